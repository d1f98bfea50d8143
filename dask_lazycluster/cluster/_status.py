"""What a :class:`~dask_lazycluster.cluster.dask_cluster.DaskCluster` shows and waits for.

:class:`ClusterStatus` is a mixin of ``DaskCluster``: requested versus running workers and the
recorded causes, in the repr and the notebook widget, and ``wait_for_workers`` raising those
causes instead of timing out.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from dask.utils import format_bytes
from distributed.deploy.spec import SpecCluster

from dask_lazycluster.exceptions import WorkersUnavailableError

if TYPE_CHECKING:
    class _State(SpecCluster):
        _failures: dict[str, str]
        _requested: int
else:
    _State = object


class ClusterStatus(_State):
    """Status and waiting of ``DaskCluster`` (a mixin)."""

    async def _wait_for_workers(self, n_workers: int = 0, timeout: float | None = None) -> None:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            assert self.scheduler_comm is not None
            running = len((await self.scheduler_comm.identity())["workers"])
            if running >= n_workers:
                return
            if self._failures and len(self.worker_spec) < n_workers:
                raise WorkersUnavailableError(n_workers, running, self._failures)
            if deadline is not None and asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"only {running} of {n_workers} workers after {timeout} s")
            await asyncio.sleep(0.1)

    # -- status --------------------------------------------------------------------------------

    def _status_text(self) -> str:
        running = len(self.scheduler_info.get("workers", {})) if hasattr(self, "scheduler_info") else 0
        text = f"{running} of {self._requested} requested workers running"
        if self._failures:
            text += "; " + "; ".join(f"{h}: {c.splitlines()[0]}" for h, c in self._failures.items())
        return text

    def __repr__(self) -> str:
        workers = self.scheduler_info.get("workers", {}) if hasattr(self, "scheduler_info") else {}
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        memory = format_bytes(sum(w.get("memory_limit") or 0 for w in workers.values()))
        address = getattr(self.scheduler, "address", None) if self.scheduler else None
        return (f"DaskCluster({self.name!r}, {address!r}, {self._status_text()}, "
                f"threads={threads}, memory={memory})")

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        status = f"<p><strong>Workers:</strong> {self._status_text()}</p>"
        return str(SpecCluster._repr_html_(self, cluster_status=(cluster_status or "") + status))

