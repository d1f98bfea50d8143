"""The scheduler on a host of the group (``scheduler_host=``, ``RemoteMasterLauncher``), on real
sshd hosts: the Dask API through the manager's local forwards, every tunnel mode, the port
rules, a lost scheduler host, a killed manager and bad input. Each test checks that nothing is
left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import dask
import pytest
from distributed import Client
from distributed.core import Status

from dask_lazycluster import (
    DaskCluster,
    LazyclusterError,
    LocalMasterLauncher,
    PortInUseError,
    RemoteMasterLauncher,
    RuntimeGroup,
)
from dask_lazycluster.cluster._remote_scheduler import RemoteScheduler
from dask_lazycluster.config import setting
from dask_lazycluster.testing import TestHosts
from dask_lazycluster.testing.pytest_plugin import start_hosts

from .conftest import ours_left, wait_no_leftovers
from .helpers import echo_server_in_host, free_port, wait_layout, wait_until
from .test_cluster import exchange_between_workers, wait_workers

pytestmark = pytest.mark.usefixtures("leak_check")


def dialled_scheduler(client: Client) -> dict[str, str]:
    """Hostname of each worker to the scheduler address it dials."""
    found = client.run(lambda dask_worker: (socket.gethostname(), dask_worker.scheduler.address))
    return dict(found.values())


def test_client_scale_logs_widget_and_dashboard_through_local_forwards(
        netns: TestHosts, group: RuntimeGroup, capsys: pytest.CaptureFixture[str]) -> None:
    names = netns.names
    with DaskCluster(group, scheduler_host=names[1]) as cluster, Client(cluster) as client:
        assert cluster.scheduler_host == names[1]
        assert isinstance(cluster.scheduler, RemoteScheduler)
        port = cluster.master_port
        assert cluster.scheduler_address == f"tcp://127.0.0.1:{port}"
        assert client.run_on_scheduler(socket.gethostname) == names[1]
        assert client.run_on_scheduler(os.getpid) != os.getpid()
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(cluster.dashboard_link, timeout=10) as page:
            assert page.status == 200
        wait_workers(client, 3)
        # tunnel mode: everything on loopback; workers of the scheduler's host dial it there,
        # the others dial their own relayed 127.0.0.1:port
        assert all(a.startswith("tcp://127.0.0.1:") for a in client.scheduler_info()["workers"])
        assert set(dialled_scheduler(client).values()) == {f"tcp://127.0.0.1:{port}"}
        assert port in group.get_runtime(names[0]).forwarded_ports
        assert exchange_between_workers(client) == [10_000_000] * 3
        cluster.scale(5)  # the resized workers of hosts 0 and 1 are replaced meanwhile
        expected = Counter({names[0]: 2, names[1]: 2, names[2]: 1})
        assert wait_layout(client, expected) == expected
        assert sum(client.gather(client.map(lambda x: x * 2, range(200)))) == 39800
        logs = cluster.get_logs()
        assert "Scheduler at" in logs["Scheduler"]
        assert "DaskCluster" in cluster._repr_html_() and "127.0.0.1" in repr(cluster)
        cluster.print_log()
        assert "distributed.scheduler" in capsys.readouterr().out
    # the scheduler's forwards went with it
    assert all(port not in r.forwarded_ports for r in group.runtimes)
    assert wait_no_leftovers(netns) == {}


def test_config_key_and_launcher_place_the_scheduler(netns: TestHosts,
                                                     group: RuntimeGroup) -> None:
    names = netns.names
    with dask.config.set({"lazycluster.scheduler-host": names[2]}):
        assert setting("scheduler-host") == names[2]
        with DaskCluster(group, n_workers=1, worker_class="distributed.Worker") as cluster, \
                Client(cluster) as client:
            assert client.run_on_scheduler(socket.gethostname) == names[2]
            assert client.submit(lambda: 6 * 7).result() == 42
        # an explicit launcher wins over the config key
        with DaskCluster(group, master_launcher=LocalMasterLauncher(group), n_workers=0) as cluster:
            assert cluster.scheduler_host is None
    launcher = RemoteMasterLauncher(group)
    assert launcher.host == names[0]
    with DaskCluster(group, master_launcher=launcher, n_workers=1,
                     worker_class="distributed.Worker") as cluster, Client(cluster) as client:
        assert launcher.process is cluster.scheduler
        assert client.run_on_scheduler(socket.gethostname) == names[0]


def test_direct_mode_workers_dial_the_scheduler_host(netns: TestHosts,
                                                     group: RuntimeGroup) -> None:
    names = netns.names
    with DaskCluster(group, scheduler_host=names[0], tunnel=False) as cluster, \
            Client(cluster) as client:
        wait_workers(client, 3)
        port = cluster.master_port
        prefix = netns.hosts[0].address.rsplit(".", 1)[0]
        assert all(a.startswith(f"tcp://{prefix}.") for a in client.scheduler_info()["workers"])
        dialled = dialled_scheduler(client)
        assert dialled[names[0]] == f"tcp://127.0.0.1:{port}"
        assert dialled[names[1]] == dialled[names[2]] == f"tcp://{netns.hosts[0].address}:{port}"
        # nothing relayed: only the manager's own forward to the scheduler
        assert all(port not in group.get_runtime(h).forwarded_ports for h in names[1:])
        assert exchange_between_workers(client) == [10_000_000] * 3
        with urllib.request.urlopen(cluster.dashboard_link, timeout=10) as page:
            assert page.status == 200


@pytest.mark.parametrize("where", ["open", "firewalled"])
def test_auto_mode_goes_direct_where_hosts_reach_each_other(netns: TestHosts, fw_hosts: TestHosts,
                                                            where: str) -> None:
    mixed = RuntimeGroup(hosts=[netns.names[0], netns.names[1], fw_hosts.names[0]])
    scheduler_host = netns.names[0] if where == "open" else fw_hosts.names[0]
    try:
        with DaskCluster(mixed, scheduler_host=scheduler_host, tunnel="auto") as cluster, \
                Client(cluster) as client:
            # the firewalled host dials out freely but nobody dials in: it alone is tunneled
            assert cluster.direct_hosts == netns.names[:2]
            wait_workers(client, 3)
            port = cluster.master_port
            dialled = dialled_scheduler(client)
            assert dialled[scheduler_host] == f"tcp://127.0.0.1:{port}"
            others = [h for h in mixed.hosts if h != scheduler_host]
            if where == "open":  # everyone reaches it directly
                address = mixed.get_runtime(scheduler_host).remote_address
                assert all(dialled[h] == f"tcp://{address}:{port}" for h in others)
            else:  # nobody reaches it: the others dial their relayed loopback port
                assert all(dialled[h] == f"tcp://127.0.0.1:{port}" for h in others)
                assert all(port in mixed.get_runtime(h).forwarded_ports for h in others)
            assert exchange_between_workers(client) == [10_000_000] * 3
    finally:
        mixed.cleanup()
    assert wait_no_leftovers(netns, fw_hosts) == {}


def test_only_ssh_open_with_the_scheduler_on_a_host(fw_hosts: TestHosts) -> None:
    group = RuntimeGroup(hosts=fw_hosts.names)
    try:
        with DaskCluster(group, scheduler_host=fw_hosts.names[2], tunnel=True) as cluster, \
                Client(cluster) as client:
            wait_workers(client, len(fw_hosts.names))
            assert client.run_on_scheduler(socket.gethostname) == fw_hosts.names[2]
            assert exchange_between_workers(client) == [10_000_000] * len(fw_hosts.names)
            with urllib.request.urlopen(cluster.dashboard_link, timeout=10) as page:
                assert page.status == 200
    finally:
        group.cleanup()
    assert wait_no_leftovers(fw_hosts) == {}


def test_adapt_drives_a_remote_scheduler(netns: TestHosts, group: RuntimeGroup) -> None:
    with DaskCluster(group, scheduler_host=netns.names[2], n_workers=0) as cluster, \
            Client(cluster) as client:
        cluster.adapt(minimum=0, maximum=6, interval="200ms", wait_count=2,
                      target_duration="1s")

        def slow(x: int) -> int:
            time.sleep(0.3)
            return x

        futures = client.map(slow, range(80))
        assert wait_until(lambda: len(client.scheduler_info()["workers"]) >= 3, 60)
        assert sum(client.gather(futures)) == sum(range(80))
        del futures
        wait_workers(client, 0, timeout=60)


def test_port_rules_count_only_where_the_port_is_used(netns: TestHosts,
                                                      group: RuntimeGroup) -> None:
    names = netns.names
    port = free_port()
    # busy on a worker host: fine when that host dials the scheduler directly...
    with echo_server_in_host(netns, names[0], port):
        with DaskCluster(group, scheduler_host=names[1], tunnel=False, master_port=port,
                         n_workers=1, worker_class="distributed.Worker") as cluster:
            assert cluster.master_port == port
        # ...not when it reaches the scheduler through a relay on that port
        with pytest.raises(PortInUseError, match=names[0]):
            DaskCluster(group, scheduler_host=names[1], tunnel=True, master_port=port)
    # busy on the scheduler's host: explicit ports fail, the default dashboard port moves on
    with echo_server_in_host(netns, names[1], 8787), echo_server_in_host(netns, names[1], port):
        with pytest.raises(PortInUseError, match=names[1]):
            DaskCluster(group, scheduler_host=names[1], master_port=port)
        with pytest.raises(PortInUseError, match=names[1]):
            DaskCluster(group, scheduler_host=names[1],
                        scheduler_options={"dashboard_address": ":8787"})
        with DaskCluster(group, scheduler_host=names[1], n_workers=0) as cluster:
            scheduler = cluster.scheduler
            assert isinstance(scheduler, RemoteScheduler)
            assert scheduler.dashboard_port not in (None, 8787, cluster.master_port)
            assert cluster.dashboard_link.startswith(f"http://127.0.0.1:{scheduler.dashboard_port}/")
            with urllib.request.urlopen(cluster.dashboard_link, timeout=10) as page:
                assert page.status == 200
    assert wait_no_leftovers(netns) == {}


def test_tls_with_the_scheduler_on_a_host(netns: TestHosts, group: RuntimeGroup) -> None:
    with DaskCluster(group, scheduler_host=netns.names[1], security=True, n_workers=2,
                     worker_class="distributed.Worker") as cluster, Client(cluster) as client:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        wait_workers(client, 2)
        assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
        assert client.submit(lambda: 1 + 1).result() == 2


def test_bad_scheduler_host_is_named_and_leaves_nothing(hosts: TestHosts,
                                                        group: RuntimeGroup) -> None:
    with pytest.raises(ValueError, match="'no-such-host'"):
        DaskCluster(group, scheduler_host="no-such-host")
    with pytest.raises(ValueError, match="'no-such-host'"):
        RemoteMasterLauncher(group, "no-such-host")
    with pytest.raises(ValueError, match="not both"):
        DaskCluster(group, scheduler_host=hosts.names[0], master_launcher=LocalMasterLauncher(group))
    with pytest.raises(TypeError, match="scheduler_host"):
        DaskCluster(group, scheduler_host=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="JSON"):
        DaskCluster(group, scheduler_host=hosts.names[0], scheduler_options={"plugins": [object()]})
    # from config, with the group made from config too: found once the group exists
    with dask.config.set({"lazycluster.hosts": hosts.names[:2],
                          "lazycluster.scheduler-host": "no-such-host"}):
        with pytest.raises(ValueError, match="'no-such-host'"):
            DaskCluster()
    assert wait_no_leftovers(hosts) == {}


def test_manager_killed_takes_the_scheduler_and_workers(hosts: TestHosts) -> None:
    script = (
        "import socket\n"
        "from dask_lazycluster import DaskCluster, RuntimeGroup\n"
        "from distributed import Client\n"
        f"cluster = DaskCluster(RuntimeGroup(hosts={hosts.names!r}), "
        f"scheduler_host={hosts.names[1]!r})\n"
        "client = Client(cluster)\n"
        "print('ready', client.run_on_scheduler(socket.gethostname), flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})
    try:
        assert proc.stdout is not None
        word, where = proc.stdout.readline().split()
        assert word == "ready"
        if hosts.mode == "netns":
            assert where == hosts.names[1]
        assert ours_left(hosts), "the scheduler and workers should be running now"
    finally:
        proc.kill()
        proc.wait()
    started = time.monotonic()
    assert wait_no_leftovers(hosts, timeout=30) == {}
    assert time.monotonic() - started < 30


def test_scheduler_killed_fails_the_cluster_and_close_still_cleans_up(
        netns: TestHosts, group: RuntimeGroup) -> None:
    cluster = DaskCluster(group, scheduler_host=netns.names[2], n_workers=2,
                          worker_class="distributed.Worker")
    try:
        with Client(cluster) as client:
            pid = client.run_on_scheduler(os.getpid)
        assert pid in netns.pids(netns.names[2])
        os.kill(pid, signal.SIGKILL)  # the host stays: its supervisor reports the exit
        assert wait_until(lambda: cluster.status == Status.failed, 30), cluster.status
        with pytest.raises(LazyclusterError, match=r"scheduler is not running \(failed: .*-9"):
            cluster.scale(1)
        assert "the scheduler failed" in repr(cluster)
    finally:
        cluster.close(timeout=60)
    assert cluster.status == Status.closed
    assert wait_no_leftovers(netns) == {}


@pytest.fixture(scope="module")
def lossy_hosts(netns: TestHosts) -> Iterator[TestHosts]:
    """Hosts of our own: the test cuts a link."""
    with start_hosts("lzrsched", 2, home=netns.home) as hosts:
        yield hosts


def test_scheduler_host_lost_fails_the_cluster_and_close_still_cleans_up(
        lossy_hosts: TestHosts) -> None:
    names = lossy_hosts.names
    group = RuntimeGroup(hosts=names)
    try:
        cluster = DaskCluster(group, scheduler_host=names[1], n_workers=2,
                              worker_class="distributed.Worker")
        client = Client(cluster)
        assert client.submit(lambda: 1).result() == 1
        lossy_hosts.set_link(names[1], False)
        try:
            assert wait_until(lambda: cluster.status == Status.failed, 60), cluster.status
            assert cluster.scheduler is not None and cluster.scheduler.status == Status.failed
            with pytest.raises(LazyclusterError, match=rf"scheduler is not running \(failed: .*{names[1]}"):
                cluster.scale(3)
            assert f"{names[1]}: the scheduler failed" in repr(cluster)
            client.close(timeout=5)
            started = time.monotonic()
            cluster.close(timeout=60)
            assert time.monotonic() - started < 60
            assert cluster.status == Status.closed
            # the healthy host is clean at once: close() stopped its worker and supervisor
            assert wait_no_leftovers(lossy_hosts, timeout=30).keys() <= {names[1]}
        finally:
            lossy_hosts.set_link(names[1], True)
    finally:
        group.cleanup()
    # the lost host cleaned up after itself: its sshd dropped the session, the lifeline ended
    assert wait_no_leftovers(lossy_hosts, timeout=30) == {}
