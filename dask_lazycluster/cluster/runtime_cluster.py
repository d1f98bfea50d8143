"""Generic master/worker cluster strategy layer (lazycluster's ``runtime_cluster`` module).

A :class:`MasterWorkerCluster` starts one master and many workers on a
:class:`~dask_lazycluster.runtime_mgmt.RuntimeGroup`. *How* the master is started and *where*
workers go are strategies: :class:`MasterLauncher` and :class:`WorkerLauncher` subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from dask_lazycluster.exceptions import LazyclusterError, MasterStartError
from dask_lazycluster.runtime_mgmt import RuntimeGroup


class _Launcher:
    """What every launcher strategy has: the group it works on.

    Args:
        runtime_group: The group the cluster runs on.

    Raises:
        TypeError: If ``runtime_group`` is not a RuntimeGroup.
    """

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        if not isinstance(runtime_group, RuntimeGroup):
            raise TypeError(f"runtime_group must be a RuntimeGroup, got {runtime_group!r}")
        self._group = runtime_group

    @property
    def runtime_group(self) -> RuntimeGroup:
        """The group the cluster runs on."""
        return self._group


class MasterLauncher(_Launcher, ABC):
    """Strategy that starts the master instance of a cluster.

    Args:
        runtime_group: The group the cluster runs on.
    """

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        super().__init__(runtime_group)
        self._port: int | None = None
        self._process: Any = None

    @property
    def port(self) -> int | None:
        """The port the master listens on; None if not started yet."""
        return self._port

    @property
    def process(self) -> Any:
        """The object running the master; None if not started yet."""
        return self._process

    @abstractmethod
    def start(self, ports: list[int] | int, timeout: int = 3, debug: bool = False) -> list[int]:
        """Launch the master instance.

        Args:
            ports: A single port (exactly it) or a list (the first port free in the group).
            timeout: Seconds after which :class:`MasterStartError` is raised.
            debug: Print remote output live.

        Returns:
            The port list without the used port (empty for a single port).

        Raises:
            PortInUseError: If a single port is given and not free in the group.
            NoPortsLeftError: If no port of the list is free in the group.
            MasterStartError: If the master did not start within ``timeout``.
        """

    def cleanup(self) -> None:
        """Release all resources: stop :attr:`process` if it can be terminated."""
        terminate = getattr(self._process, "terminate", None)
        if callable(terminate):
            terminate()


class WorkerLauncher(_Launcher, ABC):
    """Strategy that decides where workers run and starts them.

    Args:
        runtime_group: The group the workers run on.
    """

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        super().__init__(runtime_group)
        self._ports_per_host: dict[str, list[int]] = {host: [] for host in runtime_group.hosts}

    @property
    def ports_per_host(self) -> dict[str, list[int]]:
        """Host to the ports where its workers are reachable."""
        return {host: list(ports) for host, ports in self._ports_per_host.items()}

    @abstractmethod
    def start(
        self, worker_count: int, master_port: int, ports: list[int], debug: bool = False
    ) -> list[int]:
        """Launch worker instances in the group.

        Args:
            worker_count: How many workers to add.
            master_port: The master's port.
            ports: Ports to choose worker ports from (only free ones are used).
            debug: Print remote output live.

        Returns:
            The port list without the ports now in use.

        Raises:
            NoPortsLeftError: If there are not enough free ports.
        """

    def setup_worker_ssh_tunnels(self) -> None:
        """Make every worker port of :attr:`ports_per_host` reachable everywhere.

        Each port becomes ``localhost:<port>`` on the manager and on every other runtime
        (``RuntimeGroup.expose_port_from_runtime_to_group``).

        Raises:
            ValueError: If a host is not in the group.
            PortInUseError: If a worker port is busy on the manager or another runtime.
        """
        for host, ports in self._ports_per_host.items():
            for port in ports:
                self._group.expose_port_from_runtime_to_group(host, port)

    def cleanup(self) -> None:
        """Release all resources (none by default)."""


class RuntimeCluster:
    """Base class of the clusters of this package (lazycluster's abstract cluster class)."""


class MasterWorkerCluster(RuntimeCluster):
    """A master and its workers on a runtime group, started through launcher strategies.

    Args:
        runtime_group: The group to run on.
        ports: Ports for the master (when the default is busy) and the workers; defaults to
            ``range(DEFAULT_PORT_RANGE_START, DEFAULT_PORT_RANGE_END)``.
        master_launcher: Strategy for the master; subclasses set their default.
        worker_launcher: Strategy for the workers; subclasses set their default.
    """

    DEFAULT_MASTER_PORT = 60000
    DEFAULT_PORT_RANGE_START = 60001
    DEFAULT_PORT_RANGE_END = 60200

    # Set when given (subclasses such as DaskCluster always give both); see _launchers().
    _master_launcher: MasterLauncher
    _worker_launcher: WorkerLauncher

    def __init__(
        self,
        runtime_group: RuntimeGroup,
        ports: list[int] | None = None,
        master_launcher: MasterLauncher | None = None,
        worker_launcher: WorkerLauncher | None = None,
    ) -> None:
        self._group = runtime_group
        self._ports = (
            list(ports)
            if ports is not None
            else list(range(self.DEFAULT_PORT_RANGE_START, self.DEFAULT_PORT_RANGE_END))
        )
        if master_launcher is not None:
            self._master_launcher = master_launcher
        if worker_launcher is not None:
            self._worker_launcher = worker_launcher

    def _launchers(self) -> tuple[MasterLauncher | None, WorkerLauncher | None]:
        return (getattr(self, "_master_launcher", None), getattr(self, "_worker_launcher", None))

    def _required(self, kind: str) -> Any:
        launcher = self._launchers()[0 if kind == "master" else 1]
        if launcher is None:
            raise LazyclusterError(f"no {kind} launcher: pass one to the cluster's constructor")
        return launcher

    @property
    def master_port(self) -> int | None:
        """The port of the master; None if not started."""
        master = self._launchers()[0]
        return master.port if master is not None else None

    @property
    def runtime_group(self) -> RuntimeGroup:
        """The runtime group the cluster runs on."""
        return self._group

    @property
    def worker_count(self) -> int:
        """Number of workers placed so far."""
        workers = self._launchers()[1]
        return sum(len(p) for p in workers.ports_per_host.values()) if workers else 0

    def start(
        self, worker_count: int | None = None, master_port: int | None = None, debug: bool = False
    ) -> None:
        """Start the master (if needed) and make sure ``worker_count`` workers run.

        Args:
            worker_count: Workers wanted in total; defaults to one per runtime.
            master_port: Port of the master, see :meth:`start_master`.
            debug: Print remote output live.
        """
        self.start_master(master_port, debug=debug)
        wanted = self._group.runtime_count if worker_count is None else worker_count
        if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 0:
            raise ValueError(f"worker_count must be an int >= 0, got {worker_count!r}")
        missing = wanted - self.worker_count
        if missing > 0:
            self.start_workers(missing, debug=debug)

    def start_master(
        self, master_port: int | None = None, timeout: int = 3, debug: bool = False
    ) -> None:
        """Start the master instance; a no-op when it already runs on that port.

        Args:
            master_port: Its port; defaults to ``DEFAULT_MASTER_PORT`` or, when that is busy,
                the first free port of the port list.
            timeout: Seconds after which :class:`MasterStartError` is raised.
            debug: Print remote output live.

        Raises:
            PortInUseError: If ``master_port`` is given and not free in the group.
            NoPortsLeftError: If no port is free for the master.
            MasterStartError: If the master did not start, or runs on another port already.
            LazyclusterError: If the cluster has no master launcher.
        """
        master: MasterLauncher = self._required("master")
        running = master.port
        if running is not None:
            if master_port is None or master_port == running:
                return
            raise MasterStartError(
                "localhost", master_port, f"the master already runs on port {running}"
            )
        if master_port is not None:
            master.start(master_port, timeout, debug)
        else:
            candidates = [self.DEFAULT_MASTER_PORT] + [
                p for p in self._ports if p != self.DEFAULT_MASTER_PORT
            ]
            master.start(candidates, timeout, debug)
        self._ports = [p for p in self._ports if p != master.port]

    def start_workers(self, count: int | None = None, debug: bool = False) -> None:
        """Add ``count`` workers (default: one per runtime).

        Args:
            count: Number of workers to add.
            debug: Print remote output live.

        Raises:
            ValueError: If ``count`` is negative or not an int.
            NoPortsLeftError: If the port list cannot serve that many workers.
            LazyclusterError: If the cluster has no worker launcher.
        """
        count = self._group.runtime_count if count is None else count
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        if count:
            workers: WorkerLauncher = self._required("worker")
            self._ports = workers.start(count, self.master_port or 0, self._ports, debug)

    def print_log(self) -> None:
        """Print the execution log of every runtime (see ``RuntimeGroup.print_log``)."""
        self._group.print_log()

    def cleanup(self) -> None:
        """Release all resources: workers, master, forwards."""
        master, workers = self._launchers()
        if workers is not None:
            workers.cleanup()
        if master is not None:
            master.cleanup()
