"""``lazycluster.scheduler-process: true``: the scheduler in a child process of the manager."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import dask
import psutil
import pytest
from distributed import Client, Scheduler

from dask_lazycluster import DaskCluster, InvalidRuntimeError, RuntimeGroup
from dask_lazycluster.cluster.dask_cluster import LocalMasterLauncher
from dask_lazycluster.cluster.exceptions import MasterStartError
from dask_lazycluster.cluster.scheduler_process import SchedulerProcess
from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers
from .helpers import wait_until

pytestmark = pytest.mark.usefixtures("leak_check")


@pytest.fixture(autouse=True)
def own_process() -> Iterator[None]:
    with dask.config.set({"lazycluster.scheduler-process": True}):
        yield


def scheduler_children() -> list[psutil.Process]:
    """Scheduler processes this test process started and that still run."""
    found = []
    for child in psutil.Process().children():
        try:
            if any("_scheduler_child.py" in part for part in child.cmdline()):
                if child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.parametrize("tunnel", [True, False], ids=["tunnel", "direct"])
def test_tasks_scale_and_dashboard_with_the_scheduler_in_its_own_process(
        hosts: TestHosts, group: RuntimeGroup, tunnel: bool) -> None:
    with DaskCluster(group, tunnel=tunnel, n_workers=2,
                     worker_class="distributed.Worker") as cluster, Client(cluster) as client:
        scheduler = cluster.scheduler
        assert isinstance(scheduler, SchedulerProcess) and scheduler.pid is not None
        assert client.run_on_scheduler(os.getpid) == scheduler.pid != os.getpid()
        assert psutil.Process(scheduler.pid).ppid() == os.getpid()
        # A lambda travels by value: the hosts cannot import this test module.
        assert client.gather(client.map(lambda x: x + 1, range(200))) == list(range(1, 201))
        cluster.scale(4)
        client.wait_for_workers(4, timeout=60)
        assert len(cluster.scheduler_info["workers"]) == 4
        # The child serves the dashboard; its health page answers over HTTP.
        link = cluster.dashboard_link
        assert link.startswith("http://")
        health = link.rsplit("/", 1)[0] + "/health"
        with urllib.request.urlopen(health, timeout=10) as response:
            assert response.read() == b"ok"
        pid = scheduler.pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert scheduler_children() == []
    assert wait_no_leftovers(hosts) == {}


@pytest.mark.parametrize("options, match", [
    ({"no_such_option": 1}, "no_such_option"),
    ({"plugins": [threading.Lock()]}, "cannot be sent to the scheduler process"),
], ids=["unknown option", "unpicklable option"])
def test_bad_scheduler_options_are_named_and_leave_nothing(
        hosts: TestHosts, group: RuntimeGroup, options: dict[str, object], match: str) -> None:
    started = time.monotonic()
    with pytest.raises(MasterStartError, match=match):
        DaskCluster(group, n_workers=1, scheduler_options=options)
    assert time.monotonic() - started < 30
    assert wait_until(lambda: scheduler_children() == [], 10)
    assert wait_no_leftovers(hosts) == {}


def test_tls_and_logs_reach_the_scheduler_process(hosts: TestHosts, group: RuntimeGroup) -> None:
    # The temporary certificates travel to the child with the options.
    with DaskCluster(group, n_workers=1, security=True,
                     worker_class="distributed.Worker") as cluster, Client(cluster) as client:
        assert isinstance(cluster.scheduler, SchedulerProcess)
        assert cluster.scheduler_address.startswith("tls://")
        assert client.submit(lambda: 41 + 1).result(timeout=60) == 42
        assert "Scheduler" in cluster.get_logs()
    assert wait_no_leftovers(hosts) == {}


def test_the_early_started_process_goes_when_the_group_fails(hosts: TestHosts) -> None:
    # DaskCluster() starts the scheduler's process before it connects to the configured hosts.
    with dask.config.set({"lazycluster.hosts": [hosts.names[0], "nope.invalid"]}), \
            pytest.raises(InvalidRuntimeError, match="nope.invalid"):
        DaskCluster()
    assert scheduler_children() == []
    assert wait_no_leftovers(hosts) == {}


def test_a_launcher_with_its_own_scheduler_leaves_no_process(hosts: TestHosts,
                                                             group: RuntimeGroup) -> None:
    class InProcess(LocalMasterLauncher):
        def scheduler_spec(self, listen_host: str, options: dict[str, Any]) -> dict[str, Any]:
            return {"cls": Scheduler, "options": {"host": listen_host, "port": self.port,
                                                  "dashboard": False, **options}}

    with DaskCluster(group, master_launcher=InProcess(group), n_workers=1,
                     worker_class="distributed.Worker") as cluster:
        assert isinstance(cluster.scheduler, Scheduler)
        assert scheduler_children() == []
