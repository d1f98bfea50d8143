"""Named clusters: found, driven and stopped from other processes of the same user, on real hosts.

The owner of a cluster is a real ``dask lazycluster up --name`` subprocess or a
``DaskCluster(name=...)`` in this process; the other side is this process or a subprocess.
Records of killed owners come from real processes killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import importlib
import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dask.config
import psutil
import pytest
from distributed import Client
from distributed.core import Status

from dask_lazycluster import (
    ClusterNameInUseError,
    DaskCluster,
    LazyclusterError,
    NoPortsLeftError,
    RuntimeGroup,
    StaleClusterError,
    UnknownClusterError,
    WorkersUnavailableError,
)
from dask_lazycluster._core import live_cores
from dask_lazycluster._loop import run_sync
from dask_lazycluster.cluster._registry import Registration, registry_dir
from dask_lazycluster.cluster.discovery import discover
from dask_lazycluster.testing import TestHosts, read_state

from .conftest import wait_no_leftovers
from .test_cli import assert_one_line_error, cli_env, diagnosed, run_cli, start_up

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534

# A real registration in its own process, killed later to leave a stale record behind.
CLAIMER = """
import sys, time
from dask_lazycluster.cluster._registry import Registration
Registration(sys.argv[1]).claim()
print("claimed", flush=True)
time.sleep(600)
"""

# The other process of test_named_daskcluster_is_driven_from_another_process, asynchronous.
DRIVER = """
import asyncio, json, sys
from distributed import Client
from dask_lazycluster import DaskCluster

async def main():
    cluster = await DaskCluster.from_name(sys.argv[1], asynchronous=True)
    out = {"address": cluster.scheduler_address, "dashboard": cluster.dashboard_link,
           "pid": cluster.pid, "tls": cluster.security.require_encryption}
    await cluster.scale(2)
    async with Client(cluster, asynchronous=True, timeout=30) as client:
        await client.wait_for_workers(2, timeout=120)
        out["sum"] = await client.submit(sum, [1, 2, 3])
        out["workers"] = len(await client.nthreads())
    out["logs"] = sorted(await cluster.get_logs())
    await cluster.close()
    print(json.dumps(out), flush=True)

asyncio.run(main())
"""


def unique(tag: str) -> str:
    return f"t{os.getpid()}-{tag}"


def ssh_peers() -> set[tuple[str, int]]:
    """Remote ends of this process's TCP connections to any test host's sshd (or port 22)."""
    servers = {(h["address"], int(h["port"])) for info in read_state().values()
               for h in info["hosts"]}
    return {(c.raddr.ip, c.raddr.port) for c in psutil.Process().net_connections("tcp")
            if c.raddr and ((c.raddr.ip, c.raddr.port) in servers or c.raddr.port == 22)}


class Output:
    """A subprocess's stdout, read line by line in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.ended = threading.Event()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)
        self.ended.set()

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.ended.is_set():
                    break
                continue
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no {pattern!r} in output: {''.join(self.seen)}")


def ls_rows() -> dict[str, list[str]]:
    result = run_cli("ls")
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]
            if line.strip() and not line.startswith("No named")}


