"""Behaviour that once contradicted the docs (issue 17); each test failed before its fix."""

from __future__ import annotations

import pytest

from dask_lazycluster import DaskCluster, LazyclusterError, PortInUseError, RuntimeGroup
from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers
from .helpers import echo_server_in_host, free_port, wait_until


def test_explicit_master_port_busy_on_one_host_is_port_in_use(netns: TestHosts,
                                                              group: RuntimeGroup) -> None:
    # docs/troubleshooting.md: a single requested port that is busy is PortInUseError, and
    # "port free in the group" means free on every host; raised before anything starts.
    # Before the fix: MasterStartError "cannot tunnel it", after the scheduler started.
    port = free_port()
    busy_on = netns.names[1]
    with echo_server_in_host(netns, busy_on, port):
        with pytest.raises(PortInUseError, match=rf"port {port} .*{busy_on}") as info:
            DaskCluster(group, master_port=port, n_workers=1, tunnel=True)
        assert info.value.port == port and info.value.where == busy_on
    assert free_port_on_manager(port)
    assert all(r.forwarded_ports == [] for r in group.runtimes)
    assert wait_no_leftovers(netns) == {}


def free_port_on_manager(port: int) -> bool:
    """Whether nothing listens on the manager's ``port`` (a scheduler left there would)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_max_workers_per_host_refusal_names_the_limit_not_ports(hosts: TestHosts,
                                                                group: RuntimeGroup) -> None:
    # Ports are not the problem here: the refusal must not say they are.
    # Before the fix: "no free port left in the given port list: every host already runs ...".
    n = len(hosts.names)
    with DaskCluster(group, n_workers=n, max_workers_per_host=1,
                     worker_class="distributed.Worker") as cluster:
        with pytest.raises(LazyclusterError, match="max-workers-per-host") as info:
            cluster.scale(n + 1)
        assert "no free port" not in str(info.value)
        assert len(cluster.worker_spec) == n  # nothing half-planned
        assert wait_until(lambda: len(cluster.workers) == n, 60)
