"""Claims of docs/networking.md, scaling.md, mixed-hosts.md, named-clusters.md and cli.md that no
other test proved (see docs/claims.md), on the project's real sshd test hosts."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import dask
import psutil
import pytest
from distributed import Client, Security
from distributed.core import Status
from distributed.utils import get_ip

from dask_lazycluster import (
    ClusterNameInUseError,
    DaskCluster,
    LazyclusterError,
    MasterLauncher,
    NoPortsLeftError,
    Runtime,
    RuntimeGroup,
    StaleClusterError,
    UnknownClusterError,
    WorkerLauncher,
)
from dask_lazycluster._loop import run_sync
from dask_lazycluster.cluster._options import HostPlan
from dask_lazycluster.cluster._placement import HostCapacity
from dask_lazycluster.cluster._planner import WorkerPlanner
from dask_lazycluster.cluster._registry import Registration, registry_dir
from dask_lazycluster.testing import TestHosts
from dask_lazycluster.testing.pytest_plugin import start_hosts

from .conftest import wait_no_leftovers
from .helpers import (
    echo_server_in_host,
    echo_server_on_manager,
    free_port,
    new_tcp_refused,
    wait_until,
)
from .test_cli import assert_one_line_error, cli_env, run_cli
from .test_cluster import exchange_between_workers, wait_workers
from .test_named import killed_claimer, ls_rows
from .test_security import listening_addresses

pytestmark = pytest.mark.usefixtures("leak_check")


def port_of(address: str) -> int:
    """The port of a Dask address or URL."""
    port = urlparse(address).port
    assert port is not None, address
    return port


def manager_listeners(port: int) -> set[str]:
    """Addresses the manager's network namespace listens on for TCP ``port`` (any process)."""
    return {c.laddr.ip for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def host_of(worker_info: dict[str, object]) -> str:
    """The host of a worker, from its name ``<host>-<n>``."""
    return str(worker_info["name"]).rsplit("-", 1)[0]


# -- networking.md --------------------------------------------------------------------------------


@contextmanager
def fresh_group(hosts: TestHosts) -> Iterator[RuntimeGroup]:
    """A group made now, so that its reading of the hosts' busy ports is current."""
    group = RuntimeGroup(hosts=hosts.names)
    try:
        yield group
    finally:
        group.cleanup()


def test_tunnel_mode_is_the_default_and_keeps_the_manager_on_loopback(netns: TestHosts) -> None:
    names = netns.names
    busy = free_port()  # busy inside one host only: neither scheduler nor worker may take it
    ports = [busy] + [free_port() for _ in range(7)]
    with echo_server_in_host(netns, names[1], busy), fresh_group(netns) as group, \
            DaskCluster(group, ports=ports) as cluster, Client(cluster) as client:
        assert cluster.tunnel is True and cluster.direct_hosts == []
        wait_workers(client, 3)
        assert client.submit(lambda: 6 * 7).result() == 42
        # the scheduler and the dashboard listen on the manager's loopback only
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
        for port in (cluster.master_port, port_of(cluster.dashboard_link)):
            assert manager_listeners(port) == {"127.0.0.1"}, port
        listening = {name: netns.listening_ports(name) for name in names}
        for address, info in client.scheduler_info()["workers"].items():
            host = host_of(info)
            worker, nanny = port_of(address), port_of(str(info["nanny"]))
            # two ports of the list per nanny worker, none busy anywhere
            assert {worker, nanny} <= set(ports) and busy not in (worker, nanny)
            # the worker's port reaches it on every host and on the manager...
            assert all(worker in listening[name] for name in names), (host, worker)
            assert manager_listeners(worker) == {"127.0.0.1"}
            # ...the nanny's on its own host and the manager only
            assert {name for name in names if nanny in listening[name]} == {host}
            assert manager_listeners(nanny) == {"127.0.0.1"}
    assert wait_no_leftovers(netns) == {}


def test_direct_mode_takes_no_ports_and_dials_the_ssh_address(
        netns: TestHosts, group: RuntimeGroup) -> None:
    one = [free_port()]  # not enough for one tunneled nanny worker: direct mode needs none
    addresses = {host.name: host.address for host in netns.hosts}
    with DaskCluster(group, tunnel=False, ports=one) as cluster, Client(cluster) as client:
        assert cluster.tunnel is False
        wait_workers(client, 3)
        for address, info in client.scheduler_info()["workers"].items():
            own = addresses[host_of(info)]
            assert urlparse(address).hostname == own and port_of(address) not in one
            assert urlparse(str(info["nanny"])).hostname == own
        # the workers dial the manager's end of their SSH connection, not the shown address
        port = cluster.master_port
        dialled = client.run(lambda dask_worker: dask_worker.scheduler.address)
        assert set(dialled.values()) == {f"tcp://{netns.manager_address}:{port}"}
        assert cluster.scheduler_address == f"tcp://{get_ip()}:{port}"
        assert get_ip() != netns.manager_address
        assert all(r.forwarded_ports == [] for r in group.runtimes)  # no forwards
        assert exchange_between_workers(client) == [10_000_000] * 3
    assert wait_no_leftovers(netns) == {}


def test_auto_mode_from_the_config_key_logs_its_choice(
        netns: TestHosts, fw_hosts: TestHosts, caplog: pytest.LogCaptureFixture) -> None:
    open_host, walled = netns.names[0], fw_hosts.names[0]
    mixed = RuntimeGroup(hosts=[open_host, walled])
    try:
        with caplog.at_level(logging.INFO, logger="dask_lazycluster"), \
                dask.config.set({"lazycluster.tunnel": "auto"}), \
                DaskCluster(mixed, worker_class="distributed.Worker") as cluster, \
                Client(cluster) as client:
            assert cluster.tunnel == "auto", cluster.tunnel
            assert cluster.direct_hosts == [open_host], [
                r.getMessage() for r in caplog.records if "auto" in r.getMessage()]
            wait_workers(client, 2)
            assert exchange_between_workers(client) == [10_000_000] * 2
        assert f"tunnel='auto': direct ['{open_host}'], tunneled ['{walled}']" in caplog.text
    finally:
        mixed.cleanup()
    assert wait_no_leftovers(netns, fw_hosts) == {}


def test_the_scheduler_port_moves_on_when_8786_is_busy_on_a_host(netns: TestHosts) -> None:
    ports = [free_port() for _ in range(8)]
    with echo_server_in_host(netns, netns.names[2], DaskCluster.DEFAULT_MASTER_PORT), \
            fresh_group(netns) as group, DaskCluster(group, ports=ports, n_workers=1,
                        worker_class="distributed.Worker") as cluster, Client(cluster) as client:
        assert cluster.master_port != DaskCluster.DEFAULT_MASTER_PORT
        assert cluster.master_port in ports
        assert client.submit(lambda: 1 + 1).result() == 2
        assert our_registrations() == []  # named-clusters.md: unnamed clusters are not


def our_registrations() -> list[str]:
    """Named-cluster records of this process."""
    directory = registry_dir()
    records = sorted(directory.glob("*.json")) if directory.is_dir() else []
    return [r.stem for r in records if json.loads(r.read_text()).get("pid") == os.getpid()]


def test_scheduler_host_relays_nanny_ports_to_its_host_only(
        netns: TestHosts, group: RuntimeGroup) -> None:
    names = netns.names
    with DaskCluster(group, scheduler_host=names[0], tunnel=True) as cluster, \
            Client(cluster) as client:
        wait_workers(client, 3)
        assert client.submit(lambda: 6 * 7).result() == 42
        listening = {name: netns.listening_ports(name) for name in names}
        for address, info in client.scheduler_info()["workers"].items():
            host = host_of(info)
            worker, nanny = port_of(address), port_of(str(info["nanny"]))
            assert all(worker in listening[name] for name in names), (host, worker)
            assert {name for name in names if nanny in listening[name]} == {host, names[0]}
    assert wait_no_leftovers(netns) == {}


@pytest.fixture
def manager_cannot_dial_host3(netns: TestHosts) -> Iterator[str]:
    """Host 3 takes no new TCP connection from the manager but SSH; the hosts reach it."""
    with new_tcp_refused(netns, 2, netns.manager_address, outgoing=False, table="lzc2"):
        yield netns.names[2]


def test_auto_with_the_scheduler_on_a_host_ignores_what_the_manager_reaches(
        netns: TestHosts, manager_cannot_dial_host3: str) -> None:
    names = netns.names[:3]
    group = RuntimeGroup(hosts=names)
    try:
        # with the scheduler on the manager, the manager's reach counts
        with DaskCluster(group, tunnel="auto", n_workers=0) as cluster:
            assert cluster.direct_hosts == names[:2]
        # with it on a host, only host-to-host TCP does
        with DaskCluster(group, tunnel="auto", scheduler_host=names[0],
                         worker_class="distributed.Worker") as cluster, Client(cluster) as client:
            assert cluster.direct_hosts == names
            wait_workers(client, 3)
            assert exchange_between_workers(client) == [10_000_000] * 3
    finally:
        group.cleanup()
    assert wait_no_leftovers(netns) == {}


def test_an_own_security_needs_worker_certificates(netns: TestHosts, group: RuntimeGroup) -> None:
    with pytest.raises(ValueError, match="require_encryption"):
        DaskCluster(group, security=Security())
    with DaskCluster(group, security=Security.temporary(), tunnel=False, n_workers=1,
                     worker_class="distributed.Worker") as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        with Client(cluster) as client:  # takes cluster.security by itself
            assert client.submit(lambda: 6 * 7).result() == 42
        with pytest.raises((OSError, TimeoutError)):
            Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout=3)
    assert wait_no_leftovers(netns) == {}


