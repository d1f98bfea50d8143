"""The async implementation behind a :class:`~dask_lazycluster.runtimes.Runtime`.

A :class:`RuntimeCore` joins the parts of one host: its state and connection (``_host``,
``_connection``), forwards (``_forwards``), Dask servers (``_servers``) and tasks (``_task``).
The group and cluster layers await its coroutines on the SSH loop; ``Runtime``'s public
methods are thin sync wrappers over them. Cores still open when the interpreter exits are
cleaned up, so nothing is left running on any host.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import shlex
from typing import Any

import asyncssh

from dask_lazycluster._connection import ConnectionListener
from dask_lazycluster._forwards import Forwards
from dask_lazycluster._host import HostState
from dask_lazycluster._loop import run_sync
from dask_lazycluster._servers import HostServers
from dask_lazycluster._supervisor import RemoteServer
from dask_lazycluster._task import RuntimeTask, start_task
from dask_lazycluster.config import runtime_defaults
from dask_lazycluster.exceptions import InvalidRuntimeError

logger = logging.getLogger(__name__)

# Strong references: a runtime dropped without cleanup() must still be cleaned up at exit.
_live: set[RuntimeCore] = set()


class RuntimeCore:
    """One host's connection, forwards, Dask servers and tasks (used on the SSH loop).

    Arguments left as None fall back to the config as for a cluster: the host's entry in
    ``lazycluster.hosts`` (python, env), then ``lazycluster.working-dir``, ``connect-options``
    and ``python``.

    Args:
        host: The SSH host name or alias.
        working_dir: Remote working directory; None for the config's (a private temp dir).
        connect_options: ``asyncssh.connect`` keyword arguments; None for the config's.
        python: The remote python; None for the config's, else probed.
    """

    def __init__(
        self,
        host: str,
        working_dir: str | None,
        connect_options: dict[str, Any] | None,
        python: str | None,
    ) -> None:
        working_dir, options, python, env = runtime_defaults(
            host, working_dir, connect_options, python)
        self.state = HostState(host, working_dir, options, python)
        self.state.env.update(env)
        self.forwards = Forwards(self.state)
        self.servers = HostServers(self.state)
        self.tasks: list[RuntimeTask] = []
        self.closed = False
        # Registered first, so our records are straight before any other listener hears.
        self.state.ssh.add_listener(self._connection_changed)

    @property
    def host(self) -> str:
        """The host name or alias."""
        return self.state.host

    @property
    def is_alive(self) -> bool:
        """Whether the SSH connection is up."""
        return self.state.ssh.is_alive

    async def connect(self) -> None:
        """Connect and probe the host.

        Raises:
            InvalidRuntimeError: If the host cannot be used (cause in words).
        """
        await self.state.connect_and_probe()
        _live.add(self)

    def add_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(host, alive)`` on the SSH loop when the connection drops or returns.

        Args:
            listener: The callback; it must not block.
        """
        self.state.ssh.add_listener(listener)

    def remove_listener(self, listener: ConnectionListener) -> None:
        """Stop calling a listener.

        Args:
            listener: The callback.
        """
        self.state.ssh.remove_listener(listener)

    def _connection_changed(self, host: str, alive: bool) -> None:
        if not alive:  # the forwards and processes died with the connection
            self.forwards.forget()
            self.servers.forget()
            self.state.parked = None

    async def listening_ports(self, max_age: float = 0.0) -> set[int]:
        """Listening TCP ports on the host (from a live supervisor when there is one).

        Args:
            max_age: Seconds the probe's reading may be old to be used instead.

        Returns:
            The ports.
        """
        if not max_age:
            ports = await self.servers.listening_ports()
            if ports is not None:
                return ports
        return await self.state.listening_ports(max_age)

    async def start_server(
        self,
        name: str,
        cls: str,
        scheduler: str | None,
        options: dict[str, Any],
        env: dict[str, str] | None = None,
        debug: bool = False,
        python: str | None = None,
        tls: dict[str, Any] | None = None,
        setup: list[str] | None = None,
    ) -> RemoteServer:
        """Start a Dask server through the host's supervisor; await ``wait_started`` after.

        Args:
            name: Label for logs and errors.
            cls: Import path of the server class, e.g. ``"distributed.Nanny"``.
            scheduler: Scheduler address as seen from the host (None for a scheduler).
            options: Keyword arguments for the class (JSON-serialisable).
            env: Extra environment variables for this server.
            debug: Print its output live.
            python: Interpreter to use instead of the runtime's.
            tls: ``distributed.Security`` keyword arguments with in-memory PEM text; like
                ``env`` they travel over SSH stdin only.
            setup: Shell lines run before python on this host.

        Returns:
            The server's handle.
        """
        request = {"cls": cls, "scheduler": scheduler, "options": options, "env": env or {},
                   "tls": tls}
        return await self.servers.start_server(name, request, debug, python, setup)

    def execute_task(self, task: RuntimeTask, debug: bool) -> RuntimeTask:
        """Run a task's steps in the background (``task.join()`` waits).

        Args:
            task: The task (copied if already started elsewhere).
            debug: Print remote output live.

        Returns:
            The task being executed.
        """
        task = start_task(task, self.state, debug)
        self.tasks.append(task)
        return task

    def log_sections(self) -> list[tuple[str, list[str]]]:
        """Every task's and Dask server's log on this host, as (label, lines).

        Returns:
            The logs.
        """
        sections = [(task.name, task.execution_log) for task in self.tasks]
        return sections + self.servers.logs()

    async def cleanup(self) -> None:
        """Stop every process and forward, remove the temp dir, disconnect (twice is harmless)."""
        if self.closed:
            return
        self.closed = True
        _live.discard(self)
        state = self.state
        if state.ssh.is_lost:  # nothing to stop: the host killed our processes when we vanished
            await state.ssh.close()
            return
        if state.parked is not None:
            state.release_parked(state.parked[1])
            state.parked = None
        temp_dir = state.wd if state.wd_is_temp and state.wd_ready else None
        with contextlib.suppress(Exception):
            if await self.servers.shutdown(temp_dir):
                temp_dir = None
        await self.forwards.close_all()
        if temp_dir and state.ssh.is_alive:
            try:
                await asyncio.wait_for(state.ssh.gate.run(
                    state.ssh.conn, f"rm -rf {shlex.quote(temp_dir)}", "removing the working dir"), 10)
            except (OSError, asyncssh.Error, asyncio.TimeoutError, InvalidRuntimeError):
                logger.warning("could not remove %s on %s", temp_dir, self.host)
        await state.ssh.close()


