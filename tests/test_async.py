"""``asynchronous=True`` never blocks the running loop.

Constructing and awaiting a ``DaskCluster`` inside a running loop must leave the loop free: SSH
connections, probes, port planning and worker starts happen in awaited coroutines, and errors
surface from the ``await``. A ticker task measures the loop's largest stall while a cluster is
created, used and closed; above ``STALL_LIMIT`` the test fails and names the code the loop thread
was stuck in (a watchdog thread samples its stack while it does not tick).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from types import FrameType, TracebackType

import dask
import pytest
from distributed import Client

from dask_lazycluster import (
    DaskCluster,
    InvalidRuntimeError,
    PortInUseError,
    RuntimeGroup,
)
from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers
from .helpers import echo_server_on_manager, free_port

pytestmark = pytest.mark.usefixtures("leak_check")

STALL_LIMIT = 0.25  # seconds the loop may go without running a ready task
TICK = 0.005  # the ticker's sleep; shorter ticks resolve stalls better
SAMPLE_AFTER = 0.05  # the watchdog samples the loop thread once it has not ticked this long
SAMPLE_EVERY = 0.01


class StallMeter:
    """Measure the longest stall of the running loop and sample what the loop thread did.

    A ticker task sleeps ``TICK`` and notes how late it wakes up; a watchdog thread takes the loop
    thread's stack whenever the ticker is overdue by ``SAMPLE_AFTER``. Use as ``async with``.
    """

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float]] = []  # (start since enter, length), longest first
        self.samples: Counter[str] = Counter()
        self._last = 0.0
        self._t0 = 0.0
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._watchdog: threading.Thread | None = None
        self._loop_thread = 0

    @property
    def worst(self) -> float:
        """The longest stall seen, in seconds."""
        return max((length for _, length in self.stalls), default=0.0)

    async def __aenter__(self) -> StallMeter:
        self._loop_thread = threading.get_ident()
        self._t0 = self._last = time.monotonic()
        self._task = asyncio.create_task(self._tick())
        self._watchdog = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._watchdog.start()
        await asyncio.sleep(0)  # let the ticker take its first timestamp
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await asyncio.sleep(2 * TICK)  # a stall right at the end is noted too
        assert self._task is not None and self._watchdog is not None
        self._task.cancel()
        self._stop.set()
        self._watchdog.join()
        self.stalls.sort(key=lambda s: -s[1])

    async def _tick(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(TICK)
            self._last = now = time.monotonic()
            late = now - before - TICK
            if late > 0.02:
                self.stalls.append((before - self._t0, late))

    def _watch(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            if time.monotonic() - self._last < SAMPLE_AFTER:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            if frame is not None:
                self.samples[where_blocked(frame)] += 1

    def report(self) -> str:
        """Summarise the stalls and where the loop thread was during them.

        Returns:
            A few lines: the longest stalls, then the most sampled stacks.
        """
        lines = ["loop stalls (s after start: length): "
                 + ", ".join(f"{at:.2f}: {length:.2f}" for at, length in self.stalls[:8])]
        lines += [f"  ~{n * SAMPLE_EVERY:.2f} s in {where}"
                  for where, n in self.samples.most_common(8)]
        return "\n".join(lines)


def where_blocked(frame: FrameType) -> str:
    """Name what a thread is blocked in: our innermost call, what it called, the module being
    imported if any, and the innermost frame."""
    stack: list[FrameType] = []
    current: FrameType | None = frame
    while current is not None:
        stack.append(current)
        current = current.f_back
    stack.reverse()  # outermost first

    def name(f: FrameType) -> str:
        return f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}"

    ours = [i for i, f in enumerate(stack) if "dask_lazycluster" in f.f_code.co_filename]
    parts = []
    if ours:
        i = ours[-1]
        parts.append(" > ".join(name(f) for f in stack[max(ours[0], i - 2):i + 2]))
    imports = [f.f_locals.get("name") for f in stack if f.f_code.co_name == "_find_and_load"]
    if imports:
        parts.append(f"importing {imports[0]}")
    parts.append(f"at {name(stack[-1])}")
    return " | ".join(parts)


async def create_use_close(make: Callable[[], Awaitable[DaskCluster]], n_workers: int) -> StallMeter:
    """Create a cluster, run a task on each of its workers, close it, all under a StallMeter."""
    async with StallMeter() as meter:
        async with await make() as cluster, Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(n_workers, timeout=60)
            assert len(await client.run(os.getpid)) == n_workers
    return meter


async def test_cluster_on_a_ready_group_never_stalls_the_loop(hosts: TestHosts,
                                                              group: RuntimeGroup) -> None:
    n = len(hosts.names)
    meter = await create_use_close(
        lambda: DaskCluster(group, n_workers=n, asynchronous=True), n)
    assert await asyncio.to_thread(wait_no_leftovers, hosts) == {}
    print(meter.report())
    assert meter.worst <= STALL_LIMIT, meter.report()


async def test_cluster_from_config_hosts_never_stalls_the_loop(hosts: TestHosts) -> None:
    n = len(hosts.names)
    with dask.config.set({"lazycluster.hosts": hosts.names}):
        meter = await create_use_close(lambda: DaskCluster(n_workers=n, asynchronous=True), n)
    assert await asyncio.to_thread(wait_no_leftovers, hosts) == {}
    print(meter.report())
    assert meter.worst <= STALL_LIMIT, meter.report()


async def test_unknown_config_host_raises_from_the_await(hosts: TestHosts) -> None:
    with dask.config.set({"lazycluster.hosts": [hosts.names[0], "nope.invalid"]}):
        async with StallMeter() as meter:
            with pytest.raises(InvalidRuntimeError, match="nope.invalid"):
                await DaskCluster(asynchronous=True)
    assert await asyncio.to_thread(wait_no_leftovers, hosts) == {}
    assert meter.worst <= STALL_LIMIT, meter.report()


async def test_busy_master_port_raises_from_the_await(hosts: TestHosts,
                                                      group: RuntimeGroup) -> None:
    port = free_port()
    with echo_server_on_manager(port):
        async with StallMeter() as meter:
            with pytest.raises(PortInUseError, match=str(port)):
                await DaskCluster(group, master_port=port, asynchronous=True)
    assert await asyncio.to_thread(wait_no_leftovers, hosts) == {}
    assert meter.worst <= STALL_LIMIT, meter.report()


async def test_bad_argument_raises_from_the_await(group: RuntimeGroup) -> None:
    with pytest.raises(ValueError, match="n_workers"):
        await DaskCluster(group, n_workers=-1, asynchronous=True)


async def test_the_meter_sees_a_blocked_loop() -> None:
    # The check above can fail: a blocking call in the loop thread is measured and located.
    async with StallMeter() as meter:
        time.sleep(0.3)
    assert 0.28 <= meter.worst < 1, meter.report()
    assert any("test_the_meter_sees_a_blocked_loop" in where for where in meter.samples), \
        meter.report()
