"""Generic master/worker cluster strategy layer (lazycluster's ``runtime_cluster`` module).

A :class:`MasterWorkerCluster` starts one master and many workers on a
:class:`~dask_lazycluster.runtime_mgmt.RuntimeGroup`. *How* the master is started and *where*
workers go are strategies: :class:`MasterLauncher` and :class:`WorkerLauncher` subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

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

    @abstractmethod
    def cleanup(self) -> None:
        """Release all resources."""


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

    @abstractmethod
    def cleanup(self) -> None:
        """Release all resources."""


class MasterWorkerCluster:
    """A master and its workers on a runtime group, started through launcher strategies.

    Args:
        runtime_group: The group to run on.
        ports: Ports for the master (when the default is busy) and the workers; defaults to
            ``range(DEFAULT_PORT_RANGE_START, DEFAULT_PORT_RANGE_END)``.
        master_launcher: Strategy for the master.
        worker_launcher: Strategy for the workers.
    """

    DEFAULT_MASTER_PORT = 60000
    DEFAULT_PORT_RANGE_START = 60001
    DEFAULT_PORT_RANGE_END = 61000

    def __init__(
        self,
        runtime_group: RuntimeGroup,
        ports: list[int] | None,
        master_launcher: MasterLauncher,
        worker_launcher: WorkerLauncher,
    ) -> None:
        self._group = runtime_group
        self._ports = (
            list(ports)
            if ports is not None
            else list(range(self.DEFAULT_PORT_RANGE_START, self.DEFAULT_PORT_RANGE_END))
        )
        self._master_launcher = master_launcher
        self._worker_launcher = worker_launcher

    @property
    def master_port(self) -> int | None:
        """The port of the master; None if not started."""
        return self._master_launcher.port

    @property
    def runtime_group(self) -> RuntimeGroup:
        """The runtime group the cluster runs on."""
        return self._group

    @property
    def worker_count(self) -> int:
        """Number of workers placed so far."""
        return sum(len(p) for p in self._worker_launcher.ports_per_host.values())

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
        """
        from dask_lazycluster.cluster.exceptions import MasterStartError

        running = self._master_launcher.port
        if running is not None:
            if master_port is None or master_port == running:
                return
            raise MasterStartError(
                "localhost", master_port, f"the master already runs on port {running}"
            )
        if master_port is not None:
            self._master_launcher.start(master_port, timeout, debug)
        else:
            candidates = [self.DEFAULT_MASTER_PORT] + [
                p for p in self._ports if p != self.DEFAULT_MASTER_PORT
            ]
            self._master_launcher.start(candidates, timeout, debug)
        self._ports = [p for p in self._ports if p != self._master_launcher.port]

    def start_workers(self, count: int | None = None, debug: bool = False) -> None:
        """Add ``count`` workers (default: one per runtime).

        Args:
            count: Number of workers to add.
            debug: Print remote output live.

        Raises:
            ValueError: If ``count`` is negative or not an int.
            NoPortsLeftError: If the port list cannot serve that many workers.
        """
        count = self._group.runtime_count if count is None else count
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        if count:
            self._ports = self._worker_launcher.start(
                count, self.master_port or 0, self._ports, debug
            )

    def print_log(self) -> None:
        """Print the execution log of every runtime (see ``RuntimeGroup.print_log``)."""
        self._group.print_log()

    def cleanup(self) -> None:
        """Release all resources: workers, master, forwards."""
        self._worker_launcher.cleanup()
        self._master_launcher.cleanup()
