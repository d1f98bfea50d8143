"""Benchmarks of DaskCluster side by side with LocalCluster, SSHCluster and OpenSSH (issue 5).

    python benchmarks/run.py [--rounds 3] [--quick]
        [--only start3,start12,throughput,manyhosts,manyworkers]

Starts its own SSH test hosts (the project's harness, prefix ``lzbench``, 24 hosts; the first 3
serve the 3-host figures, the first 12 the 12-host ones, host 1 alone the 32 workers of
``manyworkers``), runs every contestant alternately (A B C D A B C D ...), each cold
start in a fresh Python process, prints a table and the issue's target ratios with PASS/MISS,
writes ``docs/benchmarks.md`` and ``docs/benchmarks.png``, and tears the hosts down (also on
Ctrl-C and errors). Run as root (network-namespace hosts). Not part of the test run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dask_lazycluster.testing.hosts import HarnessError, TestHosts, clear_stale  # noqa: E402

CONTESTANT = Path(__file__).resolve().parent / "contestant.py"
KINDS = ["local", "sshcluster", "dask-tunnel", "dask-direct", "dask-tunnel-sp", "dask-remote",
         "dask-remote-tunnel"]
# The opt-in scheduler process and the scheduler on a host are measured at 3 hosts only (their
# trade-offs show there).
KINDS_12 = [k for k in KINDS if k not in ("dask-tunnel-sp", "dask-remote", "dask-remote-tunnel")]
# Many hosts (issue 12): 24 hosts with one worker each. Many workers: 32 on one host.
MANY_HOSTS = 24
MANY_WORKERS = 32
SECTIONS = ("start3", "start12", "throughput", "manyhosts", "manyworkers")
LABELS = {"local": "LocalCluster", "sshcluster": "SSHCluster", "dask-tunnel": "DaskCluster(tunnel=True)",
          "dask-direct": "DaskCluster(tunnel=False)",
          "dask-tunnel-sp": "DaskCluster(tunnel=True), scheduler-process: true",
          "dask-remote": "DaskCluster(scheduler_host=host 1, tunnel=\"auto\")",
          "dask-remote-tunnel": "DaskCluster(scheduler_host=host 1, tunnel=True)"}
SHORT = {"local": "Local", "sshcluster": "SSHCluster", "dask-tunnel": "Dask tunnel",
         "dask-direct": "Dask direct", "dask-tunnel-sp": "Dask tunnel+sp",
         "dask-remote": "Dask remote auto", "dask-remote-tunnel": "Dask remote tunnel"}
TP_MODES = ["asyncssh", "openssh", "direct"]
TP_LABELS = {"asyncssh": "Runtime.expose_port_from_runtime (asyncssh)",
             "openssh": "OpenSSH ssh -L", "direct": "direct TCP (no SSH)"}
SINK_PORT = 7777
SINK = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
buf = bytearray(1 << 20)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        n += k
    c.sendall(str(n).encode())
    c.close()
"""

_children: list[subprocess.Popen[Any]] = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- process helpers -------------------------------------------------------------------------


def _group_procs(pgid: int) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == pgid and p.pid != os.getpid():
                procs.append(p)
    return procs


