"""How a :class:`~dask_lazycluster.cluster.dask_cluster.DaskCluster` starts, scales and closes.

:class:`ClusterLifecycle` is a mixin of ``DaskCluster``: the steps live here so the cluster's
own module stays a readable spec; the state is the cluster's. Every SSH step is awaited on the
SSH loop (``on_loop``), so an asynchronous cluster never blocks its event loop.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from distributed.protocol.pickle import dumps

from dask_lazycluster._group import RuntimeGroup
from dask_lazycluster._loop import on_loop
from dask_lazycluster._task import RuntimeTask
from dask_lazycluster.cluster._launchers import (
    RemoteMasterLauncher,
    RoundRobinLauncher,
    SchedulerLauncher,
    check_scheduler_host,
)
from dask_lazycluster.cluster._master import MasterSteps, scheduler_web_modules
from dask_lazycluster.cluster._options import HostPlan, host_plans
from dask_lazycluster.cluster._placement import HostCapacity, NoRoomError
from dask_lazycluster.cluster._planner import WorkerPlanner
from dask_lazycluster.cluster.remote_worker import RemoteWorker
from dask_lazycluster.cluster.runtime_cluster import (
    MasterLauncher,
    MasterWorkerCluster,
    WorkerLauncher,
)
from dask_lazycluster.cluster.scheduler_process import end_scheduler_child
from dask_lazycluster.config import host_entries, setting
from dask_lazycluster.exceptions import (
    LazyclusterError,
    MasterStartError,
    WorkersUnavailableError,
)
from dask_lazycluster.runtimes import connect_runtimes
from dask_lazycluster.utils import localhost_has_free_port

if TYPE_CHECKING:
    import subprocess

    class _ClusterState(MasterWorkerCluster, SpecCluster):
        """The cluster's state the steps use (DaskCluster's attributes, declared for mypy)."""

        _owns_group: bool
        _ports_arg: list[int] | None
        _planner: WorkerPlanner | None
        _failures: dict[str, str]
        _requested: int
        _uploads: dict[str, tuple[int, asyncio.Future[None]]]
        _cluster_wide: HostPlan
        _host_options: dict[str, dict[str, Any]]
        _tunnel: bool | str
        _n_workers: int | None
        _master_port_arg: int | None
        _scheduler_host: str | None
        _sched_options: dict[str, Any]
        _death_timeout: float
        _start_timeout: float
        _prologue: str | None
        _debug: bool
        _child: subprocess.Popen[bytes] | None
        _busy_by_host: dict[str, set[int]]
        _replaced: dict[str, dict[str, Any]]
        _retiring: set[str]
        _inherited: str
        _security: Any
        _scheduler_process: bool
        _silence_logs: Any

        def record_failure(self, host: str, cause: str) -> None: ...  # noqa: D102
        def worker_env(self, host: str) -> dict[str, str]: ...  # noqa: D102
        def release_ports(self, name: str) -> None: ...  # noqa: D102
        def busy_ports_snapshot(self) -> dict[str, set[int]] | None: ...  # noqa: D102
        def scheduler_process_options(self) -> dict[str, Any] | None: ...  # noqa: D102
        async def reconcile(self) -> None: ...  # noqa: D102
        def unused_ports(self) -> list[int]: ...  # noqa: D102
        def worker_ports_per_host(self) -> dict[str, list[int]]: ...  # noqa: D102
        def _on_connection_change(self, host: str, alive: bool) -> None: ...
else:
    _ClusterState = object

logger = logging.getLogger(__name__)



async def _shutdown_supervisors(group: RuntimeGroup) -> None:
    """End every Dask process of the group's hosts (the runtimes stay connected)."""
    await asyncio.gather(*(r.core.servers.shutdown(None) for r in group.runtimes))


async def _remove_worker(address: str, stimulus_id: str, dask_scheduler: Any) -> None:
    """Run on the scheduler (in-process or not): forget a worker whose host is lost."""
    await dask_scheduler.remove_worker(address, stimulus_id=stimulus_id, close=False)


