"""Pytest fixtures starting real SSH test hosts (load with ``pytest_plugins = [...]`` or ``-p``).

Session fixtures (sshd with OpenSSH's own limits: ``MaxSessions 10``, ``MaxStartups 10:30:100``):
    test_hosts: ``TestHosts`` with N = ``$LAZYCLUSTER_TEST_HOSTS`` (default 3) hosts named
        ``lzhost1..N`` (10.231.0.11.. in netns mode when nothing else runs), no firewall.
    firewalled_hosts: a second set ``lzfw1..N`` on the same bridge whose hosts accept only
        inbound TCP port 22; skipped unless running in netns mode (root).
    ssh_home: sets ``HOME`` to the fake home whose ``.ssh/config`` and ``.ssh/known_hosts`` list
        every host of every set (they share it), so code resolving hosts through
        ``Path.home()`` (asyncssh, dask_lazycluster's ``Runtime("lzhost1")``) needs no options;
        restores ``HOME`` at session end. (OpenSSH's ``ssh`` ignores ``HOME``: use ``ssh -F``.)

More sets (hosts that differ, a bastion, other sshd limits):
    make_hosts: function-scoped factory fixture, ``make_hosts(n, prefix, **TestHosts kwargs)``;
        the set shares the session's fake home and is torn down when the test ends.
    start_hosts(prefix, n, **kwargs): context manager doing the same for any scope, e.g. in a
        module-scoped fixture of a test module.

Leftovers of a crashed earlier session are cleaned up first. When another live session (another
pytest run on the same machine) holds a prefix, the next free one is used (``lzhostb``,
``lzhostc``, ...), so always take names and addresses from the fixture, never hard-code them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dask_lazycluster.testing.hosts import HostsInUseError, TestHosts, clear_stale


@contextlib.contextmanager
def start_hosts(prefix: str, n: int, **kwargs: Any) -> Iterator[TestHosts]:
    """Start a set under the first free prefix among prefix, prefix + "b", ..., then tear down.

    Args:
        prefix: Wanted host name prefix (another live session may hold it: take names from
            the yielded set).
        n: Number of hosts.
        **kwargs: More TestHosts arguments (``home=``, ``specs=``, ``bastion=``,
            ``max_sessions=``, ...). Pass ``home=test_hosts.home`` so the names resolve through
            the session's fake home.

    Yields:
        The running TestHosts.

    Raises:
        HostsInUseError: Every candidate prefix is held by a live set.
    """
    for suffix in ["", *"bcdefgh"]:
        try:
            clear_stale(prefix + suffix)
            hosts = TestHosts(n, prefix=prefix + suffix, **kwargs).up()
        except HostsInUseError:
            continue
        with hosts:
            yield hosts
        return
    raise HostsInUseError(f"no free prefix {prefix}*: run `python -m dask_lazycluster.testing down`")


def _n_hosts() -> int:
    """Number of hosts per set, from ``$LAZYCLUSTER_TEST_HOSTS`` (default 3)."""
    return int(os.environ.get("LAZYCLUSTER_TEST_HOSTS") or 3)


@pytest.fixture(scope="session")
def test_hosts() -> Iterator[TestHosts]:
    """Start ``lzhost1..N`` for the session.

    Yields:
        The running TestHosts; torn down at session end.
    """
    with start_hosts("lzhost", _n_hosts()) as hosts:
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
    with start_hosts("lzfw", _n_hosts(), firewall=True, home=test_hosts.home) as hosts:
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


@pytest.fixture
def make_hosts(test_hosts: TestHosts) -> Iterator[Callable[..., TestHosts]]:
    """Factory for extra sets in one test, sharing the session's fake home.

    ``make_hosts(2, "lzgpu", specs={2: HostSpec(gpus=1)})`` starts ``lzgpu1..2`` (or the next
    free prefix) and returns the running set; every set is torn down when the test ends.
    Specs and bastions need netns mode: such tests skip themselves elsewhere.

    Args:
        test_hosts: The session set owning the fake home.

    Yields:
        ``make_hosts(n, prefix, **kwargs) -> TestHosts`` (kwargs as for TestHosts).
    """
    with contextlib.ExitStack() as stack:
        def make(n: int, prefix: str, **kwargs: Any) -> TestHosts:
            needs_netns = kwargs.get("specs") or kwargs.get("bastion") or kwargs.get("firewall")
            if needs_netns and test_hosts.mode != "netns":
                pytest.skip("host specs, bastions and firewalls need netns mode (run as root)")
            kwargs.setdefault("home", test_hosts.home)
            kwargs.setdefault("mode", test_hosts.mode)
            return stack.enter_context(start_hosts(prefix, n, **kwargs))

        yield make
