"""The pure rules, without SSH: placement and sizing, port rules, per-host config, setup lines."""

from __future__ import annotations

import subprocess

import dask
import pytest

from dask_lazycluster._bootstrap import SETUP_FAILED_MARK, setup_script
from dask_lazycluster._ports import pick_port, take_free
from dask_lazycluster.cluster._options import HostPlan, host_plans
from dask_lazycluster.cluster._placement import (
    HostCapacity,
    NoRoomError,
    WorkerSize,
    gpu_share,
    layout,
    place,
    size,
    workers_for,
)
from dask_lazycluster.cluster._planner import WorkerPlanner, memory_bytes
from dask_lazycluster.config import check_host_options, host_entries, runtime_defaults, setting
from dask_lazycluster.exceptions import NoPortsLeftError, PortInUseError

GIB = 2**30
BIG = HostCapacity("big", cores=8, memory=32 * GIB, gpus=0)
SMALL = HostCapacity("small", cores=2, memory=4 * GIB, gpus=0)
GPU = HostCapacity("gpu", cores=4, memory=16 * GIB, gpus=2, max_workers=2)


def test_round_robin_fills_the_emptiest_host_first_in_group_order() -> None:
    assert place(5, [BIG, SMALL, GPU], {}) == ["big", "small", "gpu", "big", "small"]
    assert place(2, [BIG, SMALL, GPU], {"big": 2, "small": 1}) == ["gpu", "small"]
    # a host at its max-workers is skipped
    assert layout(7, [BIG, SMALL, GPU]) == {"big": 3, "small": 2, "gpu": 2}


def test_no_room_names_each_host_and_its_limit_and_places_nothing() -> None:
    full = HostCapacity("one", 1, GIB, max_workers=1, limit_name="max-workers-per-host")
    with pytest.raises(NoRoomError) as info:
        place(2, [full], {})
    assert info.value.reasons == {"one": "it runs its max-workers-per-host=1"}
    with pytest.raises(NoRoomError, match="no host is reachable"):
        place(1, [], {})


def test_a_launcher_choice_outside_the_open_hosts_is_refused() -> None:
    with pytest.raises(ValueError, match="'gpu'.*cannot take"):
        place(3, [BIG, GPU], {"gpu": 2}, select=lambda counts: "gpu")


