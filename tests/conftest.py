"""Shared fixtures: real SSH test hosts (see dask_lazycluster.testing) and leak checks."""

from __future__ import annotations

import glob
from collections.abc import Iterator

import pytest

from dask_lazycluster import RuntimeGroup
from dask_lazycluster.runtimes import _live_runtimes
from dask_lazycluster.testing import TestHosts

pytest_plugins = ["dask_lazycluster.testing.pytest_plugin"]


def parked_probe_pids() -> set[int]:
    """Probe interpreters that this process's live runtimes keep waiting (not leaks).

    Each lives at most ``PROBE_PARK_SECONDS`` and ends with its runtime's connection.
    """
    return {r._parked_pid for r in _live_runtimes if r._parked is not None}


def ours_left(*host_sets: TestHosts) -> dict[str, list[str]]:
    """Processes of ours (anything but sshd and parked probes) still alive in the test hosts."""
    found: dict[str, list[str]] = {}
    parked = parked_probe_pids()
    for hosts in host_sets:
        for name, cmdlines in hosts.leftover_processes(ignore_pids=parked).items():
            mine = [c for c in cmdlines if not c.startswith("sshd")]
            if mine:
                found[name] = mine
    return found


def wait_no_leftovers(*host_sets: TestHosts, timeout: float = 15) -> dict[str, list[str]]:
    """Wait until no process of ours is left; return what is still there at the deadline."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        left = ours_left(*host_sets)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


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


@pytest.fixture(scope="module")
def group(hosts: TestHosts) -> Iterator[RuntimeGroup]:
    """A RuntimeGroup over every test host, shared by a module's tests."""
    runtime_group = RuntimeGroup(hosts=hosts.names)
    yield runtime_group
    runtime_group.cleanup()


@pytest.fixture(scope="module")
def leak_check(hosts: TestHosts) -> Iterator[None]:
    """After the module: no process of ours in any host, no temp working dir left.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("leak_check")``; it is set up
    before their other module fixtures, so it checks after those are torn down.
    """
    before = set(glob.glob("/tmp/lazycluster-*"))
    yield
    left = wait_no_leftovers(hosts)
    assert not left, f"processes left in the test hosts: {left}"
    # The hosts share the manager's filesystem, so their temp working dirs show up here.
    left_dirs = set(glob.glob("/tmp/lazycluster-*")) - before
    assert not left_dirs, f"temp working dirs left behind: {sorted(left_dirs)}"
