"""Faults on real hosts: a host dies, sshd restarts, Ctrl-C at start-up, the scheduler dies,
start/close cycles. Each asserts results and that nothing is left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import dask
import psutil
import pytest
from distributed import Client
from distributed.core import Status

from dask_lazycluster import (
    DaskCluster,
    LazyclusterError,
    NoRuntimesDetectedError,
    RuntimeGroup,
    RuntimeManager,
)
from dask_lazycluster.cluster.scheduler_process import SchedulerProcess
from dask_lazycluster.testing import TestHosts
from dask_lazycluster.testing.hosts import clear_stale

from .conftest import wait_no_leftovers
from .helpers import wait_until

pytestmark = pytest.mark.usefixtures("leak_check")


@pytest.fixture(scope="module")
def fault_hosts(netns: TestHosts) -> Iterator[TestHosts]:
    """Hosts of our own: these tests cut links and kill daemons."""
    clear_stale("lzfault")
    with TestHosts(3, prefix="lzfault", home=netns.home) as hosts:
        yield hosts


def worker_hosts(client: Client) -> Counter[str]:
    return Counter(client.run(socket.gethostname).values())


def test_host_dies_mid_computation_and_comes_back(fault_hosts: TestHosts) -> None:
    names = fault_hosts.names
    group = RuntimeGroup(hosts=names)
    try:
        with DaskCluster(group, n_workers=6, worker_class="distributed.Worker") as cluster, \
                Client(cluster) as client:
            assert worker_hosts(client) == Counter({n: 2 for n in names})

            def slow(x: int) -> int:
                time.sleep(0.2)
                return x * 2

            futures = client.map(slow, range(120))
            time.sleep(1)
            fault_hosts.set_link(names[2], False)
            cut = time.monotonic()
            assert sum(client.gather(futures)) == 2 * sum(range(120))  # finished elsewhere

            def replaced() -> bool:
                where = worker_hosts(client)
                return sum(where.values()) == 6 and names[2] not in where

            assert wait_until(replaced, timeout=30)
            assert time.monotonic() - cut < 20  # ~6 s to notice the link, then replacements
            assert names[2] in cluster._unhealthy
            fault_hosts.set_link(names[2], True)
            assert wait_until(lambda: names[2] not in cluster._unhealthy, timeout=30)
            cluster.scale(9)
            assert wait_until(lambda: len(client.scheduler_info()["workers"]) == 9, 60)
            assert worker_hosts(client)[names[2]] >= 1  # the host is used again
            assert client.submit(sum, [1, 2]).result() == 3
    finally:
        fault_hosts.set_link(names[2], True)
        group.cleanup()
    assert wait_no_leftovers(fault_hosts) == {}


def test_sshd_restart_keeps_workers(fault_hosts: TestHosts) -> None:
    group = RuntimeGroup(hosts=fault_hosts.names)
    try:
        with DaskCluster(group, worker_class="distributed.Worker") as cluster, \
                Client(cluster) as client:
            before = set(client.scheduler_info()["workers"])
            fault_hosts.kill_sshd(fault_hosts.names[0])
            fault_hosts.start_sshd(fault_hosts.names[0])
            assert client.submit(lambda: 7).result() == 7
            assert set(client.scheduler_info()["workers"]) == before  # sessions survived
            cluster.scale(4)
            assert wait_until(lambda: len(client.scheduler_info()["workers"]) == 4, 60)
    finally:
        group.cleanup()
    assert wait_no_leftovers(fault_hosts) == {}


def scheduler_processes_since(started: float) -> list[psutil.Process]:
    """Scheduler processes (scheduler-process: true) created since ``started``, still alive.

    Found by command line and start time: once their manager is gone they are re-parented.
    """
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        with contextlib.suppress(psutil.Error):
            if any("_scheduler_child.py" in c for c in p.info["cmdline"] or []) and (
                    p.info["create_time"] >= started - 1 and p.status() != psutil.STATUS_ZOMBIE):
                found.append(p)
    return found


@pytest.mark.parametrize("own_process", [False, True], ids=["in-process", "scheduler-process"])
def test_ctrl_c_during_start_up_stops_everything(fault_hosts: TestHosts,
                                                 own_process: bool) -> None:
    script = (
        "import dask\n"
        "from dask_lazycluster import DaskCluster, RuntimeGroup\n"
        f"dask.config.set({{'lazycluster.scheduler-process': {own_process}}})\n"
        f"group = RuntimeGroup(hosts={fault_hosts.names!r})\n"
        "print('connected', flush=True)\n"
        "try:\n"
        "    DaskCluster(group, n_workers=6)\n"
        "    print('started', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "import sys; sys.stdin.read()\n"  # the session goes on, as a notebook's would
    )
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"

    def workers_starting() -> bool:
        return any(any("python" in c for c in cmds)
                   for cmds in fault_hosts.leftover_processes().values())

    def scheduler_starting() -> bool:
        return bool(scheduler_processes_since(started))

    # With its own process, interrupt while that process is still starting up.
    assert wait_until(scheduler_starting if own_process else workers_starting, timeout=30,
                      interval=0.02)
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.stdout.readline().strip() == "interrupted"
        # While the interrupted session goes on, as a notebook's would: nothing of the
        # scheduler may wait for the manager's exit.
        assert wait_until(lambda: not scheduler_processes_since(started), 15)
    finally:
        proc.communicate(timeout=60)
    assert wait_no_leftovers(fault_hosts, timeout=30) == {}


@pytest.mark.parametrize("own_process", [False, True], ids=["in-process", "scheduler-process"])
def test_scheduler_death_gives_a_clear_error_and_cleanup_still_works(
        fault_hosts: TestHosts, own_process: bool) -> None:
    group = RuntimeGroup(hosts=fault_hosts.names)
    try:
        with dask.config.set({"lazycluster.scheduler-process": own_process}):
            cluster = DaskCluster(group, worker_class="distributed.Worker")
        scheduler = cluster.scheduler
        if isinstance(scheduler, SchedulerProcess):
            assert scheduler.pid is not None
            os.kill(scheduler.pid, signal.SIGKILL)  # the process dies, not just the server
            assert wait_until(lambda: scheduler.status == Status.failed, 10)
        else:
            assert scheduler is not None
            cluster.sync(scheduler.close)
        with pytest.raises(LazyclusterError, match=r"scheduler is not running \((failed|closed)"):
            cluster.scale(5)
        cluster.close()
    finally:
        group.cleanup()
    assert wait_no_leftovers(fault_hosts) == {}


def test_start_close_cycles_do_not_leak(fault_hosts: TestHosts) -> None:
    me = psutil.Process()

    def snapshot() -> tuple[int, int, int]:
        ports = [c for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid == me.pid]
        return me.num_fds(), me.num_threads(), len(ports)

    group = RuntimeGroup(hosts=fault_hosts.names)
    try:
        figures = []
        for _ in range(20):
            with DaskCluster(group, n_workers=3, worker_class="distributed.Worker",
                             tunnel=True):
                pass
            figures.append(snapshot())
            assert wait_no_leftovers(fault_hosts) == {}
        fds, threads, ports = zip(*figures, strict=True)
        # after warm-up the figures must be flat: nothing grows per cycle
        assert max(fds[5:]) - min(fds[5:]) <= 4, fds
        assert max(threads[5:]) - min(threads[5:]) <= 2, threads
        assert max(ports[5:]) == min(ports[5:]), ports
    finally:
        group.cleanup()


def test_session_limit_is_named(netns: TestHosts) -> None:
    # sshd caps sessions per connection (MaxSessions, default 10); every worker holds one.
    clear_stale("lzsess")
    with TestHosts(1, prefix="lzsess", home=netns.home, max_sessions=2) as limited:
        name = limited.names[0]
        group = RuntimeGroup(hosts=[name])
        try:
            with pytest.raises(LazyclusterError, match=rf"host '{name}' refused a new SSH "
                                                       r"session.*MaxSessions"):
                DaskCluster(group, n_workers=3, worker_class="distributed.Worker")
        finally:
            group.cleanup()
        # Discovery's requirement checks open sessions too: the host is left out, and why.
        manager = RuntimeManager(ssh_config=str(limited.home / ".ssh" / "config"))
        try:
            with pytest.raises(NoRuntimesDetectedError, match=rf"{name}: checks failed: host "
                                                              rf"'{name}' refused.*MaxSessions"):
                manager.create_group(include_hosts=name, filter_commands=["true"] * 3)
        finally:
            manager.cleanup()
        assert wait_no_leftovers(limited) == {}