def test_forwards_bind_loopback_and_go_with_cleanup(netns: TestHosts) -> None:
    name = netns.names[0]
    to_host, from_host, local = free_port(), free_port(), free_port()
    runtime = Runtime(name)
    try:
        with echo_server_on_manager(to_host), echo_server_in_host(netns, name, from_host):
            runtime.expose_port_to_runtime(to_host)
            runtime.expose_port_from_runtime(from_host, local)
            on_host = {address for address, port in listening_addresses(netns, name)
                       if port == to_host}
            assert on_host == {"127.0.0.1"}
            assert manager_listeners(local) == {"127.0.0.1"}
            runtime.cleanup()
            assert to_host not in netns.listening_ports(name)
            assert manager_listeners(local) == set()
    finally:
        runtime.cleanup()
    assert wait_no_leftovers(netns) == {}


# -- scaling.md -----------------------------------------------------------------------------------


def test_scale_returns_before_the_workers_run_and_names_them(netns: TestHosts,
                                                            group: RuntimeGroup) -> None:
    names = netns.names
    slow_start = {name: {"setup": ["sleep 8"]} for name in names}  # each host's first worker
    with DaskCluster(group, n_workers=0, host_options=slow_start,
                     worker_class="distributed.Worker") as cluster, Client(cluster) as client:
        for bad in (-1, 1.5, "2", True):
            with pytest.raises(ValueError, match="n must be"):
                cluster.scale(bad)
        cluster.scale(3)
        assert client.scheduler_info()["workers"] == {}  # they start in the background
        assert cluster.worker_count == 3
        client.wait_for_workers(3, timeout=120)
        for name in cluster.worker_spec:
            host, number = name.rsplit("-", 1)
            assert host in names and number.isdigit()
            assert cluster.runtime_of(name).host == host
    assert wait_no_leftovers(netns) == {}


