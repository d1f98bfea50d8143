"""Dozens of workers per host on stock sshd (MaxSessions 10): all of a host's Dask processes
share its supervisor's one SSH session."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from distributed import Client

from dask_lazycluster import DaskCluster, RuntimeGroup
from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers
from .helpers import wait_until, worker_hosts


@pytest.fixture(scope="module")
def stock(hosts: TestHosts) -> Iterator[TestHosts]:
    if hosts.max_sessions is not None:
        pytest.skip("the session hosts must run sshd's stock MaxSessions")
    yield hosts



def sessions_open(group: RuntimeGroup) -> dict[str, int]:
    return {r.host: r.core.state.ssh.gate.open for r in group.runtimes}


def test_twelve_workers_on_each_of_three_hosts(stock: TestHosts) -> None:
    group = RuntimeGroup(hosts=stock.names)
    try:
        with DaskCluster(group, n_workers=0, worker_class="distributed.Worker") as cluster, \
                Client(cluster) as client:
            cluster.scale(36)
            client.wait_for_workers(36, timeout=300)
            assert worker_hosts(client) == Counter({name: 12 for name in stock.names})
            # One session per host carries its twelve Dask processes.
            assert sessions_open(group) == {name: 1 for name in stock.names}
            assert sum(client.gather(client.map(lambda x: x + 1, range(1000)))) == 500500
            cluster.scale(3)
            assert client.submit(sum, range(4)).result() == 6
            # wait_for_workers(3) returns at once while the others retire: wait for exactly 3.
            assert wait_until(lambda: len(client.scheduler_info()["workers"]) == 3, 120), \
                len(client.scheduler_info()["workers"])
    finally:
        group.cleanup()
    assert wait_no_leftovers(stock) == {}


def test_thirty_two_workers_on_one_host(stock: TestHosts) -> None:
    group = RuntimeGroup(hosts=stock.names[:1])
    try:
        with DaskCluster(group, n_workers=0, worker_class="distributed.Worker") as cluster, \
                Client(cluster) as client:
            cluster.scale(32)
            client.wait_for_workers(32, timeout=300)
            assert worker_hosts(client) == Counter({stock.names[0]: 32})
            assert sessions_open(group) == {stock.names[0]: 1}
            assert sum(client.gather(client.map(lambda x: 2 * x, range(640)))) == 2 * sum(range(640))
            cluster.scale(0)
            assert len(cluster.worker_spec) == 0
    finally:
        group.cleanup()
    assert wait_no_leftovers(stock) == {}


def test_sixteen_hosts_close_and_leave_no_working_dir(
        stock: TestHosts, make_hosts: Callable[..., TestHosts],
        caplog: pytest.LogCaptureFixture) -> None:
    # Many hosts on this machine's two cores: each host's supervisor removes its working dir
    # itself, once every child exited, so close() neither warns nor leaves one behind.
    many = make_hosts(16, "lzmany")
    group = RuntimeGroup(hosts=many.names)
    try:
        with DaskCluster(group, worker_class="distributed.Worker") as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(16, timeout=300)
            assert sum(client.gather(client.map(lambda x: x, range(200)))) == sum(range(200))
            # the workers' scratch space lives in each host's working dir
            assert all(client.run(lambda: bool(__import__("os").listdir("."))).values())
    finally:
        with caplog.at_level("WARNING"):
            group.cleanup()
    assert "could not remove" not in caplog.text
    left = {name: sorted(p.name for p in many.host_tmpdir(name).iterdir())
            for name in many.names}
    assert left == {name: [] for name in many.names}
    assert wait_no_leftovers(many) == {}