def test_a_hosts_workers_share_its_cores_and_memory() -> None:
    assert size(BIG, 1) == WorkerSize(8, 32 * GIB, 0)
    assert size(BIG, 3) == WorkerSize(2, 32 * GIB // 3, 0)
    assert size(SMALL, 4) == WorkerSize(1, GIB, 0)  # at least one thread
    assert size(GPU, 2) == WorkerSize(2, 8 * GIB, 1)


def test_gpus_are_shared_out_so_none_is_left_over() -> None:
    two = HostCapacity("g", 4, GIB, gpus=2)
    shares: list[int] = []
    for _ in range(3):
        shares.append(gpu_share(two, 3, shares))
    assert shares == [1, 1, 0] and sum(shares) == 2
    assert gpu_share(HostCapacity("g", 4, GIB, gpus=5), 2, []) == 3


def test_scale_by_cores_counts_real_sizes() -> None:
    def sizes(counts: dict[str, int]) -> list[WorkerSize]:
        caps = {"big": BIG, "small": SMALL}
        return [size(caps[h], c) for h, c in counts.items() for _ in range(c)]

    # one worker: big (8 threads); two: big + small (10)
    assert workers_for([BIG, SMALL], sizes, cores=8) == 1
    assert workers_for([BIG, SMALL], sizes, cores=9) == 2
    assert workers_for([BIG, SMALL], sizes, memory=36 * GIB) == 2


def test_the_planner_sizes_replaces_and_keeps_explicit_options() -> None:
    plans = {"big": HostPlan("big"), "small": HostPlan("small", worker_options={"nthreads": 1})}
    planner = WorkerPlanner(plans, {"big": BIG, "small": SMALL}, list(range(100, 120)), {101},
                            lambda p: p == 103, set(), None)
    planned = planner.place(2, [])
    names = [name for name, *_ in planned]
    assert [host for _, host, _, _ in planned] == ["big", "small"]
    # two ports per nanny, skipping one busy on a host (101) and one on the manager (103)
    assert [ports for _, _, ports, _ in planned] == [[100, 102], [104, 105]]
    options = planner.options_for("small", planned[1][3], 30.0)
    assert options["nthreads"] == 1 and options["memory_limit"] == 4 * GIB
    planner.set_slots({"big": 2, "small": 2})
    # big's worker had the whole host: now too big; small's threads are explicit
    assert planner.mismatched(names) == ["big-0", "small-1"]
    planner.set_slots({"big": 1, "small": 2})
    assert planner.mismatched(names) == ["small-1"]  # its memory share is now too big
    planner.adapt_to(6)
    assert planner.slots == {"big": 3, "small": 3} and planner.adaptive
    planner.set_slots({"big": 1})
    assert planner.slots == {"big": 3, "small": 3}  # adapt fixed them


def test_memory_limits_are_read_as_dask_reads_them() -> None:
    assert memory_bytes(None, 8 * GIB, 2 * GIB) == 2 * GIB
    assert memory_bytes("auto", 8 * GIB, 2 * GIB) == 2 * GIB
    assert memory_bytes("1GiB", 8 * GIB, 2 * GIB) == GIB
    assert memory_bytes(0.25, 8 * GIB, 2 * GIB) == 2 * GIB
    assert memory_bytes(12345, 8 * GIB, 2 * GIB) == 12345


def test_port_rules() -> None:
    busy = {"a": {10}, "b": {11}}
    assert pick_port([10, 11, 12], busy, "ports") == 12
    with pytest.raises(PortInUseError, match="port 11 .* on b") as info:
        pick_port(11, busy, "master_port")
    assert info.value.port == 11
    with pytest.raises(PortInUseError, match="b, localhost"):
        pick_port(11, busy, "master_port", manager_busy=lambda p: True)
    with pytest.raises(NoPortsLeftError, match="none of the 2 ports in ports is free on all of a, b"):
        pick_port([10, 11], busy, "ports")
    with pytest.raises(TypeError, match="ports"):
        pick_port("10", busy, "ports")  # type: ignore[arg-type]
    assert take_free([1, 2, 3, 4], 2, {1}, lambda p: p == 2) == [3, 4]
    with pytest.raises(NoPortsLeftError):
        take_free([1, 2], 2, {1}, lambda p: False)


def test_host_options_merge_over_cluster_wide_values(tmp_path: object) -> None:
    cluster_wide = HostPlan("*", python="/usr/bin/python3", env={"A": "1", "B": "1"},
                            setup=["echo all"], worker_options={"nthreads": 2})
    plans = host_plans(["n1", "gpu"], cluster_wide,
                       {"gpu": {"env": {"B": "2"}, "setup": ["echo gpu"], "max-workers": 2}},
                       {"gpu": {"python": "/opt/conda/bin/python", "worker-options": {"x": 1}}})
    gpu = plans["gpu"]
    assert gpu.python == "/opt/conda/bin/python" and plans["n1"].python == "/usr/bin/python3"
    assert gpu.env == {"A": "1", "B": "2"} and gpu.setup == ["echo all", "echo gpu"]
    assert gpu.worker_options == {"nthreads": 2, "x": 1} and gpu.max_workers == 2
    with pytest.raises(ValueError, match="'nope'"):
        host_plans(["n1"], cluster_wide, {}, {"nope": {}})
    with pytest.raises(ValueError, match="upload path '/no/such/dir' .*'n1'"):
        host_plans(["n1"], cluster_wide, {}, {"n1": {"upload": ["/no/such/dir"]}})


def test_per_host_keys_are_checked_naming_host_key_and_source() -> None:
    assert check_host_options({"h": {"worker_class": "distributed.Worker", "max_workers": 2}}) \
        == {"h": {"worker-class": "distributed.Worker", "max-workers": 2}}
    with pytest.raises(ValueError, match="host 'h' has an unknown key 'pyhton'"):
        check_host_options({"h": {"pyhton": "/x"}})
    with pytest.raises(ValueError, match="env of host 'h' must be a dict of str to str"):
        check_host_options({"h": {"env": {"A": 1}}})
    with pytest.raises(TypeError, match="max-workers of host 'h'"):
        check_host_options({"h": {"max_workers": "2"}})
    with dask.config.set({"lazycluster.hosts": ["a", {"host": "b", "python": "/p", "env": {"X": "1"}}]}):
        assert host_entries() == {"a": {}, "b": {"python": "/p", "env": {"X": "1"}}}
        # a runtime made by hand uses the host's entry, and an argument still wins
        assert runtime_defaults("b", None, None, None)[2:] == ("/p", {"X": "1"})
        assert runtime_defaults("b", None, None, "/mine")[2] == "/mine"
    with dask.config.set({"lazycluster.hosts": [{"host": "b", "max-workers": 0}]}), \
            pytest.raises(ValueError, match=r"config lazycluster.hosts.*max-workers of host 'b'"):
        host_entries()
    with dask.config.set({"lazycluster.hosts": ["a", "a"]}), pytest.raises(ValueError, match="twice"):
        host_entries()


def test_an_argument_wins_over_the_config_and_both_are_checked() -> None:
    with dask.config.set({"lazycluster.n-workers": 4}):
        assert setting("n-workers") == 4 and setting("n-workers", 2) == 2
    with dask.config.set({"lazycluster.n-workers": -1}), \
            pytest.raises(ValueError, match="config lazycluster.n-workers"):
        setting("n-workers")
    with pytest.raises(ValueError, match="n_workers"):
        setting("n-workers", -1)


@pytest.mark.parametrize("lines, status, failed", [
    (["export A=1", "echo hi"], 0, None),
    (["true", "false", "echo never"], 97, 2),
    (["exit 3"], 3, 1),
])
def test_setup_lines_run_in_one_shell_and_a_failing_one_is_named(
        lines: list[str], status: int, failed: int | None) -> None:
    done = subprocess.run(["sh", "-c", setup_script(lines) + 'echo "ran A=$A"'],
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == status
    if failed is None:
        assert done.stdout == "ran A=1\n" and "hi" in done.stderr  # setup output: stderr
    else:
        assert f"{SETUP_FAILED_MARK} {failed}" in done.stderr and "never" not in done.stderr