def test_scale_down_retires_gracefully_and_closes_the_forwards(netns: TestHosts,
                                                              group: RuntimeGroup) -> None:
    with DaskCluster(group, worker_class="distributed.Worker") as cluster, \
            Client(cluster) as client:
        wait_workers(client, 3)
        # the newest worker of the last host goes first when all hosts have one
        leaving = next(a for a, i in client.scheduler_info()["workers"].items()
                       if host_of(i) == netns.names[2])
        token = client.submit(lambda: secrets.token_hex(16), workers=[leaving], pure=False)
        value = token.result()
        cluster.scale(2)
        wait_workers(client, 2)
        assert leaving not in client.scheduler_info()["workers"]
        # moved before the worker closed: a recomputation would give another token
        assert client.submit(lambda x: x, token, pure=False).result() == value
        assert all(port_of(leaving) not in r.forwarded_ports for r in group.runtimes)
    assert wait_no_leftovers(netns) == {}


def test_scale_down_takes_unstarted_workers_first_then_the_newest_of_the_busiest_host() -> None:
    gib = 2**30
    capacities = {h: HostCapacity(h, 4, 4 * gib) for h in ("a", "b", "c")}
    planner = WorkerPlanner({h: HostPlan(h) for h in capacities}, capacities,
                            list(range(100, 200)), set(), lambda p: False, set(), None)
    names = [name for name, *_ in planner.place(6, [])]
    hosts = [planner.hosts_of[n] for n in names]
    assert hosts == ["a", "b", "c", "a", "b", "c"]
    # not started yet (unknown to the scheduler): newest first, then balance
    assert planner.to_remove(3, names, names[:3] + names[4:5]) == [names[5], names[3], names[4]]
    # all started: the newest of the busiest host, ties to the later host in the group
    assert planner.to_remove(2, names, names) == [names[5], names[4]]
    assert planner.to_remove(4, names, names) == [names[5], names[4], names[3], names[2]]


