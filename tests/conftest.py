"""Shared fixtures: real SSH test hosts (see dask_lazycluster.testing) and the leak check.

The leak check runs after every test module, on both sides:

- hosts: on every host of every set this session has up, no process of ours (anything but
  sshd and the parked probe interpreters of still-open runtimes) and nothing in the host's own
  temp dir (``TestHosts.host_tmpdir``) but the working dirs of still-open runtimes;
- manager (this process): no SSH connection, no listening socket, no child process and no
  temp dir that the module added and that no still-open runtime owns, and no runtime the
  module opened and left open. The session runs with a temp dir of its own, so what it finds
  there is this session's, even while other pytest sessions run on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from dask_lazycluster import RuntimeGroup
from dask_lazycluster._core import RuntimeCore, live_cores
from dask_lazycluster.exceptions import LazyclusterError
from dask_lazycluster.testing import TestHosts, read_state, running_sets

pytest_plugins = ["dask_lazycluster.testing.pytest_plugin"]

# Seconds things may take to go away after their owner closed them (processes end when their
# SSH channel closes, sshd notices a dead client within its keepalive window).
LEAK_WAIT = float(os.environ.get("LAZYCLUSTER_LEAK_WAIT") or 15)
DASK_WORKSPACE_FILES = {"global.lock", "purge.lock"}


_SESSION_TEMP = pytest.StashKey[tuple[str, str | None, str | None]]()


def pytest_configure(config: pytest.Config) -> None:
    """Give the session a temp dir of its own (TMPDIR, inherited by every child)."""
    own = tempfile.mkdtemp(prefix="lzsession-")
    config.stash[_SESSION_TEMP] = (own, os.environ.get("TMPDIR"), tempfile.tempdir)
    os.environ["TMPDIR"] = tempfile.tempdir = own


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs SSH test hosts ``ssh``: ``pytest -m "not ssh"`` runs the rest.

    A test needs hosts when one of its fixtures (directly or through others) starts them.
    """
    host_fixtures = {"test_hosts", "firewalled_hosts", "make_hosts"}
    # Modules whose tests start hosts of their own (the harness's, the leak check's).
    own_hosts = {"test_harness.py", "test_leaks.py"}
    for item in items:
        if host_fixtures & set(getattr(item, "fixturenames", ())) or item.path.name in own_hosts:
            item.add_marker(pytest.mark.ssh)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's temp dir and restore the one before it."""
    own, env, module = config.stash[_SESSION_TEMP]
    shutil.rmtree(own, ignore_errors=True)
    if env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = env
    tempfile.tempdir = module


def parked_probe_pids() -> set[int]:
    """Probe interpreters that this process's live runtimes keep waiting (not leaks).

    Each lives at most ``PROBE_PARK_SECONDS`` and ends with its runtime's connection.
    """
    return {c.state.parked_pid for c in live_cores() if c.state.parked is not None}


def ours_left(*host_sets: TestHosts) -> dict[str, list[str]]:
    """What of ours is left in the test hosts, by host: nothing a still-open runtime owns.

    Processes other than sshd and parked probes, and entries of each host's temp dir other
    than the working dirs of live runtimes.
    """
    parked = parked_probe_pids()
    working_dirs = {c.state.wd for c in live_cores()}
    found: dict[str, list[str]] = {}
    for hosts in host_sets:
        processes = hosts.leftover_processes(ignore_pids=parked)
        for name in hosts.names:
            mine = [c for c in processes[name] if not c.startswith("sshd")]
            mine += [f"temp entry {e}" for e in hosts.temp_entries(name) if e not in working_dirs]
            if mine:
                found[name] = mine
    return found


def wait_no_leftovers(*host_sets: TestHosts, timeout: float = 15) -> dict[str, list[str]]:
    """Wait until nothing of ours is left (see ours_left); return what is left at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = ours_left(*host_sets)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


# -- the leak check ---------------------------------------------------------------------------


def _core_socket(core: RuntimeCore) -> tuple[str, int] | None:
    """The manager's end of a live core's SSH connection (through a jump host: of its hop)."""
    with contextlib.suppress(LazyclusterError):
        sockname = core.state.ssh.conn.get_extra_info("sockname")
        return (str(sockname[0]), int(sockname[1]))
    return None


def _ssh_servers() -> set[tuple[str, int]]:
    """(address, port) of every recorded test host's sshd."""
    return {(h["address"], int(h["port"])) for info in read_state().values()
            for h in info["hosts"]}


def _temp_entries(temp: Path) -> Iterator[Path]:
    """Entries of the session's temp dir that a test may have left.

    pytest's own dir is left out. Every Dask server (the in-process scheduler too) works in
    ``dask-scratch-space/<kind>-<random>``, which it removes when it closes, and keeps the
    shared ``dask-scratch-space`` with its two lock files for the next server, as Dask does
    everywhere: only what is inside besides those counts.
    """
    for entry in temp.iterdir():
        if entry.name == "dask-scratch-space" and entry.is_dir():
            yield from (e for e in entry.iterdir() if e.name not in DASK_WORKSPACE_FILES)
        elif not entry.name.startswith("pytest-of-"):
            yield entry