def wait_until(check: object, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@contextlib.contextmanager
def killed_claimer(name: str) -> Iterator[int]:
    """A process that claims ``name`` and is then killed with SIGKILL: yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", CLAIMER, name], env=cli_env(),
                            stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def served(name: str) -> Iterator[list[str]]:
    """A real registration of this process, answering ``info`` and ``close`` on the SSH loop.

    Yields the requests it answered.
    """
    registration = Registration(name)
    registration.claim()
    answered: list[str] = []

    async def info() -> dict[str, object]:
        answered.append("info")
        return {"hosts": ["none"], "scheduler_address": "tcp://127.0.0.1:9", "workers": 0,
                "dashboard_link": "", "requested": 0}

    async def close() -> None:
        answered.append("close")

    async def release() -> None:  # on the loop that serves
        registration.release()

    try:
        run_sync(registration.serve({"info": info, "close": close}))
        yield answered
    finally:
        run_sync(release())


# -- a cluster of `dask lazycluster up --name`, driven from this process ----------------------------


def test_up_by_name_is_listed_scaled_used_and_stopped_from_another_process(hosts: TestHosts) -> None:
    name = unique("up")
    two = hosts.names[:2]
    proc = start_up("--hosts", ",".join(two), "--n-workers", "1", "--name", name,
                    stdout=subprocess.PIPE)
    out = Output(proc)
    with diagnosed(proc):
        out.wait_for(rf"^Name: {name} ")
        address = out.wait_for(r"^Scheduler: (\S+)").group(1)
        dashboard = out.wait_for(r"^Dashboard: (\S+)").group(1)
        out.wait_for(r"^Ready: 1 worker")

        row = ls_rows()[name]
        assert row[1:4] == ["1", ",".join(two), address], row
        assert row[-1] == str(proc.pid)

        cores_before, peers_before = {id(c) for c in live_cores()}, ssh_peers()
        cluster = DaskCluster.from_name(name)
        assert cluster.status == Status.running
        assert (cluster.scheduler_address, cluster.dashboard_link) == (address, dashboard)
        assert cluster.pid == proc.pid and cluster.hosts == two
        with pytest.raises(ValueError, match="n must be"):
            cluster.scale(-1)
        # The owner's own errors come back as themselves, attributes included.
        with pytest.raises((WorkersUnavailableError, NoPortsLeftError)) as too_many:
            cluster.scale(5000)
        assert type(too_many.value) in (WorkersUnavailableError, NoPortsLeftError)
        if isinstance(too_many.value, WorkersUnavailableError):
            assert too_many.value.requested == 5000 and too_many.value.causes

        cluster.scale(3)
        with Client(cluster, timeout=30) as client:
            client.wait_for_workers(3, timeout=120)
            assert client.submit(lambda x: x + 1, 41).result(timeout=60) == 42

            def spread() -> set[str]:
                workers = client.scheduler_info()["workers"].values()
                return {w["name"].rsplit("-", 1)[0] for w in workers}

            # The first worker had its host to itself: a second one there replaces it by two
            # half-size workers (successors first), so three can be registered before the
            # other host's one is.
            wait_until(lambda: spread() == set(two), 60)
        wait_until(lambda: ls_rows()[name][1] == "3")
        logs = cluster.get_logs()
        assert "Scheduler" in logs and "Cluster" in logs
        assert len([k for k in logs if "://" in k]) == 3, list(logs)

        cluster.adapt(minimum=1, maximum=1)
        wait_until(lambda: len(cluster.scheduler_info["workers"]) == 1)
        # This process drove all of it without an SSH connection of its own.
        assert {id(c) for c in live_cores()} == cores_before and ssh_peers() == peers_before

        cluster.disconnect()  # only the proxy goes; the cluster keeps running
        assert cluster.status == Status.closed and proc.poll() is None
        assert name in ls_rows()

        down = run_cli("down", name)
        assert down.returncode == 0 and f"Stopped {name}." in down.stdout, down
        assert proc.wait(timeout=90) == 0
        out.wait_for(r"^Stopped by another process", timeout=5)
        out.wait_for(r"^Closed\.", timeout=5)
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    assert not wait_no_leftovers(hosts)
    assert name not in ls_rows()
    with pytest.raises(UnknownClusterError, match=name):
        DaskCluster.from_name(name)


# -- a DaskCluster(name=...) of this process, driven from a subprocess --------------------------------


def test_named_daskcluster_is_driven_from_another_process(hosts: TestHosts) -> None:
    name = unique("obj")
    group = RuntimeGroup(hosts=hosts.names[:2])
    try:
        with DaskCluster(group, n_workers=1, name=name, security=True) as cluster:
            # The name is taken: a second cluster fails at once, before any SSH work.
            cores = {id(c) for c in live_cores()}
            started = time.monotonic()
            with dask.config.set({"lazycluster.hosts": hosts.names}), \
                    pytest.raises(ClusterNameInUseError, match=name) as in_use:
                DaskCluster(name=name)
            assert time.monotonic() - started < 10
            assert in_use.value.name == name and in_use.value.pid == os.getpid()
            assert {id(c) for c in live_cores()} == cores

            driver = subprocess.run([sys.executable, "-c", DRIVER, name], env=cli_env(),
                                    capture_output=True, text=True, timeout=300,
                                    stdin=subprocess.DEVNULL)
            assert driver.returncode == 0, driver.stderr
            result = json.loads(driver.stdout.strip().splitlines()[-1])
            assert result["address"] == cluster.scheduler_address
            assert result["address"].startswith("tls://") and result["tls"]
            assert result["dashboard"] == cluster.dashboard_link
            assert result["pid"] == os.getpid()
            assert result["sum"] == 6 and result["workers"] == 2
            assert "Scheduler" in result["logs"]
            # The driver's close() closed this process's cluster.
            wait_until(lambda: cluster.closed_on_request, timeout=30)
            assert cluster.status == Status.closed
            assert not (registry_dir() / f"{name}.json").exists()
    finally:
        group.cleanup()
    assert not wait_no_leftovers(hosts)
    with pytest.raises(UnknownClusterError, match=name):
        DaskCluster.from_name(name)


# -- a killed owner ------------------------------------------------------------------------------------


def test_killed_owner_leaves_nothing_and_is_not_listed(hosts: TestHosts, tmp_path: Path) -> None:
    name = unique("killed")
    # Its own temp dir: the scheduler's scratch dir there cannot be removed by a killed process.
    proc = start_up("--hosts", hosts.names[0], "--n-workers", "1", "--name", name,
                    stdout=subprocess.PIPE, env={"TMPDIR": str(tmp_path)})
    out = Output(proc)
    with diagnosed(proc):
        out.wait_for(r"^Ready: 1 worker")
        assert name in ls_rows()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert not wait_no_leftovers(hosts, timeout=30)
    with pytest.raises(StaleClusterError, match=name) as stale:
        DaskCluster.from_name(name)
    assert stale.value.pid == proc.pid
    assert not (registry_dir() / f"{name}.json").exists()
    assert not (registry_dir() / f"{name}.sock").exists()
    with pytest.raises(UnknownClusterError, match=name):
        DaskCluster.from_name(name)

    # `ls` removes a stale record as it lists, and the name can be taken again.
    other = unique("killed2")
    with killed_claimer(other):
        assert (registry_dir() / f"{other}.json").exists()
        assert other not in ls_rows()
        assert not (registry_dir() / f"{other}.json").exists()
    with served(other):
        assert other in ls_rows()


# -- permissions --------------------------------------------------------------------------------------


def as_nobody(action: str, path: Path) -> int:
    """Exit status of a forked child that drops to user nobody and tries ``action`` on ``path``:
    0 it worked, 13 permission denied, 2 refused by the peer (connection ended unanswered)."""
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            if action == "read":
                with open(path) as f:
                    f.read()
            elif action == "list":
                os.listdir(path)
            else:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(10)
                    s.connect(str(path))
                    try:
                        s.sendall(b'{"op": "info"}\n')
                        answer = s.recv(100)
                    except ConnectionError:  # closed at once, our request unread
                        answer = b""
                    os._exit(0 if answer else 2)
            code = 0
        except PermissionError:
            code = 13
        except BaseException:
            code = 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_only_the_owner_can_reach_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path(tempfile.mkdtemp(prefix="lzn-", dir="/tmp"))
    try:
        monkeypatch.setenv("HOME", str(home))
        (home / ".dask-lazycluster").mkdir(mode=0o755)  # too open: tightened on first use
        name = unique("perm")
        with served(name):
            directory = registry_dir()
            for path, mode in [(directory.parent, 0o700), (directory, 0o700),
                               (directory / f"{name}.sock", 0o600),
                               (directory / f"{name}.json", 0o600)]:
                assert stat.S_IMODE(os.lstat(path).st_mode) == mode, path
            assert stat.S_ISSOCK(os.lstat(directory / f"{name}.sock").st_mode)
            if os.geteuid() != 0:
                return  # another user is needed for the rest
            assert as_nobody("list", directory) == 13
            assert as_nobody("read", directory / f"{name}.json") == 13
            assert as_nobody("connect", directory / f"{name}.sock") == 13
            # Even with the modes opened, the owner answers no other user.
            for path in (home, directory.parent, directory):
                os.chmod(path, 0o755)
            os.chmod(directory / f"{name}.sock", 0o777)
            assert as_nobody("connect", directory / f"{name}.sock") == 2
        # A directory of another user is refused, not used.
        os.chown(directory, NOBODY, NOBODY)
        with pytest.raises(PermissionError, match="must be a directory of your own"):
            Registration(unique("perm2")).claim()
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=True)


# -- errors -------------------------------------------------------------------------------------------


def test_cli_errors_name_the_cluster(hosts: TestHosts, tmp_path: Path) -> None:
    unknown = run_cli("down", unique("nosuch"))
    assert_one_line_error(unknown, unique("nosuch"), "dask lazycluster ls")
    bad = run_cli("up", "--hosts", hosts.names[0], "--name", "a/b")
    assert_one_line_error(bad, "name", "'a/b'")
    empty = run_cli("ls", home=tmp_path)
    assert empty.returncode == 0 and "No named clusters are running." in empty.stdout
    with pytest.raises(ValueError, match="name must be"):
        DaskCluster.from_name("../etc")
    taken = unique("taken")
    with served(taken) as answered:
        started = time.monotonic()
        in_use = run_cli("up", "--hosts", hosts.names[0], "--name", taken)
        assert_one_line_error(in_use, taken, "already running", f"process {os.getpid()}")
        assert time.monotonic() - started < 30
        both = run_cli("down", unique("nosuch"), taken)
        assert both.returncode == 1 and f"Stopped {taken}." in both.stdout, both
        assert answered == ["close"]
    assert not wait_no_leftovers(hosts)


# -- dask-ctl discovery ---------------------------------------------------------------------------------


def test_discovery_yields_the_running_names() -> None:
    live, dead = unique("disc"), unique("disc-dead")

    async def names() -> list[tuple[str, type]]:
        return [pair async for pair in discover()]

    with served(live), killed_claimer(dead):
        found = asyncio.run(names())
        assert (live, DaskCluster) in found
        assert dead not in [n for n, _ in found]
        assert not (registry_dir() / f"{dead}.json").exists()
    assert live not in [n for n, _ in asyncio.run(names())]

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    entry = config["options.entry_points"]["dask_cluster_discovery"].strip()
    key, target = (part.strip() for part in entry.split("="))
    module, function = target.split(":")
    assert key == "lazycluster" and getattr(importlib.import_module(module), function) is discover


def test_a_failed_start_releases_its_name(hosts: TestHosts) -> None:
    name = unique("failed")
    with dask.config.set({"lazycluster.hosts": ["lz-no-such-host.invalid"]}), \
            pytest.raises(LazyclusterError, match="lz-no-such-host.invalid"):
        DaskCluster(name=name)
    assert not (registry_dir() / f"{name}.json").exists()
    assert not (registry_dir() / f"{name}.sock").exists()
    with served(name):  # free again
        assert name in ls_rows()