def live_cores() -> list[RuntimeCore]:
    """The cores connected and not cleaned up yet (in this process).

    Returns:
        The cores.
    """
    return list(_live)


async def connect_cores(
    hosts: list[str],
    working_dir: str | None,
    connect_options: dict[str, Any] | None,
    python: str | None,
) -> list[RuntimeCore]:
    """Connect to every host in parallel; on any failure close the others and raise.

    Args:
        hosts: Host names.
        working_dir: Working directory for all (None: a temp dir each).
        connect_options: ``asyncssh.connect`` keyword arguments for all.
        python: Remote python for all (None: probe each).

    Returns:
        The connected cores, in order.

    Raises:
        InvalidRuntimeError: The first host that failed, the others' causes appended.
    """
    cores = [RuntimeCore(h, working_dir, connect_options, python) for h in hosts]
    results = await asyncio.gather(*(c.connect() for c in cores), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await asyncio.gather(*(c.cleanup() for c in cores), return_exceptions=True)
        first = failures[0]
        if isinstance(first, InvalidRuntimeError) and len(failures) > 1:
            others = "; ".join(str(f) for f in failures[1:])
            raise InvalidRuntimeError(first.host, f"{first.cause} (also: {others})") from first
        raise first
    return cores


@atexit.register
def _cleanup_all() -> None:
    """Leave nothing running on any host when the interpreter exits."""
    cores = list(_live)
    if not cores:
        return

    async def close_all() -> None:
        await asyncio.gather(*(c.cleanup() for c in cores), return_exceptions=True)

    with contextlib.suppress(Exception):  # best effort at exit
        run_sync(close_all(), timeout=20)