@dataclass(frozen=True)
class ManagerSnapshot:
    """What this process holds that a test could leak."""

    ssh: frozenset[tuple[str, int, str, int]]  # local and remote end of SSH connections
    listening: frozenset[int]
    children: frozenset[int]
    temp: frozenset[str]
    cores: frozenset[int]  # ids of live runtime cores

    @classmethod
    def take(cls) -> ManagerSnapshot:
        """Read the current state of this process."""
        me, servers = psutil.Process(), _ssh_servers()
        ssh, listening = set(), set()
        for c in me.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN:
                listening.add(c.laddr.port)
            elif c.raddr and (c.raddr.port == 22 or (c.raddr.ip, c.raddr.port) in servers):
                ssh.add((c.laddr.ip, c.laddr.port, c.raddr.ip, c.raddr.port))
        children = set()
        for p in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                # sshd of local-mode hosts and what runs under it are the hosts' side
                if p.status() != psutil.STATUS_ZOMBIE and "sshd" not in (
                        [p.name()] + [q.name() for q in p.parents()]):
                    children.add(p.pid)
        temp = {str(e) for e in _temp_entries(Path(tempfile.gettempdir()))}
        return cls(frozenset(ssh), frozenset(listening), frozenset(children), frozenset(temp),
                   frozenset(id(c) for c in live_cores()))

    def leaks_since(self, before: ManagerSnapshot) -> list[str]:
        """What this snapshot holds beyond ``before`` and beyond what live runtimes own."""
        cores = live_cores()
        owned_sockets = {s for s in map(_core_socket, cores) if s is not None}
        owned_ports = {p for c in cores for p in c.forwards.listeners}
        leaks = [f"runtime of {c.host} left open" for c in cores if id(c) not in before.cores]
        leaks += [f"SSH connection {lip}:{lport} -> {rip}:{rport}"
                  for lip, lport, rip, rport in sorted(self.ssh - before.ssh)
                  if (lip, lport) not in owned_sockets]
        leaks += [f"listening socket on port {p}"
                  for p in sorted(self.listening - before.listening - owned_ports)]
        for pid in sorted(self.children - before.children):
            with contextlib.suppress(psutil.Error):
                leaks.append(f"child process {pid}: {' '.join(psutil.Process(pid).cmdline())}")
        leaks += [f"temp entry {t}" for t in sorted(self.temp - before.temp)]
        return leaks


def _clear_host_leaks() -> None:
    """Kill leftover processes and remove leftover temp entries, so the next module starts clean."""
    parked = parked_probe_pids()
    working_dirs = {c.state.wd for c in live_cores()}
    for hosts in running_sets():
        for name in hosts.names:
            for pid in hosts.pids(name):
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    if pid not in parked and not proc.name().startswith("sshd"):
                        proc.kill()
            for entry in map(Path, hosts.temp_entries(name)):
                if str(entry) not in working_dirs:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)


@pytest.fixture(scope="module", autouse=True)
def leak_check() -> Iterator[None]:
    """After every module: nothing of ours left on any test host or in this process.

    Set up before the module's other fixtures, so it checks after they are torn down.
    """
    before = ManagerSnapshot.take()
    yield
    deadline = time.monotonic() + LEAK_WAIT
    while True:
        on_hosts = ours_left(*running_sets())
        on_manager = ManagerSnapshot.take().leaks_since(before)
        if (not on_hosts and not on_manager) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if on_hosts:
        _clear_host_leaks()
    if on_hosts or on_manager:
        lines = [f"  {host}: {item}" for host, items in on_hosts.items() for item in items]
        lines += [f"  manager: {item}" for item in on_manager]
        pytest.fail(f"left behind after the module ({LEAK_WAIT:g} s after its fixtures "
                    "closed):\n" + "\n".join(lines), pytrace=False)


# -- host fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hosts(test_hosts: TestHosts, ssh_home: object) -> TestHosts:
    """The unfirewalled hosts, resolvable by name through the fake ``~/.ssh/config``."""
    return test_hosts


@pytest.fixture(scope="session")
def fw_hosts(firewalled_hosts: TestHosts, ssh_home: object) -> TestHosts:
    """Hosts that accept inbound TCP on port 22 only."""
    return firewalled_hosts


@pytest.fixture(scope="session")
def netns(hosts: TestHosts) -> TestHosts:
    """The hosts, when each is its own network namespace (tunnel tests need that)."""
    if hosts.mode != "netns":
        pytest.skip("needs netns test hosts (run as root): hosts share the manager's ports")
    return hosts


@pytest.fixture(scope="session")
def python_without_distributed(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python the test hosts can run that cannot import distributed: a bare venv made here.

    The machine's own ``python3`` may or may not have distributed; this one never has. The
    hosts share the manager's filesystem in both harness modes, so the path works there.
    """
    env_dir = tmp_path_factory.mktemp("no-distributed")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True,
                   capture_output=True, timeout=120)
    python = str(env_dir / "bin" / "python")
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as in an SSH session
    check = subprocess.run([python, "-c", "import distributed"], capture_output=True, env=plain)
    assert check.returncode != 0, f"{python} can import distributed"
    return python


@pytest.fixture(scope="module")
def group(hosts: TestHosts) -> Iterator[RuntimeGroup]:
    """A RuntimeGroup over every test host, shared by a module's tests."""
    runtime_group = RuntimeGroup(hosts=hosts.names)
    yield runtime_group
    runtime_group.cleanup()
