"""DaskCluster on real sshd test hosts: the seed flow, SpecCluster behaviour, networking, errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from distributed import Client
from distributed.diskutils import WorkSpace

from dask_lazycluster import (
    DaskCluster,
    LazyclusterError,
    LocalMasterLauncher,
    MasterStartError,
    NoPortsLeftError,
    PortInUseError,
    RoundRobinLauncher,
    RuntimeGroup,
    RuntimeTask,
    WorkersUnavailableError,
)
from dask_lazycluster.testing import TestHosts

from .conftest import ours_left, wait_no_leftovers
from .helpers import (
    echo_server_on_manager,
    free_port,
    new_tcp_refused,
    wait_layout,
    wait_until,
    worker_hosts,
)

pytestmark = pytest.mark.usefixtures("leak_check")



def wait_workers(client: Client, n: int, timeout: float = 60) -> None:
    assert wait_until(lambda: len(client.scheduler_info()["workers"]) == n, timeout), (
        f"expected {n} workers, have {len(client.scheduler_info()['workers'])}"
    )


def exchange_between_workers(client: Client) -> list[int]:
    """Make every worker fetch a 10 MB result computed on another worker."""
    workers = sorted(client.scheduler_info()["workers"])
    made = [client.submit(lambda n: b"x" * n, 10_000_000, workers=[w], pure=False)
            for w in workers]
    moved = [client.submit(len, f, workers=[workers[(i + 1) % len(workers)]])
             for i, f in enumerate(made)]
    return client.gather(moved)


def test_seed_flow(hosts: TestHosts, group: RuntimeGroup,
                   capsys: pytest.CaptureFixture[str]) -> None:
    cluster = DaskCluster(group)
    cluster.start()
    assert cluster.worker_count == len(hosts.names)  # start() is idempotent: one per runtime
    assert cluster.master_port == DaskCluster.DEFAULT_MASTER_PORT
    assert cluster.runtime_group is group
    client = cluster.get_client()
    assert client.submit(lambda x: x + 1, 1).result() == 2
    assert sum(client.gather(client.map(lambda x: x * 2, range(100)))) == 9900
    if hosts.mode == "netns":
        assert worker_hosts(client) == Counter({name: 1 for name in hosts.names})
    assert {h: len(p) for h, p in cluster._worker_launcher.ports_per_host.items()} == {
        name: 1 for name in hosts.names}
    cluster.print_log()
    assert "distributed.worker" in capsys.readouterr().out
    client.close()
    cluster.cleanup()
    cluster.cleanup()  # twice is harmless
    assert wait_no_leftovers(hosts) == {}


def test_speccluster_behaviour_and_balanced_scaling(netns: TestHosts, group: RuntimeGroup) -> None:
    names = netns.names
    with DaskCluster(group, n_workers=0) as cluster, Client(cluster) as client:
        assert "DaskCluster" in cluster._repr_html_()
        with urllib.request.urlopen(cluster.dashboard_link, timeout=10) as page:
            assert page.status == 200
        two_each = Counter({n: 2 for n in names})
        cluster.scale(6)
        wait_workers(client, 6)
        assert wait_layout(client, two_each) == two_each
        cluster.scale(4)
        wait_workers(client, 4)
        # removed from the busiest hosts, last in group order first; the workers left alone
        # on a host are replaced by whole-host ones, so the layout settles after the count
        after_down = Counter({names[0]: 2, names[1]: 1, names[2]: 1})
        assert wait_layout(client, after_down) == after_down
        cluster.scale(6)
        wait_workers(client, 6)
        assert wait_layout(client, two_each) == two_each  # refilled the emptiest
        assert all(len(p) == 2 for p in cluster._worker_launcher.ports_per_host.values())
        # scale(cores=) counts real sizes: one worker per host has all of its cores.
        cores = group.get_runtime(names[0]).cpu_cores
        cluster.scale(cores=cores)
        wait_workers(client, 1)
        assert "Cluster" in cluster.get_logs()
        assert client.submit(sum, [1, 2]).result() == 3


def test_adapt_grows_under_load_and_shrinks_when_idle(netns: TestHosts,
                                                      group: RuntimeGroup) -> None:
    with DaskCluster(group, n_workers=0) as cluster, Client(cluster) as client:
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


async def test_async_cluster(hosts: TestHosts, group: RuntimeGroup) -> None:
    async with DaskCluster(group, n_workers=1, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            assert await client.submit(lambda: 41 + 1) == 42
            await cluster.scale(2)
            await client.wait_for_workers(2)
            await cluster  # the cluster's own view catches up
            assert len(cluster.workers) == 2


def test_tunnel_mode_when_hosts_open_only_ssh(fw_hosts: TestHosts) -> None:
    group = RuntimeGroup(hosts=fw_hosts.names)
    try:
        with DaskCluster(group, tunnel=True) as cluster, Client(cluster) as client:
            wait_workers(client, len(fw_hosts.names))
            assert all(a.startswith("tcp://127.0.0.1:") for a in client.scheduler_info()["workers"])
            assert exchange_between_workers(client) == [10_000_000] * len(fw_hosts.names)
    finally:
        group.cleanup()
    assert wait_no_leftovers(fw_hosts) == {}


def test_direct_mode_uses_an_address_the_hosts_can_route(netns: TestHosts,
                                                         group: RuntimeGroup) -> None:
    with DaskCluster(group, tunnel=False) as cluster, Client(cluster) as client:
        wait_workers(client, 3)
        prefix = netns.hosts[0].address.rsplit(".", 1)[0]
        assert all(a.startswith(f"tcp://{prefix}.") for a in client.scheduler_info()["workers"])
        assert exchange_between_workers(client) == [10_000_000] * 3
        assert cluster.direct_hosts == netns.names
        with urllib.request.urlopen(cluster.dashboard_link, timeout=10) as page:
            assert page.status == 200


def test_auto_mode_picks_direct_or_tunnel_per_host(netns: TestHosts, fw_hosts: TestHosts) -> None:
    mixed = RuntimeGroup(hosts=[netns.names[0], *fw_hosts.names[:2]])
    try:
        with DaskCluster(mixed, tunnel="auto") as cluster, Client(cluster) as client:
            assert cluster.direct_hosts == [netns.names[0]]
            wait_workers(client, 3)
            assert exchange_between_workers(client) == [10_000_000] * 3
    finally:
        mixed.cleanup()


@pytest.fixture
def host0_cannot_dial_host1(netns: TestHosts) -> Iterator[None]:
    """Host 0 may not open TCP connections to host 1 (SSH excepted); replies still pass."""
    with new_tcp_refused(netns, 0, netns.hosts[1].address, outgoing=True, table="lztest"):
        yield


@pytest.mark.usefixtures("host0_cannot_dial_host1")
def test_auto_mode_tunnels_a_host_that_another_host_cannot_reach(netns: TestHosts) -> None:
    # Both hosts reach the manager both ways, so a probe of host <-> manager alone would make
    # them direct, and host 0's worker could then never fetch from host 1's.
    group = RuntimeGroup(hosts=netns.names[:3])
    try:
        with DaskCluster(group, tunnel="auto", n_workers=3,
                         worker_class="distributed.Worker") as cluster, Client(cluster) as client:
            assert cluster.direct_hosts == [netns.names[0], netns.names[2]]
            wait_workers(client, 3)
            workers = sorted(client.scheduler_info()["workers"])
            for source in workers:
                made = client.submit(lambda: b"x" * 1_000_000, workers=[source], pure=False)
                for target in set(workers) - {source}:
                    moved = client.submit(len, made, workers=[target], pure=False)
                    assert moved.result(timeout=30) == 1_000_000, (source, target)
    finally:
        group.cleanup()


def test_user_errors_raise_synchronously_and_leave_nothing(hosts: TestHosts,
                                                           group: RuntimeGroup) -> None:
    with pytest.raises(ValueError, match="tunnel"):
        DaskCluster(group, tunnel="maybe")
    with pytest.raises(ValueError, match="n_workers"):
        DaskCluster(group, n_workers=-1)
    with pytest.raises(TypeError, match="runtime_group"):
        DaskCluster("host1")  # type: ignore[arg-type]
    busy = free_port()
    with echo_server_on_manager(busy), pytest.raises(PortInUseError, match=str(busy)):
        DaskCluster(group, master_port=busy)
    few = [free_port() for _ in range(3)]
    with pytest.raises(NoPortsLeftError):
        DaskCluster(group, ports=few, tunnel=True)  # 3 nannies need 6 ports
    assert wait_no_leftovers(hosts) == {}


def test_port_exhaustion_from_scale_and_start_workers(netns: TestHosts,
                                                      group: RuntimeGroup) -> None:
    ports = sorted({free_port() for _ in range(8)})[:4]
    with DaskCluster(group, ports=ports, n_workers=2) as cluster:
        with pytest.raises(NoPortsLeftError):
            cluster.scale(3)
        with pytest.raises(NoPortsLeftError):
            cluster.start_workers(1)
        assert len(cluster.worker_spec) == 2  # nothing half-planned
        with pytest.raises(ValueError):
            cluster.start_workers(-1)
        with pytest.raises(ValueError):
            cluster.scale(-1)
        cluster.scale(1)
        assert wait_until(lambda: len(cluster.workers) == 1, 30)
        cluster.start_workers(1)  # freed ports are reused
        assert len(cluster.workers) == 2


def test_master_port_rules(netns: TestHosts, group: RuntimeGroup) -> None:
    with DaskCluster(group, n_workers=0) as cluster:
        port = cluster.master_port
        cluster.start_master(port)  # no-op on the running port
        cluster.start_master()
        with pytest.raises(MasterStartError, match=str(port)):
            cluster.start_master(port + 1)


def test_scheduler_port_lost_at_bind_is_chosen_again(
        group: RuntimeGroup, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # The race of two clusters starting at once: the manager's free-port checks pass, then
    # another program binds the port before the scheduler does. Our checks are made to miss
    # 8786's holder (the only stand-in); the bind and its EADDRINUSE are real.
    import dask_lazycluster._group_core as group_core
    import dask_lazycluster.cluster._master as master

    holder = socket.socket()
    # As the scheduler's own bind does: a port in TIME_WAIT must not keep the holder out.
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 8786))
        holder.listen()
    except OSError:
        pass  # another program holds 8786 already, which sets up the race as well
    real_check = master.localhost_has_free_port

    def misses_8786(port: int) -> bool:
        return port == 8786 or real_check(port)

    monkeypatch.setattr(group_core, "localhost_has_free_port", misses_8786)
    monkeypatch.setattr(master, "localhost_has_free_port", misses_8786)
    try:
        with caplog.at_level("INFO", logger="dask_lazycluster"), \
                DaskCluster(group, n_workers=1, worker_class="distributed.Worker") as cluster, \
                Client(cluster) as client:
            assert cluster.master_port != 8786
            assert cluster.scheduler_address.endswith(f":{cluster.master_port}")
            client.wait_for_workers(1, timeout=60)  # the hosts' forwards follow the new port
            assert client.submit(sum, range(5)).result(timeout=30) == 10
        assert "scheduler port 8786 was taken since it was chosen" in caplog.text
    finally:
        holder.close()


def test_worker_port_taken_on_its_host_after_the_snapshot_is_chosen_again(
        hosts: TestHosts, caplog: pytest.LogCaptureFixture) -> None:
    # The cluster reuses the group's fresh port snapshot; a program that binds the worker's
    # port on its host after that makes the worker's own bind fail there (really).
    first = 29500 + os.getpid() % 400
    group = RuntimeGroup(hosts=hosts.names[:1])
    try:
        holder = group.execute_task(RuntimeTask("hold").run_command(
            f"python3 -c 'import socket, time; s = socket.socket(); "
            f"s.bind((\"127.0.0.1\", {first})); s.listen(); print(\"held\", flush=True); "
            f"time.sleep(120)'"), execute_async=True)
        assert isinstance(holder, RuntimeTask)
        assert wait_until(lambda: "held" in holder.execution_log, 30), holder.execution_log
        with caplog.at_level("INFO", logger="dask_lazycluster"), \
                DaskCluster(group, n_workers=1, worker_class="distributed.Worker",
                            ports=list(range(first, first + 10)), master_port=free_port(),
                            tunnel=True) as cluster, Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            (address,) = client.scheduler_info()["workers"]
            assert not address.endswith(f":{first}"), address
            assert client.submit(sum, range(5)).result(timeout=30) == 10
        assert "a port was taken on" in caplog.text, caplog.text
    finally:
        group.cleanup()
    assert wait_no_leftovers(hosts) == {}


def test_wrong_python_fails_fast_naming_host_and_path(hosts: TestHosts,
                                                      group: RuntimeGroup) -> None:
    started = time.monotonic()
    with pytest.raises(LazyclusterError, match="/no/such/python") as info:
        DaskCluster(group, python="/no/such/python", n_workers=1)
    assert hosts.names[0] in str(info.value)
    assert time.monotonic() - started < 30
    assert wait_no_leftovers(hosts) == {}


def test_custom_launchers_are_honoured(netns: TestHosts, group: RuntimeGroup) -> None:
    class FirstHostOnly(RoundRobinLauncher):
        def select_host(self, counts: dict[str, int], max_per_host: int | None) -> str:
            return self.runtime_group.hosts[0]

    class FixedPort(LocalMasterLauncher):
        chosen = 0

        def start(self, ports: list[int] | int, timeout: int = 3, debug: bool = False) -> list[int]:
            return super().start(self.chosen, timeout, debug)

    master = FixedPort(group)
    master.chosen = free_port()
    with DaskCluster(group, master_launcher=master, worker_launcher=FirstHostOnly(group),
                     n_workers=3) as cluster, Client(cluster) as client:
        assert cluster.master_port == master.chosen
        assert master.process is cluster.scheduler
        assert worker_hosts(client) == Counter({netns.names[0]: 3})


def test_max_workers_per_host(netns: TestHosts, group: RuntimeGroup) -> None:
    with DaskCluster(group, n_workers=3, max_workers_per_host=1,
                     worker_class="distributed.Worker") as cluster:
        with pytest.raises(WorkersUnavailableError, match="max-workers-per-host=1") as info:
            cluster.scale(4)
        assert "port" not in str(info.value)  # the ports are not the problem
        assert set(info.value.causes) == set(netns.names)
        assert len(cluster.worker_spec) == 3  # nothing changed


@pytest.mark.parametrize("own_process", [False, True], ids=["in-process", "scheduler-process"])
def test_manager_killed_leaves_nothing_running(hosts: TestHosts, own_process: bool) -> None:
    script = (
        "import os, dask\n"
        "from dask_lazycluster import DaskCluster, RuntimeGroup\n"
        f"dask.config.set({{'lazycluster.scheduler-process': {own_process}}})\n"
        f"cluster = DaskCluster(RuntimeGroup(hosts={hosts.names!r}), tunnel=False)\n"
        "print('ready', getattr(cluster.scheduler, 'pid', os.getpid()), flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    def scratch_dirs() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("lazycluster-scheduler-*"))

    scratch_before = scratch_dirs()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})
    try:
        assert proc.stdout is not None
        word, pid = proc.stdout.readline().split()
        assert word == "ready" and (int(pid) != proc.pid) == own_process
        assert ours_left(hosts), "the workers should be running now"
    finally:
        proc.kill()
        proc.wait()
    started = time.monotonic()
    assert wait_until(lambda: not psutil.pid_exists(int(pid)) or
                      psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE, 15)
    assert wait_no_leftovers(hosts, timeout=30) == {}
    assert time.monotonic() - started < 30
    # The scheduler process's scratch space goes with it (nobody else is left to remove it).
    assert wait_until(lambda: scratch_dirs() <= scratch_before, 15), scratch_dirs()
    if not own_process:
        # An in-process scheduler's scratch dir died with the manager; Dask's next workspace
        # on this machine purges it, since nobody holds its lock any more.
        space = Path(tempfile.gettempdir()) / "dask-scratch-space"
        WorkSpace(str(space)).new_work_dir(prefix="next-").release()
        assert not [p for p in space.glob("scheduler-*") if p.suffix != ".dirlock"]


@pytest.fixture
def config_hosts(hosts: TestHosts) -> Iterator[list[str]]:
    import dask

    with dask.config.set({"lazycluster.hosts": hosts.names[:2], "lazycluster.n-workers": 1,
                          "lazycluster.worker-class": "distributed.Worker"}):
        yield hosts.names[:2]


def test_cluster_from_config_owns_and_closes_its_group(hosts: TestHosts,
                                                       config_hosts: list[str]) -> None:
    with DaskCluster() as cluster, Client(cluster) as client:
        assert cluster.runtime_group.hosts == config_hosts
        wait_workers(client, 1)
        runtimes = cluster.runtime_group.runtimes
    assert all(r.core.closed for r in runtimes)


def test_prologue_runs_once_per_host_and_failures_name_the_host(
        hosts: TestHosts, group: RuntimeGroup) -> None:
    from dask_lazycluster import TaskExecutionError

    with DaskCluster(group, n_workers=1, prologue="echo prepared > prologue.txt") as cluster:
        with Client(cluster) as client:
            wait_workers(client, 1)
            assert client.run(lambda: open("prologue.txt").read().strip()) == {
                a: "prepared" for a in client.scheduler_info()["workers"]}
    with pytest.raises(TaskExecutionError, match="no-such-installer"):
        DaskCluster(group, prologue="no-such-installer --all")
    assert wait_no_leftovers(hosts) == {}


def test_scale_by_memory_and_debug_output(hosts: TestHosts, group: RuntimeGroup,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    with DaskCluster(group, n_workers=0, worker_class="distributed.Worker",
                     worker_options={"memory_limit": "1GiB", "nthreads": 1}, debug=True) as cluster:
        with Client(cluster) as client:
            cluster.scale(memory="2.5GiB")
            wait_workers(client, 3)
            cluster.scale(cores=2)  # never scales down below what memory= asked before
            assert len(cluster.worker_spec) == 2
    assert "Start worker at" in capfd.readouterr().out  # remote output streamed live


def test_interpreter_exit_without_close_leaves_nothing(hosts: TestHosts) -> None:
    script = (
        "from dask_lazycluster import DaskCluster, RuntimeGroup\n"
        f"cluster = DaskCluster(RuntimeGroup(hosts={hosts.names!r}), tunnel=False)\n"
        "print('ready', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ})
    assert done.returncode == 0 and "ready" in done.stdout, done.stderr[-2000:]
    assert wait_no_leftovers(hosts, timeout=30) == {}