def kill_group(proc: subprocess.Popen[Any], grace: float = 0.0) -> list[str]:
    """Kill a child's process group (after up to ``grace`` s for it to empty); return stragglers."""
    pgid = proc.pid
    deadline = time.monotonic() + grace
    left = _group_procs(pgid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _group_procs(pgid)
    names = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                names.append(" ".join(p.cmdline())[:120])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(5)
    if proc in _children:
        _children.remove(proc)
    return names


def spawn(argv: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[Any]:
    proc = subprocess.Popen(argv, env=env, start_new_session=True, **kwargs)
    _children.append(proc)
    return proc


# -- the benchmark ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
        self.only = set(args.only.split(",")) if args.only else set(SECTIONS)
        if self.only - set(SECTIONS):
            raise SystemExit(f"error: unknown --only section(s) {sorted(self.only - set(SECTIONS))}")
        self.tmp = Path(tempfile.mkdtemp(prefix="lzbench-"))
        self.logdir = self.tmp / "logs"
        self.logdir.mkdir()
        self.hosts: TestHosts | None = None
        self.mgr: TestHosts | None = None
        self.runs: list[dict[str, Any]] = []
        self.stragglers: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.seq = 0

    # -- setup --------------------------------------------------------------------------------

    def snapshot_package(self) -> None:
        """Copy dask_lazycluster so every run of this benchmark measures the same code."""
        src = Path(self.args.package).resolve() if self.args.package else ROOT / "dask_lazycluster"
        dst = self.tmp / "pkg" / "dask_lazycluster"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        digest = hashlib.sha256()
        for f in sorted(dst.rglob("*")):
            if f.is_file():
                digest.update(str(f.relative_to(dst)).encode() + f.read_bytes())
        self.pkg_digest = digest.hexdigest()[:12]
        git = ["git", "-C", str(src.parent)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "dask_lazycluster"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        self.pkg_commit = head
        self.pkg_dirty = [line[3:] for line in dirty if line.strip()]

    def env(self) -> dict[str, str]:
        assert self.hosts is not None
        env = dict(os.environ)
        env["HOME"] = str(self.hosts.home)  # asyncssh reads ~/.ssh from $HOME
        env["PYTHONPATH"] = str(self.tmp / "pkg") + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def up(self) -> None:
        prefix = self.args.prefix
        try:
            clear_stale(prefix)
            clear_stale(prefix + "m")
        except HarnessError as exc:
            raise SystemExit(f"error: {exc} (python -m dask_lazycluster.testing down --prefix "
                             f"{prefix})") from exc
        n = MANY_HOSTS if "manyhosts" in self.only else 12 if "start12" in self.only else 3
        log(f"starting {n} test hosts (prefix {prefix}) ...")
        self.hosts = TestHosts(n, prefix=prefix).up(timeout=60)
        if self.hosts.mode != "netns":
            raise SystemExit("error: run as root: the benchmark needs network-namespace hosts")
        # SSHCluster starts its scheduler over SSH too: an sshd on the manager itself (the
        # harness in local mode, sharing the fake home), its scheduler bound to the bridge address.
        self.mgr = TestHosts(1, mode="local", prefix=prefix + "m", home=self.hosts.home).up(timeout=30)
        log(f"hosts up: {', '.join(self.hosts.names)}; manager sshd "
            f"{self.mgr.hosts[0].address}:{self.mgr.hosts[0].port} for SSHCluster's scheduler")

    def down(self) -> None:
        for proc in list(_children):
            kill_group(proc)
        for h in (self.mgr, self.hosts):
            if h is not None:
                with contextlib.suppress(Exception):
                    h.down()
        self.mgr = self.hosts = None
        shutil.rmtree(self.tmp / "pkg", ignore_errors=True)  # the logs stay for a look

    # -- cleanliness between runs --------------------------------------------------------------

    def wait_clean(self, after: str, timeout: float = 45.0) -> None:
        """Wait until no process is left on the hosts (and the manager sshd); kill stragglers."""
        assert self.hosts is not None and self.mgr is not None
        t = time.monotonic()
        deadline = t + timeout
        while True:
            left = {n: p for n, p in self.hosts.leftover_processes().items() if p}
            left.update({f"manager-sshd:{n}": p for n, p in self.mgr.leftover_processes().items() if p})
            if not left:
                waited = time.monotonic() - t
                if waited > 5:
                    self.stragglers.append({"after": after, "gone_after_s": round(waited, 1),
                                            "killed": False})
                time.sleep(1.0)  # let the CPUs settle before the next contestant
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.stragglers.append({"after": after, "killed": True,
                                "processes": {k: v[:4] for k, v in left.items()}})
        log(f"  stragglers after {after} still there after {timeout:g} s: killing {left}")
        for name in self.hosts.names:
            self._kill_pids(self.hosts.pids(name))
        for name in self.mgr.names:
            self._kill_pids(self.mgr.pids(name))

    @staticmethod
    def _kill_pids(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()

    # -- cluster runs --------------------------------------------------------------------------

    def run_cluster(self, kind: str, n: int, figures: list[str], rnd: int, *, hosts: int | None = None,
                    extra: list[str] | None = None, timeout: float | None = None) -> None:
        """One contestant in a fresh process: n workers on the first ``hosts`` hosts (default n)."""
        assert self.hosts is not None and self.mgr is not None
        self.seq += 1
        nh = n if hosts is None else hosts
        names = self.hosts.names[:nh]
        addresses = {h.name: h.address for h in self.hosts.hosts[:nh]}
        netns = {h.name: h.netns for h in self.hosts.hosts[:nh]}
        logfile = self.logdir / f"{self.seq:03d}-{kind}-{n}.log"
        argv = [sys.executable, str(CONTESTANT), "cluster", "--kind", kind, "--n", str(n),
                "--hosts", ",".join(names), "--addresses", json.dumps(addresses),
                "--connect-options", json.dumps(self.hosts.connect_options()),
                "--scheduler-ssh-host", self.mgr.names[0],
                "--scheduler-address", self.hosts.manager_address,
                "--figures", ",".join(figures), "--reps", "1" if self.quick else "3",
                "--timeout", "240" if n > 12 else "120", "--host-netns", json.dumps(netns),
                *(extra or [])]
        if timeout is None:
            timeout = 240 if n <= 3 else 360 if n <= 12 else 600
        log(f"round {rnd + 1}: {LABELS[kind]}, {n} workers{' + ' + ','.join(figures) if figures else ''}")
        with open(logfile, "w") as err:
            t0 = time.time()
            proc = spawn([*argv, "--t0", repr(t0)], self.env(), stdout=subprocess.PIPE,
                         stderr=err, stdin=subprocess.DEVNULL, text=True)
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                out = ""
                log(f"  TIMEOUT after {timeout} s: killed (log {logfile})")
            wall = time.time() - t0
        left = kill_group(proc, grace=10)
        if left:
            self.stragglers.append({"after": f"{kind}/{n} (manager)", "killed": True,
                                    "processes": {"manager": left}})
        result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")),
                      None)
        if result is None:
            text = logfile.read_text(errors="replace").strip().splitlines()
            tail = text[-15:]
            errors = list(dict.fromkeys(  # distinct exception lines, in order
                line.strip() for line in text
                if re.match(r"\s*[\w.]+(Error|Exception|Timeout\w*):", line)))
            self.failures.append({"kind": kind, "n": n, "round": rnd + 1, "rc": proc.returncode,
                                  "log": str(logfile), "errors": errors[:6], "tail": tail})
            log(f"  FAILED (rc {proc.returncode}); log tail:\n    " + "\n    ".join(tail))
        else:
            result.update(round=rnd, wall_s=wall)
            self.runs.append(result)
            brief = {k: round(v, 3) for k, v in result.items()
                     if k.endswith("_s") and isinstance(v, float)}
            log(f"  {brief}")
        self.wait_clean(f"{kind}/{n} round {rnd + 1}")

    # -- raw tunnel throughput -----------------------------------------------------------------

    def run_throughput(self) -> None:
        assert self.hosts is not None
        host = self.hosts.hosts[0]
        nbytes = (256 if self.quick else 1024) << 20
        self.tp_bytes = nbytes
        sink = self.hosts.popen(host.name, [sys.executable, "-c", SINK, str(SINK_PORT)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        _children.append(sink)
        try:
            assert sink.stdout is not None
            ready = _readline(sink.stdout, 20)
            if ready.strip() != "ready":
                raise RuntimeError(f"sink server in {host.name} did not start")
            self.tp_info: dict[str, Any] = {}
            for rnd in range(self.rounds):
                for mode in TP_MODES:
                    log(f"round {rnd + 1}: throughput {TP_LABELS[mode]}, {nbytes >> 20} MiB")
                    try:
                        rate = self._throughput_once(mode, host.name, host.address, nbytes)
                        self.runs.append({"kind": f"tp-{mode}", "round": rnd, "tp_MBps": rate})
                        log(f"  {rate:.0f} MB/s")
                    except Exception as exc:  # recorded, the rest goes on
                        self.failures.append({"kind": f"tp-{mode}", "round": rnd + 1,
                                              "errors": [repr(exc)]})
                        log(f"  FAILED: {exc!r}")
        finally:
            kill_group(sink)
            # the sink ran under `ip netns exec`: make sure nothing of it is left in the host
            self._kill_pids(self.hosts.pids(host.name))

    def _throughput_once(self, mode: str, name: str, address: str, nbytes: int) -> float:
        assert self.hosts is not None
        holder: subprocess.Popen[Any] | None = None
        try:
            if mode == "direct":
                target = (address, SINK_PORT)
            else:
                port = _free_local_port()
                if mode == "asyncssh":
                    holder = spawn([sys.executable, str(CONTESTANT), "forward", "--host", name,
                                    "--remote-port", str(SINK_PORT), "--local-port", str(port),
                                    "--connect-options", json.dumps(self.hosts.connect_options())],
                                   self.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=open(self.logdir / "forward.log", "a"), text=True)
                    assert holder.stdout is not None
                    line = _readline(holder.stdout, 30)
                    if not line.startswith("READY "):
                        raise RuntimeError(f"asyncssh forward did not start: {line!r}")
                    self.tp_info["asyncssh"] = json.loads(line[6:])
                else:
                    holder = spawn([*self.hosts.ssh_argv(name), "-N", "-o", "ExitOnForwardFailure=yes",
                                    "-L", f"127.0.0.1:{port}:127.0.0.1:{SINK_PORT}"],
                                   self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=open(self.logdir / "forward.log", "a"))
                    self.tp_info["openssh"] = _openssh_cipher(self.hosts, name)
                target = ("127.0.0.1", port)
                _wait_port(target, 30, holder)
            return _send(target, nbytes)
        finally:
            if holder is not None:
                with contextlib.suppress(Exception):
                    if holder.stdin:  # the asyncssh holder cleans up when its stdin closes
                        holder.stdin.close()
                    else:
                        holder.terminate()
                    holder.wait(10)
                kill_group(holder)

    # -- main flow -----------------------------------------------------------------------------

    def run(self) -> None:
        self.started = dt.datetime.now(dt.timezone.utc)
        self.load_start = os.getloadavg()
        self.snapshot_package()
        self.up()
        self.wait_clean("setup")
        if "start3" in self.only:
            for rnd in range(self.rounds):
                for kind in KINDS:
                    self.run_cluster(kind, 3, ["tasks", "transfer", "scale"], rnd)
        if "start12" in self.only:
            for rnd in range(self.rounds):
                for kind in KINDS_12:
                    self.run_cluster(kind, 12, [], rnd)
        if "manyhosts" in self.only:
            # cold start of 24 hosts, 4000 tasks, then 10 s idle with the cluster up
            for rnd in range(self.rounds):
                for kind in KINDS_12:
                    self.run_cluster(kind, MANY_HOSTS, ["tasks", "idle", "sessions"], rnd,
                                     extra=["--tasks", "4000", "--idle", "10"])
        if "manyworkers" in self.only:
            # 32 workers on host 1: scale 1 -> 32 (SSHCluster cannot scale: a cold start of 32
            # with worker_options n_workers=32), then the host's memory when idle
            for rnd in range(self.rounds):
                for kind in KINDS_12:
                    start_n = MANY_WORKERS if kind == "sshcluster" else 1
                    figures = ["hostmem"] if kind == "sshcluster" else ["scaleto", "hostmem"]
                    self.run_cluster(kind, MANY_WORKERS, figures, rnd, hosts=1,
                                     extra=["--start-n", str(start_n), "--idle", "5"])
        if "throughput" in self.only:
            self.run_throughput()
        self.load_end = os.getloadavg()
        self.finished = dt.datetime.now(dt.timezone.utc)

    def state(self) -> dict[str, Any]:
        """Everything the report needs, JSON-serialisable (``--json`` saves it, ``--render`` reads it)."""
        load = "/".join(f"{x:.1f}" for x in self.load_start) + " / " + "/".join(
            f"{x:.1f}" for x in getattr(self, "load_end", os.getloadavg()))
        finished = getattr(self, "finished", dt.datetime.now(dt.timezone.utc))
        machine = machine_info()
        machine.update({
            "dask_lazycluster": (f"commit {self.pkg_commit}"
                                 + (f" + uncommitted changes in {', '.join(self.pkg_dirty)}"
                                    if self.pkg_dirty else "")
                                 + f" (snapshot sha256 {self.pkg_digest})"),
            "date": f"{self.started:%Y-%m-%d %H:%M} – {finished:%H:%M} UTC",
            "load average (1/5/15 min) at start / end": load,
            "rounds": str(self.rounds) + (" (--quick)" if self.quick else ""),
        })
        return {"command": " ".join(["python benchmarks/run.py", *sys.argv[1:]]),
                "machine": machine, "runs": self.runs, "failures": self.failures,
                "stragglers": self.stragglers, "tp_info": getattr(self, "tp_info", {}),
                "tp_bytes": getattr(self, "tp_bytes", 0)}


def machine_info() -> dict[str, str]:
    from importlib.metadata import version

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10).stderr.strip()
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "dask": version("dask"), "distributed": version("distributed"),
        "asyncssh": version("asyncssh"), "OpenSSH": ssh_v.split(",")[0],
    }


# -- small helpers -----------------------------------------------------------------------------


def _readline(stream: Any, timeout: float) -> str:
    """Read one line from a child's pipe, bounded by timeout."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return ""
        return str(stream.readline())
    finally:
        sel.close()


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(target: tuple[str, int], timeout: float, proc: subprocess.Popen[Any] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"forward process exited ({proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(target, timeout=2) as s:
            s.shutdown(socket.SHUT_WR)
            s.recv(64)  # the sink answers "0": the whole path works
            return
        time.sleep(0.05)
    raise TimeoutError(f"{target} not reachable within {timeout:g} s")


def _send(target: tuple[str, int], nbytes: int) -> float:
    """Send nbytes of random data; return MB/s until the sink confirmed receiving all of it."""
    chunk = memoryview(os.urandom(1 << 20))
    with socket.create_connection(target, timeout=120) as s:
        t = time.perf_counter()
        sent = 0
        while sent < nbytes:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            data = s.recv(64)
            if not data:
                break
            reply += data
        elapsed = time.perf_counter() - t
    if int(reply or b"0") != nbytes:
        raise RuntimeError(f"sink received {reply!r} of {nbytes} bytes")
    return nbytes / elapsed / 1e6


def _openssh_cipher(hosts: TestHosts, name: str) -> dict[str, Any]:
    """The cipher OpenSSH negotiates with the host (first of the client's list the host offers)."""
    argv = hosts.ssh_argv(name, "true")
    argv.insert(1, "-v")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    for line in p.stderr.splitlines():
        if "kex: client->server cipher:" in line:
            return {"cipher": line.split("cipher:")[1].split()[0]}
    return {}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -- results -----------------------------------------------------------------------------------


class Report:
    """Tables, ratios, markdown and plot from a run's state (``Bench.state()`` or its JSON)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.s = state
        self.runs: list[dict[str, Any]] = state["runs"]

    def values(self, kind: str, key: str, n: int | None = None) -> list[float]:
        out = []
        for r in self.runs:
            if r.get("kind") == kind and (n is None or r.get("n") == n):
                v = r.get(key)
                if isinstance(v, int | float):
                    out.append(float(v))
        return out

    def med(self, kind: str, key: str, n: int | None = None) -> float | None:
        return median(self.values(kind, key, n))

    def max_conns(self, kind: str, key: str, n: int) -> int | None:
        vals = [max(r[key].values()) for r in self.runs
                if r.get("kind") == kind and r.get("n") == n and r.get(key)]
        return max(vals) if vals else None

    # ---

    def table_rows(self) -> list[list[str]]:
        """Rows of the main table: label, then one cell per contestant."""
        rows: list[list[str]] = []

        def cell(kind: str, key: str, n: int | None, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
            vals = self.values(kind, key, n)
            if not vals:
                return "n/a"
            m = statistics.median(vals) * scale
            text = fmt.format(m)
            if len(vals) > 1:
                text += f" ({fmt.format(min(vals) * scale)}–{fmt.format(max(vals) * scale)})"
            return text

        specs = [
            ("1. cold start to 3 workers ready, s", "start_s", 3, "{:.2f}", 1.0),
            ("1. cold start to 12 workers ready, s", "start_s", 12, "{:.2f}", 1.0),
            ("   of which imports, s (3 workers)", "import_s", 3, "{:.2f}", 1.0),
            ("   manager CPU (user+sys) until ready, s (3)", "cpu_s", 3, "{:.2f}", 1.0),
            ("   manager CPU (user+sys) until ready, s (12)", "cpu_s", 12, "{:.2f}", 1.0),
            ("   1-min load average when ready (3 workers)", "load1", 3, "{:.1f}", 1.0),
            ("2. scale 3 → 6 (all registered), s", "scale_up_s", 3, "{:.2f}", 1.0),
            ("2. scale 6 → 3 (gone from scheduler), s", "scale_down_s", 3, "{:.2f}", 1.0),
            ("3. 2000 trivial tasks round trip, s", "tasks_s", 3, "{:.2f}", 1.0),
            ("4. worker-to-worker 100 MB, s", "transfer_s", 3, "{:.2f}", 1.0),
            ("6. manager RSS after start, MB (3 workers)", "rss", 3, "{:.0f}", 1e-6),
            ("6. manager RSS after start, MB (12 workers)", "rss", 12, "{:.0f}", 1e-6),
            ("   scheduler RSS (its own process or host), MB (3)", "scheduler_rss", 3, "{:.0f}", 1e-6),
            ("   close(), s (3 workers)", "close_s", 3, "{:.2f}", 1.0),
            (f"7. {MANY_HOSTS} hosts, 1 worker each: cold start to all ready, s", "start_s", MANY_HOSTS,
             "{:.2f}", 1.0),
            (f"   manager CPU (user+sys) until ready, s ({MANY_HOSTS})", "cpu_s", MANY_HOSTS, "{:.2f}", 1.0),
            (f"   4000 trivial tasks round trip, s ({MANY_HOSTS} hosts)", "tasks_s", MANY_HOSTS, "{:.2f}",
             1.0),
            (f"   idle manager CPU per host, % of a core ({MANY_HOSTS} hosts, 10 s)", "idle_cpu_pct_per_host",
             MANY_HOSTS, "{:.2f}", 1.0),
            (f"   idle manager CPU, all hosts, % of a core ({MANY_HOSTS} hosts)", "idle_cpu_pct", MANY_HOSTS,
             "{:.1f}", 1.0),
            (f"   manager RSS after start, MB ({MANY_HOSTS} workers)", "rss", MANY_HOSTS, "{:.0f}", 1e-6),
            (f"8. {MANY_WORKERS} workers on 1 host: scale 1 → {MANY_WORKERS} (all registered), s",
             "scaleto_s", MANY_WORKERS, "{:.2f}", 1.0),
            ("   the same, per worker added, s", "scaleto_per_worker_s", MANY_WORKERS, "{:.3f}", 1.0),
            (f"   process start to {MANY_WORKERS} workers ready, s (SSHCluster: cold start with "
             f"n_workers={MANY_WORKERS})", "start_all_s", MANY_WORKERS, "{:.2f}", 1.0),
            ("   host memory when idle, RSS per worker, MB", "host_rss_per_worker", MANY_WORKERS,
             "{:.0f}", 1e-6),
            ("   host memory when idle, PSS per worker, MB", "host_pss_per_worker", MANY_WORKERS,
             "{:.0f}", 1e-6),
            ("   host memory when idle, RSS of all its processes, MB", "host_rss", MANY_WORKERS,
             "{:.0f}", 1e-6),
            ("   processes on the host (sshd's own not counted)", "host_procs", MANY_WORKERS, "{:.0f}", 1.0),
        ]
        for label, key, n, fmt, scale in specs:
            rows.append([label] + [cell(k, key, n, fmt, scale) for k in KINDS])
        for label, key, n in (("6. SSH connections per host (3 workers)", "ssh_conns", 3),
                              ("6. SSH connections per host (12 workers)", "ssh_conns", 12),
                              ("6. SSH connections per host (6 workers on 3 hosts)", "ssh_conns_2n", 3),
                              (f"6. SSH connections per host ({MANY_HOSTS} workers)", "ssh_conns",
                               MANY_HOSTS),
                              (f"6. SSH connections per host ({MANY_WORKERS} workers on 1 host)",
                               "ssh_conns_scaled", MANY_WORKERS),
                              (f"6. SSH connections per host ({MANY_WORKERS} workers on 1 host, SSHCluster "
                               "cold start)", "ssh_conns", MANY_WORKERS)):
            cells = []
            for k in KINDS:
                m = self.max_conns(k, key, n)
                if key == "ssh_conns" and n == MANY_WORKERS and k != "sshcluster":
                    m = None  # the others' figure is the one after scaling, the row above
                cells.append("n/a" if m is None or k == "local" else f"{m} (max)")
            rows.append([label, *cells])
        for label, n in ((f"6. SSH sessions per host ({MANY_HOSTS} workers)", MANY_HOSTS),
                         (f"6. SSH sessions on the host ({MANY_WORKERS} workers on 1 host)", MANY_WORKERS)):
            cells = []
            for k in KINDS:
                vals = self.values(k, "host_sessions", n)
                cells.append("n/a" if not vals or k == "local" else f"{max(vals):.0f} (max)")
            rows.append([label, *cells])
        return rows

    def ratios(self) -> list[dict[str, Any]]:
        m = self.med
        out: list[dict[str, Any]] = []

        def add(name: str, value: float | None, op: str, target: float, unit: str = "x",
                note: str = "") -> None:
            if value is None:
                verdict = "n/a"
            else:
                ok = value <= target if op == "<=" else value >= target
                verdict = "PASS" if ok else "MISS"
            out.append({"name": name, "value": value, "op": op, "target": target, "unit": unit,
                        "verdict": verdict, "note": note})

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        t3, s3, l3 = m("dask-tunnel", "start_s", 3), m("sshcluster", "start_s", 3), m("local", "start_s", 3)
        add("cold start 3 workers: DaskCluster(tunnel=True) / SSHCluster", ratio(t3, s3), "<=", 0.6)
        add("cold start 3 workers: DaskCluster(tunnel=True) / LocalCluster", ratio(t3, l3), "<=", 2.0)
        d3 = m("dask-direct", "start_s", 3)
        add("cold start 3 workers: DaskCluster(tunnel=False) / SSHCluster", ratio(d3, s3), "<=", 0.6,
            note="same target, direct mode (informative)")
        t12 = m("dask-tunnel", "start_s", 12)
        add("cold start: DaskCluster(tunnel=True) 12 hosts / 3 hosts", ratio(t12, t3), "<=", 1.5)
        add("cold start: DaskCluster(tunnel=False) 12 hosts / 3 hosts",
            ratio(m("dask-direct", "start_s", 12), d3), "<=", 1.5, note="informative")
        add("cold start: SSHCluster 12 hosts / 3 hosts",
            ratio(m("sshcluster", "start_s", 12), s3), "<=", 1.5, note="peer, informative")
        add("cold start: LocalCluster 12 workers / 3 workers",
            ratio(m("local", "start_s", 12), l3), "<=", 1.5, note="floor, informative")
        add("scale 3 → 6, DaskCluster(tunnel=True), seconds", m("dask-tunnel", "scale_up_s", 3), "<=", 1.5,
            unit="s")
        add("scale 3 → 6, DaskCluster(tunnel=False), seconds", m("dask-direct", "scale_up_s", 3), "<=",
            1.5, unit="s", note="informative")
        ts = m("sshcluster", "tasks_s", 3)
        add("2000 tasks: DaskCluster(tunnel=False) / SSHCluster", ratio(m("dask-direct", "tasks_s", 3), ts),
            "<=", 1.0)
        add("2000 tasks: DaskCluster(tunnel=True) / SSHCluster", ratio(m("dask-tunnel", "tasks_s", 3), ts),
            "<=", 1.15)
        sp = "opt-in scheduler-process: true (informative)"
        add("2000 tasks: DaskCluster(tunnel=True), scheduler process / SSHCluster",
            ratio(m("dask-tunnel-sp", "tasks_s", 3), ts), "<=", 1.15, note=sp)
        add("cold start 3 workers: DaskCluster(tunnel=True), scheduler process / SSHCluster",
            ratio(m("dask-tunnel-sp", "start_s", 3), s3), "<=", 0.6, note=sp)
        # The scheduler on a host (issue 16): only the client's link crosses SSH.
        rs = "scheduler on host 1, tunnel=\"auto\" (all hosts direct here)"
        add("2000 tasks: DaskCluster(scheduler_host) / SSHCluster",
            ratio(m("dask-remote", "tasks_s", 3), ts), "<=", 1.0, note=rs)
        add("worker-to-worker 100 MB: DaskCluster(scheduler_host) / SSHCluster (throughput)",
            ratio(m("sshcluster", "transfer_s", 3), m("dask-remote", "transfer_s", 3)), ">=", 0.9,
            note=rs)
        add("cold start 3 workers: DaskCluster(scheduler_host) / SSHCluster",
            ratio(m("dask-remote", "start_s", 3), s3), "<=", 0.8, note=rs)
        rt = "scheduler on host 1, tunnel=True (informative)"
        add("2000 tasks: DaskCluster(scheduler_host, tunnel=True) / SSHCluster",
            ratio(m("dask-remote-tunnel", "tasks_s", 3), ts), "<=", 1.0, note=rt)
        add("cold start 3 workers: DaskCluster(scheduler_host, tunnel=True) / SSHCluster",
            ratio(m("dask-remote-tunnel", "start_s", 3), s3), "<=", 0.8, note=rt)
        add("raw tunnel throughput: asyncssh forward / OpenSSH ssh -L",
            ratio(m("tp-asyncssh", "tp_MBps"), m("tp-openssh", "tp_MBps")), ">=", 1.0)
        # worker-to-worker: throughput ratio = direct time / tunnel time
        add("worker-to-worker 100 MB: tunnel / direct (throughput)",
            ratio(m("dask-direct", "transfer_s", 3), m("dask-tunnel", "transfer_s", 3)), ">=", 0.5)
        # Many workers on one host (issue 12): the supervisor forks each from its one session.
        add(f"scale 1 → {MANY_WORKERS} on one host, DaskCluster(tunnel=True), seconds per worker",
            m("dask-tunnel", "scaleto_per_worker_s", MANY_WORKERS), "<=", 0.3, unit="s")
        add(f"scale 1 → {MANY_WORKERS} on one host, DaskCluster(tunnel=False), seconds per worker",
            m("dask-direct", "scaleto_per_worker_s", MANY_WORKERS), "<=", 0.3, unit="s",
            note="informative")
        add(f"cold start {MANY_HOSTS} workers: DaskCluster(tunnel=True) / SSHCluster",
            ratio(m("dask-tunnel", "start_s", MANY_HOSTS), m("sshcluster", "start_s", MANY_HOSTS)), "<=",
            0.6, note="the 3-host target at 24 hosts (informative)")
        for kind in ("dask-tunnel", "dask-direct"):
            conns = [self.max_conns(kind, key, n) for key, n in
                     (("ssh_conns", 3), ("ssh_conns", 12), ("ssh_conns_2n", 3), ("ssh_conns", MANY_HOSTS),
                      ("ssh_conns_scaled", MANY_WORKERS))]
            known = [c for c in conns if c is not None]
            add(f"SSH connections per host, {LABELS[kind]} (max over 3, 12, {MANY_HOSTS} hosts, 6 workers "
                f"on 3 and {MANY_WORKERS} on 1)", float(max(known)) if known else None, "<=", 1, unit="")
        return out

    # ---

    def print(self) -> None:
        rows = self.table_rows()
        width = max(len(r[0]) for r in rows)
        cols = [max(len(SHORT[k]), *(len(r[i + 1]) for r in rows)) for i, k in enumerate(KINDS)]
        print()
        print(" " * width + " | " + " | ".join(SHORT[k].ljust(c) for k, c in zip(KINDS, cols, strict=True)))
        print("-" * (width + sum(c + 3 for c in cols)))
        for row in rows:
            cells = (v.ljust(c) for v, c in zip(row[1:], cols, strict=True))
            print(row[0].ljust(width) + " | " + " | ".join(cells))
        print()
        print("5. raw throughput through one forward, MB/s (median of rounds):")
        for mode in TP_MODES:
            rate = self.med(f"tp-{mode}", "tp_MBps")
            print(f"   {TP_LABELS[mode]:48} {'n/a' if rate is None else f'{rate:.0f}'}")
        print()
        print("Targets (issue 5), ratios of medians:")
        for r in self.ratios():
            v = "n/a" if r["value"] is None else f"{r['value']:.2f}{r['unit']}"
            note = f"  [{r['note']}]" if r["note"] else ""
            print(f"  {r['verdict']:4}  {r['name']}: {v} (target {r['op']} {r['target']:g}{r['unit']}){note}")
        if self.s['failures']:
            print(f"\n{len(self.s['failures'])} failed run(s):")
            for f in self.s['failures']:
                print(f"  {f['kind']} n={f.get('n')} round {f['round']}: {f.get('errors')}"
                      f" (log {f.get('log')})")
        if self.s['stragglers']:
            print("\nProcesses left on the hosts after a run:")
            for s in self.s['stragglers']:
                print(f"  {s}")

    # ---

    def markdown(self, png: str | None) -> str:
        st = self.s
        lines = ["# Benchmarks", "",
                 f"Generated by `{st['command']}` (issue 5). Do not edit by hand: re-run it "
                 "(findings kept by hand go to `benchmarks/notes.md`, included below).",
                 "", "## Machine and versions", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in st["machine"].items()]
        lines += ["", "## Targets", "", "Ratios of medians from this run.", "",
                  "| verdict | figure | measured | target |", "|---|---|---|---|"]
        for r in self.ratios():
            v = "n/a" if r["value"] is None else f"{r['value']:.2f}{r['unit']}"
            name = r["name"] + (f" *({r['note']})*" if r["note"] else "")
            lines.append(f"| **{r['verdict']}** | {name} | {v} | {r['op']} {r['target']:g}{r['unit']} |")
        if png:
            lines += ["", f"![cold start and target ratios]({png})"]
        lines += ["", "## Results", "",
                  "Median over rounds (min–max in brackets). One worker per host (LocalCluster runs "
                  "as many local workers), except section 8: 32 workers on host 1.", "",
                  "| figure | " + " | ".join(LABELS[k] for k in KINDS) + " |",
                  "|---|" + "---|" * len(KINDS)]
        for row in self.table_rows():
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"### 5. Raw throughput through one forward ({st.get('tp_bytes', 0) >> 20} MiB "
                  "of random data, one connection)", "", "| path | MB/s | cipher |", "|---|---|---|"]
        info = st.get("tp_info", {})
        for mode in TP_MODES:
            vals = self.values(f"tp-{mode}", "tp_MBps")
            v = "n/a" if not vals else f"{statistics.median(vals):.0f}" + (
                f" ({min(vals):.0f}–{max(vals):.0f})" if len(vals) > 1 else "")
            cipher = info.get(mode, {}).get("cipher", "—")
            lines.append(f"| {TP_LABELS[mode]} | {v} | {cipher} |")
        if st["failures"] or st["stragglers"]:
            lines += ["", "## Incidents", ""]
            for f in st["failures"]:
                what = LABELS.get(f["kind"], f["kind"]) + (f", {f['n']} workers" if "n" in f else "")
                lines.append(f"- failed run: {what}, round {f['round']}: "
                             + " / ".join(f"`{e[:300]}`" for e in f.get("errors") or f["tail"][-2:]))
            for g in st["stragglers"]:
                lines.append(f"- processes left on the hosts after {g['after']}: "
                             + (f"gone after {g['gone_after_s']} s" if not g["killed"]
                                else f"killed after the wait: {json.dumps(g.get('processes'))[:400]}"))
        lines += ["", "## Method", "",
                  "- Test hosts: the project's harness (`dask_lazycluster.testing.TestHosts`), 12 "
                  "network namespaces on one bridge, each with its own sshd; the 3-worker figures use "
                  "the first 3. All hosts share this machine's cores, so every remote interpreter "
                  "competes with the manager for the same CPUs; the machine is also shared with "
                  "other work (see the load average), so single numbers are noisy.",
                  "- Contestants run alternately (A B C D A B C D ...), each cold start in a fresh "
                  "Python subprocess started with `HOME` at the harness's fake home; the time runs "
                  "from just before the subprocess is spawned (interpreter start and imports "
                  "included) until a `Client` sees every worker registered with status running on "
                  "the scheduler (polled every 20 ms).",
                  "- `LocalCluster(n_workers=N, processes=True)` on the manager is the floor. "
                  "`SSHCluster`: `hosts=[manager] + worker hosts`; the manager is reached through an "
                  "extra sshd on the manager itself (the harness in local mode on 127.0.0.x), the "
                  "scheduler is bound to the bridge address 10.231.0.1 (`scheduler_options={'host': "
                  "..., 'port': 0}`) and the workers to `interface='eth0'`, because the default "
                  "addresses are unroutable here; `remote_python=sys.executable`. `DaskCluster` runs "
                  "with its defaults (Nanny workers, scheduler in-process), except the "
                  "`scheduler_host` contestants, whose scheduler runs on host 1 with the workers "
                  "(`tunnel=\"auto\"`, which finds every host direct here, and `tunnel=True`). "
                  "Every contestant keeps "
                  "its default dashboard and thread counts.",
                  "- In the same process after the cold start (warm): 2000 tasks "
                  "`client.gather(client.map(inc, range(2000), pure=False))` after a 20-task warm-up; "
                  "100 MB of `os.urandom` made on a worker of host 1 and consumed by `len` on a "
                  "worker of host 2 (time from submit of the consumer to its result); scale to 2N "
                  "until 2N workers run, then back to N until the scheduler lists N. Each of these is "
                  "the median of 3 repetitions inside the process, then the median over rounds. "
                  "SSHCluster cannot scale (no worker template), hence n/a.",
                  "- Manager RSS: `psutil` RSS of the manager process right after the start (for "
                  "SSHCluster the scheduler is a separate process, shown on its own row). SSH "
                  "connections: established TCP connections of the manager process to port 22 of "
                  "each host (`psutil`), the maximum over hosts.",
                  f"- Many hosts (7): {MANY_HOSTS} hosts, one worker each, contestants as at 12 hosts. "
                  "After the cold start, 4000 tasks (`inc` as above, median of 3), then the manager "
                  "process's CPU time over 10 s of idleness with the cluster up (for SSHCluster plus its "
                  "scheduler process on the manager; the others run the scheduler in-process), as % of "
                  "a core, divided by the hosts. SSH sessions per host: processes in the host whose "
                  "parent is an sshd process (each session's command), the maximum over hosts.",
                  f"- Many workers (8): {MANY_WORKERS} workers on host 1. DaskCluster and LocalCluster "
                  f"start with 1 worker, then `scale({MANY_WORKERS})` is timed until {MANY_WORKERS} "
                  f"workers run (per worker: divided by {MANY_WORKERS - 1}); SSHCluster cannot scale and "
                  f"cold-starts {MANY_WORKERS} workers with `worker_options={{'n_workers': "
                  f"{MANY_WORKERS}}}` (its way to many workers on a host, over one connection). After 5 s "
                  "of idleness, RSS and PSS (`psutil` `memory_full_info`) summed over every process in the "
                  "host's network namespace except sshd's own (supervisor, nannies, workers, shells); "
                  "for LocalCluster over the manager's child processes. RSS counts pages shared after "
                  "fork once per process, PSS shares them out.",
                  "- Raw throughput: a sink server inside host 1 counts bytes until EOF and answers the "
                  "count; the benchmark process sends random data in 1 MiB `sendall` calls through: "
                  "an asyncssh local forward held by `Runtime.expose_port_from_runtime` in another "
                  "process, a plain `ssh -N -L` (OpenSSH defaults), or directly to the host's address.",
                  "- Between runs the benchmark waits until no process other than sshd's listener is "
                  "left in any host (and under the manager's extra sshd); stragglers are reported "
                  "above. Every subprocess and wait has a timeout.",
                  "- The package is snapshotted at the start (`PYTHONPATH`), so concurrent edits do not "
                  "change the code under test mid-run.", ""]
        notes = Path(__file__).resolve().parent / "notes.md"
        if notes.exists():  # hand-written findings (profiles, what each change bought) stay apart
            lines += ["## Notes", "", f"*(kept by hand in `benchmarks/{notes.name}`)*", "",
                      notes.read_text().strip(), ""]
        return "\n".join(lines)

    def plot(self, path: Path) -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log("matplotlib not installed: no plot (pip install matplotlib)")
            return False
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.5]})
        colors = {"local": "#9e9e9e", "sshcluster": "#e08a2c", "dask-tunnel": "#2c6fbb",
                  "dask-direct": "#63a6e0", "dask-tunnel-sp": "#7e57c2", "dask-remote": "#2e9e5b",
                  "dask-remote-tunnel": "#8bc79f"}
        width = 0.8 / len(KINDS)
        for i, kind in enumerate(KINDS):
            # A contestant not measured at some size gets no bar there (not a bar of 0).
            points = [(x + (i - (len(KINDS) - 1) / 2) * width, v) for x, n in enumerate((3, 12, MANY_HOSTS))
                      if (v := self.med(kind, "start_s", n)) is not None]
            bars = ax1.bar([p[0] for p in points], [p[1] for p in points], width,
                           label=LABELS[kind], color=colors[kind])
            ax1.bar_label(bars, fmt="%.1f", fontsize=7)
        ax1.set_xticks(range(3), [f"{n} workers\n({n} hosts)" for n in (3, 12, MANY_HOSTS)])
        ax1.set_ylabel("seconds (median)")
        ax1.set_title("Cold start to all workers ready")
        ax1.set_ylim(0, ax1.get_ylim()[1] * 1.4)  # headroom: the legend sits above the bars
        ax1.legend(fontsize=7, loc="upper left")
        ratios = [r for r in self.ratios() if r["value"] is not None and not r["note"]
                  and r["unit"] == "x"]
        names = [textwrap.fill(r["name"].replace("DaskCluster", "DC").replace("(tunnel=True)", "(tunnel)")
                               .replace("(tunnel=False)", "(direct)"), 34) for r in ratios]
        ys = range(len(ratios))
        ax2.barh(ys, [r["value"] for r in ratios],
                 color=["#4caf50" if r["verdict"] == "PASS" else "#e53935" for r in ratios])
        for y, r in zip(ys, ratios, strict=True):
            ax2.plot([r["target"], r["target"]], [y - 0.4, y + 0.4], color="black", lw=2)
            ax2.text(max(r["value"], r["target"]) * 1.01, y, f" {r['value']:.2f} ({r['op']} {r['target']:g})",
                     va="center",
                     fontsize=7)
        ax2.set_yticks(list(ys), names, fontsize=7)
        ax2.invert_yaxis()
        ax2.set_title("Target ratios (black tick = target; green PASS, red MISS)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per figure (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="1 round, 1 repetition inside each process, 256 MiB throughput")
    parser.add_argument("--only", default="", help="comma list of " + ",".join(SECTIONS))
    parser.add_argument("--prefix", default="lzbench", help="test host prefix")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.*")
    parser.add_argument("--package", default="", metavar="DIR",
                        help="measure this dask_lazycluster directory (e.g. of an older checkout) "
                             "instead of the one next to this script")
    parser.add_argument("--json", default="", help="also save the results (state) to this file")
    parser.add_argument("--render", default="", metavar="JSON",
                        help="only re-render the report and docs from a saved --json file")
    args = parser.parse_args()
    if args.render:
        return finish(json.loads(Path(args.render).read_text()), args)
    if args.rounds is not None and not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1..20")
    if os.geteuid() != 0:
        parser.error("run as root: the benchmark starts network-namespace test hosts")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: tearing down")
        return 130
    finally:
        bench.down()
        log(f"test hosts down; logs in {bench.logdir}")
    state = bench.state()
    if args.json:
        Path(args.json).write_text(json.dumps(state, indent=1))
    return finish(state, args)


def finish(state: dict[str, Any], args: argparse.Namespace) -> int:
    report = Report(state)
    report.print()
    if not args.no_docs:
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        png = docs / "benchmarks.png"
        has_png = report.plot(png)
        (docs / "benchmarks.md").write_text(report.markdown("benchmarks.png" if has_png else None))
        log(f"wrote {docs / 'benchmarks.md'}" + (f" and {png}" if has_png else ""))
    return 0

if __name__ == "__main__":
    sys.exit(main())
