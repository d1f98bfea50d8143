"""What a cluster's workers and launchers ask of it (:class:`ClusterOwnerAPI`).

A mixin of :class:`~dask_lazycluster.cluster.dask_cluster.DaskCluster`: the methods the
``RemoteWorker`` (``WorkerOwner``) and the launchers (``MasterOwner``, ``WorkersOwner``) call,
kept apart so the cluster's own module stays a readable spec. The state is the cluster's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dask_lazycluster._task import send_file
from dask_lazycluster.cluster._lifecycle import ClusterLifecycle
from dask_lazycluster.cluster._options import HostPlan
from dask_lazycluster.cluster._security import worker_tls
from dask_lazycluster.cluster.remote_worker import RemoteWorker
from dask_lazycluster.exceptions import WorkersUnavailableError

logger = logging.getLogger("dask_lazycluster.cluster.dask_cluster")


class ClusterOwnerAPI(ClusterLifecycle):
    """The inside API of ``DaskCluster`` for its workers and launchers (a mixin)."""

    def worker_env(self, host: str) -> dict[str, str]:
        """Environment of a Dask process on ``host``: its plan's, plus the inherited config.

        Sent over SSH stdin only, never on a command line.

        Args:
            host: The host.

        Returns:
            The environment variables.
        """
        return {**self.host_plans[host].env, "DASK_INTERNAL_INHERIT_CONFIG": self._inherited}

    def worker_tls(self) -> dict[str, Any] | None:
        """``Security`` keyword arguments for the workers (PEM text), or None."""
        return worker_tls(self._security)

    async def prepare_host(self, host: str) -> None:
        """Copy the host's ``upload`` paths to it, once per SSH connection (on the SSH loop).

        Args:
            host: The host.
        """
        await self._upload_once(host)

    def release_ports(self, name: str) -> None:
        """A worker ended: its ports may be used again.

        Args:
            name: The worker.
        """
        if self._planner is not None:
            if name in self.worker_spec:
                self._planner.release(name)
            else:
                self._planner.forget(name)

    def fresh_ports(self, name: str) -> list[int]:
        """Other tunnel ports for a worker whose ports turned out to be taken.

        Args:
            name: The worker.

        Returns:
            Its new ports (the old ones count as busy from now on).
        """
        assert self._planner is not None
        return self._planner.reallocate(name)

    def record_failure(self, host: str, cause: str) -> None:
        """Remember (and log once) why a worker could not start or be placed on ``host``.

        Args:
            host: The host (``"*"`` for the whole cluster).
            cause: Why.
        """
        if self._failures.get(host) != cause:
            logger.warning("worker on %s: %s", host, cause)
        self._failures[host] = cause

    def busy_ports_snapshot(self) -> dict[str, set[int]] | None:
        """Listening ports per host read at start-up (the launcher's port rules use it)."""
        return getattr(self, "_busy_by_host", None)

    def scheduler_process_options(self) -> dict[str, Any] | None:
        """Options of the scheduler's own process (``scheduler-process: true``), else None."""
        if not self._scheduler_process:
            return None
        return {"log_level": self._silence_logs or logging.INFO,
                "start_timeout": self._start_timeout, "child": self._child}

    async def reconcile(self) -> None:
        """Start and stop workers until they match the plan, and say why if they cannot.

        Raises:
            WorkerStartError: The first failure of this run.
            WorkersUnavailableError: If requested workers are missing for a recorded cause
                (a start that failed in a run triggered before, e.g. by ``scale``).
        """
        await self._correct_state()
        planned = len(self._planned())
        if self._failures and planned < self._requested:
            raise WorkersUnavailableError(self._requested, planned, self._failures)

    def unused_ports(self) -> list[int]:
        """Ports of the port list that no worker holds."""
        return self._planner.unused_ports() if self._planner else list(self._ports)

    def worker_ports_per_host(self) -> dict[str, list[int]]:
        """Host to the ports of its workers (their tunnel port, or direct address port)."""
        addresses = {n: w.worker_address for n, w in self.workers.items()
                     if isinstance(w, RemoteWorker)}
        hosts = self.runtime_group.hosts
        if self._planner is None:
            return {host: [] for host in hosts}
        return self._planner.ports_per_host(hosts, self._planned(), addresses)

    @property
    def host_plans(self) -> dict[str, HostPlan]:
        """Each host's options for its Dask processes (cluster-wide merged with its own)."""
        return dict(self._planner.plans) if self._planner else {}

    async def _upload_once(self, host: str) -> None:
        """The host's uploads, once per SSH connection (a reconnected host gets them again)."""
        assert self._planner is not None
        paths = self._planner.plans[host].upload
        if not paths:
            return
        state = self.runtime_group.get_runtime(host).core.state
        generation = id(state.ssh.conn)
        done = self._uploads.get(host)
        if done is None or done[0] != generation or done[1].cancelled() or (
                done[1].done() and done[1].exception() is not None):

            async def copy() -> None:
                for path in paths:
                    await send_file(state, path, None)

            done = (generation, asyncio.ensure_future(copy()))
            self._uploads[host] = done
        await asyncio.shield(done[1])
