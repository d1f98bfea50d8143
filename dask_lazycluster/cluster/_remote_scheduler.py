"""The Dask scheduler on a host of the group (:class:`RemoteScheduler`), and how hosts reach it.

The scheduler is one more Dask server of that host's supervisor, so it has the workers'
lifeline: when the manager or its SSH connection goes, the supervisor kills it. The manager
reaches it (and its dashboard) through local forwards over that host's connection, so
``Client(cluster)`` and ``dashboard_link`` use ``127.0.0.1`` as with a local scheduler. Other
hosts reach it directly, or through a listener on their own loopback relayed by the manager
(:func:`scheduler_routes` decides which for ``tunnel="auto"``).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from contextlib import suppress
from typing import Any, Protocol

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface
from distributed.security import Security

from dask_lazycluster._group import RuntimeGroup
from dask_lazycluster._host import HostState
from dask_lazycluster._loop import on_loop
from dask_lazycluster._reach import Reach
from dask_lazycluster._supervisor import RemoteServer, tail
from dask_lazycluster.cluster._security import pem, worker_tls
from dask_lazycluster.exceptions import LazyclusterError, MasterStartError

logger = logging.getLogger(__name__)

#: Seconds the scheduler gets to end by itself once the cluster asked it to close.
CLOSE_GRACE = 5.0


class SchedulerOwner(Protocol):
    """What a :class:`RemoteScheduler` needs from its cluster."""

    status: Status

    @property
    def runtime_group(self) -> RuntimeGroup:
        """The group the scheduler runs in."""

    def worker_env(self, host: str) -> dict[str, str]:
        """Environment for a Dask process on ``host`` (secrets included: stdin only)."""

    def scheduler_tls(self) -> dict[str, Any] | None:
        """``Security`` keyword arguments for the scheduler, or None."""

    def scheduler_lost(self, host: str, cause: str) -> None:
        """The scheduler ended without being asked to (called on the SSH loop)."""


def scheduler_tls(security: Security | None) -> dict[str, Any] | None:
    """``Security`` keyword arguments for a scheduler on a host, with PEM text in place of paths.

    The scheduler's certificate falls back to the workers' (``Security.temporary()`` makes one
    for every role).

    Args:
        security: The cluster's security, or None.

    Returns:
        The keyword arguments, or None for plain TCP.
    """
    tls = worker_tls(security)
    if tls is None or security is None:
        return None
    for field, fallback in (("tls_scheduler_cert", "tls_worker_cert"),
                            ("tls_scheduler_key", "tls_worker_key")):
        value = getattr(security, field, None) or getattr(security, fallback, None)
        if value is not None:
            tls[field] = pem(value)
    return tls


class RemoteScheduler(ProcessInterface):
    """A ``distributed.Scheduler`` on one runtime, started by that host's supervisor.

    ``start()`` forwards the manager's ``127.0.0.1:port`` (and the dashboard's port) to the
    scheduler, relays the port to the hosts in ``exposed_to`` (their workers dial
    ``127.0.0.1:port``), then asks the supervisor for the scheduler. If the scheduler ends
    without being asked to (its host lost, the process killed), it is marked failed and the
    cluster is told.

    Args:
        host: The runtime to run on.
        port: The scheduler port (the same number on the host and on the manager).
        dashboard_port: The dashboard port (same on both), or None without a dashboard.
        exposed_to: Hosts that reach the scheduler through a relayed ``127.0.0.1:port``.
        scheduler_options: Keyword arguments for ``distributed.Scheduler`` (JSON-serialisable).
        owner: Weak reference to the owning cluster.
        python: Remote interpreter, or None for the runtime's.
        setup: Shell lines run before python on the host.
        debug: Print remote output live.
        start_timeout: Seconds from launch to listening.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        dashboard_port: int | None,
        exposed_to: list[str],
        scheduler_options: dict[str, Any],
        owner: weakref.ref[SchedulerOwner],
        python: str | None = None,
        setup: list[str] | None = None,
        debug: bool = False,
        start_timeout: float = 60,
    ) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.dashboard_port = dashboard_port
        self.exposed_to = list(exposed_to)
        self.process: RemoteServer | None = None
        self._options = dict(scheduler_options)
        self._owner = owner
        self._python = python
        self._setup = list(setup or [])
        self._debug = debug
        self._start_timeout = start_timeout
        self._forwarded: list[tuple[str, int]] = []
        self._watcher: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<RemoteScheduler on {self.host}:{self.port}: {self.status.name}>"

    def _cluster(self) -> SchedulerOwner:
        cluster = self._owner()
        if cluster is None:
            raise MasterStartError(self.host, self.port, "its cluster is gone")
        return cluster

    async def start(self) -> None:
        """Forward the ports, start the scheduler on the host and wait until it listens.

        Raises:
            MasterStartError: If a port cannot be forwarded or the scheduler fails to start
                (host, port and cause named, with the scheduler's output tail).
        """
        try:
            await on_loop(self._launch())
        except MasterStartError:
            raise
        except asyncio.TimeoutError:
            output = tail(self.process.log) if self.process is not None else ""
            raise MasterStartError(
                self.host, self.port,
                f"not listening after {self._start_timeout:g} s "
                f"(lazycluster.worker-start-timeout):\n{output or 'no output'}") from None
        except LazyclusterError as exc:
            raise MasterStartError(self.host, self.port, getattr(exc, "cause", str(exc))) from exc
        scheme = str(self._options.get("protocol") or "tcp")
        self.address = f"{scheme}://127.0.0.1:{self.port}"
        await super().start()

    async def _launch(self) -> None:
        cluster = self._cluster()
        group = cluster.runtime_group
        runtime = group.get_runtime(self.host)
        options = {**self._options, "port": self.port}
        options.setdefault("local_directory", runtime.core.state.working_dir_path)
        try:
            self.process = await runtime.core.start_server(
                "scheduler", "distributed.Scheduler", None, options,
                cluster.worker_env(self.host), self._debug, self._python,
                cluster.scheduler_tls(), self._setup)
            # The forwards are made while the host imports and starts the scheduler.
            await self._forward(group)
            await self.process.wait_started(self._start_timeout)
        except BaseException:
            await self._teardown(graceful=False)
            raise
        self._watcher = asyncio.ensure_future(self._watch(self.process))

    async def _forward(self, group: RuntimeGroup) -> None:
        """The manager's forwards to the scheduler and its dashboard, and the hosts' relays."""
        runtime = group.get_runtime(self.host)
        for port in (self.port, self.dashboard_port):
            if port is not None:
                await runtime.core.forwards.from_runtime(port, port)
                self._forwarded.append((self.host, port))
        relayed = [h for h in self.exposed_to if group.get_runtime(h).is_alive]
        if relayed:
            skip = [h for h in group.hosts if h not in relayed]
            try:
                await group.core.expose_to_runtimes(self.port, self.port, skip,
                                                    relay_from=runtime)
            except LazyclusterError as exc:
                raise MasterStartError(self.host, self.port,
                                       f"cannot relay it to the other hosts: {exc}") from exc
            self._forwarded += [(h, self.port) for h in relayed]

    async def forward_dashboard(self, port: int) -> None:
        """Forward the dashboard's real port (the scheduler moved it: ours was taken since).

        On the SSH loop. The manager's port of the same number must be free, or the dashboard
        is left unforwarded (logged).

        Args:
            port: The port the scheduler's dashboard listens on.
        """
        cluster = self._cluster()
        forwards = cluster.runtime_group.get_runtime(self.host).core.forwards
        if self.dashboard_port is not None:
            await forwards.close(self.dashboard_port)
            self._forwarded.remove((self.host, self.dashboard_port))
        self.dashboard_port = None
        try:
            await forwards.from_runtime(port, port)
        except LazyclusterError as exc:
            logger.warning("the dashboard on %s cannot be forwarded: %s", self.host, exc)
            return
        self.dashboard_port = port
        self._forwarded.append((self.host, port))

    async def restore_relay(self, host: str) -> None:
        """Relay the scheduler port to ``host`` again (it reconnected); on the SSH loop.

        Args:
            host: The host.
        """
        cluster = self._owner()
        if cluster is None or host not in self.exposed_to or self.status != Status.running:
            return
        group = cluster.runtime_group
        source = group.get_runtime(self.host).core.forwards
        with suppress(LazyclusterError):
            await group.get_runtime(host).core.forwards.relay_from(source, self.port, self.port)

    async def _watch(self, server: RemoteServer) -> None:
        """Mark the scheduler failed if it ends while nobody asked it to."""
        while not await server.wait_exit(3600):
            pass
        cluster = self._owner()
        if self.status != Status.running or cluster is None or cluster.status in (
                Status.closing, Status.closed):
            return
        self.status = Status.failed
        runtime = cluster.runtime_group.get_runtime(self.host)
        if not runtime.is_alive:
            cause = f"the SSH connection to {self.host} was lost"
        else:
            cause = (f"it exited (status {server.exit_code}):\n"
                     f"{tail(server.log, 10) or 'no output'}")
        logger.error("the scheduler on %s ended: %s", self.host, cause)
        cluster.scheduler_lost(self.host, cause)

    async def _teardown(self, graceful: bool) -> None:
        server = self.process
        if server is not None:
            # The cluster's terminate() usually closed it already: then this returns at once.
            await (server.stop(CLOSE_GRACE, settle=CLOSE_GRACE) if graceful else server.kill())
        cluster = self._owner()
        if cluster is not None:
            group = cluster.runtime_group
            for host, port in self._forwarded:
                with suppress(LazyclusterError):
                    await group.get_runtime(host).core.forwards.close(port)
        self._forwarded.clear()

    async def close(self) -> None:
        """Stop the scheduler (gracefully first) and close its forwards; twice is harmless."""
        if self.status == Status.closed:
            return
        self.status = Status.closing  # the watcher ends once the server has (no cancel needed)
        with suppress(LazyclusterError):
            await on_loop(self._teardown(graceful=True))
        await super().close()


