"""Dask on a runtime group: :class:`DaskCluster`, a real ``SpecCluster`` (lazycluster's API).

The scheduler runs on the manager (in-process, or in a child process with
``lazycluster.scheduler-process``); each worker is a :class:`RemoteWorker` process
interface that starts a Dask server on its runtime over that runtime's one SSH connection.
Placement is a :class:`RoundRobinLauncher` strategy, so ``scale``/``adapt`` put workers the
lazycluster way; in tunnel mode every port is reachable as ``localhost:<port>`` everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections import Counter
from contextlib import ExitStack, suppress
from typing import Any

from dask.utils import parse_bytes, parse_timedelta
from distributed import Client, Scheduler
from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from distributed.protocol.pickle import dumps
from distributed.security import Security
from distributed.utils import NoOpAwaitable, silence_logging_cmgr

import dask_lazycluster.config  # noqa: F401  (registers the lazycluster.* defaults)
from dask_lazycluster._loop import get_loop, on_loop, run_sync
from dask_lazycluster.cluster.exceptions import MasterStartError
from dask_lazycluster.cluster.remote_worker import RemoteWorker, is_nanny
from dask_lazycluster.cluster.runtime_cluster import (
    MasterLauncher,
    MasterWorkerCluster,
    WorkerLauncher,
)
from dask_lazycluster.cluster.scheduler_process import SchedulerProcess, spawn_scheduler_child
from dask_lazycluster.config import setting
from dask_lazycluster.exceptions import LazyclusterError, NoPortsLeftError
from dask_lazycluster.runtime_mgmt import RuntimeGroup
from dask_lazycluster.runtimes import Runtime, RuntimeTask
from dask_lazycluster.utils import localhost_has_free_port, preload_dashboard

logger = logging.getLogger(__name__)

class LocalMasterLauncher(MasterLauncher):
    """Runs the Dask scheduler on the manager (the machine running Python).

    In the client's process by default; in a child process with
    ``lazycluster.scheduler-process: true`` (see :class:`SchedulerProcess`).

    :meth:`start` chooses the scheduler port by the group's port rules; the cluster then
    starts the scheduler on it and, in tunnel mode, exposes it to every runtime.

    Args:
        runtime_group: The group where the workers will run.
    """

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        super().__init__(runtime_group)
        self._cluster: weakref.ref[DaskCluster] | None = None

    @property
    def process(self) -> Scheduler | SchedulerProcess | None:
        """The scheduler: a ``distributed.Scheduler``, or its :class:`SchedulerProcess`.

        The process interface runs it with ``lazycluster.scheduler-process: true``; None
        until the cluster started it.
        """
        cluster = self._cluster() if self._cluster else None
        return cluster.scheduler if cluster is not None else None

    def start(self, ports: list[int] | int, timeout: int = 3, debug: bool = False) -> list[int]:
        """Choose the scheduler port: free on the manager and on every runtime.

        Args:
            ports: A single port (exactly it) or a list (the first free one).
            timeout: Kept for the launcher interface: the in-process scheduler starts or
                fails at once (``MasterStartError``), it cannot hang.
            debug: Unused for a local scheduler (kept for the launcher interface).

        Returns:
            The list without the chosen port (empty when a single port was given).

        Raises:
            PortInUseError: If a single port is given and it is busy.
            NoPortsLeftError: If no port of the list is free.
        """
        group = self.runtime_group
        cluster = self._cluster() if self._cluster else None
        snapshot = cluster._busy_by_host if cluster is not None else None
        self._port = run_sync(
            on_loop(group._pick_port(ports, group.runtimes, True, "master_port", snapshot))
        )
        return [] if isinstance(ports, int) else [p for p in ports if p != self._port]

    def scheduler_spec(self, listen_host: str, options: dict[str, Any]) -> dict[str, Any]:
        """The ``SpecCluster`` scheduler spec for the chosen port.

        Args:
            listen_host: Address to bind (loopback in tunnel mode).
            options: Extra ``distributed.Scheduler`` keyword arguments (they win).

        Returns:
            ``{"cls": Scheduler, "options": {...}}``, or :class:`SchedulerProcess` as the class
            with ``lazycluster.scheduler-process: true``.

        Raises:
            MasterStartError: If :meth:`start` did not choose a port yet.
        """
        if self._port is None:
            raise MasterStartError("localhost", None, "start() must choose a port first")
        dashboard = "127.0.0.1:8787" if listen_host == "127.0.0.1" else ":8787"
        base = {"host": listen_host, "port": self._port, "dashboard_address": dashboard,
                "protocol": "tcp"}
        cluster = self._cluster() if self._cluster else None
        if cluster is not None and cluster._scheduler_process:
            child = {"log_level": cluster._silence_logs or logging.INFO,
                     "start_timeout": cluster._start_timeout, "child": cluster._child}
            return {"cls": SchedulerProcess, "options": {**base, **options, **child}}
        return {"cls": Scheduler, "options": {**base, **options}}

    def cleanup(self) -> None:
        """Close the scheduler's forwards to the runtimes (the cluster closes the scheduler)."""
        if self._port is not None:
            self.runtime_group.close_port_forward(self._port)


