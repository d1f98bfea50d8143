"""Hosts reachable only through a jump host: "a bastion set up with ProxyJump works unchanged".

docs/hosts-and-ssh.md promises it for host names, docs/networking.md for tunnel mode. The set
(harness ``bastion=True``): host 1 is the jump host, reached directly; hosts 2..3 accept
connections only from it and each other, cannot reach the manager, and the fake
``~/.ssh/config`` gives them ``ProxyJump <host 1>``. Nothing in the calls below knows that.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator

import psutil
import pytest
from distributed import Client

from dask_lazycluster import DaskCluster, Runtime, RuntimeGroup, RuntimeTask
from dask_lazycluster.testing import TestHosts
from dask_lazycluster.testing.pytest_plugin import start_hosts

from .conftest import wait_no_leftovers
from .helpers import echo_from_host, echo_server_on_manager, free_port, wait_until


@pytest.fixture(scope="module")
def bastion(test_hosts: TestHosts, ssh_home: object) -> Iterator[TestHosts]:
    """Three hosts: the jump host, then two reachable only through it (names from ~/.ssh/config)."""
    if test_hosts.mode != "netns":
        pytest.skip("a bastion needs netns mode (root): local-mode hosts share one network")
    with start_hosts("lzjump", 3, home=test_hosts.home, bastion=True) as hosts:
        yield hosts


def manager_tcp_peers() -> set[str]:
    """Addresses this process has TCP connections to."""
    return {c.raddr.ip for c in psutil.Process().net_connections("tcp") if c.raddr}


def test_a_host_behind_the_bastion_by_name(bastion: TestHosts) -> None:
    jump, behind, _ = bastion.hosts
    with pytest.raises(OSError):  # really out of the manager's reach
        socket.create_connection((behind.address, 22), timeout=1).close()
    runtime = Runtime(behind.name)
    try:
        assert runtime.info["hostname"] == behind.name
        assert behind.address not in manager_tcp_peers()  # all of it goes through the jump host
        assert jump.address in manager_tcp_peers()
        task = runtime.execute_task(RuntimeTask("where").run_function(socket.gethostname),
                                    execute_async=False)
        assert list(task.function_returns) == [behind.name]
        port = free_port()
        with echo_server_on_manager(port):  # a forward over the jumped connection
            # lazycluster returns the forward's process key
            assert runtime.expose_port_to_runtime(port) == f"{behind.name}::-R::{port}::{port}"
            assert echo_from_host(bastion, behind.name, port) == "echo:ping:manager"
    finally:
        runtime.cleanup()
    assert wait_no_leftovers(bastion) == {}
    assert wait_until(lambda: jump.address not in manager_tcp_peers(), 10)


def test_a_group_across_the_bastion(bastion: TestHosts) -> None:
    group = RuntimeGroup(hosts=bastion.names)
    try:
        tasks = group.execute_task(RuntimeTask("where").run_function(socket.gethostname), broadcast=True,
                                   execute_async=False)
        assert isinstance(tasks, list)
        assert [next(t.function_returns) for t in tasks] == bastion.names
        port = free_port()
        with echo_server_on_manager(port):
            assert group.expose_port_to_runtimes(port) == port
            for name in bastion.names:
                assert echo_from_host(bastion, name, port) == "echo:ping:manager"
    finally:
        group.cleanup()
    assert wait_no_leftovers(bastion) == {}


def exchange(client: Client) -> list[int]:
    """Every worker fetches 1 MB made on the next worker (across hosts)."""
    workers = sorted(client.scheduler_info()["workers"])
    made = [client.submit(lambda: b"x" * 1_000_000, workers=[w], pure=False) for w in workers]
    moved = [client.submit(len, f, workers=[workers[(i + 1) % len(workers)]], pure=False)
             for i, f in enumerate(made)]
    return client.gather(moved)


@pytest.mark.parametrize("tunnel", [True, "auto"])
def test_a_cluster_across_the_bastion_leaves_nothing(bastion: TestHosts,
                                                     tunnel: bool | str) -> None:
    jump = bastion.hosts[0]
    group = RuntimeGroup(hosts=bastion.names)
    try:
        with DaskCluster(group, n_workers=3, tunnel=tunnel) as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(3, timeout=60)
            hosts_of_workers = Counter(client.run(socket.gethostname).values())
            assert hosts_of_workers == Counter(bastion.names)
            assert sum(client.gather(client.map(lambda x: x * x, range(200)))) == sum(
                x * x for x in range(200))
            assert exchange(client) == [1_000_000] * 3
            # auto mode: only the jump host is reachable both ways; the others are tunneled
            assert cluster.direct_hosts == ([] if tunnel is True else [jump.name])
    finally:
        group.cleanup()
    assert wait_no_leftovers(bastion) == {}  # the jump host included
    assert wait_until(lambda: jump.address not in manager_tcp_peers(), 10)
