"""Every host as itself: sizing, per-host options, setup, upload, GPUs, inherited config,
on real hosts that differ (cores, memory, where Python lives, GPUs)."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
import yaml
from distributed import Client

from dask_lazycluster import (
    DaskCluster,
    LazyclusterError,
    RuntimeGroup,
    SetupError,
    WorkersUnavailableError,
)
from dask_lazycluster.testing import HostSpec, TestHosts
from dask_lazycluster.testing.pytest_plugin import start_hosts

from .conftest import wait_no_leftovers
from .helpers import wait_until

MIB = 2**20
ALT_PYTHON = "/opt/lzenv/bin/python3"


@pytest.fixture(scope="module")
def mixed(test_hosts: TestHosts, ssh_home: Path) -> Iterator[TestHosts]:
    """Host 1: one core, 1 GiB, two GPUs. Host 2: Python only at /opt/lzenv. Host 3: plain."""
    if test_hosts.mode != "netns":
        pytest.skip("hosts that differ need netns mode (run as root)")
    specs = {1: HostSpec(cpus=1, memory="1G", gpus=2), 2: HostSpec().with_python_at("/opt/lzenv")}
    with start_hosts("lzmix", 3, home=test_hosts.home, specs=specs) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def group(mixed: TestHosts) -> Iterator[RuntimeGroup]:
    with dask.config.set({"lazycluster.hosts": [
            mixed.names[0], mixed.names[2], {"host": mixed.names[1], "python": ALT_PYTHON}]}):
        runtime_group = RuntimeGroup(hosts=mixed.names)
    yield runtime_group
    runtime_group.cleanup()
    assert wait_no_leftovers(mixed) == {}


def sizes(client: Client) -> dict[str, list[tuple[int, int]]]:
    """Hostname to the (threads, memory limit) of each of its workers (retiring ones skipped)."""
    found: dict[str, list[tuple[int, int]]] = {}
    for host, threads, memory in client.run(lambda dask_worker: (
            __import__("socket").gethostname(), dask_worker.state.nthreads,
            dask_worker.memory_manager.memory_limit), on_error="ignore").values():
        found.setdefault(host, []).append((threads, memory))
    return {h: sorted(v) for h, v in found.items()}


def wait_workers(client: Client, n: int) -> None:
    assert wait_until(lambda: len(client.scheduler_info()["workers"]) == n, 90), (
        f"expected {n} workers, have {len(client.scheduler_info()['workers'])}")


def test_the_hosts_really_differ(mixed: TestHosts, group: RuntimeGroup) -> None:
    first, second, third = (group.get_runtime(n) for n in mixed.names)
    assert (first.cpu_cores, third.cpu_cores) == (1, os.cpu_count())
    assert first.memory == 1024 * MIB and third.memory > first.memory
    assert len(first.gpus) == 2 and not third.gpus
    # The config's per-host python applies to a group made by hand too (not only clusters).
    assert second.python == ALT_PYTHON
    assert second.info["distributed_version"] is not None


def test_each_worker_is_sized_to_its_own_host_and_rebalanced_on_scale(
        mixed: TestHosts, group: RuntimeGroup) -> None:
    a, b, c = mixed.names
    memory = {n: group.get_runtime(n).memory for n in mixed.names}
    with DaskCluster(group) as cluster, Client(cluster) as client:
        wait_workers(client, 3)
        assert sizes(client) == {a: [(1, memory[a])], b: [(2, memory[b])], c: [(2, memory[c])]}
        cluster.scale(6)
        wait_workers(client, 6)
        assert wait_until(lambda: sizes(client) == {
            a: [(1, memory[a] // 2)] * 2, b: [(1, memory[b] // 2)] * 2,
            c: [(1, memory[c] // 2)] * 2}, 60), sizes(client)
        assert client.submit(sum, range(10)).result() == 45
        cluster.scale(3)
        assert wait_until(lambda: sizes(client) == {
            a: [(1, memory[a])], b: [(2, memory[b])], c: [(2, memory[c])]}, 90), sizes(client)
        # scale(cores=) counts real sizes: host 1 has one core, the next host two.
        cluster.scale(0)
        wait_workers(client, 0)
        cluster.scale(cores=3)
        assert len(cluster.worker_spec) == 2


def test_gpus_become_resources_and_tasks_find_them(mixed: TestHosts, group: RuntimeGroup) -> None:
    gpu_host = mixed.names[0]
    with DaskCluster(group) as cluster, Client(cluster) as client:
        wait_workers(client, 3)
        resources = {info["name"].rsplit("-", 1)[0]: info.get("resources", {})
                     for info in client.scheduler_info()["workers"].values()}
        assert resources == {gpu_host: {"GPU": 2}, mixed.names[1]: {}, mixed.names[2]: {}}
        where = client.submit(lambda: __import__("socket").gethostname(),
                              resources={"GPU": 1}, pure=False).result()
        assert where == gpu_host


def test_per_host_options_env_worker_class_max_workers_and_setup(
        mixed: TestHosts, group: RuntimeGroup) -> None:
    a, b, c = mixed.names
    options: dict[str, dict[str, Any]] = {
        a: {"max_workers": 1, "env": {"ONLY_A": "1"}},
        c: {"worker-class": "distributed.Worker",
            "setup": ["export LZ_SETUP=activated", "cd /"]},
    }
    with DaskCluster(group, n_workers=0, host_options=options, env={"EVERYWHERE": "yes"},
                     worker_options={"nthreads": 1}) as cluster, Client(cluster) as client:
        cluster.scale(6)
        wait_workers(client, 6)
        facts = client.run(lambda dask_worker: (
            __import__("socket").gethostname(), os.environ.get("ONLY_A"),
            os.environ.get("EVERYWHERE"), os.environ.get("LZ_SETUP"), dask_worker.nanny is None))
        hosts = Counter(f[0] for f in facts.values())
        assert hosts == Counter({a: 1, b: 3, c: 2})  # a holds one; round robin fills the rest
        for host, only_a, everywhere, setup, plain_worker in facts.values():
            assert (only_a == "1") == (host == a) and everywhere == "yes"
            assert (setup == "activated") == (host == c)
            assert plain_worker == (host == c)  # Workers on c, nannies elsewhere


def test_uploads_reach_new_workers_and_hosts_that_reconnect(
        mixed: TestHosts, group: RuntimeGroup, tmp_path: Path) -> None:
    package = tmp_path / "lzshared"
    package.mkdir()
    (package / "__init__.py").write_text("ANSWER = 42\n")
    target = mixed.names[2]
    with DaskCluster(group, n_workers=0, upload=[str(package)],
                     worker_class="distributed.Worker") as cluster, Client(cluster) as client:
        cluster.scale(3)
        wait_workers(client, 3)
        assert set(client.run(lambda: __import__("lzshared").ANSWER).values()) == {42}
        cluster.scale(6)  # new workers on hosts that already have the upload
        wait_workers(client, 6)
        assert set(client.run(lambda: __import__("lzshared").ANSWER).values()) == {42}
        # A host that loses its connection loses its working dir (the supervisor removes it
        # when the manager vanishes); once back, its next worker gets the upload again.
        mixed.set_link(target, False)
        assert wait_until(lambda: not group.get_runtime(target).is_alive, 30)
        mixed.set_link(target, True)
        assert wait_until(lambda: group.get_runtime(target).is_alive, 60)
        cluster.scale(0)
        wait_workers(client, 0)
        cluster.scale(6)
        wait_workers(client, 6)
        on_target = [a for a, w in client.scheduler_info()["workers"].items()
                     if w["name"].startswith(target)]
        assert on_target
        assert set(client.run(lambda: __import__("lzshared").ANSWER,
                              workers=on_target).values()) == {42}


def test_workers_inherit_the_managers_config(mixed: TestHosts, group: RuntimeGroup) -> None:
    key = "distributed.worker.memory.target"

    def resources(client: Client) -> set[tuple[tuple[str, float], ...]]:
        return {tuple(sorted((k, v) for k, v in w["resources"].items() if k != "GPU"))
                for w in client.scheduler_info()["workers"].values()}

    with dask.config.set({key: 0.42, "lazycluster-test.marker": "from-the-manager",
                          "distributed.worker.resources": {"LZTOKEN": 1}}):
        with DaskCluster(group) as cluster, Client(cluster) as client:
            wait_workers(client, 3)
            seen = client.run(lambda: (dask.config.get(key),
                                       dask.config.get("lazycluster-test.marker")))
            assert set(seen.values()) == {(0.42, "from-the-manager")}
            assert resources(client) == {(("LZTOKEN", 1),)}  # the workers act on it
        # An explicit worker option still wins over the inherited config.
        with DaskCluster(group, worker_options={"resources": {"LZTOKEN": 5}}) as cluster, \
                Client(cluster) as client:
            wait_workers(client, 3)
            assert resources(client) == {(("LZTOKEN", 5),)}


def test_a_missing_python_and_a_failing_setup_line_are_named(
        mixed: TestHosts, group: RuntimeGroup) -> None:
    a, b, c = mixed.names
    # Host 2 has no interpreter at the manager's path: asking for it there is named.
    with pytest.raises(LazyclusterError, match=rf"'{b}'.*{sys.executable}"):
        DaskCluster(RuntimeGroup(runtimes=[group.get_runtime(b)]), python=sys.executable,
                    n_workers=1)
    with DaskCluster(group, n_workers=0, host_options={c: {"setup": ["true", "false"]}}) as cluster, \
            Client(cluster) as client:
        cluster.scale(3)
        with pytest.raises(WorkersUnavailableError, match=rf"{c}.*setup line 2 \('false'\)"):
            cluster.wait_for_workers(3, timeout=120)
        with pytest.raises(WorkersUnavailableError):
            client.wait_for_workers(3, timeout=30)
        assert "2 of 3 requested" in repr(cluster) and c in repr(cluster)
        assert isinstance(cluster.failures, dict) and c in cluster.failures
    with pytest.raises(SetupError, match=c):
        DaskCluster(group, n_workers=3, host_options={c: {"setup": ["exit 3"]}})
    assert wait_no_leftovers(mixed) == {}


@pytest.mark.parametrize("options, error, words", [
    ({"no-such-host": {"python": "/x"}}, ValueError, "no-such-host"),
    ({"{a}": {"pyhton": "/x"}}, ValueError, "{a}.*pyhton"),
    ({"{a}": {"max_workers": "2"}}, TypeError, "max-workers of host '{a}'"),
    ({"{a}": {"env": {"X": 1}}}, ValueError, "env of host '{a}'"),
    ({"{a}": ["python"]}, TypeError, "host_options"),
])
def test_bad_host_options_are_named_and_leave_nothing(
        mixed: TestHosts, group: RuntimeGroup, options: dict[str, Any], error: type[Exception],
        words: str) -> None:
    a = mixed.names[0]
    options = {k.format(a=a): v for k, v in options.items()}
    with pytest.raises(error, match=words.format(a=a)):
        DaskCluster(group, host_options=options)
    assert wait_no_leftovers(mixed) == {}


def test_a_bad_hosts_entry_in_the_config_is_named(mixed: TestHosts) -> None:
    with dask.config.set({"lazycluster.hosts": [{"host": mixed.names[0], "setup": "not a list"}]}):
        with pytest.raises(TypeError, match=rf"lazycluster.hosts.*setup of host '{mixed.names[0]}'"):
            DaskCluster()


def test_a_plain_daskcluster_from_the_config_file_sizes_and_configures_each_host(
        mixed: TestHosts, tmp_path: Path) -> None:
    a, b, c = mixed.names
    (tmp_path / "lazycluster.yaml").write_text(
        "lazycluster:\n"
        "  hosts:\n"
        f"    - {a}\n"
        f"    - {{host: {b}, python: {ALT_PYTHON}, env: {{FROM_FILE: b}}}}\n"
        f"    - {{host: {c}, worker-class: distributed.Worker, max-workers: 1,\n"
        "       worker-options: {nthreads: 1}}\n")
    # The file as a user writes it; its section is applied like Dask applies a config file.
    section = yaml.safe_load((tmp_path / "lazycluster.yaml").read_text())["lazycluster"]
    with dask.config.set({f"lazycluster.{key}": value for key, value in section.items()}), \
            DaskCluster() as cluster, Client(cluster) as client:
        wait_workers(client, 3)
        facts = {f[0]: f[1:] for f in client.run(lambda dask_worker: (
            __import__("socket").gethostname(), dask_worker.state.nthreads,
            __import__("sys").executable, os.environ.get("FROM_FILE"),
            dask_worker.nanny is None)).values()}
        assert facts[a][0] == 1 and facts[b][0] == 2 and facts[c][0] == 1  # own cores; explicit
        assert facts[b][1] == ALT_PYTHON and facts[b][2] == "b"
        assert facts[c][3] is True and facts[a][3] is False  # c: plain Worker; a: nanny
    assert wait_no_leftovers(mixed) == {}


def test_adapt_beyond_what_the_hosts_allow_is_raised_by_wait_for_workers(
        mixed: TestHosts, group: RuntimeGroup) -> None:
    limits = {name: {"max_workers": 1} for name in mixed.names}
    with DaskCluster(group, n_workers=0, host_options=limits) as cluster, Client(cluster) as client:
        cluster.adapt(minimum=5, maximum=5, interval="200ms")
        client.wait_for_workers(3, timeout=120)  # as many as fit run
        with pytest.raises(WorkersUnavailableError, match="max-workers=1") as info:
            client.wait_for_workers(5, timeout=120)
        assert info.value.requested == 5 and set(info.value.causes) == set(mixed.names)
        assert len(client.scheduler_info()["workers"]) == 3
        assert "3 of 5 requested" in repr(cluster)
