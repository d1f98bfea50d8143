"""Tests of the real-SSH test hosts harness itself (real sshd, real namespaces, no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import CompletedProcess

import psutil
import pytest

from dask_lazycluster.testing import HarnessError, HostSpec, TestHosts, running_sets, system
from dask_lazycluster.testing.hosts import clear_stale, read_state
from dask_lazycluster.testing.pytest_plugin import start_hosts
from dask_lazycluster.testing.specs import NVIDIA_SMI

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="netns mode needs root")


def _netns(hosts: TestHosts) -> None:
    if hosts.mode != "netns":
        pytest.skip("needs netns mode (root)")


def _ssh(hosts: TestHosts, name: str, *command: str, **opts: str) -> CompletedProcess[str]:
    extra = [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]
    argv = hosts.ssh_argv(name, *command)
    return subprocess.run(argv[:1] + extra + argv[1:], capture_output=True, text=True, timeout=30)


def _tcp_ok(hosts: TestHosts, name: str, address: str, port: int, timeout: int = 2) -> bool:
    """Whether host name can open a TCP connection to address:port."""
    script = f"exec 3<>/dev/tcp/{address}/{port}"
    res = hosts.run(name, ["timeout", str(timeout), "bash", "-c", script])
    return res.returncode == 0


@pytest.fixture
def manager_listener() -> Iterator[int]:
    """A TCP listener on all of the manager's addresses; yields its port."""
    with socket.create_server(("0.0.0.0", 0), backlog=50) as server:
        yield server.getsockname()[1]


