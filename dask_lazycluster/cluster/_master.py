"""Where a ``DaskCluster``'s scheduler runs, and how every host reaches it.

:class:`MasterSteps` is a mixin of ``DaskCluster`` (through ``ClusterLifecycle``): it chooses
the scheduler's ports, starts it and answers the workers' one question, "at which address do
I dial the scheduler?" (:meth:`MasterSteps.scheduler_address_for`), the same way for a
scheduler on the manager (``LocalMasterLauncher`` or a custom launcher) and on a host
(``RemoteMasterLauncher``). The state is the cluster's.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import inspect
import logging
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from distributed import Scheduler
from distributed.core import Server, Status
from distributed.deploy.spec import SpecCluster

from dask_lazycluster._group import RuntimeGroup
from dask_lazycluster._loop import on_loop
from dask_lazycluster.cluster._launchers import (
    LocalMasterLauncher,
    RemoteMasterLauncher,
    SchedulerLauncher,
)
from dask_lazycluster.cluster._remote_scheduler import RemoteScheduler, scheduler_routes, scheduler_tls
from dask_lazycluster.cluster.runtime_cluster import MasterLauncher, MasterWorkerCluster
from dask_lazycluster.exceptions import LazyclusterError, MasterStartError
from dask_lazycluster.utils import localhost_has_free_port

if TYPE_CHECKING:
    import subprocess

    from distributed.security import Security

    from dask_lazycluster.cluster._options import HostPlan
    from dask_lazycluster.cluster._planner import WorkerPlanner

    class _MasterState(MasterWorkerCluster, SpecCluster):
        """The cluster's state these steps use (DaskCluster's attributes, declared for mypy)."""

        _planner: WorkerPlanner | None
        _failures: dict[str, str]
        _cluster_wide: HostPlan
        _tunnel: bool | str
        _master_port_arg: int | None
        _scheduler_host: str | None
        _sched_options: dict[str, Any]
        _security: Security | None
        _scheduler_process: bool
        _silence_logs: int | bool
        _start_timeout: float
        _debug: bool
        _child: subprocess.Popen[bytes] | None
        _busy_by_host: dict[str, set[int]]

        async def _undo(self) -> None: ...
        def _kill_child(self) -> None: ...
else:
    _MasterState = object

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 8786
DEFAULT_DASHBOARD_PORT = 8787


def scheduler_web_modules() -> list[str]:
    """What a scheduler imports when it starts its web server (its routes are Dask config)."""
    import dask.config

    return ["distributed.dashboard.scheduler",
            *dask.config.get("distributed.scheduler.http.routes", [])]


def _import_scheduler_web_modules() -> None:
    """Import what a scheduler imports when it starts its web server (bokeh, http routes)."""
    for module in scheduler_web_modules():
        with suppress(ImportError):
            importlib.import_module(module)


def _own_port_choice(launcher: MasterLauncher) -> bool:
    """Whether the cluster chooses the port itself (a launcher whose ``start`` is ours)."""
    return isinstance(launcher, SchedulerLauncher) and type(launcher).start is SchedulerLauncher.start


class MasterSteps(_MasterState):
    """Choosing, starting and reaching the scheduler of ``DaskCluster`` (a mixin)."""

    def _default_master(self, group: RuntimeGroup) -> MasterLauncher:
        """``RemoteMasterLauncher`` with ``scheduler_host``, else ``LocalMasterLauncher``."""
        if self._scheduler_host is not None:
            return RemoteMasterLauncher(group, self._scheduler_host)
        return LocalMasterLauncher(group)

    @property
    def scheduler_host(self) -> str | None:
        """The host the scheduler runs on; None when it runs on the manager."""
        launcher = getattr(self, "_master_launcher", None)
        return launcher.host if isinstance(launcher, RemoteMasterLauncher) else None

    def _listen_host(self) -> str:
        """Where the scheduler binds: loopback in tunnel mode, else every interface."""
        return "127.0.0.1" if self._tunnel is True else "0.0.0.0"

    async def _plan_routes(self, group: RuntimeGroup) -> set[str]:
        """Hosts whose workers use plain TCP; a remote scheduler's launcher learns who dials it.

        With a scheduler on the manager, ``tunnel="auto"`` tests the manager and every host
        both ways and host to host; with one on a host, only host to host (the manager then
        talks to the scheduler alone, through its forward).
        """
        launcher = self._master_launcher
        remote = launcher if isinstance(launcher, RemoteMasterLauncher) else None
        dial: set[str] = set()
        if self._tunnel is True:
            direct: set[str] = set()
        elif self._tunnel is False:
            direct = dial = set(group.hosts)
        elif remote is None:
            direct = await on_loop(group.core.direct_hosts())
        else:
            direct, dial = await on_loop(scheduler_routes(
                [r.core.state for r in group.runtimes], remote.host))
        if self._tunnel == "auto":
            logger.info("tunnel='auto': direct %s, tunneled %s", sorted(direct),
                        sorted(set(group.hosts) - direct))
        if remote is not None:
            remote.set_routes(dial)
            if self._tunnel == "auto":
                logger.info("tunnel='auto': %s dial the scheduler on %s directly",
                            sorted(remote.direct_to_scheduler) or "no hosts", remote.host)
        return direct

    # -- ports ---------------------------------------------------------------------------------

    def _dashboard_ports(self) -> list[int] | int | None:
        """Dashboard port candidates of a scheduler on a host (None: no dashboard)."""
        options = self._sched_options
        address = options.get("dashboard_address")
        if options.get("dashboard") is False or (address is None and "dashboard_address" in options):
            return None
        port = str(address or "").rsplit(":", 1)[-1]
        if port.isdigit() and int(port):
            return int(port)  # asked for: exactly it
        return [DEFAULT_DASHBOARD_PORT] + [p for p in self._ports if p != DEFAULT_DASHBOARD_PORT]

    async def _choose_master_port(self) -> None:
        launcher = self._master_launcher
        explicit = self._master_port_arg
        if _own_port_choice(launcher):
            assert isinstance(launcher, SchedulerLauncher)
            candidates: list[int] | int = explicit if explicit is not None else (
                [DEFAULT_MASTER_PORT] + [p for p in self._ports if p != DEFAULT_MASTER_PORT])
            await on_loop(launcher.choose_port(candidates))
            self._ports = [p for p in self._ports if p != launcher.port]
        else:  # a custom launcher's start() is synchronous: keep it off this loop
            await asyncio.to_thread(MasterWorkerCluster.start_master, self, explicit)
        dashboard = self._dashboard_ports()
        if isinstance(launcher, RemoteMasterLauncher) and dashboard is not None:
            port = await on_loop(launcher.choose_dashboard_port(dashboard))
            self._ports = [p for p in self._ports if p != port]

    async def _choose_master_port_again(self, taken: int) -> bool:
        """Choose another scheduler port after ``taken`` was taken; False if not ours to choose."""
        launcher = self._master_launcher
        planner = self._planner
        if self._master_port_arg is not None or planner is None or not _own_port_choice(launcher):
            return False
        assert isinstance(launcher, SchedulerLauncher)
        in_use = {p for ports in planner.allocated.values() for p in ports}
        candidates = [p for p in self._ports if p not in in_use and p != taken]
        if not candidates:
            return False
        port = await on_loop(launcher.choose_port(candidates))
        logger.info("scheduler port %s was taken since it was chosen; using %s", taken, port)
        planner.reserved.discard(taken)
        planner.reserved.add(port)
        self._ports = [p for p in self._ports if p != port]
        self.scheduler_spec = self._scheduler_spec(self._listen_host())
        return True

    def _scheduler_spec(self, listen: str) -> dict[str, Any]:
        launcher = self._master_launcher
        spec = getattr(launcher, "scheduler_spec", None)
        if callable(spec):
            return dict(spec(listen, self._sched_options))
        return LocalMasterLauncher.scheduler_spec(launcher, listen, self._sched_options)  # type: ignore[arg-type]

    # -- start ---------------------------------------------------------------------------------

    async def _prepare_scheduler(self) -> None:
        """The scheduler's spec; a local one's web modules imported off the loop meanwhile."""
        self.scheduler_spec = self._scheduler_spec(self._listen_host())
        if self.scheduler_host is None:
            await asyncio.to_thread(_import_scheduler_web_modules)

    async def _start_scheduler(self) -> None:
        port = self.master_port
        if port is not None and not localhost_has_free_port(port) and self.scheduler is None:
            # Taken since it was chosen (another program, another cluster starting now): a
            # port we chose ourselves is chosen again; one the user asked for is an error.
            if not await self._choose_master_port_again(port):
                raise MasterStartError("localhost", port, "the port was taken after it was chosen")
            port = self.master_port
        where = self.scheduler_host or "localhost"
        unknown = _unknown_scheduler_option(self.scheduler_spec)
        if unknown is not None:
            await self._undo()
            raise MasterStartError(where, self.master_port, "TypeError: distributed.Scheduler "
                                   f"got an unexpected keyword argument {unknown!r}")
        try:
            if self.scheduler is None and self.scheduler_spec.get("cls") is Scheduler:
                port = await self._start_local_scheduler(port)
            await super()._start()
        except Exception as exc:
            root: BaseException = exc
            # Dask wraps the real reason twice; ours already says what failed.
            while root.__cause__ is not None and not isinstance(root, MasterStartError):
                root = root.__cause__
            if isinstance(root, MasterStartError):
                where, cause = root.host, root.cause
            else:
                cause = f"{type(root).__name__}: {root}"
            await self._undo()
            raise MasterStartError(where, self.master_port, cause) from exc
        if getattr(self.scheduler, "_process", None) is not self._child:
            self._kill_child()  # a custom master launcher started its own scheduler
        if isinstance(self.scheduler, RemoteScheduler):
            await self._follow_dashboard(self.scheduler)
        elif self._tunnel is not False:
            assert port is not None and self._planner is not None
            try:
                await on_loop(self.runtime_group.core.expose_to_runtimes(
                    port, port, list(self._planner.direct_hosts)))
            except LazyclusterError as exc:
                await self._close()
                raise MasterStartError("localhost", port, f"cannot tunnel it: {exc}") from exc

    async def _start_local_scheduler(self, port: int | None) -> int | None:
        """Start the in-process scheduler (``SpecCluster._start`` then keeps it); returns its port.

        Another program may bind our chosen port between the check and the scheduler's bind
        (two notebooks starting clusters at once): a port we chose ourselves is chosen again.
        """
        for attempt in range(3):
            scheduler = Scheduler(**self.scheduler_spec.get("options", {}))
            try:
                self.scheduler = await scheduler
                return port
            except Exception as exc:
                # A failed Scheduler has closed itself (listeners included).
                if attempt == 2 or port is None or not _address_in_use(exc) or \
                        not await self._choose_master_port_again(port):
                    raise
                port = self.master_port
        raise AssertionError("unreachable")  # pragma: no cover

    async def _follow_dashboard(self, scheduler: RemoteScheduler) -> None:
        """Forward the port the dashboard really took, if a stale port snapshot made Dask move it."""
        actual = self.scheduler_info.get("services", {}).get("dashboard")
        if actual is not None and actual != scheduler.dashboard_port:
            logger.info("the dashboard on %s took port %s (%s was taken since it was chosen)",
                        scheduler.host, actual, scheduler.dashboard_port)
            await on_loop(scheduler.forward_dashboard(int(actual)))

    # -- what the workers and the scheduler ask of the cluster ---------------------------------

    def scheduler_address_for(self, host: str) -> str:
        """The scheduler's address as the workers of ``host`` dial it.

        Args:
            host: A host of the group.

        Returns:
            For a scheduler on the manager: the manager's address on that host's SSH
            connection (direct hosts) or ``127.0.0.1`` (its remote forward). For one on a
            host: that host's address (hosts that reach it) or ``127.0.0.1`` (its own
            loopback, or a relay).
        """
        scheme = str(getattr(self.scheduler, "address", "") or "tcp://").split("://", 1)[0]
        launcher = self._master_launcher
        if isinstance(launcher, RemoteMasterLauncher):
            address = launcher.address_for(host)
        elif self._planner is not None and host in self._planner.direct_hosts:
            address = self.runtime_group.get_runtime(host).local_address
        else:
            address = "127.0.0.1"
        return f"{scheme}://{address}:{self.master_port}"

    def scheduler_host_options(self, host: str) -> dict[str, Any]:
        """How a scheduler on ``host`` is started: that host's python and setup lines.

        Args:
            host: The host.

        Returns:
            ``python``, ``setup``, ``debug`` and ``start_timeout`` for ``RemoteScheduler``.
        """
        plan = self._planner.plans[host] if self._planner is not None else self._cluster_wide
        return {"python": plan.python, "setup": list(plan.setup), "debug": self._debug,
                "start_timeout": self._start_timeout}

    def scheduler_tls(self) -> dict[str, Any] | None:
        """``Security`` keyword arguments (PEM text) for a scheduler on a host, or None."""
        return scheduler_tls(self._security)

    def scheduler_lost(self, host: str, cause: str) -> None:
        """The scheduler on ``host`` ended unasked: the cluster fails (any thread).

        Args:
            host: The scheduler's host.
            cause: Why, in words.
        """
        if self.status == Status.running and self.loop is not None:
            self.loop.add_callback(self._scheduler_failed, host, cause)

    def _scheduler_failed(self, host: str, cause: str) -> None:
        """Mark the cluster failed (on its loop): scale and repr then say why."""
        if self.status != Status.running:
            return
        self.status = Status.failed
        scheduler = self.scheduler
        if scheduler is not None and scheduler.status == Status.running:
            scheduler.status = Status.failed
        self._failures[host] = f"the scheduler failed: {cause}"
        adaptive = getattr(self, "_adaptive", None)
        if adaptive is not None:
            adaptive.stop()  # it would only scale a cluster that cannot run tasks
        logger.error("the scheduler on %s failed (%s): close() the cluster (it still stops every "
                     "worker) and start a new one", host, cause.splitlines()[0])

    async def _restore_scheduler_relay(self, host: str) -> None:
        """A reconnected host gets its relay to a scheduler on another host back."""
        if isinstance(self.scheduler, RemoteScheduler):
            await on_loop(self.scheduler.restore_relay(host))


def _unknown_scheduler_option(spec: dict[str, Any]) -> str | None:
    """The first option an in-process ``distributed.Scheduler`` would refuse (None: none).

    The Scheduler opens its dashboard before it checks its keyword arguments, so it would leave
    that listener behind in this process: an unknown option is refused before it is made.
    """
    if spec.get("cls") is not Scheduler:
        return None
    known = {p.name for cls in (Scheduler, Server) for p in inspect.signature(cls).parameters.values()
             if p.kind is not p.VAR_KEYWORD}
    return next((key for key in spec.get("options", {}) if key not in known), None)


def _address_in_use(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a bind that found its address in use."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.EADDRINUSE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