class RoundRobinLauncher(WorkerLauncher):
    """Places each new worker on the runtime with the fewest workers (ties: group order).

    After a scale-down the next scale-up refills the emptiest runtimes first, so the
    distribution stays even. Subclass and override :meth:`select_host` for another strategy.

    Args:
        runtime_group: The group where the workers will run.
    """

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        super().__init__(runtime_group)
        self._cluster: weakref.ref[DaskCluster] | None = None

    def _owner(self) -> DaskCluster:
        cluster = self._cluster() if self._cluster else None
        if cluster is None:
            raise LazyclusterError("this launcher is not attached to a running DaskCluster")
        return cluster

    def select_host(self, counts: dict[str, int], max_per_host: int | None) -> str:
        """Choose the host of the next worker.

        Args:
            counts: Workers per usable host (hosts whose connection is lost are left out),
                planned ones included.
            max_per_host: Most workers allowed on one host, or None.

        Returns:
            The host name.

        Raises:
            NoPortsLeftError: If every usable host is full (or none is usable).
        """
        hosts = [h for h in self.runtime_group.hosts if h in counts]
        open_hosts = [h for h in hosts if max_per_host is None or counts[h] < max_per_host]
        if not hosts:
            raise NoPortsLeftError("no host is reachable right now to place a worker on")
        if not open_hosts:
            raise NoPortsLeftError(f"every host already runs max-workers-per-host={max_per_host}")
        return min(open_hosts, key=lambda h: counts.get(h, 0))  # min keeps group order on ties

    @property
    def ports_per_host(self) -> dict[str, list[int]]:
        """Host to the ports where its workers are reachable (planned workers included)."""
        cluster = self._cluster() if self._cluster else None
        if cluster is None:
            return super().ports_per_host
        return cluster._ports_per_host()

    def start(
        self, worker_count: int, master_port: int, ports: list[int], debug: bool = False
    ) -> list[int]:
        """Add ``worker_count`` workers to the cluster and wait until they run.

        Args:
            worker_count: Workers to add.
            master_port: The scheduler port (the cluster knows it; kept for the interface).
            ports: Unused: the cluster's own port list is used, so ``scale`` and this agree.
            debug: Print remote output live.

        Returns:
            The ports of the cluster's list still unused.

        Raises:
            NoPortsLeftError: If there are not enough free ports.
        """
        cluster = self._owner()
        cluster._debug = cluster._debug or debug
        cluster.scale(len(cluster.worker_spec) + worker_count)
        cluster.sync(cluster._correct_state)
        return cluster._unused_ports()

    def setup_worker_ssh_tunnels(self) -> None:
        """Make sure every tunneled worker is reachable as ``localhost:<port>`` everywhere.

        Workers set their tunnels up themselves when they start; this re-creates any missing.

        Raises:
            PortInUseError: If a worker's port became busy on the manager or a runtime.
        """
        cluster = self._owner()
        workers = [w for w in cluster.workers.values() if isinstance(w, RemoteWorker)]
        run_sync(on_loop(_gather(*(w._ensure_tunnels() for w in workers))))

    def cleanup(self) -> None:
        """Stop every worker of the cluster."""
        cluster = self._cluster() if self._cluster else None
        if cluster is not None and cluster.status == Status.running:
            cluster.scale(0)
            cluster.sync(cluster._correct_state)