@pytest.fixture
def listener_in() -> Iterator[Callable[..., None]]:
    """Factory starting a TCP listener on port 8000 inside a host; stops them afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(hosts: TestHosts, name: str, port: int = 8000) -> None:
        code = (f"import socket, time; s = socket.create_server(('0.0.0.0', {port})); "
                "time.sleep(60)")
        procs.append(hosts.popen(name, [sys.executable, "-c", code]))
        deadline = time.monotonic() + 10
        while port not in hosts.listening_ports(name):
            assert time.monotonic() < deadline, f"listener on {name}:{port} did not start"
            time.sleep(0.02)

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_hosts_come_up_clean(test_hosts: TestHosts) -> None:
    assert len(test_hosts.hosts) == len(test_hosts.names) >= 1
    for name in test_hosts.names:
        res = _ssh(test_hosts, name, "echo", "hello")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "hello"
    for h in test_hosts.hosts:
        assert h.port in test_hosts.listening_ports(h.name)  # 22 in netns mode
    # SSH sessions of earlier test modules may take a moment to end (the fixtures are shared)
    deadline = time.monotonic() + 15
    while test_hosts.leftover_processes() != {n: [] for n in test_hosts.names}:
        assert time.monotonic() < deadline, test_hosts.leftover_processes()
        time.sleep(0.2)


def test_each_host_has_its_own_temp_dir(test_hosts: TestHosts) -> None:
    code = "import tempfile; print(tempfile.gettempdir())"
    dirs = []
    for name in test_hosts.names:
        own = str(test_hosts.host_tmpdir(name))
        res = _ssh(test_hosts, name, f"echo $TMPDIR; {sys.executable} -c '{code}'")
        assert res.stdout.split() == [own, own], res.stderr  # sessions and python see it
        assert test_hosts.run(name, [sys.executable, "-c", code]).stdout.strip() == own
        assert Path(own).is_dir() and own.startswith(str(test_hosts.tmpdir))
        dirs.append(own)
    assert len(set(dirs)) == len(dirs)
    assert test_hosts in running_sets()


def test_own_hostnames(test_hosts: TestHosts) -> None:
    _netns(test_hosts)
    code = "import socket; print(socket.gethostname())"
    for name in test_hosts.names:
        res = _ssh(test_hosts, name, f"hostname; {sys.executable} -c '{code}'")
        assert res.stdout.split() == [name, name], res.stderr
        assert test_hosts.run(name, ["hostname"]).stdout.strip() == name


def test_hosts_reach_each_other_and_manager(test_hosts: TestHosts, manager_listener: int) -> None:
    _netns(test_hosts)
    assert test_hosts.manager_address == "10.231.0.1"
    for h in test_hosts.hosts:
        assert _tcp_ok(test_hosts, h.name, test_hosts.manager_address, manager_listener)
        for other in test_hosts.hosts:
            assert _tcp_ok(test_hosts, h.name, other.address, 22)


def test_manager_default_route_address_unreachable(test_hosts: TestHosts,
                                                   manager_listener: int) -> None:
    _netns(test_hosts)
    route = subprocess.run(["ip", "route", "get", "1.1.1.1"], capture_output=True, text=True)
    match = re.search(r"\bsrc (\S+)", route.stdout)
    if route.returncode or match is None:
        pytest.skip("the manager has no default route, so no default-route address to test")
    address = match.group(1)
    socket.create_connection((address, manager_listener), timeout=2).close()  # it listens there
    res = test_hosts.run(test_hosts.names[0],
                         ["bash", "-c", f"exec 3<>/dev/tcp/{address}/{manager_listener}"])
    assert res.returncode != 0
    assert "unreachable" in res.stderr


def test_firewall_only_ssh_open(test_hosts: TestHosts, firewalled_hosts: TestHosts,
                                listener_in: Callable[..., None]) -> None:
    fw, plain = firewalled_hosts.hosts[0], test_hosts.hosts[0]
    listener_in(firewalled_hosts, fw.name)
    listener_in(test_hosts, plain.name)
    socket.create_connection((fw.address, 22), timeout=2).close()
    socket.create_connection((plain.address, 8000), timeout=2).close()
    with pytest.raises(OSError):
        socket.create_connection((fw.address, 8000), timeout=1).close()
    # outbound from the firewalled host is not restricted
    assert _tcp_ok(firewalled_hosts, fw.name, plain.address, 8000)
    assert firewalled_hosts.leftover_processes()[fw.name]  # the listener counts as leftover


def test_shared_home_resolves_both_sets(test_hosts: TestHosts, firewalled_hosts: TestHosts,
                                        ssh_home: Path) -> None:
    asyncssh = pytest.importorskip("asyncssh")
    assert Path.home() == ssh_home == test_hosts.home == firewalled_hosts.home

    async def hostname(name: str) -> str:
        async with asyncssh.connect(name) as conn:  # resolved through ~/.ssh/config only
            return str((await conn.run("hostname", check=True)).stdout).strip()

    for name in (test_hosts.names[0], firewalled_hosts.names[-1]):
        assert asyncio.run(hostname(name)) == name


def test_connect_options_for_asyncssh(test_hosts: TestHosts) -> None:
    asyncssh = pytest.importorskip("asyncssh")

    async def echo() -> str:
        async with asyncssh.connect(test_hosts.names[-1], **test_hosts.connect_options()) as conn:
            return str((await conn.run("echo ok", check=True)).stdout).strip()

    assert asyncio.run(echo()) == "ok"


def test_host_keys_are_verified(test_hosts: TestHosts, tmp_path: Path) -> None:
    name = test_hosts.names[0]
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    other_key = " ".join((tmp_path / "k.pub").read_text().split()[:2])
    bad = tmp_path / "known_hosts"
    bad.write_text("".join(f"{line.split()[0]} {other_key}\n"
                           for line in test_hosts.known_hosts.read_text().splitlines()
                           if line and not line.startswith("#")))
    res = _ssh(test_hosts, name, "true", UserKnownHostsFile=str(bad))
    assert res.returncode == 255
    assert "verification failed" in res.stderr or "IDENTIFICATION HAS CHANGED" in res.stderr
    empty = tmp_path / "empty"
    empty.write_text("")
    assert _ssh(test_hosts, name, "true", UserKnownHostsFile=str(empty)).returncode == 255
    assert _ssh(test_hosts, name, "true").returncode == 0


def test_refuses_to_start_over_running_set(test_hosts: TestHosts) -> None:
    with pytest.raises(HarnessError, match="down"):
        TestHosts(1, mode=test_hosts.mode, prefix=test_hosts.prefix).up()
    assert test_hosts.prefix in read_state()  # the failed attempt did not drop the record
    with pytest.raises(HarnessError, match="in use"):
        clear_stale(test_hosts.prefix)


@needs_root
def test_faults_and_teardown() -> None:
    clear_stale("lztd")
    hosts = TestHosts(2, prefix="lztd").up()  # addresses picked automatically
    try:
        a, b = hosts.hosts
        assert (a.netns, b.netns) == ("lztd1", "lztd2")
        others = [info for prefix, info in read_state().items() if prefix != "lztd"]
        taken = {h["address"] for info in others for h in info["hosts"]}
        assert not taken & {a.address, b.address}
        # a detached process in a host shows up as leftover and is killed by down()
        assert _ssh(hosts, a.name, "nohup sleep 300 >/dev/null 2>&1 &").returncode == 0
        assert any("sleep 300" in c for c in hosts.leftover_processes()[a.name])
        # link down cuts the host off; up restores it
        hosts.set_link(b.name, False)
        assert not _tcp_ok(hosts, a.name, b.address, 22, timeout=1)
        hosts.set_link(b.name, True)
        assert _tcp_ok(hosts, a.name, b.address, 22)
        # sshd restart keeps the host key (known_hosts still verifies)
        hosts.kill_sshd(b.name)
        assert 22 not in hosts.listening_ports(b.name)
        hosts.start_sshd(b.name)
        deadline = time.monotonic() + 10
        while _ssh(hosts, b.name, "true").returncode != 0:
            assert time.monotonic() < deadline, "sshd did not come back"
            time.sleep(0.05)
        pids = [hosts._pids[n] for n in hosts.names] + hosts.pids(a.name)
        tmpdir = hosts.tmpdir
        assert tmpdir is not None and tmpdir.exists()
        assert hosts in running_sets()
        TestHosts.from_state("lztd").down()  # as the CLI's `down` does, from the state file
    finally:
        hosts.down()  # idempotent
    hosts.down()
    assert hosts not in running_sets()
    assert not tmpdir.exists()
    assert "lztd" not in read_state()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(r"^lztd\d", names, re.M)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "lztd1b" not in links and "lztd2b" not in links
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


@needs_root
def test_addresses_held_by_a_foreign_namespace_are_skipped() -> None:
    """A namespace not made by the harness holding a test address on this machine."""
    from dask_lazycluster.testing.network import SUBNET

    clear_stale("lzfa")
    recorded = {int(h["address"].rsplit(".", 1)[1])
                for info in read_state().values() for h in info["hosts"]}
    base = next(b for b in range(10, 250, 10) if not recorded & {b + 1, b + 2})
    foreign = "lzforeign"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        subprocess.run(["ip", "-n", foreign, "addr", "add", f"{SUBNET}.{base + 1}/24", "dev",
                        "lo"], check=True)
        with TestHosts(2, prefix="lzfa") as hosts:
            got = {h.address for h in hosts.hosts}
            assert f"{SUBNET}.{base + 1}" not in got, got
            assert hosts.first_host is not None and hosts.first_host > base
            assert _ssh(hosts, hosts.names[0], "hostname").stdout.strip() == "lzfa1"
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=False)


def test_local_mode() -> None:
    clear_stale("lzloc")
    with TestHosts(2, mode="local", prefix="lzloc") as hosts:
        assert hosts.manager_address == "127.0.0.1"
        first = hosts.first_host or 0
        assert [h.address for h in hosts.hosts] == [f"127.0.0.{first + 1}", f"127.0.0.{first + 2}"]
        assert all(h.port >= 22200 and h.netns is None for h in hosts.hosts)
        assert "[lzloc1]:" in hosts.known_hosts.read_text()
        assert _ssh(hosts, "lzloc2", "true").returncode == 0
        assert hosts.listening_ports("lzloc1") == {hosts.hosts[0].port}
        # processes detached from a session are still tracked (by the session's environment)
        assert _ssh(hosts, "lzloc2", "nohup sleep 301 >/dev/null 2>&1 &").returncode == 0
        deadline = time.monotonic() + 10
        while not any("sleep 301" in c for c in hosts.leftover_processes()["lzloc2"]):
            assert time.monotonic() < deadline, hosts.leftover_processes()
            time.sleep(0.05)
        sleeper = [p for p in hosts.pids("lzloc2") if "sleep" in psutil.Process(p).name()]
        with pytest.raises(HarnessError):
            hosts.set_link("lzloc1", False)
        tmpdir = hosts.tmpdir
    assert tmpdir is not None and not tmpdir.exists()
    assert sleeper and not [p for p in sleeper if psutil.pid_exists(p)
                            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(HarnessError, match="netns"):
        TestHosts(1, firewall=True, mode="local")


def test_missing_binary_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(system.PACKAGES, "no-such-sshd", "openssh-server")
    with pytest.raises(HarnessError, match="apt-get install -y openssh-server"):
        system.find_bin("no-such-sshd")


@needs_root
def test_cli_up_status_down() -> None:
    clear_stale("lzcli")
    cli = [sys.executable, "-m", "dask_lazycluster.testing"]
    up = subprocess.run([*cli, "up", "1", "--prefix", "lzcli"],
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    config = re.search(r"ssh -F (\S+) lzcli1", up.stdout)
    assert config is not None, up.stdout
    # how to use the hosts by name, and under the names the docs' examples use
    home = Path(config.group(1)).parent.parent
    assert "--install-ssh-config" in up.stdout and f"HOME={home} " in up.stdout, up.stdout
    assert "--prefix node" in up.stdout
    try:  # the hosts outlive the CLI process
        res = subprocess.run(["ssh", "-F", config.group(1), "lzcli1", "hostname"],
                             capture_output=True, text=True, timeout=30)
        assert res.stdout.strip() == "lzcli1", res.stderr
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=60)
        assert "lzcli1" in status.stdout and "sshd running" in status.stdout
        info = read_state()["lzcli"]
        assert info["owner_pid"] is None and json.dumps(info)
    finally:
        down = subprocess.run([*cli, "down", "--prefix", "lzcli"], capture_output=True,
                              text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert "lzcli" not in read_state()
    assert not Path(config.group(1)).exists()


def test_cli_install_ssh_config_makes_the_names_work(tmp_path: Path) -> None:
    # docs/quickstart.md "Trying it without machines": up --install-ssh-config, then the
    # names work for ssh -F ~/.ssh/config and for Runtime(NAME); down restores the config.
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    user_config = home / ".ssh" / "config"
    original = "Host elsewhere\n    HostName elsewhere.invalid\n"
    user_config.write_text(original)
    env = {**os.environ, "HOME": str(home),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    cli = [sys.executable, "-m", "dask_lazycluster.testing"]
    clear_stale("lzcfg")
    up = subprocess.run([*cli, "up", "1", "--prefix", "lzcfg", "--install-ssh-config"],
                        capture_output=True, text=True, timeout=60, env=env)
    assert up.returncode == 0, up.stderr
    try:
        assert "Runtime('lzcfg1')" in up.stdout, up.stdout
        text = user_config.read_text()
        assert text.endswith(original) and re.match(r"# .*\nInclude /\S+/config\n", text), text
        res = subprocess.run(["ssh", "-F", str(user_config), "-o", "BatchMode=yes", "lzcfg1",
                              "echo", "reached"], capture_output=True, text=True, timeout=30)
        assert res.stdout.strip() == "reached", res.stderr
        code = ("from dask_lazycluster import Runtime, RuntimeTask\n"
                "r = Runtime('lzcfg1')\n"
                "t = r.execute_task(RuntimeTask('t').run_function(lambda: 6 * 7),"
                " execute_async=False)\n"
                "print(list(t.function_returns))\n"
                "r.cleanup()\n")
        py = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=env)
        assert py.stdout.strip() == "[42]", py.stderr
    finally:
        down = subprocess.run([*cli, "down", "--prefix", "lzcfg"], capture_output=True,
                              text=True, timeout=60, env=env)
    assert down.returncode == 0, down.stderr
    assert user_config.read_text() == original
    assert "lzcfg" not in read_state()


# -- stock sshd limits ---------------------------------------------------------------------------

async def _open_sessions(hosts: TestHosts, name: str, k: int) -> int:
    """Open up to k sessions on one connection; return how many sshd accepted."""
    import asyncssh

    async with asyncssh.connect(name, **hosts.connect_options()) as conn:
        procs = []
        try:
            for _ in range(k):
                try:
                    procs.append(await conn.create_process("cat"))  # ends on EOF at close
                except asyncssh.ChannelOpenError:
                    break
            return len(procs)
        finally:
            for p in procs:
                p.stdin.write_eof()


def test_stock_session_limit(test_hosts: TestHosts, make_hosts: Callable[..., TestHosts]) -> None:
    config = (Path(str(test_hosts.tmpdir)) / test_hosts.names[0] / "sshd_config").read_text()
    assert "MaxSessions" not in config and "MaxStartups" not in config
    assert asyncio.run(_open_sessions(test_hosts, test_hosts.names[0], 11)) == 10
    roomy = make_hosts(1, "lzroomy", max_sessions=20, max_startups="50:30:100")
    assert asyncio.run(_open_sessions(roomy, roomy.names[0], 11)) == 11
    config = (Path(str(roomy.tmpdir)) / roomy.names[0] / "sshd_config").read_text()
    assert "MaxSessions 20\n" in config and "MaxStartups 50:30:100\n" in config


# -- hosts that differ ---------------------------------------------------------------------------

GPU_LINE = re.compile(r"GPU (\d+): NVIDIA Stand-in \(UUID: GPU-[0-9a-f-]{36}\)")
MIB_300 = 300 * 2**20


@pytest.fixture(scope="module")
def spec_hosts(test_hosts: TestHosts) -> Iterator[TestHosts]:
    """lzspec1: 1 core, 300 MiB, an env var, 2 GPUs; lzspec2: Python at /opt/lzenv; lzspec3 plain."""
    _netns(test_hosts)
    specs = {1: HostSpec(cpus=1, memory="300M", env={"LZ_MARK": "one two"}, gpus=2),
             2: HostSpec().with_python_at("/opt/lzenv")}
    with start_hosts("lzspec", 3, home=test_hosts.home, specs=specs) as hosts:
        yield hosts


def _on_each(hosts: TestHosts, script: str) -> list[str]:
    """Stdout of script (run by the login shell) on every host, in order."""
    out = []
    for name in hosts.names:
        res = _ssh(hosts, name, script)
        out.append(res.stdout.strip())
    return out


def test_spec_cpus(spec_hosts: TestHosts) -> None:
    py = f"{sys.executable} -c 'import os; print(sorted(os.sched_getaffinity(0)))'"
    one, _, plain = _on_each(spec_hosts, f"nproc; {py}")
    assert one.split("\n") == ["1", "[0]"]
    assert plain.split("\n") == [str(len(os.sched_getaffinity(0))),
                                 str(sorted(os.sched_getaffinity(0)))]
    # the cpuset cgroup enforces it: a session cannot widen its affinity
    widen = (f"{sys.executable} -c 'import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))}); "
             "print(sorted(os.sched_getaffinity(0)))'")
    assert _ssh(spec_hosts, spec_hosts.names[0], widen).stdout.strip() == "[0]"
    # run() enters the same host
    assert spec_hosts.run(spec_hosts.names[0], ["nproc"]).stdout.strip() == "1"


def test_spec_memory_limit(spec_hosts: TestHosts) -> None:
    limit_file = "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    one = _ssh(spec_hosts, spec_hosts.names[0], f"cat {limit_file}")
    assert one.stdout.strip() == str(MIB_300), one.stderr
    # distributed's own reading of the limit (it tries the same file) agrees
    code = "from distributed.system import memory_limit; print(memory_limit())"
    res = _ssh(spec_hosts, spec_hosts.names[0], f"{sys.executable} -c '{code}'")
    assert res.stdout.strip() == str(MIB_300), res.stderr
    # and the limit is enforced: 400 MiB do not fit
    grab = f"{sys.executable} -c 'b = bytearray(400 * 2**20); b[::4096] = b\"x\" * len(b[::4096])'"
    assert _ssh(spec_hosts, spec_hosts.names[0], f"{grab}; echo rc=$?").stdout.strip() == "rc=137"
    # a host without a memory spec has no limit file of its own
    assert _ssh(spec_hosts, spec_hosts.names[2], f"cat {limit_file}").returncode != 0


def test_spec_env_on_one_host_only(spec_hosts: TestHosts) -> None:
    # seen by the login shell (after root's ~/.bashrc ran) and by a program it starts
    seen = _on_each(spec_hosts, "echo \"[$LZ_MARK]\"; env | grep -c '^LZ_MARK=one two$'")
    assert seen == ["[one two]\n1", "[]\n0", "[]\n0"]


def test_spec_python_elsewhere(spec_hosts: TestHosts) -> None:
    one, moved, plain = spec_hosts.names
    code = "import sys, dask_lazycluster; print(sys.prefix, sys.version.split()[0])"
    res = _ssh(spec_hosts, moved, f"/opt/lzenv/bin/python3 -c '{code}'")
    assert res.stdout.split() == ["/opt/lzenv", sys.version.split()[0]], res.stderr
    # the manager's interpreter path does not exist there, but does on the other hosts
    assert _ssh(spec_hosts, moved, f"test -e {sys.executable}").returncode == 1
    assert _ssh(spec_hosts, moved, f"ls -A {sys.prefix}").stdout == ""
    for name in (one, plain):
        assert _ssh(spec_hosts, name, f"test -e {sys.executable}").returncode == 0
        assert _ssh(spec_hosts, name, "test -e /opt/lzenv").returncode == 1
    assert not Path("/opt/lzenv").exists()  # nothing was written to the machine's files


def test_spec_gpus(spec_hosts: TestHosts) -> None:
    one, moved, plain = spec_hosts.names
    lines = _ssh(spec_hosts, one, "nvidia-smi -L").stdout.splitlines()
    assert [GPU_LINE.fullmatch(line) is not None for line in lines] == [True, True]
    assert [m.group(1) for m in map(GPU_LINE.fullmatch, lines) if m] == ["0", "1"]
    query = _ssh(spec_hosts, one, "nvidia-smi --query-gpu=index,memory.total "
                                  "--format=csv,noheader,nounits")
    assert query.stdout.splitlines() == ["0, 16384", "1, 16384"]
    bad = _ssh(spec_hosts, one, "nvidia-smi --no-such-flag")
    assert bad.returncode == 2 and "Invalid combination" in bad.stderr
    for name in (moved, plain):
        assert _ssh(spec_hosts, name, "command -v nvidia-smi").returncode == 1
    assert not Path(NVIDIA_SMI).exists()


def test_spec_validation_and_local_mode(test_hosts: TestHosts) -> None:
    with pytest.raises(ValueError, match="spec of lzv1: cpus must be"):
        TestHosts(1, prefix="lzv", mode="netns", specs={1: HostSpec(cpus=99)})
    with pytest.raises(ValueError, match="spec of lzv2: memory"):
        TestHosts(2, prefix="lzv", mode="netns", specs=[None, HostSpec(memory="lots")])
    with pytest.raises(ValueError, match="hide '/no/such/dir'"):
        TestHosts(1, prefix="lzv", mode="netns", specs={"lzv1": HostSpec(hide=["/no/such/dir"])})
    with pytest.raises(ValueError, match="specs key 3"):
        TestHosts(2, prefix="lzv", mode="netns", specs={3: HostSpec(gpus=1)})
    with pytest.raises(ValueError, match="env"):
        TestHosts(1, prefix="lzv", mode="netns", specs={1: HostSpec(env={"A B": "x"})})
    with pytest.raises(ValueError, match="bastion=True needs n >= 2"):
        TestHosts(1, prefix="lzv", mode="netns", bastion=True)
    with pytest.raises(ValueError, match="max_sessions"):
        TestHosts(1, prefix="lzv", max_sessions=-1)  # 0 is valid: forwarding only
    for kwargs in ({"specs": {1: HostSpec(gpus=1)}}, {"bastion": True}):
        with pytest.raises(HarnessError, match="needs netns mode"):
            TestHosts(2, prefix="lzv", mode="local", **kwargs)
    assert "lzv" not in read_state()


# -- bastion -------------------------------------------------------------------------------------

def test_bastion(make_hosts: Callable[..., TestHosts], ssh_home: Path,
                 manager_listener: int) -> None:
    import asyncssh

    hosts = make_hosts(3, "lzjump", bastion=True)
    jump, behind, other = hosts.hosts
    assert (jump.jump, behind.jump, other.jump) == (None, jump.name, jump.name)
    assert f"Host {behind.name}\n" in hosts.ssh_config.read_text()
    for h in hosts.hosts:  # every host by name, those behind through the jump host
        res = _ssh(hosts, h.name, "hostname")
        assert res.stdout.strip() == h.name, res.stderr
    direct = _ssh(hosts, behind.name, "true", ProxyJump="none", ConnectTimeout="2")
    assert direct.returncode == 255 and "timed out" in direct.stderr
    with pytest.raises(OSError):
        socket.create_connection((behind.address, 22), timeout=1).close()
    socket.create_connection((jump.address, 22), timeout=2).close()
    # behind the bastion: the hosts reach each other, not the manager
    assert _tcp_ok(hosts, behind.name, other.address, 22)
    assert not _tcp_ok(hosts, behind.name, hosts.manager_address, manager_listener, timeout=1)
    assert _tcp_ok(hosts, jump.name, hosts.manager_address, manager_listener)

    async def hostname(**options: object) -> str:
        async with asyncssh.connect(other.name, **options) as conn:
            return str((await conn.run("hostname", check=True)).stdout).strip()

    assert asyncio.run(hostname(**hosts.connect_options())) == other.name
    assert asyncio.run(hostname()) == other.name  # by name through ~/.ssh/config alone


# -- robustness and teardown ---------------------------------------------------------------------

def _fake_rehash(root: Path) -> subprocess.Popen[bytes]:
    """A process that looks like ``pyenv rehash`` of root (name and PYENV_ROOT)."""
    env = {**os.environ, "PYENV_ROOT": str(root)}
    proc = subprocess.Popen(["bash", "-c", "exec -a pyenv-rehash sleep 30"], env=env)
    deadline = time.monotonic() + 5
    while "pyenv-rehash" not in " ".join(psutil.Process(proc.pid).cmdline()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def test_stale_pyenv_lock_removed_unless_a_rehash_holds_it(tmp_path: Path) -> None:
    lock = system.pyenv_lock(tmp_path)
    lock.parent.mkdir()
    holder = _fake_rehash(tmp_path)
    waiter = None
    try:
        lock.write_text("#!/bin/sh\n")  # written by a rehash that runs: kept
        assert not system.remove_stale_pyenv_lock(tmp_path)
        assert lock.exists()
        time.sleep(0.3)
        waiter = _fake_rehash(tmp_path)  # started after the lock: only waits for it
        holder.kill()
        holder.wait()
        assert system.remove_stale_pyenv_lock(tmp_path)
        assert not lock.exists()
        assert not system.remove_stale_pyenv_lock(tmp_path)  # nothing to do
        lock.write_text("#!/bin/sh\n")  # now the waiter may be the one that wrote it
        assert not system.remove_stale_pyenv_lock(tmp_path)
        old = time.time() - 2 * system.STALE_LOCK_AGE  # older than any rehash takes: stale
        os.utime(lock, (old, old))
        assert system.remove_stale_pyenv_lock(tmp_path)
        assert not lock.exists()
    finally:
        for proc in (holder, waiter):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_up_fails_when_logins_hang(test_hosts: TestHosts, tmp_path: Path) -> None:
    _netns(test_hosts)
    shims = system.login_pyenv_root() / "shims"
    bashrc = system.login_pyenv_root().parent / ".bashrc"  # HOME may be the fake home
    if not shims.is_dir() or "pyenv init" not in bashrc.read_text(errors="replace"):
        pytest.skip("needs a login that runs `pyenv init` (root's ~/.bashrc on these machines)")
    # on this host only, a lock held by "another" rehash: pyenv waits for it at every login
    (tmp_path / ".pyenv-shim").write_text("#!/bin/sh\n")
    clear_stale("lzhang")
    hosts = TestHosts(1, prefix="lzhang", home=test_hosts.home,
                      specs={1: HostSpec(binds={str(shims): str(tmp_path)})})
    start = time.monotonic()
    with pytest.raises(HarnessError, match=r"lzhang1: the login hangs"):
        hosts.up(timeout=4)
    assert time.monotonic() - start < 15
    assert "lzhang" not in read_state()
    assert not re.search(r"^lzhang\d", _netns_list(), re.M)
    assert "Host lzhang1" not in test_hosts.ssh_config.read_text()


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@needs_root
def test_teardown_leaves_nothing_with_specs_and_bastion(test_hosts: TestHosts) -> None:
    clear_stale("lzall")
    specs = {2: HostSpec(cpus=1, memory="256M", env={"X": "1"}, gpus=1).with_python_at(),
             3: HostSpec(hide=["/opt"])}
    hosts = TestHosts(3, prefix="lzall", home=test_hosts.home, bastion=True, firewall=True,
                      specs=specs).up()
    try:
        assert _ssh(hosts, "lzall2", "nproc; nvidia-smi -L | wc -l").stdout.split() == ["1", "1"]
        assert _ssh(hosts, "lzall3", "ls -A /opt").stdout == ""
        # a detached process in a spec host lives in its cgroup and namespaces
        assert _ssh(hosts, "lzall2", "nohup sleep 300 >/dev/null 2>&1 &").returncode == 0
        pids = [*hosts._pids.values(), *hosts.pids("lzall2")]
        cgroups = [p for paths in hosts._cgroups.values() for p in paths]
        assert len(cgroups) == 2 and all(Path(p).is_dir() for p in cgroups)
        mounts = {}
        for pid in pids:  # a process of the ssh session above may have ended meanwhile
            with contextlib.suppress(FileNotFoundError):
                mounts[pid] = os.readlink(f"/proc/{pid}/ns/mnt")
        assert set(hosts._pids.values()) <= set(mounts)  # the sshds themselves are there
        assert len(set(mounts.values()) - {os.readlink("/proc/self/ns/mnt")}) >= 1
        tmpdir = hosts.tmpdir
    finally:
        hosts.down()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not [p for p in cgroups if Path(p).exists()]
    assert not re.search(r"^lzall\d", _netns_list(), re.M)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "lzall" not in links
    assert tmpdir is not None and not tmpdir.exists()
    assert "lzall" not in read_state() and "lzall" not in test_hosts.ssh_config.read_text()
    assert "lzall" not in Path("/proc/self/mountinfo").read_text()
    assert not Path("/opt/lzenv").exists() and Path("/opt").is_dir()
    lock = system.pyenv_lock()
    assert not lock.exists() or system.remove_stale_pyenv_lock() is False  # none left stale