async def scheduler_routes(
    states: list[HostState], scheduler_host: str, timeout: float = 2.0
) -> tuple[set[str], set[str]]:
    """What ``tunnel="auto"`` makes direct when the scheduler runs on ``scheduler_host``.

    Only host-to-host TCP counts: the manager talks to nobody but the scheduler, through its
    forward. A host is direct when every other host dials it; a host dials the scheduler
    directly when it reached the scheduler host's listener.

    Args:
        states: The group's hosts.
        scheduler_host: The host running the scheduler.
        timeout: Seconds per connection attempt.

    Returns:
        ``(direct hosts, hosts that dial the scheduler host directly)``.
    """
    reaches = await asyncio.gather(*(Reach(s).start(timeout) for s in states))
    try:
        listening = [x for x in reaches if x.port is not None]
        reached_by: dict[str, set[str]] = {x.host: set() for x in listening}

        async def dial_from(x: Reach) -> None:
            others = [c for c in listening if c is not x]
            targets = [(c.state.ssh.remote_address, int(c.port or 0)) for c in others]
            answers = await x.dial(targets, timeout) if others else []
            for c, ok in zip(others, answers or [False] * len(others), strict=True):
                if ok:
                    reached_by[c.host].add(x.host)

        await asyncio.gather(*(dial_from(x) for x in reaches))
        everyone = {x.host for x in reaches}
        direct = {h for h, dialers in reached_by.items() if dialers >= everyone - {h}}
        for host in sorted(everyone - direct):
            missing = everyone - {host} - reached_by.get(host, set())
            logger.info("tunnel='auto': %s is tunneled: %s cannot reach it directly",
                        host, ", ".join(sorted(missing)) or "the probe")
        return direct, reached_by.get(scheduler_host, set())
    finally:
        for x in reaches:
            x.close()
