"""A Dask worker on a runtime, as a ``SpecCluster`` process interface (:class:`RemoteWorker`)."""

from __future__ import annotations

import asyncio
import logging
import weakref
from contextlib import suppress
from typing import Any, Protocol

from distributed.core import Status, rpc
from distributed.deploy.spec import ProcessInterface

from dask_lazycluster._group import RuntimeGroup
from dask_lazycluster._loop import on_loop
from dask_lazycluster._supervisor import RemoteServer
from dask_lazycluster.cluster._options import is_nanny
from dask_lazycluster.exceptions import (
    LazyclusterError,
    PortInUseError,
    WorkerStartError,
    WorkerStartTimeoutError,
)

#: Tries to find free ports for a new worker's tunnels.
PORT_ATTEMPTS = 3
logger = logging.getLogger(__name__)


class WorkerOwner(Protocol):
    """What a :class:`RemoteWorker` needs from its cluster."""

    status: Status
    scheduler_comm: rpc | None

    @property
    def runtime_group(self) -> RuntimeGroup:
        """The group the worker runs in."""

    def worker_env(self, host: str) -> dict[str, str]:
        """Environment for a Dask process on ``host`` (secrets included: stdin only)."""

    def worker_tls(self) -> dict[str, Any] | None:
        """``Security`` keyword arguments for workers, or None."""

    async def prepare_host(self, host: str) -> None:
        """Make ``host`` ready for its first worker (uploads); on the SSH loop."""

    def release_ports(self, name: str) -> None:
        """The worker ``name`` no longer needs its ports."""

    def fresh_ports(self, name: str) -> list[int]:
        """Other ports for ``name``: its ports turned out to be taken by someone else."""

    def record_failure(self, host: str, cause: str) -> None:
        """Remember why a worker could not start on ``host``."""

    @property
    def scheduler_host(self) -> str | None:
        """The host the scheduler runs on; None for the manager."""

    def scheduler_address_for(self, host: str) -> str:
        """The scheduler's address as the workers of ``host`` dial it."""


