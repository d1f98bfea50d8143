"""Tests of the real-SSH test hosts harness itself (real sshd, real namespaces, no mocks)."""

from __future__ import annotations

import asyncio
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

from dask_lazycluster.testing import HarnessError, TestHosts
from dask_lazycluster.testing.hosts import clear_stale, read_state

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
        assert 22 in test_hosts.listening_ports(name) or test_hosts.mode == "local"
    # SSH sessions of earlier test modules may take a moment to end (the fixtures are shared)
    deadline = time.monotonic() + 15
    while test_hosts.leftover_processes() != {n: [] for n in test_hosts.names}:
        assert time.monotonic() < deadline, test_hosts.leftover_processes()
        time.sleep(0.2)


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
        TestHosts.from_state("lztd").down()  # as the CLI's `down` does, from the state file
    finally:
        hosts.down()  # idempotent
    hosts.down()
    assert not tmpdir.exists()
    assert "lztd" not in read_state()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(r"^lztd\d", names, re.M)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "lztd1b" not in links and "lztd2b" not in links
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


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
    from dask_lazycluster.testing import hosts as harness

    monkeypatch.setitem(harness._PACKAGES, "no-such-sshd", "openssh-server")
    with pytest.raises(HarnessError, match="apt-get install -y openssh-server"):
        harness._bin("no-such-sshd")


@needs_root
def test_cli_up_status_down() -> None:
    clear_stale("lzcli")
    cli = [sys.executable, "-m", "dask_lazycluster.testing"]
    up = subprocess.run([*cli, "up", "1", "--prefix", "lzcli"],
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    config = re.search(r"ssh -F (\S+) lzcli1", up.stdout)
    assert config is not None, up.stdout
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