def test_start_workers_raises_a_start_failure_that_failures_keep(netns: TestHosts,
                                                                group: RuntimeGroup) -> None:
    first = netns.names[0]
    failing = {name: {"setup": ["exit 3"]} for name in netns.names}
    with DaskCluster(group, n_workers=0, host_options=failing) as cluster:
        with pytest.raises(LazyclusterError, match=rf"{first}.*setup line 1"):
            cluster.start_workers(1)
        assert first in cluster.failures
    assert wait_no_leftovers(netns) == {}


def test_adapt_beyond_the_ports_fails_each_step_and_logs_it(
        netns: TestHosts, group: RuntimeGroup, caplog: pytest.LogCaptureFixture) -> None:
    ports = sorted({free_port() for _ in range(8)})[:5]  # at most two nanny workers
    adaptive = logging.getLogger("distributed.deploy.adaptive")  # does not propagate
    adaptive.addHandler(caplog.handler)
    try:
        with DaskCluster(group, n_workers=0, ports=ports) as cluster:
            cluster.adapt(minimum=4, maximum=4, interval="200ms")
            assert wait_until(lambda: any(
                r.exc_info and isinstance(r.exc_info[1], NoPortsLeftError)
                and "Adaptive encountered an error" in r.getMessage()
                for r in list(caplog.records)), 60), caplog.text[-2000:]
            assert cluster.worker_spec == {}  # the step failed as a whole
    finally:
        adaptive.removeHandler(caplog.handler)
    assert wait_no_leftovers(netns) == {}


def test_plain_launchers_contribute_select_host_and_the_port(netns: TestHosts,
                                                              group: RuntimeGroup) -> None:
    class PortOnly(MasterLauncher):  # no scheduler_spec: the local scheduler's is used
        def start(self, ports: list[int] | int, timeout: int = 3,
                  debug: bool = False) -> list[int]:
            self._port = chosen
            return []

    class LastHost(WorkerLauncher):
        def start(self, worker_count: int, master_port: int, ports: list[int],
                  debug: bool = False) -> list[int]:
            raise AssertionError("the cluster starts its workers itself")

        def select_host(self, counts: dict[str, int], max_per_host: int | None) -> str:
            return self.runtime_group.hosts[-1]

    chosen = free_port()
    with DaskCluster(group, master_launcher=PortOnly(group), worker_launcher=LastHost(group),
                     n_workers=2, worker_class="distributed.Worker") as cluster, \
            Client(cluster) as client:
        assert cluster.master_port == chosen and port_of(cluster.scheduler_address) == chosen
        wait_workers(client, 2)
        assert {host_of(i) for i in client.scheduler_info()["workers"].values()} == {
            netns.names[-1]}
    assert wait_no_leftovers(netns) == {}


# -- mixed-hosts.md -------------------------------------------------------------------------------


def test_adapt_without_a_maximum_gives_each_host_its_max_workers_or_its_cores() -> None:
    gib = 2**30
    capacities = {"a": HostCapacity("a", 4, 8 * gib),
                  "b": HostCapacity("b", 8, 8 * gib, max_workers=2, limit_name="max-workers")}
    planner = WorkerPlanner({h: HostPlan(h) for h in capacities}, capacities,
                            list(range(100, 200)), set(), lambda p: False, set(), None)
    planner.adapt_to(float("inf"))
    assert planner.slots == {"a": 4, "b": 2} and planner.adaptive
    planned = planner.place(6, [])
    names = [name for name, *_ in planned]
    assert {size_.nthreads for _, host, _, size_ in planned if host == "a"} == {1}  # 4 / 4
    assert {size_.nthreads for _, host, _, size_ in planned if host == "b"} == {4}  # 8 / 2
    planner.set_slots({"a": 1, "b": 1})  # scale(n) plans no longer apply
    assert planner.slots == {"a": 4, "b": 2} and planner.mismatched(names) == []


