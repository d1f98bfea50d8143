"""lazycluster's Dask launcher strategies: where the scheduler runs, where workers go.

:class:`LocalMasterLauncher` (the scheduler on the manager), :class:`RemoteMasterLauncher` (on
a host of the group) and :class:`RoundRobinLauncher` are importable from
``dask_lazycluster.cluster.dask_cluster`` as in lazycluster. They work for the cluster they are
attached to (see ``attach``), which they reach only through the small protocols below.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Collection, Coroutine
from typing import Any, Protocol

from distributed import Scheduler
from distributed.core import Status

from dask_lazycluster._group import RuntimeGroup
from dask_lazycluster._loop import on_loop, run_sync
from dask_lazycluster.cluster._remote_scheduler import RemoteScheduler, SchedulerOwner
from dask_lazycluster.cluster.runtime_cluster import MasterLauncher, WorkerLauncher
from dask_lazycluster.cluster.scheduler_process import SchedulerProcess
from dask_lazycluster.exceptions import LazyclusterError, MasterStartError
from dask_lazycluster.runtimes import Runtime

logger = logging.getLogger(__name__)


class MasterOwner(SchedulerOwner, Protocol):
    """What :class:`LocalMasterLauncher` and :class:`RemoteMasterLauncher` need from a cluster."""

    scheduler: Any

    def busy_ports_snapshot(self) -> dict[str, set[int]] | None:
        """Listening ports per host read at start-up (None: read them now)."""

    def scheduler_process_options(self) -> dict[str, Any] | None:
        """Options of a scheduler in its own process, or None for an in-process one."""

    def scheduler_host_options(self, host: str) -> dict[str, Any]:
        """``python``, ``setup``, ``debug`` and ``start_timeout`` of a scheduler on ``host``."""


class WorkersOwner(Protocol):
    """What :class:`RoundRobinLauncher` needs from its cluster."""

    status: Status
    worker_spec: dict[str, Any]
    workers: dict[str, Any]

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Scale to ``n`` workers."""

    def sync(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a coroutine function on the cluster's loop and wait."""

    def reconcile(self) -> Coroutine[Any, Any, None]:
        """Start and stop workers until they match the spec."""

    def unused_ports(self) -> list[int]:
        """Ports of the cluster's list not used by a worker."""

    def worker_ports_per_host(self) -> dict[str, list[int]]:
        """Host to the ports of its workers."""


class SchedulerLauncher(MasterLauncher):
    """What both of dask-lazycluster's master launchers share: the cluster, the port choice.

    Args:
        runtime_group: The group where the workers will run.
    """

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        super().__init__(runtime_group)
        self._cluster: weakref.ref[MasterOwner] | None = None

    def attach(self, cluster: MasterOwner) -> None:
        """Work for ``cluster`` (called by the cluster it is given to).

        Args:
            cluster: The cluster.
        """
        self._cluster = weakref.ref(cluster)

    def _owner(self) -> MasterOwner | None:
        return self._cluster() if self._cluster else None

    @property
    def process(self) -> Any:
        """The cluster's scheduler object (None until the cluster started it)."""
        cluster = self._owner()
        return cluster.scheduler if cluster is not None else None

    def _where(self) -> list[Runtime]:
        """The runtimes on which the scheduler port must be free."""
        return self.runtime_group.runtimes

    async def choose_port(self, ports: list[int] | int) -> int:
        """Choose the scheduler port by the port rules (a coroutine for the SSH loop).

        Args:
            ports: A single port (exactly it) or a list (the first free one).

        Returns:
            The port (also recorded as :attr:`port`).

        Raises:
            PortInUseError: If a single port is given and it is busy.
            NoPortsLeftError: If no port of the list is free.
        """
        self._port = await self._pick(ports, self._where(), "master_port")
        return self._port

    async def _pick(self, ports: list[int] | int, runtimes: list[Runtime], argument: str) -> int:
        """The port rules over ``runtimes`` and the manager."""
        cluster = self._owner()
        # An explicit port is checked fresh: a snapshot may predate whoever took it since.
        snapshot = cluster.busy_ports_snapshot() if cluster and isinstance(ports, list) else None
        return await self.runtime_group.core.pick_port(ports, runtimes, True, argument, snapshot)

    def start(self, ports: list[int] | int, timeout: int = 3, debug: bool = False) -> list[int]:
        """Choose the scheduler port by the group's port rules (the cluster starts it).

        Args:
            ports: A single port (exactly it) or a list (the first free one).
            timeout: Kept for the launcher interface: the cluster's
                ``lazycluster.worker-start-timeout`` bounds a scheduler on a host; the
                in-process one starts or fails at once (``MasterStartError``).
            debug: Unused (the cluster's ``debug`` applies).

        Returns:
            The list without the chosen port (empty when a single port was given).

        Raises:
            PortInUseError: If a single port is given and it is busy.
            NoPortsLeftError: If no port of the list is free.
        """
        port = run_sync(on_loop(self.choose_port(ports)))
        return [] if isinstance(ports, int) else [p for p in ports if p != port]

    def cleanup(self) -> None:
        """Close the scheduler's forwards (the cluster closes the scheduler itself)."""
        if self._port is not None:
            self.runtime_group.close_port_forward(self._port)


class LocalMasterLauncher(SchedulerLauncher):
    """Runs the Dask scheduler on the manager (the machine running Python).

    In the client's process by default; in a child process with
    ``lazycluster.scheduler-process: true`` (a ``SchedulerProcess``).

    :meth:`start` chooses the scheduler port by the group's port rules (free on the manager
    and on every runtime); the cluster then starts the scheduler on it and, in tunnel mode,
    exposes it to every runtime.

    Args:
        runtime_group: The group where the workers will run.
    """

    @property
    def process(self) -> Scheduler | SchedulerProcess | None:
        """The scheduler: a ``distributed.Scheduler``, or its ``SchedulerProcess``.

        None until the cluster started it.
        """
        return super().process

    def scheduler_spec(self, listen_host: str, options: dict[str, Any]) -> dict[str, Any]:
        """The ``SpecCluster`` scheduler spec for the chosen port.

        Args:
            listen_host: Address to bind (loopback in tunnel mode).
            options: Extra ``distributed.Scheduler`` keyword arguments (they win).

        Returns:
            ``{"cls": Scheduler, "options": {...}}``, or ``SchedulerProcess`` as the class
            with ``lazycluster.scheduler-process: true``.

        Raises:
            MasterStartError: If :meth:`start` did not choose a port yet.
        """
        if self._port is None:
            raise MasterStartError("localhost", None, "start() must choose a port first")
        dashboard = "127.0.0.1:8787" if listen_host == "127.0.0.1" else ":8787"
        base = {"host": listen_host, "port": self._port, "dashboard_address": dashboard,
                "protocol": "tcp"}
        owner = getattr(self, "_owner", None)  # a plain MasterLauncher borrows this method
        cluster = owner() if owner is not None else None
        child = cluster.scheduler_process_options() if cluster is not None else None
        if child is not None:
            return {"cls": SchedulerProcess, "options": {**base, **options, **child}}
        return {"cls": Scheduler, "options": {**base, **options}}


class RemoteMasterLauncher(SchedulerLauncher):
    """Runs the Dask scheduler on a runtime of the group, where the workers are.

    The scheduler is one more Dask server of that host's supervisor, with the workers'
    lifeline (manager or connection gone: scheduler gone). The manager reaches it and its
    dashboard through local forwards, so ``Client(cluster)`` and ``dashboard_link`` use
    ``127.0.0.1``; only the client's link (and the dashboard) cross SSH from the manager.
    Workers on other hosts dial the scheduler host directly, or in tunnel mode
    ``127.0.0.1:<port>`` on their own host, relayed by the manager (see Networking in the
    docs). ``DaskCluster(scheduler_host=...)`` and ``lazycluster.scheduler-host`` make one.

    :meth:`start` chooses the scheduler port by the group's port rules: free on the manager,
    on the scheduler's host and on the hosts that reach it through a relay.

    Args:
        runtime_group: The group where the workers will run.
        host: The runtime to run the scheduler on; None for the group's first.

    Raises:
        ValueError: If ``host`` is not a host of the group.
    """

    def __init__(self, runtime_group: RuntimeGroup, host: str | None = None) -> None:
        super().__init__(runtime_group)
        hosts = runtime_group.hosts
        self.host: str = check_scheduler_host(hosts[0] if host is None and hosts else host,
                                              hosts)
        self.dashboard_port: int | None = None
        #: Hosts whose workers dial the scheduler host's own address.
        self.direct_to_scheduler: set[str] = set()
        #: Hosts whose workers dial a relayed ``127.0.0.1:port`` (tunnel mode: all others).
        self.exposed_to: set[str] = set(hosts) - {self.host}

    @property
    def process(self) -> RemoteScheduler | None:
        """The scheduler's ``RemoteScheduler`` (None until the cluster started it)."""
        return super().process

    def set_routes(self, dial_scheduler: Collection[str]) -> None:
        """Say which hosts dial the scheduler host directly; the others get a relay.

        Args:
            dial_scheduler: Hosts that reach the scheduler host by plain TCP (none in tunnel
                mode, all in direct mode, the probed ones with ``"auto"``).
        """
        others = set(self.runtime_group.hosts) - {self.host}
        self.direct_to_scheduler = set(dial_scheduler) & others
        self.exposed_to = others - self.direct_to_scheduler

    def _where(self) -> list[Runtime]:
        group = self.runtime_group
        return [group.get_runtime(h) for h in group.hosts
                if h == self.host or h in self.exposed_to]

    async def choose_dashboard_port(self, ports: list[int] | int) -> int:
        """Choose the dashboard port: free on the scheduler's host and on the manager.

        The manager forwards the same port number, so ``dashboard_link`` is right as Dask
        computes it. A coroutine for the SSH loop.

        Args:
            ports: A single port (exactly it) or a list (the first free one).

        Returns:
            The port (also recorded as :attr:`dashboard_port`).

        Raises:
            PortInUseError: If a single port is given and it is busy.
            NoPortsLeftError: If no port of the list is free.
        """
        if isinstance(ports, list):
            ports = [p for p in ports if p != self._port]
        self.dashboard_port = await self._pick(
            ports, [self.runtime_group.get_runtime(self.host)], "dashboard port")
        return self.dashboard_port

    def address_for(self, host: str) -> str:
        """The address (without port) at which the workers of ``host`` dial the scheduler.

        Args:
            host: A host of the group.

        Returns:
            The scheduler host's address for hosts that reach it directly, else
            ``127.0.0.1`` (the scheduler host's loopback, or a relay).
        """
        if host in self.direct_to_scheduler:
            return self.runtime_group.get_runtime(self.host).remote_address
        return "127.0.0.1"

    def scheduler_spec(self, listen_host: str, options: dict[str, Any]) -> dict[str, Any]:
        """The ``SpecCluster`` scheduler spec: a ``RemoteScheduler`` on :attr:`host`.

        Args:
            listen_host: Address to bind on the host (loopback in tunnel mode).
            options: Extra ``distributed.Scheduler`` keyword arguments (they win; a
                ``security`` object travels as PEM text over SSH stdin instead).

        Returns:
            ``{"cls": RemoteScheduler, "options": {...}}``.

        Raises:
            MasterStartError: If :meth:`start` did not choose a port yet, or the launcher is
                not attached to a cluster.
            TypeError: If the options are not JSON-serialisable (they travel to the host).
        """
        cluster = self._owner()
        if self._port is None or self._cluster is None or cluster is None:
            raise MasterStartError(self.host, self._port,
                                   "start() must choose a port first, for a DaskCluster")
        own = {k: v for k, v in options.items() if k != "security"}
        port = self.dashboard_port
        dashboard = f"{listen_host if listen_host == '127.0.0.1' else ''}:{port}"
        sched = {"host": listen_host, "protocol": "tcp", **own, "port": self._port,
                 **({"dashboard_address": dashboard} if port else {"dashboard": False})}
        try:
            json.dumps(sched)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"scheduler_options must be JSON-serialisable to start the "
                            f"scheduler on {self.host}: {exc}") from None
        return {"cls": RemoteScheduler, "options": {
            "host": self.host, "port": self._port, "dashboard_port": port,
            "exposed_to": sorted(self.exposed_to), "scheduler_options": sched,
            "owner": self._cluster, **cluster.scheduler_host_options(self.host)}}

    def cleanup(self) -> None:
        """Close the scheduler's forwards (the cluster closes the scheduler itself)."""
        super().cleanup()
        if self.dashboard_port is not None:
            self.runtime_group.get_runtime(self.host).close_port_forward(self.dashboard_port)