class ClusterLifecycle(MasterSteps, _ClusterState):
    """Start-up, scaling and shutdown steps of ``DaskCluster`` (a mixin)."""

    def _check_group_arguments(self, group: Any, master: Any, worker: Any,
                               scheduler_host: str | None = None) -> None:
        if group is not None and not isinstance(group, RuntimeGroup):
            raise TypeError(f"runtime_group must be a RuntimeGroup, got {group!r}")
        if master is not None and not isinstance(master, MasterLauncher):
            raise TypeError(f"master_launcher must be a MasterLauncher, got {master!r}")
        if worker is not None and not isinstance(worker, WorkerLauncher):
            raise TypeError(f"worker_launcher must be a WorkerLauncher, got {worker!r}")
        if master is not None:
            if scheduler_host is not None:
                raise ValueError("pass scheduler_host or master_launcher, not both "
                                 "(RemoteMasterLauncher(group, host) places the scheduler)")
            self._scheduler_host = None  # the launcher decides; the config is only a default
        known = group or getattr(worker, "runtime_group", None)
        if self._scheduler_host is not None and known is not None:
            check_scheduler_host(self._scheduler_host, known.hosts)

    # -- start-up ------------------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Connect, probe, plan ports and the first workers, run the prologue."""
        group = self._group
        if group is None:
            hosts = list(host_entries())
            if not hosts:
                raise ValueError("no runtime_group given and no hosts configured "
                                 "(lazycluster.hosts)")
            group = RuntimeGroup(runtimes=await on_loop(connect_runtimes(hosts)))
            self._group = group
        first, last = setting("port-range")
        ports = self._ports_arg if self._ports_arg is not None else list(range(first, last + 1))
        MasterWorkerCluster.__init__(
            self, group, ports, self._master_launcher or self._default_master(group),
            self._worker_launcher or RoundRobinLauncher(group))
        plans = host_plans(group.hosts, self._cluster_wide, host_entries(), self._host_options)
        self._check_distributed(plans)
        for launcher in (self._master_launcher, self._worker_launcher):
            if isinstance(launcher, SchedulerLauncher | RoundRobinLauncher):
                launcher.attach(self)
        # A scheduler on a host waits for nothing but its supervisor: start it first, and
        # have it import the scheduler's web modules before it forks the scheduler.
        await self._prestart_supervisors({self.scheduler_host}, plans,
                                        scheduler_web_modules())
        for runtime in group.runtimes:
            runtime.add_connection_listener(self._on_connection_change)
        direct = await self._plan_routes(group)
        # One snapshot of every host's listening ports serves the master and all worker ports.
        # A probe of the last few seconds (RuntimeGroup(...) right before) is fresh enough: a
        # port taken since makes its forward fail loudly, never silently.
        self._busy_by_host = await on_loop(group.core.busy_ports(group.runtimes, max_age=30))
        own_limit = {h for h, o in {**host_entries(), **self._host_options}.items()
                     if "max-workers" in o}
        capacities = {r.host: HostCapacity(
            r.host, r.cpu_cores, r.memory, len(r.gpus), plans[r.host].max_workers,
            "max-workers" if r.host in own_limit else "max-workers-per-host")
            for r in group.runtimes}
        self._planner = WorkerPlanner(
            plans, capacities, self._ports, set().union(*self._busy_by_host.values()),
            lambda p: not localhost_has_free_port(p), direct, self._cluster_wide.max_workers)
        await self._choose_master_port()
        if self.master_port is None:  # a custom master launcher whose start() chose none
            raise MasterStartError("localhost", None, "start() must choose a port first")
        self._planner.reserved.add(self.master_port)
        if isinstance(self._master_launcher, RemoteMasterLauncher) and \
                self._master_launcher.dashboard_port is not None:
            self._planner.reserved.add(self._master_launcher.dashboard_port)
        n = group.runtime_count if self._n_workers is None else self._n_workers
        self.worker_spec = self._plan_new(n, strict=True)
        self._requested = n
        self._planner.set_slots(self._planner.counts(self.worker_spec))
        if self._prologue:  # the group's own (synchronous) API, kept off this loop
            task = RuntimeTask("prologue").run_command(self._prologue)
            await asyncio.to_thread(group.execute_task, task, broadcast=True,
                                    execute_async=False, debug=self._debug)
        await self._prestart_supervisors(
            {self._planner.hosts_of[name] for name in self.worker_spec}, plans)
        await self._prepare_scheduler()

    def _check_distributed(self, plans: dict[str, HostPlan]) -> None:
        """Hosts whose probed python lacks distributed (and nothing set up to change that)."""
        if self._prologue:
            return  # a prologue may install it
        missing = [r for r in self.runtime_group.runtimes
                   if r.info.get("distributed_version") is None
                   and not plans[r.host].python and not plans[r.host].setup]
        if missing:
            raise LazyclusterError(
                f"distributed is not installed for the remote python on "
                f"{', '.join(r.host for r in missing)} ({missing[0].python}): install it there, "
                f"pass python= (or a host's python), or use prologue='pip install distributed'")

    async def _prestart_supervisors(self, hosts: set[str | None], plans: dict[str, HostPlan],
                                    preload: list[str] | None = None) -> None:
        """Start the hosts' supervisors now: they import distributed while the scheduler starts."""
        runtimes = [self.runtime_group.get_runtime(h) for h in self.runtime_group.hosts if h in hosts]

        async def prestart() -> None:
            for runtime in runtimes:
                plan = plans[runtime.host]
                runtime.core.servers.prestart(plan.python, plan.setup, preload)

        await on_loop(prestart())

    async def _undo(self) -> None:
        """A failed start-up leaves nothing: no forward, process, owned connection or child."""
        with suppress(Exception):
            if self._group is not None and self.master_port is not None:
                await on_loop(self._group.core.close_port(self.master_port))
        if self._owns_group and self._group is not None:
            with suppress(Exception):
                await on_loop(self._group.core.cleanup())
        elif self._group is not None:
            with suppress(Exception):
                await on_loop(_shutdown_supervisors(self._group))
        self._kill_child()

    def _abandon(self) -> None:
        """Undo a failed synchronous construction (the loop thread and the scheduler child)."""
        with suppress(Exception):
            if getattr(self, "_loop_runner", None) is not None and self.status != Status.closed:
                self.sync(self._close)
        with suppress(Exception):
            self._loop_runner.stop()
        self._kill_child()

    def _kill_child(self) -> None:
        """End the scheduler process started early (unused, or closed already) and its scratch."""
        child = getattr(self, "_child", None)
        if child is not None:
            end_scheduler_child(child)


    # -- scaling -------------------------------------------------------------------------------

    def _check_scheduler(self) -> None:
        if self.status == Status.failed or (self.status == Status.running and (
                self.scheduler is None or self.scheduler.status != Status.running)):
            state = self.scheduler.status.name if self.scheduler is not None else "missing"
            cause = self._failures.get(self.scheduler_host or "", "").partition(": ")[2]
            raise LazyclusterError(
                f"the scheduler is not running ({state}{': ' + cause if cause else ''}): "
                f"close() this cluster (it still stops every worker) and start a new one")

    def _plan_new(self, count: int, strict: bool) -> dict[str, dict[str, Any]]:
        """Specs of ``count`` new workers; ``strict``: all or nothing, else as many as fit."""
        planner = self._planner
        assert planner is not None
        launcher = self._worker_launcher
        select = getattr(launcher, "select_host", None)

        def choose(counts: dict[str, int]) -> str:
            return str(select(counts, planner.max_per_host)) if select else min(counts, key=counts.get)  # type: ignore[arg-type]

        try:
            planned = planner.place(count, self._planned(), choose)
        except NoRoomError as exc:
            if strict:
                raise WorkersUnavailableError(len(self._planned()) + count,
                                              len(self._planned()), exc.reasons) from None
            for host, cause in exc.reasons.items():
                self.record_failure(host, f"cannot take another worker: {cause}")
            fits = 0
            while fits < count:  # as many as fit
                try:
                    planned = planner.place(fits + 1, self._planned(), choose)
                except NoRoomError:
                    break
                for name, *_ in planned:
                    planner.forget(name)
                fits += 1
            planned = planner.place(fits, self._planned(), choose) if fits else []
        return {name: self._worker_spec_for(name, host, ports, size)
                for name, host, ports, size in planned}

    def _worker_spec_for(self, name: str, host: str, ports: list[int],
                         size: Any) -> dict[str, Any]:
        assert self._planner is not None
        plan = self._planner.plans[host]
        return {"cls": RemoteWorker, "options": {
            "name": name, "host": host, "ports": ports, "owner": weakref.ref(self),
            "worker_class": plan.worker_class,
            "worker_options": self._planner.options_for(host, size, self._death_timeout),
            "python": plan.python, "setup": plan.setup, "debug": self._debug,
            "start_timeout": self._start_timeout}}

    def _rescale(self, n: int) -> None:
        """Change the worker spec to ``n`` workers, replacing those whose share changed."""
        planner = self._planner
        assert planner is not None
        names = self._planned()
        if n < len(names):
            launched = {d["name"] for d in self.scheduler_info.get("workers", {}).values()}
            self._drop(planner.to_remove(len(names) - n, names, launched))
        elif n > len(names) and self.status not in (Status.closing, Status.closed):
            self.worker_spec.update(self._plan_new(n - len(names), strict=not planner.adaptive))
        if planner.adaptive:
            return
        planner.set_slots(planner.counts(self._planned()))
        replaced = planner.mismatched(self._planned())
        if replaced:
            logger.info("resizing %s to their host's new share", replaced)
            for name in replaced:  # running ones retire after their successors run
                spec = self.worker_spec.pop(name)
                if name in self.workers:
                    self._replaced[name] = spec
                else:
                    planner.forget(name)
            self.worker_spec.update(self._plan_new(len(replaced), strict=False))

    async def _correct_state_internal(self) -> None:
        # Successors of replaced workers start before those retire, so the host keeps its
        # capacity (and a place for their data) meanwhile. If a successor fails, the replaced
        # worker stays: better the old size than no worker.
        replaced = {n: spec for n, spec in self._replaced.items() if n in self.workers}
        self._replaced.clear()
        self.worker_spec.update(replaced)
        self._retiring.update(replaced)  # in the spec for now, but no longer planned
        try:
            await self._reconcile_once()
        except Exception:
            self._retiring.difference_update(replaced)
            raise
        if replaced:
            for name in replaced:
                self.worker_spec.pop(name, None)
            self._retiring.difference_update(replaced)
            await self._reconcile_once()

    def _planned(self) -> list[str]:
        """The workers of the plan: the spec without those retiring after a resize."""
        return [n for n in self.worker_spec if n not in self._retiring]

    async def _reconcile_once(self) -> None:
        try:
            await super()._correct_state_internal()
        except Exception as exc:
            # SpecCluster keeps workers that failed to start: drop them so worker_spec,
            # workers and the scheduler agree, free their ports, and say why.
            failed = [n for n, w in self.workers.items() if w.status != Status.running]
            for name in failed:
                self.workers.pop(name).status = Status.failed  # it tore itself down already
                self.worker_spec.pop(name, None)
                self.release_ports(name)
            logger.error("workers %s failed to start: %s", failed, exc)
            raise

    def _drop(self, names: list[str]) -> None:
        assert self._planner is not None
        for name in names:
            del self.worker_spec[name]
            if name not in self.workers:
                self._planner.forget(name)

    async def _connection_changed(self, host: str, alive: bool) -> None:
        planner = self._planner
        if planner is None:
            return
        if host == self.scheduler_host:
            if not alive:  # nothing runs without it; the cluster says so, close() cleans up
                self._scheduler_failed(host, f"the SSH connection to {host} was lost")
            return
        if alive:
            # Usable again only once its forwards are back, so a scale() now cannot place a
            # worker that would find no way to the scheduler.
            await self._restore_scheduler_relay(host)
            await on_loop(self._restore_tunnels(host))
            planner.unhealthy.discard(host)
            logger.warning("host %s is reachable again; new workers may go there", host)
            return
        planner.unhealthy.add(host)
        lost = [n for n in list(self.worker_spec) if planner.hosts_of.get(n) == host]
        logger.warning("host %s lost: removing its workers %s and replacing them elsewhere",
                       host, lost)
        by_name = {w["name"]: a for a, w in self.scheduler_info.get("workers", {}).items()}
        for name in lost:
            address = by_name.get(name)
            if address is not None and self.scheduler_comm is not None:
                # Without this the scheduler waits for TCP timeouts before rescheduling.
                with suppress(Exception):
                    await self.scheduler_comm.run_function(
                        function=dumps(_remove_worker),
                        args=dumps((address, f"lazycluster-host-lost-{host}")), kwargs=dumps({}))
            del self.worker_spec[name]
        self.worker_spec.update(self._plan_new(len(lost), strict=False))
        await self._correct_state()

    async def _restore_tunnels(self, host: str) -> None:
        """A reconnected host gets back the forwards of the scheduler and of every worker."""
        assert self._planner is not None
        if self._tunnel is False or host in self._planner.direct_hosts:
            return
        runtime = self.runtime_group.get_runtime(host)
        ports = [self.master_port if self.scheduler_host is None else None] + [
            w.ports[0] for w in self.workers.values()
            if isinstance(w, RemoteWorker) and w.ports and w.host != host]
        for port in ports:
            if port is not None:
                with suppress(LazyclusterError):
                    await runtime.core.forwards.to_runtime(port, port)

    # -- close ---------------------------------------------------------------------------------

    async def _close_rest(self) -> None:
        """What SpecCluster does not close: forwards, supervisors, the group it owns.

        A group passed in stays connected for reuse, but no Dask process of this cluster (nor
        the supervisor that ran them) is left on its hosts.
        """
        group = self._group
        if group is None:
            return
        if self.master_port is not None:
            with suppress(Exception):
                await on_loop(group.core.close_port(self.master_port))
        with suppress(Exception):
            if self._owns_group:
                await on_loop(group.core.cleanup())
            else:
                await on_loop(_shutdown_supervisors(group))
        self._kill_child()
