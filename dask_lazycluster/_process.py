"""Supervised Dask server processes on a runtime (:class:`RemoteProcess`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

import asyncssh

from dask_lazycluster.exceptions import LazyclusterError

if TYPE_CHECKING:
    from dask_lazycluster.runtimes import Runtime

_LOG_TAIL = 20


def _tail(lines: list[str], n: int = _LOG_TAIL) -> str:
    return "\n".join(lines[-n:])


def _say_bye(process: asyncssh.SSHClientProcess[Any]) -> None:
    """End a lifeline in order: the remote side then keeps the working dir (we still need it)."""
    try:
        process.stdin.write(b"bye\n")
        process.stdin.write_eof()
    except (OSError, asyncssh.Error):
        pass  # already gone


class RemoteProcess:
    """A supervised long-running python process on a runtime (a Dask server).

    Created by :meth:`Runtime.start_server`. Its stdin is the lifeline: a ``stop`` line asks for
    a graceful close; closing the channel (or the manager dying) kills the remote process group.

    Args:
        runtime: The runtime it runs on.
        process: The asyncssh process.
        name: A label for logs and errors.
        debug: Whether to print its output live.
        python: The interpreter it runs on (named in errors).
    """

    def __init__(
        self,
        runtime: Runtime,
        process: asyncssh.SSHClientProcess,
        name: str,
        debug: bool,
        python: str,
    ) -> None:
        self.runtime = runtime
        self.python = python
        self.name = name
        self.log: list[str] = []
        self._process = process
        self._debug = debug
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._hurry = asyncio.Event()
        self._readers = [
            asyncio.ensure_future(self._read_events()),
            asyncio.ensure_future(self._read_log()),
        ]

    async def _read_events(self) -> None:
        try:
            async for line in self._process.stdout:
                try:
                    await self._events.put(json.loads(line))
                except ValueError:
                    self.log.append(line.decode(errors="replace").rstrip())
        except (asyncssh.Error, OSError) as exc:  # the connection dropped under us
            self.log.append(f"[lazycluster] connection lost: {exc}")
        await self._events.put({"event": "eof"})

    async def _read_log(self) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):  # ends with a lost connection too
            await self._pump_log()

    async def _pump_log(self) -> None:
        async for raw in self._process.stderr:
            if not raw:  # asyncssh yields an empty read at EOF
                continue
            line = raw.decode(errors="replace").rstrip("\n")
            self.log.append(line)
            if self._debug:
                print(f"[{self.runtime.host}:{self.name}] {line}", flush=True)

    async def wait_started(self, timeout: float) -> dict[str, Any]:
        """Wait for the server's ``started`` message.

        Args:
            timeout: Seconds to wait.

        Returns:
            The message (``address``, ``worker_address``, ``pid``).

        Raises:
            LazyclusterError: If the process fails or exits first, with the host and output tail.
            TimeoutError: If nothing is heard within ``timeout``.
        """
        message = await asyncio.wait_for(self._events.get(), timeout)
        if message.get("event") == "started":
            return message
        await asyncio.gather(*self._readers, return_exceptions=True)
        detail = message.get("message") or _tail(self.log) or "no output"
        raise LazyclusterError(
            f"{self.name} failed to start on host {self.runtime.host!r} "
            f"(python {self.python!r}):\n{detail}"
        )

    @property
    def exited(self) -> bool:
        """Whether the remote process has ended."""
        return self._process.is_closing() or self._readers[0].done()

    async def wait_exit(self, timeout: float) -> bool:
        """Wait for the process to end by itself (e.g. closed by the scheduler).

        Args:
            timeout: Seconds to wait.

        Returns:
            Whether it ended.
        """
        hurry: asyncio.Future[Any] = asyncio.ensure_future(self._hurry.wait())
        ended: asyncio.Future[Any] = asyncio.shield(self._readers[0])
        await asyncio.wait([ended, hurry], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        return self._readers[0].done()

    def hurry(self) -> None:
        """Cut a :meth:`wait_exit` short (the cluster is closing: no time for courtesy)."""
        self._hurry.set()

    async def stop(self, grace: float = 10.0, settle: float = 0.0) -> None:
        """Close the server gracefully, then kill its process group if it lingers.

        Args:
            grace: Seconds to wait for a graceful exit after asking for it.
            settle: Seconds to first let it end on its own: a worker the scheduler is
                already closing must not be told twice (its nanny then waits 4 s and kills).
        """
        if settle and (await self.wait_exit(settle) or self._hurry.is_set()):
            await self.kill()
            return
        if not self.exited:
            try:
                self._process.stdin.write(b"stop\n")
                await asyncio.wait_for(asyncio.shield(self._readers[0]), grace)
            except (asyncio.TimeoutError, OSError, asyncssh.Error, BrokenPipeError):
                pass
        await self.kill()

    async def kill(self) -> None:
        """End the lifeline: the remote side kills its whole process group.

        Waits for the remote process to exit before closing the channel, so a process still
        starting up cannot create the working dir after cleanup removed it.
        """
        _say_bye(self._process)
        try:
            await asyncio.wait_for(self._process.wait_closed(), 5)
        except (asyncio.TimeoutError, OSError, asyncssh.Error):
            pass
        self._process.close()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self in self.runtime._servers:
            self.runtime._servers.discard(self)
            self.runtime._finished_servers.append(self)