@pytest.fixture(scope="module")
def lossy(netns: TestHosts) -> Iterator[TestHosts]:
    """A host of our own: the test cuts its link."""
    with start_hosts("lzc2lossy", 1, home=netns.home) as hosts:
        yield hosts


def test_setup_lines_reach_the_workers_after_the_host_reconnects(lossy: TestHosts) -> None:
    name = lossy.names[0]
    group = RuntimeGroup(hosts=[name])
    try:
        with DaskCluster(group, host_options={name: {"setup": ["export LZ_C2=activated"]}},
                         worker_class="distributed.Worker") as cluster, \
                Client(cluster) as client:
            wait_workers(client, 1)
            assert set(client.run(lambda: os.environ.get("LZ_C2")).values()) == {"activated"}
            supervisors = set(client.run(os.getppid).values())  # the workers' parent
            lossy.set_link(name, False)
            try:
                assert wait_until(lambda: not group.get_runtime(name).is_alive, 60)
            finally:
                lossy.set_link(name, True)
            assert wait_until(lambda: group.get_runtime(name).is_alive, 60)
            cluster.scale(0)
            wait_workers(client, 0)
            cluster.scale(2)  # a new supervisor on the reconnected host, setup run again
            wait_workers(client, 2)
            assert not set(client.run(os.getppid).values()) & supervisors
            assert set(client.run(lambda: os.environ.get("LZ_C2")).values()) == {"activated"}
    finally:
        group.cleanup()
    assert wait_no_leftovers(lossy, timeout=60) == {}


# -- named-clusters.md ----------------------------------------------------------------------------


def test_the_name_rule_and_the_errors_name_the_cluster() -> None:
    for bad in ["", "-a", ".a", "_a", "a" * 65, "a/b", "a b", "é"]:
        with pytest.raises(ValueError, match="name"):
            DaskCluster.from_name(bad)
    for good in ["a", "Z" * 64, f"t{os.getpid()}.c2_x-y"]:
        with pytest.raises(UnknownClusterError, match=re.escape(good)):
            DaskCluster.from_name(good)
    for error in (UnknownClusterError, StaleClusterError, ClusterNameInUseError):
        assert issubclass(error, LazyclusterError)


def run_proxy(script: str, name: str) -> None:
    """Run ``script`` (Python, the cluster's name in ``sys.argv[1]``) in another process."""
    done = subprocess.run([sys.executable, "-c", script, name], env=cli_env(),
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-3000:]


PROXY_HEAD = "import sys\nfrom distributed import Client\nfrom dask_lazycluster import DaskCluster\n"


def test_a_proxys_adapt_outlives_it_and_what_closes_the_cluster(hosts: TestHosts) -> None:
    name = f"t{os.getpid()}-c2adapt"
    group = RuntimeGroup(hosts=hosts.names[:2])
    try:
        with DaskCluster(group, n_workers=0, name=name, worker_class="distributed.Worker") \
                as cluster, Client(cluster) as client:
            assert our_registrations() == [name]
            run_proxy(PROXY_HEAD + (
                "with DaskCluster.from_name(sys.argv[1], shutdown_on_close=False) as proxy:\n"
                "    proxy.adapt(minimum=0, maximum=2, interval='200ms', wait_count=2,\n"
                "                target_duration='1s')\n"
                "    Client(proxy).close()\n"
                "print('done', flush=True)\n"), name)
            # neither the block's end nor Client(proxy).close() stopped it
            assert cluster.status == Status.running and not cluster.closed_on_request

            def slow(x: int) -> int:
                __import__("time").sleep(0.3)
                return x

            futures = client.map(slow, range(40))  # only adaptive scaling can run these
            assert wait_until(lambda: len(client.scheduler_info()["workers"]) >= 1, 60)
            assert sum(client.gather(futures)) == sum(range(40))
            del futures
            # a proxy's own `with` block closes the cluster for everyone
            run_proxy(PROXY_HEAD + "with DaskCluster.from_name(sys.argv[1]):\n    pass\n"
                      "print('done', flush=True)\n", name)
            assert wait_until(lambda: cluster.closed_on_request, 60)
            assert cluster.status == Status.closed
        assert our_registrations() == []
        with DaskCluster(group, n_workers=1, name=name,
                         worker_class="distributed.Worker") as cluster:
            run_proxy(PROXY_HEAD + "Client(DaskCluster.from_name(sys.argv[1])).shutdown()\n"
                      "print('done', flush=True)\n", name)
            assert wait_until(lambda: cluster.closed_on_request, 60)
            assert cluster.status == Status.closed
    finally:
        group.cleanup()
    assert wait_no_leftovers(hosts) == {}


