"""Promises of docs/architecture.md that no other module proves: graceful retirement moves a
worker's data, and the connection settings (AES-GCM by default, overridable)."""

from __future__ import annotations

import asyncio
import time

import pytest
from distributed import Client

from dask_lazycluster import DaskCluster, Runtime, RuntimeGroup
from dask_lazycluster._loop import run_sync
from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers


def test_scale_down_retires_workers_so_their_data_moves(hosts: TestHosts,
                                                          group: RuntimeGroup) -> None:
    # Scattered data cannot be recomputed: had a worker been stopped without retirement, the
    # futures it held would be lost.
    with DaskCluster(group, n_workers=3, worker_class="distributed.Worker") as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(3, timeout=120)
        futures = {address: client.scatter(list(range(1000)), workers=[address], hash=False)
                   for address in client.scheduler_info()["workers"]}
        cluster.scale(1)
        deadline = time.monotonic() + 120
        while len(client.scheduler_info()["workers"]) > 1:
            assert time.monotonic() < deadline, "scale(1) did not retire two workers"
            time.sleep(0.2)
        survivors = set(client.scheduler_info()["workers"])
        assert len(set(futures) - survivors) == 2
        # Every piece, also those of the retired workers, now lives on the survivor.
        assert client.gather(list(futures.values())) == [list(range(1000))] * 3
        held = client.run_on_scheduler(
            lambda dask_scheduler: {k: [w.address for w in ts.who_has]
                                    for k, ts in dask_scheduler.tasks.items()})
        assert all(set(where) == survivors for where in held.values()), held
    assert wait_no_leftovers(hosts) == {}


def test_connections_prefer_aes_gcm_unless_told_otherwise(hosts: TestHosts) -> None:
    runtime = Runtime(hosts.names[0])
    try:
        assert runtime.core.state.ssh.conn.get_extra_info("send_cipher") == \
            "aes128-gcm@openssh.com"
    finally:
        runtime.cleanup()
    runtime = Runtime(hosts.names[0], connect_options={"encryption_algs": ["aes256-ctr"]})
    try:
        assert runtime.core.state.ssh.conn.get_extra_info("send_cipher") == "aes256-ctr"
    finally:
        runtime.cleanup()


def test_a_sync_call_on_the_ssh_loop_raises_instead_of_deadlocking() -> None:
    async def nested() -> int:
        return run_sync(asyncio.sleep(0, result=1))

    with pytest.raises(RuntimeError, match="on its own SSH loop"):
        run_sync(nested(), timeout=30)
    # The loop still serves calls afterwards.
    assert run_sync(asyncio.sleep(0, result=2), timeout=30) == 2