class RemoteWorker(ProcessInterface):
    """A Dask worker (or nanny) on one runtime, started and stopped over its SSH connection.

    In tunnel mode its worker port is exposed to the manager and to every runtime, and its
    nanny port to wherever the scheduler runs, *before* it starts, so it is reachable the
    moment it registers. The cluster says at which address it dials the scheduler.
    ``close()`` retires it through the scheduler (its data moves to other workers), then stops
    its process group and its forwards.

    Args:
        scheduler: The scheduler address as the manager sees it (the worker itself dials
            the address its cluster gives for its host).
        name: The worker name (its spec key).
        host: The runtime host.
        ports: Tunnel mode: ``[worker_port]`` or ``[worker_port, nanny_port]``; empty: direct.
        owner: Weak reference to the owning cluster.
        worker_class: Import path of the server class.
        worker_options: Its keyword arguments.
        python: Remote interpreter, or None for the runtime's.
        setup: Shell lines run before python on the host.
        debug: Print remote output live.
        start_timeout: Seconds from launch to registered.
    """

    def __init__(
        self,
        scheduler: str,
        *,
        name: str,
        host: str,
        ports: list[int],
        owner: weakref.ref[WorkerOwner],
        worker_class: str,
        worker_options: dict[str, Any],
        python: str | None,
        setup: list[str],
        debug: bool,
        start_timeout: float,
    ) -> None:
        super().__init__(scheduler, name)
        self.name = name
        self.host = host
        self.ports = list(ports)
        self.scheduler = scheduler
        self.worker_address: str | None = None
        self.process: RemoteServer | None = None
        self._owner = owner
        self._worker_class = worker_class
        self._options = worker_options
        self._python = python
        self._setup = setup
        self._debug = debug
        self._start_timeout = start_timeout
        self._tunnels: list[tuple[str, int]] = []

    def __repr__(self) -> str:
        return f"<RemoteWorker {self.name!r} on {self.host}: {self.status.name}>"

    def _cluster(self) -> WorkerOwner:
        cluster = self._owner()
        if cluster is None:
            raise LazyclusterError(f"worker {self.name}: its cluster is gone")
        return cluster

    async def start(self) -> None:
        """Launch the worker and wait until it is registered with the scheduler.

        Raises:
            WorkerStartError: If it fails to start (host, python and output tail named).
            WorkerStartTimeoutError: If it does not start in time.
        """
        try:
            await on_loop(self._launch())
        except LazyclusterError as exc:
            with suppress(LazyclusterError):
                self._cluster().record_failure(self.host, getattr(exc, "cause", str(exc)))
            raise
        await super().start()

    async def ensure_tunnels(self) -> None:
        """Expose the worker's ports: its worker port everywhere, its nanny port to the scheduler."""
        if not self.ports:
            return
        cluster = self._cluster()
        group = cluster.runtime_group
        worker_port = self.ports[0]
        if ("group", worker_port) not in self._tunnels:
            await group.core.forward_to_group(self.host, worker_port, worker_port)
            self._tunnels.append(("group", worker_port))
        if not (is_nanny(self._worker_class) and len(self.ports) > 1):
            return
        # Only the scheduler talks to a nanny: it is exposed where the scheduler runs.
        nanny, runtime = self.ports[1], group.get_runtime(self.host)
        where = cluster.scheduler_host
        if where is None and ("local", nanny) not in self._tunnels:
            await runtime.core.forwards.from_runtime(nanny, nanny)
            self._tunnels.append(("local", nanny))
        elif where is not None and where != self.host and ("relay", nanny) not in self._tunnels:
            await group.get_runtime(where).core.forwards.relay_from(
                runtime.core.forwards, nanny, nanny)
            self._tunnels.append(("relay", nanny))

    async def _tunnels_on_free_ports(self, cluster: WorkerOwner) -> None:
        """Forward the worker's ports; ports taken since they were chosen are swapped.

        A port can be taken between the check and the bind (by another program, or by a
        process of a worker that is still ending): a new worker then takes other ports
        instead of failing.
        """
        for attempt in range(PORT_ATTEMPTS):
            try:
                await self.ensure_tunnels()
                return
            except PortInUseError:
                if attempt == PORT_ATTEMPTS - 1:
                    raise
                await self._close_tunnels()
                self.ports = cluster.fresh_ports(self.name)

    async def _launch(self) -> None:
        cluster = self._cluster()
        runtime = cluster.runtime_group.get_runtime(self.host)
        scheduler = cluster.scheduler_address_for(self.host)
        scheme = scheduler.split("://", 1)[0]
        tls = cluster.worker_tls()
        options = dict(self._options)
        options.setdefault("name", self.name)
        if tls is not None:
            options["protocol"] = scheme
        try:
            await cluster.prepare_host(self.host)
            for attempt in range(PORT_ATTEMPTS):
                if self.ports:
                    await self._tunnels_on_free_ports(cluster)
                    options["host"] = "127.0.0.1"
                    if is_nanny(self._worker_class):
                        options["worker_port"], options["port"] = self.ports[0], self.ports[1]
                    else:
                        options["port"] = self.ports[0]
                else:
                    options["host"] = runtime.remote_address
                options.setdefault("local_directory", runtime.core.state.working_dir_path)
                self.process = await runtime.core.start_server(
                    self.name, self._worker_class, scheduler, options,
                    cluster.worker_env(self.host), self._debug, self._python, tls, self._setup)
                try:
                    started = await self.process.wait_started(self._start_timeout)
                    break
                except WorkerStartError as exc:
                    # A port taken on the host after the snapshot (by another program): the
                    # bind fails there. Ports of ours are chosen again, as for the forwards.
                    if not self.ports or attempt == PORT_ATTEMPTS - 1 or \
                            "Address already in use" not in str(exc):
                        raise
                    await self._teardown()
                    self.ports = cluster.fresh_ports(self.name)
                    logger.info("%s: a port was taken on %s since it was chosen; using %s",
                                self.name, self.host, self.ports)
        except asyncio.TimeoutError as exc:
            await self._teardown()
            tail = "\n".join(list(self.process.log)[-20:]) if self.process else ""
            raise WorkerStartTimeoutError(
                self.host, self.name,
                f"not started within {self._start_timeout:g} s (lazycluster.worker-start-timeout)"
                f":\n{tail or 'no output'}") from exc
        except BaseException:
            await self._teardown()
            raise
        self.address = started["address"]
        self.worker_address = started["worker_address"]

    async def _teardown(self, graceful: bool = False) -> None:
        if self.process is not None:
            await (self.process.stop(5, settle=5) if graceful else self.process.kill())
        await self._close_tunnels()

    async def _close_tunnels(self) -> None:
        cluster = self._owner()
        if cluster is None:
            return
        group = cluster.runtime_group
        for kind, port in self._tunnels:
            if kind == "group":
                await group.core.close_port(port)
            else:
                where = cluster.scheduler_host if kind == "relay" else self.host
                await group.get_runtime(where or self.host).core.forwards.close(port)
        self._tunnels.clear()

    def hurry(self) -> None:
        """The cluster is closing: do not wait politely for this worker to end by itself."""
        if self.process is not None:
            self.process.hurry()

    async def close(self) -> None:
        """Retire the worker through the scheduler (unless the cluster is closing), then stop it.

        Calling it again is harmless.
        """
        if self.status == Status.closed:
            return
        cluster = self._owner()
        graceful = cluster is not None and cluster.status == Status.running
        comm = cluster.scheduler_comm if cluster is not None else None
        if graceful and self.status == Status.running and comm is not None:
            with suppress(Exception):
                await asyncio.wait_for(
                    comm.retire_workers(names=[self.name], close_workers=True, remove=True), 30)
        with suppress(LazyclusterError):
            await on_loop(self._teardown(graceful))
        if cluster is not None:
            cluster.release_ports(self.name)
        await super().close()
