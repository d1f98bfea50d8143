"""Clusters reachable by name from other processes of the same user on the manager.

``DaskCluster(..., name="etl")`` and ``dask lazycluster up --name etl`` register their cluster
under that name. From any other process of the same user on the same machine,
``DaskCluster.from_name("etl")`` returns a :class:`DaskClusterProxy` that drives it:
``scale``, ``adapt``, ``close`` and ``get_logs`` are carried out by the owning process (the
one holding the SSH connections, which the caller never opens), and ``Client(proxy)``
connects to its scheduler. :func:`running_clusters` lists the running ones (``dask
lazycluster ls``), :func:`stop_cluster` stops one (``dask lazycluster down``).

The owner answers on a Unix domain socket in a directory only its user can enter; see
[Named clusters](../named-clusters.md). When the owner ends, however it ends, its hosts
end their Dask processes (the SSH lifeline) and its record disappears or is found stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from distributed.core import Status, rpc
from distributed.deploy.adaptive import Adaptive as DaskAdaptive
from distributed.deploy.cluster import Cluster
from distributed.objects import SchedulerInfo
from distributed.security import Security
from distributed.utils import Log, Logs

from dask_lazycluster._loop import run_sync
from dask_lazycluster.cluster._registry import (
    Handler,
    Record,
    Registration,
    find_record,
    live_records,
    request,
)
from dask_lazycluster.exceptions import StaleClusterError

if TYPE_CHECKING:
    from distributed.deploy.spec import SpecCluster

    from dask_lazycluster.cluster.runtime_cluster import MasterWorkerCluster

    class _Owner(MasterWorkerCluster, SpecCluster):
        """What the naming steps use of a DaskCluster (declared for mypy)."""

        _registration: Registration | None

        def worker_tls(self) -> dict[str, Any] | None: ...  # noqa: D102
else:
    _Owner = object

# Seconds ``ls`` waits for each owner's answer, and ``from_name`` for a starting cluster.
INFO_TIMEOUT = 5
CONNECT_TIMEOUT = 120

__all__ = ["ClusterSummary", "DaskClusterProxy", "running_clusters", "stop_cluster"]


def registration(name: str | None) -> Registration | None:
    """The registration a cluster with this ``name=`` argument makes (None: not named).

    Args:
        name: The ``name`` argument, or None.

    Returns:
        The (not yet claimed) registration, or None.

    Raises:
        ValueError: If ``name`` cannot name a cluster.
    """
    return None if name is None else Registration(name)


class ClusterNaming(_Owner):
    """The naming steps of ``DaskCluster`` (a mixin): claim, serve, release, ``from_name``."""

    _closed_on_request = False

    # SpecCluster's placeholder is annotated to return a ProcessInterface; dask-ctl's
    # protocol (which it stands for) returns a cluster object.
    @classmethod
    def from_name(  # type: ignore[override]
            cls, name: str, loop: Any = None, asynchronous: bool = False,
            shutdown_on_close: bool = True) -> DaskClusterProxy:
        """Drive the running cluster named ``name`` from this process.

        The cluster may run in any process of this user on this machine (a ``dask
        lazycluster up --name`` or a ``DaskCluster(name=...)``); that process carries out
        ``scale``, ``adapt``, ``close`` and ``get_logs``. This is dask-ctl's ``from_name``.

        Args:
            name: The cluster's name.
            loop: The event loop to use (asynchronous use).
            asynchronous: Return an awaitable proxy for ``await`` / ``async with``.
            shutdown_on_close: Whether the proxy's ``close()`` stops the cluster (default).

        Returns:
            The proxy, connected (``await`` it first when asynchronous).

        Raises:
            ValueError: If ``name`` cannot name a cluster.
            UnknownClusterError: If no cluster of that name runs.
            StaleClusterError: If its process is gone (its record is removed).
        """
        return DaskClusterProxy(name, loop=loop, asynchronous=asynchronous,
                                shutdown_on_close=shutdown_on_close)

    @property
    def closed_on_request(self) -> bool:
        """Whether another process closed the cluster (``down``, a proxy's ``close``).

        Set once that close has finished.
        """
        return self._closed_on_request

    @contextlib.asynccontextmanager
    async def _named(self) -> AsyncIterator[None]:
        """Around start-up: claim the name first, serve it once started, release on failure."""
        registered = self._registration
        if registered is None:
            yield
            return
        registered.claim()
        try:
            yield
            await registered.serve(
                self._control_handlers(), scheduler_address=self.scheduler_address,
                dashboard_link=self.dashboard_link, hosts=list(self.runtime_group.hosts))
        except BaseException:
            registered.release()
            raise

    def _release_name(self) -> None:
        if self._registration is not None:
            self._registration.release()

    def _control_handlers(self) -> dict[str, Handler]:
        """What other processes may ask, each run on this cluster's event loop."""

        async def info() -> dict[str, Any]:
            return self._summary_fields()

        async def connect() -> dict[str, Any]:
            return {**self._summary_fields(), "tls": self.worker_tls()}

        async def scale(n: int = 0, memory: str | None = None, cores: int | None = None) -> None:
            await _settled(self.scale(n, memory=memory, cores=cores))

        async def adapt(**kwargs: Any) -> None:
            self.adapt(**kwargs)

        async def logs(cluster: bool = True, scheduler: bool = True,
                       workers: bool | list[str] = True) -> dict[str, str]:
            found = await self._get_logs(cluster=cluster, scheduler=scheduler, workers=workers)
            return {key: str(text) for key, text in found.items()}

        async def close() -> None:
            try:
                await self._close()
            finally:
                self._closed_on_request = True

        return {"info": info, "connect": connect, "scale": scale, "adapt": adapt,
                "logs": logs, "close": close}

    def _summary_fields(self) -> dict[str, Any]:
        record = self._registration.record if self._registration else None
        return {"name": self.name, "pid": os.getpid(), "started": record and record.started,
                "hosts": list(self.runtime_group.hosts),
                "scheduler_address": self.scheduler_address,
                "dashboard_link": self.dashboard_link,
                "workers": len(self.scheduler_info.get("workers", {})),
                "requested": len(self.worker_spec), "status": self.status.name}


async def _settled(result: Any) -> None:
    if isinstance(result, Awaitable):
        await result


@dataclass(frozen=True)
class ClusterSummary:
    """One running named cluster, as ``dask lazycluster ls`` shows it.

    Attributes:
        name: The cluster name.
        pid: The owning process.
        started: When it was started (seconds since the epoch).
        hosts: Its hosts (empty while starting).
        scheduler_address: The scheduler's address (None while starting).
        dashboard_link: The dashboard's link.
        workers: Workers running (None if the owner did not answer in time).
        requested: Workers requested (None if the owner did not answer in time).
        status: ``"running"``, ``"starting"`` or ``"not answering"``.
    """

    name: str
    pid: int
    started: float
    hosts: tuple[str, ...]
    scheduler_address: str | None
    dashboard_link: str | None
    workers: int | None
    requested: int | None
    status: str


async def _summarise(record: Record) -> ClusterSummary | None:
    summary = ClusterSummary(record.name, record.pid, record.started, tuple(record.hosts),
                             record.scheduler_address, record.dashboard_link, None, None,
                             "starting")
    if record.state != "running":
        return summary
    try:
        info = await request(record, "info", timeout=INFO_TIMEOUT)
    except StaleClusterError:  # gone meanwhile (its record is removed)
        return None
    except Exception:  # busy, or from an incompatible version
        return replace(summary, status="not answering")
    return replace(summary, hosts=tuple(info["hosts"]),
                   scheduler_address=info["scheduler_address"],
                   dashboard_link=info["dashboard_link"], workers=info["workers"],
                   requested=info["requested"], status="running")


async def running_clusters_async() -> list[ClusterSummary]:
    """The async form of :func:`running_clusters`."""
    summaries = [await _summarise(record) for record in live_records()]
    return [s for s in summaries if s is not None]


def running_clusters() -> list[ClusterSummary]:
    """The named clusters of this user running on this machine, by name.

    Records left by killed owners are removed on the way.

    Returns:
        One summary per cluster.
    """
    return run_sync(running_clusters_async())


def stop_cluster(name: str, timeout: float | None = None) -> None:
    """Stop the running cluster ``name`` (its owner closes it; nothing is left on its hosts).

    Args:
        name: The cluster name.
        timeout: Seconds to wait for the owner to finish closing; None waits.

    Raises:
        ValueError: If ``name`` cannot name a cluster.
        UnknownClusterError: If no cluster of that name runs.
        StaleClusterError: If its process is gone (its record is removed).
        TimeoutError: If closing takes longer than ``timeout``.
    """
    record = find_record(name)
    run_sync(request(record, "close", timeout=timeout))


class DaskClusterProxy(Cluster):
    """A named ``DaskCluster`` of another process, driven from this one.

    Made by ``DaskCluster.from_name(name)``. ``scale``, ``adapt``, ``close`` and ``get_logs``
    are carried out by the owning process; ``scheduler_address``, ``dashboard_link``,
    ``scheduler_info``, ``wait_for_workers`` and ``Client(proxy)`` work as with the cluster
    itself. This process opens no SSH connection.

    Args:
        name: The cluster's name.
        loop: The event loop to use (asynchronous use).
        asynchronous: Use with ``await`` / ``async with`` in a running loop.
        shutdown_on_close: Whether ``close()`` stops the cluster; with False it only
            disconnects this proxy (as ``disconnect()`` does).

    Raises:
        ValueError: If ``name`` cannot name a cluster.
        UnknownClusterError: If no cluster of that name runs.
        StaleClusterError: If its process is gone (its record is removed).
    """

    def __init__(self, name: str, loop: Any = None, asynchronous: bool = False,
                 shutdown_on_close: bool = True) -> None:
        self._record = find_record(name)
        super().__init__(asynchronous=asynchronous, loop=loop, name=name)
        self.shutdown_on_close = shutdown_on_close
        self.security = Security()
        self._owner: dict[str, Any] = {}
        self._follower: asyncio.Future[None] | None = None
        if not self.called_from_running_loop:
            self._loop_runner.start()
            try:
                self.sync(self._start)
            except BaseException:
                self._loop_runner.stop()
                raise

    def __await__(self) -> Any:
        async def started() -> DaskClusterProxy:
            if self.status == Status.created:
                await self._start()
            return self

        return started().__await__()

    async def _start(self) -> None:
        self.status = Status.starting
        try:
            self._owner = await request(self._record, "connect", timeout=CONNECT_TIMEOUT)
            tls = self._owner.pop("tls", None)
            if tls:
                self.security = Security(**tls)
            self.scheduler_comm = rpc(self._owner["scheduler_address"],
                                      connection_args=self.security.get_connection_args("client"))
            self.scheduler_info = SchedulerInfo(await self.scheduler_comm.identity())
            self._cluster_info.update(await self.scheduler_comm.get_metadata(
                keys=["cluster-manager-info"], default={}))
        except BaseException:
            if self.scheduler_comm is not None:
                await self.scheduler_comm.close_rpc()
            self.status = Status.closed  # nothing of it is left to close
            raise
        # Not Cluster._start: a scheduler sends worker updates to one subscriber only (its
        # "worker-status" plugin), and that is the owner's, which adapt and scale rely on.
        self._follower = asyncio.ensure_future(self._follow_scheduler())
        self.status = Status.running

    async def _follow_scheduler(self) -> None:
        """Keep ``scheduler_info`` current by asking the scheduler, until closed or gone."""
        assert self.scheduler_comm is not None
        while self.status == Status.running:
            await asyncio.sleep(self._sync_interval)
            try:
                self.scheduler_info = SchedulerInfo(await self.scheduler_comm.identity())
            except OSError:  # the scheduler is gone (the cluster was closed)
                return

    async def _call(self, op: str, **fields: Any) -> Any:
        try:
            return await request(self._record, op, **fields)
        except TypeError as exc:  # from encoding the request
            raise TypeError(f"the arguments of {op} must be JSON-serialisable for a cluster of "
                            f"another process: {exc}") from None

    @property
    def pid(self) -> int:
        """The process that owns the cluster."""
        return self._record.pid

    @property
    def dashboard_link(self) -> str:
        """The dashboard's link, as the owner gives it."""
        return str(self._owner.get("dashboard_link") or "")

    @property
    def hosts(self) -> list[str]:
        """The cluster's hosts."""
        return list(self._owner.get("hosts") or [])

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Scale the cluster to ``n`` workers (or enough for ``memory``/``cores``).

        Args:
            n: Target number of workers.
            memory: Target total memory, e.g. ``"64 GiB"``.
            cores: Target total threads.

        Returns:
            An awaitable when asynchronous, else None.

        Raises:
            ValueError: If ``n`` is negative or not an int (as the owner checks it).
            NoPortsLeftError: As ``DaskCluster.scale`` raises it in the owner.
            WorkersUnavailableError: As ``DaskCluster.scale`` raises it in the owner.
            StaleClusterError: If the owner is gone.
        """
        return self.sync(self._call, "scale", n=n, memory=memory, cores=cores)

    def adapt(
        self,
        Adaptive: type[DaskAdaptive] = DaskAdaptive,  # noqa: N803 - Dask's name
        minimum: float = 0,
        maximum: float = math.inf,
        **kwargs: Any,
    ) -> Any:
        """Turn on adaptive scaling of the cluster, run by its owner.

        Args:
            Adaptive: Only Dask's own class (the owner runs it).
            minimum: Fewest workers.
            maximum: Most workers.
            **kwargs: As for ``DaskCluster.adapt`` (``minimum_cores``, ``interval``...),
                JSON-serialisable.

        Returns:
            An awaitable when asynchronous, else None.

        Raises:
            TypeError: If another adaptive class, or arguments that are not
                JSON-serialisable, are given.
            StaleClusterError: If the owner is gone.
        """
        if Adaptive is not DaskAdaptive:
            raise TypeError("adapt() of a cluster of another process runs Dask's own Adaptive")
        return self.sync(self._call, "adapt", minimum=minimum, maximum=maximum, **kwargs)

    def get_logs(self, cluster: bool = True, scheduler: bool = True,
                 workers: bool | list[str] = True) -> Any:
        """Return the logs of the cluster manager (the owner), scheduler and workers.

        Args:
            cluster: Include the owner's cluster log.
            scheduler: Include the scheduler's log.
            workers: All workers (True), none (False), or these worker addresses.

        Returns:
            A ``Logs`` mapping (an awaitable of one when asynchronous).
        """
        return self.sync(self._get_logs, cluster=cluster, scheduler=scheduler,
                         workers=list(workers) if not isinstance(workers, bool) else workers)

    async def _get_logs(self, cluster: bool = True, scheduler: bool = True,
                        workers: bool | list[str] = True) -> Logs:
        found = await self._call("logs", cluster=cluster, scheduler=scheduler, workers=workers)
        return Logs({key: Log(text) for key, text in found.items()})

    def close(self, timeout: float | None = None) -> Any:
        """Stop the cluster (its owner closes it), then disconnect.

        With ``shutdown_on_close=False`` only this proxy disconnects.

        Args:
            timeout: Seconds to wait.

        Returns:
            An awaitable when asynchronous, else None.
        """
        result = super().close(timeout)
        if not self.asynchronous:
            self._loop_runner.stop()
        return result

    def disconnect(self) -> Any:
        """Stop using the cluster from here; it keeps running.

        Returns:
            An awaitable when asynchronous, else None.
        """
        self.shutdown_on_close = False
        return self.close()

    async def _close(self) -> None:
        if self.status == Status.closed:
            return
        if self.shutdown_on_close and self.status == Status.running:
            with contextlib.suppress(StaleClusterError):  # already stopped by someone else
                await self._call("close")
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await super()._close()