def check_scheduler_host(host: str | None, hosts: list[str]) -> str:
    """Check that the scheduler's host is one of the group's.

    Args:
        host: The host asked for (``scheduler_host``, ``lazycluster.scheduler-host``).
        hosts: The group's hosts.

    Returns:
        The host.

    Raises:
        ValueError: If it is not a host of the group (or the group is empty).
    """
    if host is None or host not in hosts:
        raise ValueError(f"scheduler_host {host!r} is not a host of the runtime group "
                         f"({', '.join(hosts) or 'no hosts'})")
    return host


class RoundRobinLauncher(WorkerLauncher):
    """Places each new worker on the runtime with the fewest workers (ties: group order).

    After a scale-down the next scale-up refills the emptiest runtimes first, so the
    distribution stays even. Hosts at their ``max-workers`` are skipped. Subclass and override
    :meth:`select_host` for another strategy.

    Args:
        runtime_group: The group where the workers will run.
    """

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        super().__init__(runtime_group)
        self._cluster: weakref.ref[WorkersOwner] | None = None

    def attach(self, cluster: WorkersOwner) -> None:
        """Work for ``cluster`` (called by the cluster it is given to).

        Args:
            cluster: The cluster.
        """
        self._cluster = weakref.ref(cluster)

    def _owner(self) -> WorkersOwner:
        cluster = self._cluster() if self._cluster else None
        if cluster is None:
            raise LazyclusterError("this launcher is not attached to a running DaskCluster")
        return cluster

    def select_host(self, counts: dict[str, int], max_per_host: int | None) -> str:
        """Choose the host of the next worker.

        Args:
            counts: Workers per host, for the hosts that can take one more (reachable and
                below their ``max-workers``), planned workers included, in group order.
            max_per_host: The cluster-wide ``max-workers-per-host`` (None: no limit).

        Returns:
            A host of ``counts``.
        """
        return min(counts, key=lambda h: counts[h])  # min keeps group order on ties

    @property
    def ports_per_host(self) -> dict[str, list[int]]:
        """Host to the ports where its workers are reachable (planned workers included)."""
        cluster = self._cluster() if self._cluster else None
        if cluster is None:
            return super().ports_per_host
        return cluster.worker_ports_per_host()

    def start(
        self, worker_count: int, master_port: int, ports: list[int], debug: bool = False
    ) -> list[int]:
        """Add ``worker_count`` workers to the cluster and wait until they run.

        Args:
            worker_count: Workers to add.
            master_port: The scheduler port (the cluster knows it; kept for the interface).
            ports: Unused: the cluster's own port list is used, so ``scale`` and this agree.
            debug: Unused (the cluster's ``debug`` applies).

        Returns:
            The ports of the cluster's list still unused.

        Raises:
            NoPortsLeftError: If there are not enough free ports.
            WorkersUnavailableError: If the hosts cannot take that many workers.
        """
        cluster = self._owner()
        cluster.scale(len(cluster.worker_spec) + worker_count)
        cluster.sync(cluster.reconcile)
        return cluster.unused_ports()

    def setup_worker_ssh_tunnels(self) -> None:
        """Make sure every tunneled worker is reachable as ``localhost:<port>`` everywhere.

        Workers set their tunnels up themselves when they start; this re-creates any missing.

        Raises:
            PortInUseError: If a worker's port became busy on the manager or a runtime.
        """
        workers = [w for w in self._owner().workers.values() if hasattr(w, "ensure_tunnels")]

        async def ensure_all() -> None:
            await asyncio.gather(*(w.ensure_tunnels() for w in workers))

        run_sync(on_loop(ensure_all()))

    def cleanup(self) -> None:
        """Stop every worker of the cluster."""
        cluster = self._cluster() if self._cluster else None
        if cluster is not None and cluster.status == Status.running:
            cluster.scale(0)
            cluster.sync(cluster.reconcile)
