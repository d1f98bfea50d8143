"""Dask on a runtime group: :class:`DaskCluster`, a real ``SpecCluster`` (lazycluster's API).

The scheduler runs on the manager (in-process, or in a child process with
``lazycluster.scheduler-process``) or on a host (``lazycluster.scheduler-host``); each worker
is a ``RemoteWorker`` process interface that starts a Dask server through its host's
supervisor over that host's one SSH connection.
Placement and sizing are the planner's (``_planner``); the launchers are lazycluster's
strategies (``_launchers``), importable from here as in lazycluster.
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import ExitStack
from typing import Any

import dask.config
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import SpecCluster
from distributed.utils import NoOpAwaitable, silence_logging_cmgr

from dask_lazycluster._group import RuntimeGroup
from dask_lazycluster.cluster._launchers import (
    LocalMasterLauncher,
    RemoteMasterLauncher,
    RoundRobinLauncher,
)
from dask_lazycluster.cluster._lifecycle import ClusterLifecycle
from dask_lazycluster.cluster._options import HostPlan
from dask_lazycluster.cluster._owner import ClusterOwnerAPI
from dask_lazycluster.cluster._planner import WorkerPlanner
from dask_lazycluster.cluster._security import resolve_security
from dask_lazycluster.cluster._status import ClusterStatus
from dask_lazycluster.cluster.named import ClusterNaming, registration
from dask_lazycluster.cluster.remote_worker import RemoteWorker
from dask_lazycluster.cluster.runtime_cluster import (
    MasterLauncher,
    MasterWorkerCluster,
    WorkerLauncher,
)
from dask_lazycluster.cluster.scheduler_process import spawn_scheduler_child
from dask_lazycluster.config import check_host_options, setting
from dask_lazycluster.exceptions import LazyclusterError
from dask_lazycluster.runtimes import Runtime
from dask_lazycluster.utils import preload_dashboard

__all__ = ["DaskCluster", "LocalMasterLauncher", "RemoteMasterLauncher", "RemoteWorker",
           "RoundRobinLauncher"]

logger = logging.getLogger(__name__)

MP_METHOD_ENV = "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"


class DaskCluster(ClusterNaming, ClusterStatus, ClusterOwnerAPI, ClusterLifecycle,
                  MasterWorkerCluster, SpecCluster):
    """A Dask cluster on a runtime group: lazycluster's ``DaskCluster`` as a ``SpecCluster``.

    ``DaskCluster(group)`` starts the scheduler on the manager and one worker per runtime;
    ``Client(cluster)``, ``scale``, ``adapt``, ``async with``, the widget and ``get_logs`` work
    as with any Dask cluster. Every argument left as None falls back to the ``lazycluster.*``
    Dask config (``lazycluster.yaml`` describes each key); with ``asynchronous=True`` all SSH
    work happens when the cluster is awaited, never blocking the running loop.

    **Every host as itself.** Unless ``nthreads`` / ``memory_limit`` are given, a host's
    workers share its usable cores and memory: each gets ``max(1, cores // k)`` threads and
    ``memory // k`` bytes, where ``k`` is the number of workers the cluster plans on that
    host (one worker gets the whole host), and a host with GPUs gives its workers
    ``resources={"GPU": n}``, its GPUs shared out. ``scale(n)`` plans the round-robin layout
    of ``n``: when that changes a host's ``k``, the running workers of that host whose size
    no longer fits are replaced by right-sized ones (their data is moved first), so at rest no
    host is oversubscribed and none is left idle. ``adapt(maximum=m)`` plans the layout of
    ``m`` once, so adaptive workers are never replaced and never oversubscribe a host.
    Per-host options (``python``, ``env``, ``setup``, ``upload``, ``worker_class``,
    ``worker_options``, ``max_workers``) come from mapping entries of ``lazycluster.hosts``
    and from ``host_options``, and win over the cluster-wide values.

    Args:
        runtime_group: The runtimes to use; None builds one from ``lazycluster.hosts``.
        ports: Ports for the scheduler (when 8786 is busy) and the tunneled workers; defaults
            to ``lazycluster.port-range``.
        master_launcher: Scheduler strategy; default ``LocalMasterLauncher``, or
            ``RemoteMasterLauncher`` with ``scheduler_host``.
        scheduler_host: Run the scheduler on this host of the group instead of the manager.
        worker_launcher: Placement strategy; default ``RoundRobinLauncher``.
        n_workers: Workers to start now; default one per runtime.
        master_port: Scheduler port; default 8786 if free, else the first free of ``ports``.
        tunnel: True (all traffic over SSH), False (direct TCP) or ``"auto"``.
        python: Remote python for the workers (default: each runtime's).
        worker_class: ``"distributed.Nanny"`` or ``"distributed.Worker"`` (or another path).
        worker_options: Keyword arguments for the worker class (JSON-serialisable).
        scheduler_options: Keyword arguments for ``distributed.Scheduler``.
        death_timeout: Seconds (or a Dask time string) a worker survives without scheduler.
        max_workers_per_host: Most workers on one host.
        env: Environment variables for the workers.
        prologue: Shell command run once on every host before any worker starts (e.g.
            ``"pip install -q -r requirements.txt"``); nothing is installed unless you ask.
        setup: Shell lines run before python in the shell that starts a host's Dask
            processes (e.g. ``["source /opt/conda/bin/activate ml"]``).
        upload: Local files or directories copied to each host's working directory before
            its first worker starts (importable by the workers).
        host_options: Host name to its own options (keys as in ``lazycluster.hosts``
            mappings, ``_`` or ``-``).
        debug: Print remote output live.
        asynchronous: Use with ``await`` / ``async with`` in a running loop.
        **kwargs: Passed to ``SpecCluster``: ``security``, ``silence_logs``, ``name`` (see ``from_name``).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument has a wrong value (e.g. negative ``n_workers``, an unknown
            host in ``host_options``).
        InvalidRuntimeError: If a configured host cannot be used.
        PortInUseError: If ``master_port`` is given and busy.
        NoPortsLeftError: If the ports cannot serve the scheduler and ``n_workers`` workers.
        WorkersUnavailableError: If the hosts cannot take ``n_workers`` workers.
        MasterStartError: If the scheduler cannot start.
        TaskExecutionError: If the prologue fails on a host.
        ClusterNameInUseError: If a running cluster has the ``name`` (before any SSH work).
        WorkerStartError: If a worker cannot start (host and cause named).

    Examples:
        >>> from distributed import Client
        >>> from dask_lazycluster import DaskCluster, RuntimeGroup
        >>> cluster = DaskCluster(RuntimeGroup(hosts=["node1", "gpu-box"]),  # doctest: +SKIP
        ...                       host_options={"gpu-box": {"worker_class": "distributed.Worker"}})
        >>> client = Client(cluster)                                # doctest: +SKIP
        >>> cluster.scale(4)                  # two workers per host, each half a host
        >>> cluster.adapt(minimum=0, maximum=8)                     # doctest: +SKIP
        >>> cluster.close()                                         # doctest: +SKIP
    """

    DEFAULT_MASTER_PORT = 8786
    #: lazycluster's; kept for launcher subclasses that use it, never run by this package.
    PIP_INSTALL_COMMAND = 'pip install -q "dask[complete]"'
    # lazycluster.port-range's default; the config value is what DaskCluster uses.
    DEFAULT_PORT_RANGE_START = 29000
    DEFAULT_PORT_RANGE_END = 30000

    def __init__(
        self,
        runtime_group: RuntimeGroup | None = None,
        ports: list[int] | None = None,
        master_launcher: MasterLauncher | None = None,
        worker_launcher: WorkerLauncher | None = None,
        *,
        scheduler_host: str | None = None,
        n_workers: int | None = None,
        master_port: int | None = None,
        tunnel: bool | str | None = None,
        python: str | None = None,
        worker_class: str | None = None,
        worker_options: dict[str, Any] | None = None,
        scheduler_options: dict[str, Any] | None = None,
        death_timeout: float | str | None = None,
        max_workers_per_host: int | None = None,
        env: dict[str, str] | None = None,
        prologue: str | None = None,
        setup: list[str] | None = None,
        upload: list[str] | None = None,
        host_options: dict[str, dict[str, Any]] | None = None,
        debug: bool = False,
        asynchronous: bool = False,
        **kwargs: Any,
    ) -> None:
        # Everything a user can get wrong in arguments or config is checked here, at once.
        self._tunnel = setting("tunnel", tunnel)
        self._n_workers = setting("n-workers", n_workers)
        self._master_port_arg = setting("master-port", master_port)
        method = setting("worker-start-method")
        self._cluster_wide = HostPlan(
            host="*", python=setting("python", python),
            env={MP_METHOD_ENV: method, **setting("env", env)},
            setup=list(setting("setup", setup)), upload=list(setting("upload", upload)),
            worker_class=setting("worker-class", worker_class),
            worker_options=dict(setting("worker-options", worker_options)),
            max_workers=setting("max-workers-per-host", max_workers_per_host))
        self._host_options = check_host_options(host_options)
        self._sched_options = dict(setting("scheduler-options", scheduler_options))
        self._death_timeout = parse_timedelta(setting("death-timeout", death_timeout))
        self._start_timeout = float(setting("worker-start-timeout"))
        self._scheduler_process = setting("scheduler-process")
        self._prologue = setting("prologue", prologue)
        self._debug = debug
        self._scheduler_host = setting("scheduler-host", scheduler_host)
        self._check_group_arguments(runtime_group, master_launcher, worker_launcher, scheduler_host)
        self._registration = registration(kwargs.get("name"))  # findable by name once started
        # None until _start builds it from lazycluster.hosts.
        self._group = runtime_group or getattr(  # type: ignore[assignment]
            master_launcher or worker_launcher, "runtime_group", None)
        self._owns_group = self._group is None
        self._ports_arg = list(ports) if ports is not None else None
        self._ports: list[int] = []
        self._master_launcher = master_launcher  # type: ignore[assignment]
        self._worker_launcher = worker_launcher  # type: ignore[assignment]
        self._planner: WorkerPlanner | None = None
        self._failures: dict[str, str] = {}
        self._replaced: dict[str, dict[str, Any]] = {}  # retire once their successors run
        self._retiring: set[str] = set()
        self._requested = 0
        self._uploads: dict[str, tuple[int, asyncio.Future[None]]] = {}
        # Workers inherit the manager's Dask config as it is now, as SSHCluster's do.
        self._inherited = dask.config.serialize(dask.config.global_config)
        self._silence_logs = kwargs.setdefault("silence_logs", logging.WARNING)
        self._security = resolve_security(kwargs.pop("security", None))
        if self._security is not None:
            self._sched_options = {"protocol": "tls", "security": self._security,
                                   **self._sched_options}
            kwargs["security"] = self._security
        local = self._scheduler_host is None and not isinstance(master_launcher, RemoteMasterLauncher)
        dashboard = local and self._sched_options.get("dashboard") is not False
        # The scheduler's own process starts first: its imports overlap the SSH work.
        self._child = spawn_scheduler_child(dashboard) if self._scheduler_process and local else None
        if dashboard:
            preload_dashboard()
        try:
            SpecCluster.__init__(self, workers={}, scheduler=None, worker=None,
                                 asynchronous=asynchronous, **kwargs)
        except BaseException:
            self._abandon()
            raise

    # -- start ---------------------------------------------------------------------------------

    async def _start(self) -> None:
        if self.status == Status.running:
            return
        async with self._named():  # claims the name first, serves it once started
            if self._planner is None:
                try:
                    await self._prepare()
                except BaseException:
                    await self._undo()
                    raise
            await self._start_scheduler()

    # -- scaling -------------------------------------------------------------------------------

    def new_worker_spec(self) -> dict[str, dict[str, Any]]:
        """Return name and spec of the next worker, placed by the worker launcher.

        Returns:
            ``{name: spec}``.

        Raises:
            NoPortsLeftError: If no ports are left for it.
            WorkersUnavailableError: If no host can take it.
        """
        return self._plan_new(1, strict=True)

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Scale to ``n`` workers (or enough for ``memory``/``cores``), balanced over hosts.

        New workers go to the hosts with the fewest workers; removed ones come from the hosts
        with the most, and are retired gracefully (their data moves to the remaining workers).
        Workers whose share of their host changed are replaced (see the class docstring).
        ``memory``/``cores`` count the real sizes of the workers placed.

        Args:
            n: Target number of workers.
            memory: Target total memory, e.g. ``"64 GiB"``.
            cores: Target total threads.

        Returns:
            An awaitable when asynchronous, else None.

        Raises:
            ValueError: If ``n`` is negative or not an int.
            NoPortsLeftError: If the ports cannot serve ``n`` workers (nothing is changed).
            WorkersUnavailableError: If the hosts cannot take ``n`` workers (nothing is
                changed; under ``adapt`` as many as fit are started and the cause recorded).
            LazyclusterError: If the scheduler died.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        self._check_scheduler()
        planner = self._planner
        if planner is None:
            raise LazyclusterError("the cluster is not started yet: await it first")
        planner.adaptive = self._adapting()
        if memory is not None or cores is not None:
            wanted = planner.workers_for(cores, parse_bytes(memory) if memory else None)
            n = max(n, wanted)
        if not planner.adaptive:
            self._failures.clear()
        self._requested = n
        self._rescale(n)
        assert self.loop is not None
        self.loop.add_callback(self._correct_state)
        return NoOpAwaitable() if self.asynchronous else None

    def _adapting(self) -> bool:
        adaptive = getattr(self, "_adaptive", None)
        return adaptive is not None and getattr(adaptive, "state", None) == "running"

    def adapt(
        self,
        Adaptive: type[Adaptive] = Adaptive,  # noqa: N803 - Dask's name
        minimum: float = 0,
        maximum: float = math.inf,
        minimum_cores: int | None = None,
        maximum_cores: int | None = None,
        minimum_memory: str | None = None,
        maximum_memory: str | None = None,
        **kwargs: Any,
    ) -> Adaptive:
        """Turn on adaptive scaling between ``minimum`` and ``maximum`` workers.

        Each host is sized for its share of ``maximum`` (its layout in round robin), so the
        workers adapt adds and removes never oversubscribe a host. Cores and memory bounds
        count the real sizes of the workers placed.

        Args:
            Adaptive: The adaptive class (Dask's by default).
            minimum: Fewest workers.
            maximum: Most workers (``inf``: each host's ``max-workers``, else its cores).
            minimum_cores: Fewest threads, turned into workers.
            maximum_cores: Most threads, turned into workers.
            minimum_memory: Least memory, turned into workers.
            maximum_memory: Most memory, turned into workers.
            **kwargs: For the adaptive class (``interval``, ``wait_count``...).

        Returns:
            The adaptive object.
        """
        planner = self._planner
        if planner is not None:
            if minimum_cores is not None or minimum_memory is not None:
                minimum = max(minimum, planner.workers_for(
                    minimum_cores, parse_bytes(minimum_memory) if minimum_memory else None))
            if maximum_cores is not None or maximum_memory is not None:
                maximum = min(maximum, planner.workers_for(
                    maximum_cores, parse_bytes(maximum_memory) if maximum_memory else None))
            planner.adapt_to(maximum)
        return Cluster.adapt(self, Adaptive=Adaptive, minimum=minimum, maximum=maximum, **kwargs)

    def _on_connection_change(self, host: str, alive: bool) -> None:
        """Runtime listener (SSH loop thread): hand the event to the cluster's loop."""
        if self.status in (Status.running, Status.starting) and self.loop is not None:
            self.loop.add_callback(self._connection_changed, host, alive)

    # -- close ---------------------------------------------------------------------------------

    async def _close(self) -> None:
        self._release_name()
        for runtime in (self._group.runtimes if self._group else []):
            runtime.remove_connection_listener(self._on_connection_change)
        # Workers still being retired by an earlier scale-down need not wait politely now.
        for worker in self.workers.values():
            if isinstance(worker, RemoteWorker):
                worker.hurry()
        with ExitStack() as quiet:
            if self._silence_logs:
                # SpecCluster restores the log level as it returns, while the closed scheduler's
                # batched sends still report their aborted comms (INFO, with a traceback).
                quiet.enter_context(silence_logging_cmgr(level=self._silence_logs))
            await SpecCluster._close(self)
            await self._close_rest()

    # -- lazycluster API ------------------------------------------------------------------------

    def get_client(self, timeout: int = 2) -> Client:
        """Return a Client connected to the cluster.

        Args:
            timeout: Seconds to wait for the connection.

        Returns:
            The client (asynchronous when the cluster is).

        Raises:
            TimeoutError: If it cannot connect within ``timeout``.
        """
        return Client(self, timeout=timeout, asynchronous=self.asynchronous)

    def cleanup(self) -> None:
        """Stop every worker, the scheduler and their forwards (twice is harmless).

        Runtimes the cluster created from config are cleaned up too; a group you passed in
        stays connected for reuse (call its ``cleanup()``).
        """
        if self.status != Status.closed:
            self.close()

    @property
    def direct_hosts(self) -> list[str]:
        """Hosts whose workers use direct TCP (all with ``tunnel=False``, probed with "auto")."""
        direct = self._planner.direct_hosts if self._planner else set()
        return [h for h in self.runtime_group.hosts if h in direct]

    @property
    def lost_hosts(self) -> list[str]:
        """Hosts whose SSH connection is down; no worker is placed there until it is back.

        A host leaves this list once its connection and forwards are restored, so a
        ``scale()`` after that may use it again.
        """
        lost = self._planner.unhealthy if self._planner else set()
        return [h for h in self.runtime_group.hosts if h in lost]

    @property
    def tunnel(self) -> bool | str:
        """The networking mode: True (SSH tunnels), False (direct) or ``"auto"``."""
        return self._tunnel

    @property
    def failures(self) -> dict[str, str]:
        """Why requested workers could not be placed or started, by host (since the last scale)."""
        return dict(self._failures)

    def runtime_of(self, worker_name: str) -> Runtime:
        """Return the runtime a worker runs on.

        Args:
            worker_name: The worker's name (its spec key).

        Returns:
            The runtime.

        Raises:
            KeyError: If no such worker is planned.
        """
        if self._planner is None or worker_name not in self._planner.hosts_of:
            raise KeyError(worker_name)
        return self.runtime_group.get_runtime(self._planner.hosts_of[worker_name])