# -- cli.md ---------------------------------------------------------------------------------------


def test_list_runtimes_long_shows_every_column_and_why_a_host_failed(
        hosts: TestHosts, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(f"Include {Path.home() / '.ssh' / 'config'}\n\n"
                      "Host lzc2gone\n    HostName lz-no-such-host.invalid\n")
    result = run_cli("list-runtimes", "-l", "--ssh-config", str(config))
    assert result.returncode == 0, result.stderr
    active, _, inactive = result.stdout.partition("Inactive hosts")
    assert re.search(r"^\s+HOST\s+CORES\s+MEMORY\s+GPUS\s+PYTHON\s+DISTRIBUTED$", active, re.M)
    for name in hosts.names:
        assert re.search(rf"^\s+{name}\s+\d+\s+\S+", active, re.M), result.stdout
    assert re.search(r"^\s+lzc2gone: .*resolve", inactive, re.M), result.stdout


def test_check_reports_on_every_host_and_exits_1_if_one_is_unusable(hosts: TestHosts) -> None:
    result = run_cli("check", "lz-no-such-host.invalid", hosts.names[0])
    assert_one_line_error(result, "lz-no-such-host.invalid")
    assert "lz-no-such-host.invalid: UNUSABLE" in result.stdout
    assert f"{hosts.names[0]}: ok" in result.stdout  # reported although listed after the bad one


def test_add_runtime_waits_for_the_lock_on_dot_ssh(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    config = home / ".ssh" / "config"
    lock = os.open(home / ".ssh", os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-m", "dask_lazycluster.cli", "add-runtime",
                                 "node1", "10.0.0.9"], env=cli_env(home), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(5)
            assert not config.exists()  # nothing written while another editor holds ~/.ssh
        finally:
            os.close(lock)  # releases the lock
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert config.read_text() == "Host node1\n    HostName 10.0.0.9\n"
    assert not (home / ".ssh" / "known_hosts").exists()  # the host key is not recorded


@contextmanager
def registered(name: str, info: dict[str, object] | None, delay: float = 0) -> Iterator[None]:
    """A real registration of ``name`` in this process: claimed only (``info`` None: still
    starting), or serving ``info`` after ``delay`` seconds."""
    registration = Registration(name)
    registration.claim()

    async def answer() -> dict[str, object]:
        await __import__("asyncio").sleep(delay)
        assert info is not None
        return info

    async def close() -> None:
        pass

    async def release() -> None:
        registration.release()

    try:
        if info is not None:
            run_sync(registration.serve({"info": answer, "close": close}))
        yield
    finally:
        run_sync(release())


def test_ls_shows_requested_starting_and_silent_clusters() -> None:
    base = {"hosts": ["h1"], "scheduler_address": "tcp://127.0.0.1:9", "dashboard_link": ""}
    short, full = f"t{os.getpid()}-c2short", f"t{os.getpid()}-c2full"
    starting, silent = f"t{os.getpid()}-c2starting", f"t{os.getpid()}-c2silent"
    with registered(short, {**base, "workers": 1, "requested": 3}), \
            registered(full, {**base, "workers": 2, "requested": 2}), \
            registered(starting, None), \
            registered(silent, {**base, "workers": 1, "requested": 1}, delay=20):
        rows = ls_rows()
        assert rows[short][1] == "1/3" and rows[full][1] == "2"
        assert rows[starting][1] == "starting" and rows[silent][1] == "?"


def test_down_names_a_stale_cluster() -> None:
    name = f"t{os.getpid()}-c2stale"
    with killed_claimer(name) as pid:
        result = run_cli("down", name)
        assert_one_line_error(result, name, str(pid))
    assert name not in ls_rows()
