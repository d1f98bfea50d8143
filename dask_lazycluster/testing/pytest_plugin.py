"""Pytest fixtures starting real SSH test hosts (load with ``pytest_plugins = [...]`` or ``-p``).

Fixtures (all session scoped):
    test_hosts: ``TestHosts`` with N = ``$LAZYCLUSTER_TEST_HOSTS`` (default 3) hosts named
        ``lzhost1..N`` (10.231.0.11.. in netns mode when nothing else runs), no firewall.
    firewalled_hosts: a second set ``lzfw1..N`` on the same bridge whose hosts accept only
        inbound TCP port 22; skipped unless running in netns mode (root).
    ssh_home: sets ``HOME`` to the fake home whose ``.ssh/config`` and ``.ssh/known_hosts`` list
        every host of both sets (they share it), so code resolving hosts through
        ``Path.home()`` (asyncssh, dask_lazycluster's ``Runtime("lzhost1")``) needs no options;
        restores ``HOME`` at session end. (OpenSSH's ``ssh`` ignores ``HOME``: use ``ssh -F``.)

Leftovers of a crashed earlier session are cleaned up first. When another live session (another
pytest run on the same machine) holds a prefix, the next free one is used (``lzhostb``,
``lzhostc``, ...), so always take names and addresses from the fixture, never hard-code them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dask_lazycluster.testing.hosts import HostsInUseError, TestHosts, clear_stale


def _start(base: str, n: int, **kwargs: Any) -> TestHosts:
    """Start a set under the first free prefix among base, base + "b", base + "c", ...."""
    for suffix in ["", *"bcdefgh"]:
        try:
            clear_stale(base + suffix)
            return TestHosts(n, prefix=base + suffix, **kwargs).up()
        except HostsInUseError:
            continue
    raise HostsInUseError(f"no free prefix {base}*: run `python -m dask_lazycluster.testing down`")


def _n_hosts() -> int:
    """Number of hosts per set, from ``$LAZYCLUSTER_TEST_HOSTS`` (default 3)."""
    return int(os.environ.get("LAZYCLUSTER_TEST_HOSTS") or 3)


@pytest.fixture(scope="session")
def test_hosts() -> Iterator[TestHosts]:
    """Start ``lzhost1..N`` for the session.

    Yields:
        The running TestHosts; torn down at session end.
    """
    with _start("lzhost", _n_hosts()) as hosts:
        yield hosts


@pytest.fixture(scope="session")
def firewalled_hosts(test_hosts: TestHosts) -> Iterator[TestHosts]:
    """Start ``lzfw1..N`` (only SSH open inbound) sharing test_hosts' fake home.

    Args:
        test_hosts: The unfirewalled set, whose fake home this set adds its entries to.

    Yields:
        The running TestHosts; torn down at session end (before test_hosts).
    """
    if test_hosts.mode != "netns":
        pytest.skip("firewalled hosts need netns mode (run as root)")
    with _start("lzfw", _n_hosts(), firewall=True, home=test_hosts.home) as hosts:
        yield hosts


@pytest.fixture(scope="session")
def ssh_home(test_hosts: TestHosts) -> Iterator[Path]:
    """Point ``HOME`` at the shared fake home for the rest of the session.

    Args:
        test_hosts: The host set owning the fake home.

    Yields:
        The fake home directory (contains ``.ssh/config``, ``known_hosts``, ``id_ed25519``).
    """
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(test_hosts.home)
    try:
        yield test_hosts.home
    finally:
        if old is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old