async def _remove_worker(address: str, stimulus_id: str, dask_scheduler: Scheduler) -> None:
    """Run on the scheduler (in-process or not): forget a worker whose host is lost."""
    await dask_scheduler.remove_worker(address, stimulus_id=stimulus_id, close=False)


async def _gather(*coros: Any) -> list[Any]:
    return list(await asyncio.gather(*coros))


class DaskCluster(MasterWorkerCluster, SpecCluster):
    """A Dask cluster on a runtime group: lazycluster's ``DaskCluster`` as a ``SpecCluster``.

    ``DaskCluster(group)`` starts the scheduler on the manager and one worker per runtime;
    ``Client(cluster)``, ``scale``, ``adapt``, ``async with``, the widget and ``get_logs`` work
    as with any Dask cluster. Every argument left as None falls back to the ``lazycluster.*``
    Dask config (see ``lazycluster.yaml``).

    Args:
        runtime_group: The runtimes to use; None builds one from ``lazycluster.hosts``.
        ports: Ports for the scheduler (when 8786 is busy) and the tunneled workers; defaults
            to ``lazycluster.port-range``.
        master_launcher: Scheduler strategy; default :class:`LocalMasterLauncher`.
        worker_launcher: Placement strategy; default :class:`RoundRobinLauncher`.
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
        debug: Print remote output live.
        asynchronous: Use with ``await`` / ``async with`` in a running loop.
        **kwargs: Passed to ``SpecCluster`` (``name``, ``security``, ``silence_logs``...).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument has a wrong value (e.g. negative ``n_workers``).
        InvalidRuntimeError: If a configured host cannot be used.
        PortInUseError: If ``master_port`` is given and busy.
        NoPortsLeftError: If the ports cannot serve the scheduler and ``n_workers`` workers.
        MasterStartError: If the scheduler cannot start.
        TaskExecutionError: If the prologue fails on a host.
        LazyclusterError: If a worker cannot start (host and cause named).
    """

    DEFAULT_MASTER_PORT = 8786
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
        debug: bool = False,
        asynchronous: bool = False,
        **kwargs: Any,
    ) -> None:
        self._tunnel = setting("tunnel", tunnel)
        n_workers = setting("n-workers", n_workers)
        self._worker_class = setting("worker-class", worker_class)
        self._worker_options = dict(setting("worker-options", worker_options))
        sched_options = dict(setting("scheduler-options", scheduler_options))
        self._env = dict(setting("env", env))
        self._python = setting("python", python)
        self._death_timeout = parse_timedelta(setting("death-timeout", death_timeout))
        self._max_per_host = setting("max-workers-per-host", max_workers_per_host)
        self._start_timeout = float(setting("worker-start-timeout"))
        self._warm_spares = setting("warm-spares")
        self._start_method = setting("worker-start-method")
        self._scheduler_process = setting("scheduler-process")
        # The nanny's setting travels as Dask config in the environment; the user's env wins.
        self._env = {_MP_METHOD_ENV: self._start_method, **self._env}
        master_port = setting("master-port", master_port)
        self._debug = debug
        # Quiet like LocalCluster: scheduler INFO lines would drown a notebook.
        self._silence_logs = kwargs.setdefault("silence_logs", logging.WARNING)
        self._security = _resolve_security(kwargs.pop("security", None))
        dashboard = sched_options.get("dashboard") is not False
        # The scheduler's own process starts first: its imports overlap the SSH work below.
        self._child = spawn_scheduler_child(dashboard) if self._scheduler_process else None
        if dashboard:
            preload_dashboard()
        self._owns_group = runtime_group is None
        try:
            if runtime_group is None:
                hosts = setting("hosts")
                if not hosts:
                    raise ValueError(
                        "no runtime_group given and no hosts configured (lazycluster.hosts)"
                    )
                runtime_group = RuntimeGroup(
                    hosts=list(hosts),
                    working_dir=setting("working-dir"),
                    connect_options=setting("connect-options") or None,
                    python=self._python,
                )
            elif not isinstance(runtime_group, RuntimeGroup):
                raise TypeError(f"runtime_group must be a RuntimeGroup, got {runtime_group!r}")
        except BaseException:
            self._kill_child()
            raise
        if ports is None:
            first, last = setting("port-range")
            ports = list(range(first, last + 1))
        try:
            master_launcher = master_launcher or LocalMasterLauncher(runtime_group)
            worker_launcher = worker_launcher or RoundRobinLauncher(runtime_group)
            MasterWorkerCluster.__init__(
                self, runtime_group, ports, master_launcher, worker_launcher
            )
            prologue = setting("prologue", prologue)
            if self._python is None and not prologue:  # a prologue may install it
                missing = [r.host for r in runtime_group.runtimes
                           if r.info.get("distributed_version") is None]
                if missing:
                    raise LazyclusterError(
                        f"distributed is not installed for the remote python on "
                        f"{', '.join(missing)} ({runtime_group.get_runtime(missing[0]).python}): "
                        f"install it there, pass python= or use prologue='pip install distributed'"
                    )
            self._init_state(master_launcher, worker_launcher)
            self.start_master(master_port)
            # Everything a user can get wrong is checked here, before any process starts.
            initial = self._plan_workers(
                runtime_group.runtime_count if n_workers is None else n_workers, {}
            )
            if prologue:
                runtime_group.execute_task(RuntimeTask("prologue").run_command(prologue),
                                           broadcast=True, execute_async=False, debug=debug)
            # Remote interpreters start importing now, while the scheduler starts here.
            self._prewarm(Counter(self._hosts_of[name] for name in initial))
            listen = "127.0.0.1" if self._tunnel is True else "0.0.0.0"
            if self._security is not None:
                sched_options = {"protocol": "tls", "security": self._security, **sched_options}
                kwargs["security"] = self._security
            scheduler = self._master_launcher_spec(listen, sched_options)
            SpecCluster.__init__(
                self,
                workers=initial,
                scheduler=scheduler,
                worker=self._template,
                asynchronous=asynchronous,
                **kwargs,
            )
        except BaseException:
            self._abandon()
            raise

    # -- set-up helpers -------------------------------------------------------------------------

    def _init_state(self, master: MasterLauncher, workers: WorkerLauncher) -> None:
        """Port and placement bookkeeping; one snapshot of the hosts' busy ports."""
        self._allocated: dict[str, list[int]] = {}
        self._unhealthy: set[str] = set()
        for runtime in self._group.runtimes:
            runtime.add_connection_listener(self._on_connection_change)
        self._hosts_of: dict[str, str] = {}
        self._counter = 0
        self._direct_hosts: set[str] = set() if self._tunnel is True else set(self._group.hosts)
        if self._tunnel == "auto":
            self._direct_hosts = run_sync(on_loop(self._group._direct_hosts()))
            logger.info("tunnel='auto': direct %s, tunneled %s", sorted(self._direct_hosts),
                        sorted(set(self._group.hosts) - self._direct_hosts))
        for launcher in (master, workers):
            if isinstance(launcher, LocalMasterLauncher | RoundRobinLauncher):
                launcher._cluster = weakref.ref(self)
        # One snapshot of every host's listening ports serves the master and all worker ports.
        # A probe of the last few seconds (RuntimeGroup(...) right before) is fresh enough: a
        # port taken since makes its forward fail loudly, never silently.
        self._busy_by_host = run_sync(
            on_loop(self._group._busy_ports(self._group.runtimes, max_age=30))
        )
        self._busy_snapshot: set[int] = set().union(*self._busy_by_host.values())
        # The hosts' facts do not change: compute the new-worker options once, not per worker.
        self._template = self._worker_template()

    def _master_launcher_spec(self, listen: str, options: dict[str, Any]) -> dict[str, Any]:
        launcher = self._master_launcher
        if isinstance(launcher, LocalMasterLauncher):
            return launcher.scheduler_spec(listen, options)
        spec = getattr(launcher, "scheduler_spec", None)
        if callable(spec):
            return dict(spec(listen, options))
        return LocalMasterLauncher.scheduler_spec(launcher, listen, options)  # type: ignore[arg-type]

    def _worker_template(self) -> dict[str, Any]:
        runtimes = self._group.runtimes
        options = dict(self._worker_options)
        options.setdefault("nthreads", min(r.cpu_cores for r in runtimes))
        if "memory_limit" not in options:
            options["memory_limit"] = min(r.memory for r in runtimes)
        options.setdefault("death_timeout", self._death_timeout)
        return {"cls": RemoteWorker, "options": options}

    def _abandon(self) -> None:
        """Undo a failed construction: no forward, process or (owned) connection is left."""
        with suppress(Exception):
            if getattr(self, "_loop_runner", None) is not None and self.status != Status.closed:
                self.sync(self._close)
        with suppress(Exception):
            self._loop_runner.stop()
        with suppress(Exception):
            self._master_launcher.cleanup()
        if self._owns_group:
            with suppress(Exception):
                self._group.cleanup()
        self._kill_child()

    def _kill_child(self) -> None:
        """Kill the scheduler process started early if construction failed (no-op if gone)."""
        child = getattr(self, "_child", None)
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()

    async def _start(self) -> None:
        port = self.master_port
        if port is not None and not localhost_has_free_port(port) and self.scheduler is None:
            # Taken since it was chosen (another program): fail clearly rather than late.
            raise MasterStartError("localhost", port, "the port was taken after it was chosen")
        try:
            await SpecCluster._start(self)
        except Exception as exc:
            root: BaseException = exc
            # Dask wraps the real reason twice; ours already says what failed.
            while root.__cause__ is not None and not isinstance(root, MasterStartError):
                root = root.__cause__
            cause = root.cause if isinstance(root, MasterStartError) else (
                f"{type(root).__name__}: {root}")
            raise MasterStartError("localhost", self.master_port, cause) from exc
        if getattr(self.scheduler, "_process", None) is not self._child:
            self._kill_child()  # a custom master launcher started its own scheduler
        if self._tunnel is not False:
            port = self.master_port
            assert port is not None
            exclude = list(self._direct_hosts)
            try:
                await on_loop(self._group._expose_port_to_runtimes(port, port, exclude))
            except LazyclusterError as exc:
                await self._close()
                raise MasterStartError("localhost", port, f"cannot tunnel it: {exc}") from exc

    # -- placement and ports ----------------------------------------------------------------------

    @property
    def worker_count(self) -> int:
        """Number of workers planned (running or starting)."""
        return len(self.worker_spec) if hasattr(self, "worker_spec") else 0

    def _ports_needed(self, host: str) -> int:
        if host in self._direct_hosts:
            return 0
        return 2 if is_nanny(self._worker_class) else 1

    def _take_ports(self, count: int) -> list[int]:
        in_use = {p for ports in self._allocated.values() for p in ports}
        in_use.add(self.master_port or 0)
        taken: list[int] = []
        for port in self._ports:
            if len(taken) == count:
                break
            if port in in_use or port in self._busy_snapshot or not localhost_has_free_port(port):
                continue
            taken.append(port)
        if len(taken) < count:
            raise NoPortsLeftError(
                f"the port list ({len(self._ports)} ports) has too few ports free on the manager "
                f"and every runtime for another worker; pass more ports= or a larger port-range"
            )
        return taken

    def _plan_workers(
        self, count: int, existing: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Allocate hosts and ports for ``count`` new workers, all or nothing."""
        counts = Counter({h: 0 for h in self._group.hosts if h not in self._unhealthy})
        counts.update(self._hosts_of[n] for n in existing
                      if n in self._hosts_of and self._hosts_of[n] in counts)
        planned: dict[str, dict[str, Any]] = {}
        try:
            for _ in range(count):
                host = self._worker_launcher_select(dict(counts))
                while f"{host}-{self._counter}" in existing or f"{host}-{self._counter}" in planned:
                    self._counter += 1
                name = f"{host}-{self._counter}"
                self._counter += 1
                self._allocated[name] = self._take_ports(self._ports_needed(host))
                self._hosts_of[name] = host
                counts[host] += 1
                planned[name] = self._worker_spec_for(name, host)
        except BaseException:
            for name in planned:
                self._release_ports(name)
            self._allocated = {n: p for n, p in self._allocated.items() if n not in planned}
            raise
        return planned

    def _worker_launcher_select(self, counts: dict[str, int]) -> str:
        launcher = self._worker_launcher
        select = getattr(launcher, "select_host", None)
        if select is None:
            return RoundRobinLauncher.select_host(launcher, counts, self._max_per_host)  # type: ignore[arg-type]
        host = select(counts, self._max_per_host)
        if host not in counts:
            raise LazyclusterError(
                f"worker launcher chose {host!r}, which is not a reachable host of the group"
            )
        return str(host)

    def _worker_spec_for(self, name: str, host: str) -> dict[str, Any]:
        return {
            "cls": RemoteWorker,
            "options": {
                "name": name,
                "host": host,
                "ports": self._allocated[name],
                "cluster": weakref.ref(self),
                "worker_class": self._worker_class,
                "worker_options": self._template["options"],
                "python": self._python,
                "debug": self._debug,
                "start_timeout": self._start_timeout,
            },
        }

    def _launch_secrets(self) -> tuple[dict[str, str], dict[str, Any] | None]:
        """Environment and TLS material for a worker, sent over SSH stdin only.

        Kept out of the worker spec so they never show in reprs or logs.
        """
        if self._security is None:
            return self._env, None
        sec = self._security
        tls: dict[str, Any] = {"require_encryption": True}
        # A worker also acts as a client (of the scheduler and its peers).
        for field, fallback in (("tls_ca_file", None), ("tls_worker_cert", None),
                                ("tls_worker_key", None), ("tls_client_cert", "tls_worker_cert"),
                                ("tls_client_key", "tls_worker_key")):
            value = getattr(sec, field, None) or (getattr(sec, fallback, None) if fallback else None)
            if value is not None:
                tls[field] = _pem(value)
        return self._env, tls

    def _release_ports(self, name: str) -> None:
        self._allocated.pop(name, None)
        if name not in getattr(self, "worker_spec", {}):
            self._hosts_of.pop(name, None)

    def _unused_ports(self) -> list[int]:
        in_use = {p for ports in self._allocated.values() for p in ports}
        return [p for p in self._ports if p not in in_use]

    def _ports_per_host(self) -> dict[str, list[int]]:
        result: dict[str, list[int]] = {host: [] for host in self._group.hosts}
        for name in getattr(self, "worker_spec", {}):
            host = self._hosts_of.get(name)
            if host is None:
                continue
            ports = self._allocated.get(name) or []
            worker = self.workers.get(name)
            if ports:
                result[host].append(ports[0])
            elif isinstance(worker, RemoteWorker) and worker.worker_address:
                result[host].append(int(worker.worker_address.rsplit(":", 1)[1]))
        return result

    # -- SpecCluster API ----------------------------------------------------------------------------

    def new_worker_spec(self) -> dict[str, dict[str, Any]]:
        """Return name and spec of the next worker, placed by the worker launcher.

        Returns:
            ``{name: spec}``.

        Raises:
            NoPortsLeftError: If no ports are left for it.
        """
        return self._plan_workers(1, self.worker_spec)

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Scale to ``n`` workers (or enough for ``memory``/``cores``), balanced over hosts.

        New workers go to the hosts with the fewest workers; removed ones come from the hosts
        with the most, and are retired gracefully (their data moves to the remaining workers).

        Args:
            n: Target number of workers.
            memory: Target total memory, e.g. ``"64 GiB"``.
            cores: Target total threads.

        Returns:
            An awaitable when asynchronous, else None.

        Raises:
            ValueError: If ``n`` is negative or not an int.
            NoPortsLeftError: If the ports cannot serve ``n`` workers (nothing is changed).
            LazyclusterError: If the scheduler died.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if self.status == Status.running and (
            self.scheduler is None or self.scheduler.status != Status.running
        ):
            state = self.scheduler.status.name if self.scheduler is not None else "missing"
            raise LazyclusterError(
                f"the scheduler is not running ({state}): close() this cluster (it still "
                f"stops every worker) and start a new one"
            )
        if memory is not None:
            n = max(n, math.ceil(parse_bytes(memory) / self._memory_per_worker()))
        if cores is not None:
            n = max(n, math.ceil(cores / self._threads_per_worker()))
        current = len(self.worker_spec)
        if n > current and self.status not in (Status.closing, Status.closed):
            self.worker_spec.update(self._plan_workers(n - current, self.worker_spec))
        elif n < current:
            for name in self._names_to_remove(current - n):
                del self.worker_spec[name]
                if name not in self.workers:
                    self._release_ports(name)
        assert self.loop is not None
        self.loop.add_callback(self._correct_state)
        if self.asynchronous:
            return NoOpAwaitable()
        return None

    def _names_to_remove(self, count: int) -> list[str]:
        """Workers not yet launched first, then the newest on the most loaded hosts."""
        launched = {d["name"] for d in self.scheduler_info.get("workers", {}).values()}
        order = {host: i for i, host in enumerate(self._group.hosts)}
        chosen: list[str] = []
        remaining = list(self.worker_spec)
        for name in reversed(remaining):
            if len(chosen) == count:
                return chosen
            if name not in launched and name not in self.workers:
                chosen.append(name)
        remaining = [n for n in remaining if n not in chosen]
        while len(chosen) < count and remaining:
            counts = Counter(self._hosts_of.get(n, "") for n in remaining)
            busiest = max(counts, key=lambda h: (counts[h], order.get(h, -1)))
            victim = [n for n in remaining if self._hosts_of.get(n, "") == busiest][-1]
            remaining.remove(victim)
            chosen.append(victim)
        return chosen

    @property
    def _forkserver(self) -> bool:
        """Whether warm processes should start the nanny's fork server ahead of need."""
        # The user's env may override worker-start-method; __init__ always sets the variable.
        return self._env[_MP_METHOD_ENV] == "forkserver" and is_nanny(self._worker_class)

    def _prewarm(self, per_host: Counter[str]) -> None:
        runtimes = [self._group.get_runtime(h) for h in per_host]
        run_sync(on_loop(_gather(*(
            r._prewarm(per_host[r.host], self._python, self._debug, self._forkserver)
            for r in runtimes
        ))))

    async def _refill_spares(self) -> None:
        """Keep ``warm-spares`` warm processes per host for the next scale-up."""
        await _gather(*(
            r._prewarm(self._warm_spares - r._warm_count, self._python, self._debug,
                       self._forkserver)
            for r in self._group.runtimes
            if r._warm_count < self._warm_spares
        ))

    def _on_connection_change(self, host: str, alive: bool) -> None:
        """Runtime listener (SSH loop thread): hand the event to the cluster's loop."""
        if self.status in (Status.running, Status.starting) and self.loop is not None:
            self.loop.add_callback(self._handle_connection_change, host, alive)

    async def _handle_connection_change(self, host: str, alive: bool) -> None:
        if alive:
            self._unhealthy.discard(host)
            await on_loop(self._restore_tunnels(host))
            logger.warning("host %s is reachable again; new workers may go there", host)
            return
        self._unhealthy.add(host)
        lost = [n for n in list(self.worker_spec) if self._hosts_of.get(n) == host]
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
                        args=dumps((address, f"lazycluster-host-lost-{host}")),
                        kwargs=dumps({}),
                    )
            del self.worker_spec[name]
        try:
            self.worker_spec.update(self._plan_workers(len(lost), self.worker_spec))
        except LazyclusterError as exc:
            logger.warning("cannot replace the workers of %s: %s", host, exc)
        await self._correct_state()

    async def _restore_tunnels(self, host: str) -> None:
        """A reconnected host gets back the forwards of the scheduler and of every worker."""
        if self._tunnel is False or host in self._direct_hosts:
            return
        runtime = self._group.get_runtime(host)
        ports = [self.master_port] + [
            w.ports[0] for w in self.workers.values()
            if isinstance(w, RemoteWorker) and w.ports and w.host != host
        ]
        for port in ports:
            if port is not None:
                with suppress(LazyclusterError):
                    await runtime._expose_to_runtime(port, port)

    async def _correct_state_internal(self) -> None:
        try:
            await SpecCluster._correct_state_internal(self)
        except Exception as exc:
            # SpecCluster keeps workers that failed to start: drop them so worker_spec,
            # workers and the scheduler agree, free their ports, and say why.
            failed = [n for n, w in self.workers.items() if w.status != Status.running]
            for name in failed:
                self.workers.pop(name).status = Status.failed  # it tore itself down already
                self.worker_spec.pop(name, None)
                self._release_ports(name)
            logger.error("workers %s failed to start: %s", failed, exc)
            raise
        if self.status == Status.running and self._warm_spares > 0:
            await on_loop(self._refill_spares())

    async def _close(self) -> None:
        for runtime in self._group.runtimes:
            runtime.remove_connection_listener(self._on_connection_change)
        # Workers still being retired by an earlier scale-down need not wait politely now.
        processes = [w.process for w in self.workers.values()
                     if isinstance(w, RemoteWorker) and w.process is not None]
        for process in processes:
            get_loop().call_soon_threadsafe(process.hurry)
        with ExitStack() as quiet:
            if self._silence_logs:
                # SpecCluster restores the log level as it returns, while the closed scheduler's
                # batched sends still report their aborted comms (INFO, with a traceback).
                quiet.enter_context(silence_logging_cmgr(level=self._silence_logs))
            await SpecCluster._close(self)
            await self._close_rest()

    async def _close_rest(self) -> None:
        """What SpecCluster does not close: warm processes, the scheduler's forwards, the group."""
        with suppress(Exception):
            await on_loop(_gather(*(r._drain_warm() for r in self._group.runtimes)))
        if self.master_port is not None:
            with suppress(Exception):
                await on_loop(self._group._close_port(self.master_port))
        if self._owns_group:
            with suppress(Exception):
                await on_loop(_gather(*(r._cleanup() for r in self._group.runtimes)))

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
        return [h for h in self._group.hosts if h in self._direct_hosts]

    @property
    def tunnel(self) -> bool | str:
        """The networking mode: True (SSH tunnels), False (direct) or ``"auto"``."""
        return self._tunnel

    def runtime_of(self, worker_name: str) -> Runtime:
        """Return the runtime a worker runs on.

        Args:
            worker_name: The worker's name (its spec key).

        Returns:
            The runtime.

        Raises:
            KeyError: If no such worker is planned.
        """
        return self._group.get_runtime(self._hosts_of[worker_name])


_MP_METHOD_ENV = "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"


def _resolve_security(security: Any) -> Security | None:
    """``True``: temporary self-signed TLS for this cluster; a ``Security``: the user's own."""
    if security is None or security is False:
        return None
    if security is True:
        return Security.temporary()
    if isinstance(security, Security):
        if not security.require_encryption or not getattr(security, "tls_worker_cert", None):
            raise ValueError("security= needs TLS certificates for the workers "
                             "(tls_worker_cert/tls_worker_key) and require_encryption=True")
        return security
    raise TypeError(f"security must be True, False or a distributed.Security, got {security!r}")


def _pem(value: str | None) -> str | None:
    """A certificate or key as PEM text: in-memory already, or read from the manager's file."""
    if value is None or "-----BEGIN" in value:
        return value
    with open(value) as f:
        return f.read()
