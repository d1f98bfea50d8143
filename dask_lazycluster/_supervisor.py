"""The manager's side of a host's supervisor: :class:`HostSupervisor` and :class:`RemoteServer`.

One supervisor process per host (and interpreter) runs over one SSH session and is the parent
of every Dask process there (see :mod:`dask_lazycluster.remote.supervisor` for the protocol).
A :class:`RemoteServer` is the handle of one Dask server it started. Everything here runs on
the SSH loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
from typing import Any

import asyncssh

from dask_lazycluster._bootstrap import SETUP_FAILED_MARK
from dask_lazycluster.exceptions import (
    LazyclusterError,
    SetupError,
    WorkerStartError,
)

logger = logging.getLogger(__name__)

#: Lines of output kept per server and per supervisor for errors and ``print_log``.
LOG_LINES = 2000
#: Ended servers whose logs stay readable by ``print_log`` (scale cycles add many).
FINISHED_KEPT = 100
#: Seconds to wait for a killed server's end to be confirmed (a busy host can be slow).
KILL_WAIT = 60.0
#: The manager pings each supervisor this often; a supervisor that hears nothing for
#: ``SILENCE`` seconds takes the manager for gone and stops everything (sshd may never notice
#: a client that lost its network: ClientAliveInterval is off by default).
PING_INTERVAL = 5.0
SILENCE = 30.0


def tail(lines: list[str] | collections.deque[str], n: int = 20) -> str:
    """The last ``n`` lines, joined.

    Args:
        lines: The lines.
        n: How many.

    Returns:
        The text.
    """
    return "\n".join(list(lines)[-n:])


class RemoteServer:
    """A Dask server (nanny, worker, scheduler) started by a host's supervisor.

    Args:
        supervisor: The supervisor that started it.
        ident: Its id in the supervisor's protocol.
        name: A label for logs and errors (the worker name).
        debug: Print its output live.
    """

    def __init__(self, supervisor: HostSupervisor, ident: str, name: str, debug: bool) -> None:
        self.supervisor = supervisor
        self.ident = ident
        self.name = name
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.exit_code: int | None = None
        self.debug = debug
        self._started: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._error: str | None = None
        self._exited = asyncio.Event()
        self._hurry = asyncio.Event()

    def __repr__(self) -> str:
        return f"<RemoteServer {self.name!r} on {self.host}>"

    @property
    def host(self) -> str:
        """The host it runs on."""
        return self.supervisor.host

    @property
    def python(self) -> str:
        """The interpreter it runs on."""
        return self.supervisor.python

    def handle_event(self, message: dict[str, Any]) -> None:
        """Take one event from the supervisor (called by it).

        Args:
            message: The decoded event.
        """
        event = message.get("event")
        if event == "log":
            line = str(message.get("line", ""))
            self.log.append(line)
            if self.debug:
                print(f"[{self.host}:{self.name}] {line}", flush=True)
        elif event == "started":
            if not self._started.done():
                self._started.set_result(message)
        elif event == "error":
            self._error = str(message.get("message") or "")
        elif event in ("exited", "lost"):
            self.exit_code = message.get("code")
            if not self._started.done():
                self._started.set_exception(self._failure(message))
                self._started.exception()  # retrieved: nobody may be waiting for it
            self._exited.set()

    def _failure(self, message: dict[str, Any]) -> LazyclusterError:
        if message.get("event") == "lost":
            return self.supervisor.failure(self.name)
        detail = self._error or tail(self.log) or f"exit status {message.get('code')}, no output"
        return WorkerStartError(self.host, self.name, f"(python {self.python!r}):\n{detail}")

    async def wait_started(self, timeout: float) -> dict[str, Any]:
        """Wait until the server runs.

        Args:
            timeout: Seconds to wait.

        Returns:
            Its ``started`` event (``address``, ``worker_address``, ``pid``).

        Raises:
            WorkerStartError: If it (or its supervisor) failed first; the host, python and
                output tail are named.
            SetupError: If a setup line failed on the host.
            TimeoutError: If it did not start within ``timeout``.
        """
        return await asyncio.wait_for(asyncio.shield(self._started), timeout)

    @property
    def exited(self) -> bool:
        """Whether the server has ended (or its supervisor, or the connection, is gone)."""
        return self._exited.is_set()

    async def wait_exit(self, timeout: float) -> bool:
        """Wait for the server to end by itself (e.g. closed by the scheduler).

        Args:
            timeout: Seconds to wait; :meth:`hurry` cuts it short.

        Returns:
            Whether it ended.
        """
        waiters = [asyncio.ensure_future(self._exited.wait()),
                   asyncio.ensure_future(self._hurry.wait())]
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        return self.exited

    def hurry(self) -> None:
        """Cut a :meth:`wait_exit` short (the cluster is closing: no time for courtesy)."""
        self._hurry.set()

    async def stop(self, grace: float = 10.0, settle: float = 0.0) -> None:
        """Close the server gracefully, then kill its process group if it lingers.

        Args:
            grace: Seconds to wait for a graceful exit after asking for it.
            settle: Seconds to first let it end on its own: a worker the scheduler is
                already closing must not be told twice (its nanny then waits and kills).
        """
        if settle and (await self.wait_exit(settle) or self._hurry.is_set()):
            await self.kill()
            return
        if not self.exited:
            self.supervisor.send(op="stop", id=self.ident, grace=grace)
            await self.wait_exit(grace + 5)
        await self.kill()

    async def kill(self) -> None:
        """Kill the server's whole process group and wait until the supervisor saw it end.

        The supervisor reports the end once the process is reaped (or itself ends, or the
        connection drops), so its ports are free when this returns; the wait is bounded only
        as a safety net.
        """
        if not self.exited:
            self.supervisor.send(op="kill", id=self.ident)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exited.wait(), KILL_WAIT)
        self.supervisor.retire(self)


class HostSupervisor:
    """The manager's handle of one supervisor process on a host.

    Args:
        host: The host.
        process: The SSH process running the supervisor (bundle and request already sent).
        python: The interpreter it runs on (named in errors).
        setup: The setup lines its shell ran (named when one fails).
    """

    def __init__(
        self,
        host: str,
        process: asyncssh.SSHClientProcess[bytes],
        python: str,
        setup: list[str],
    ) -> None:
        self.host = host
        self.python = python
        self.setup = list(setup)
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.servers: dict[str, RemoteServer] = {}
        self.finished: collections.deque[RemoteServer] = collections.deque(maxlen=FINISHED_KEPT)
        self.info: dict[str, Any] = {}
        self._process = process
        self._ids = itertools.count(1)
        self._ports: dict[int, asyncio.Future[str]] = {}
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._bye: asyncio.Future[None] = loop.create_future()
        self._ended = False
        self._exit_status: int | None = None
        self._readers = [asyncio.ensure_future(self._read_events()),
                         asyncio.ensure_future(self._read_stderr())]
        self._pinger = asyncio.ensure_future(self._ping())

    def __repr__(self) -> str:
        return f"<HostSupervisor {self.host} python={self.python!r}>"

    async def _ping(self) -> None:
        while self.alive:
            self.send(op="ping")
            await asyncio.sleep(PING_INTERVAL)

    @property
    def alive(self) -> bool:
        """Whether the supervisor process still runs (as far as the manager knows)."""
        return not self._ended and not self._process.is_closing()

    # -- talking to it ---------------------------------------------------------------------

    def send(self, **request: Any) -> None:
        """Write one request line (a vanished supervisor is reported by its reader)."""
        with contextlib.suppress(OSError, asyncssh.Error, BrokenPipeError):
            self._process.stdin.write(json.dumps(request).encode() + b"\n")

    def start(
        self, name: str, request: dict[str, Any], debug: bool = False
    ) -> RemoteServer:
        """Ask for a Dask server; returns at once (await the handle's ``wait_started``).

        Args:
            name: The server's label (worker name).
            request: ``cls``, ``scheduler``, ``options``, ``env``, ``tls``, ``cwd``.
            debug: Print its output live.

        Returns:
            The server's handle.
        """
        ident = f"{next(self._ids)}"
        server = RemoteServer(self, ident, name, debug)
        self.servers[ident] = server
        if self._ended:
            server.handle_event({"event": "lost"})
        else:
            self.send(op="start", id=ident, **request)
        return server

    async def listening_ports_text(self, timeout: float = 10) -> str:
        """The host's ``/proc/net/tcp`` and ``tcp6`` text, read by the supervisor.

        Args:
            timeout: Seconds to wait.

        Returns:
            The text.

        Raises:
            LazyclusterError: If the supervisor is gone.
            TimeoutError: If it does not answer in time.
        """
        if not self.alive:
            raise LazyclusterError(f"the supervisor on {self.host!r} is gone")
        req = next(self._ids)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._ports[req] = future
        self.send(op="ports", req=req)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._ports.pop(req, None)

    def retire(self, server: RemoteServer) -> None:
        """Move an ended server to the finished ones (its log stays readable).

        Args:
            server: The server.
        """
        if self.servers.pop(server.ident, None) is not None:
            self.finished.append(server)

    async def shutdown(self, remove_dir: str | None, timeout: float = 15) -> None:
        """Stop every server, then remove ``remove_dir`` once all have exited, and end.

        Args:
            remove_dir: The private temp working dir to remove, or None.
            timeout: Seconds to wait for the supervisor's goodbye.
        """
        if self.alive:
            self.send(op="shutdown", remove_dir=remove_dir)
            with contextlib.suppress(asyncio.TimeoutError, LazyclusterError):
                await asyncio.wait_for(asyncio.shield(self._bye), timeout)
        self._pinger.cancel()
        self._process.close()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for server in list(self.servers.values()):
            self.retire(server)

    # -- hearing from it -------------------------------------------------------------------

    async def _read_events(self) -> None:
        try:
            async for line in self._process.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    self.log.append(line.decode(errors="replace").rstrip())
                    continue
                self._dispatch(message)
        except (asyncssh.Error, OSError) as exc:  # the connection dropped under us
            self.log.append(f"[lazycluster] connection lost: {exc}")
        await self._end()

    def _dispatch(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "ready":
            self.info = message
            if not self.ready.done():
                self.ready.set_result(message)
        elif event == "ports":
            future = self._ports.get(int(message.get("req") or 0))
            if future is not None and not future.done():
                future.set_result(str(message.get("proc_net_tcp", "")))
        elif event == "bye":
            if not self._bye.done():
                self._bye.set_result(None)
        else:
            server = self.servers.get(str(message.get("id")))
            if server is not None:
                server.handle_event(message)

    async def _read_stderr(self) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            async for raw in self._process.stderr:
                if raw:
                    self.log.append(raw.decode(errors="replace").rstrip("\n"))

    async def _end(self) -> None:
        """The supervisor's stdout ended: it exited, or the connection is gone."""
        self._ended = True
        self._pinger.cancel()
        with contextlib.suppress(asyncio.TimeoutError, asyncssh.Error, OSError):
            result = await asyncio.wait_for(self._process.wait(), 5)
            self._exit_status = result.exit_status
        await asyncio.gather(self._readers[1], return_exceptions=True)
        if not self.ready.done():
            self.ready.set_exception(self.failure("the supervisor"))
            self.ready.exception()
        if not self._bye.done():
            self._bye.set_result(None)
        for future in self._ports.values():
            if not future.done():
                future.set_exception(LazyclusterError(f"the supervisor on {self.host!r} ended"))
        for server in list(self.servers.values()):
            server.handle_event({"event": "lost", "code": None})

    def failure(self, name: str) -> LazyclusterError:
        """Why this supervisor could not (or can no longer) run ``name``.

        Args:
            name: The server (worker) concerned.

        Returns:
            A :class:`SetupError` when a setup line failed, else a :class:`WorkerStartError`
            naming the host, the interpreter and the supervisor's output tail.
        """
        output = tail(self.log)
        marks = [line for line in self.log if line.startswith(SETUP_FAILED_MARK)]
        if marks and not self.info:  # it never got as far as python: a setup line ended it
            number = int(marks[-1].split()[-1])
            line = self.setup[number - 1] if 0 < number <= len(self.setup) else "?"
            shown = "\n".join(x for x in self.log if not x.startswith(SETUP_FAILED_MARK))
            return SetupError(self.host, name,
                              f"setup line {number} ({line!r}) failed:\n{shown[-2000:]}")
        if self._exit_status is None:
            cause = "the SSH connection to the host was lost"
        elif self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None:
            cause = f"its supervisor ended (exit status {self._exit_status})"
        else:
            cause = f"python {self.python!r} could not start (exit status {self._exit_status})"
        return WorkerStartError(self.host, name, f"{cause}:\n{output or 'no output'}")
