"""SSH sessions on one connection, never more than the host allows (:class:`SessionGate`).

sshd allows ``MaxSessions`` sessions (commands, SFTP) per connection, 10 by default, and most
users cannot change it. Port forwards are not sessions. The gate counts our open sessions;
when the host refuses one, the number open at that moment is taken as the host's limit and
further requests wait until one of ours closes. So a host with ``MaxSessions 2`` still works,
only with less parallelism.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncssh

from dask_lazycluster.exceptions import SessionRefusedError

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Session-open failures that mean "no more sessions": OpenSSH 9 answers MaxSessions with
# OPEN_CONNECT_FAILED ("open failed"); others may say prohibited or resource shortage.
_LIMIT_CODES = {asyncssh.OPEN_CONNECT_FAILED, asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                asyncssh.OPEN_RESOURCE_SHORTAGE}
#: Seconds a waiting opening waits for a release before trying again anyway.
RETRY_SECONDS = 2.0


class SessionGate:
    """Hands out the SSH sessions of one connection.

    Must be used from the SSH loop only.

    Args:
        host: The host, named in errors and logs.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        #: Sessions the host allows on this connection, once learnt from a refusal.
        self.limit: int | None = None
        #: Sessions of ours open now, and openings under way.
        self.open = 0
        self.pending = 0
        self._changed = asyncio.Condition()

    async def release(self) -> None:
        """Give back one session (its channel closed)."""
        async with self._changed:
            self.open -= 1
            self._changed.notify_all()

    async def _wait_turn(self) -> None:
        async with self._changed:
            while self.limit is not None and self.open + self.pending >= self.limit:
                try:
                    await asyncio.wait_for(self._changed.wait(), RETRY_SECONDS)
                except asyncio.TimeoutError:
                    break  # sshd may free a closed session later than we do: try again
            self.pending += 1

    async def opened(self, opener: Callable[[], Awaitable[T]], what: str) -> T:
        """Open a session with ``opener``, waiting for a free one at the host's limit.

        The caller must :meth:`release` the session when its channel closes (see
        :meth:`create_process`, which does it).

        Args:
            opener: Opens the session (e.g. ``conn.create_process(...)``).
            what: What it is for, for errors.

        Returns:
            What ``opener`` returned.

        Raises:
            SessionRefusedError: If the host refuses a session while none of ours is open.
        """
        while True:
            await self._wait_turn()
            try:
                result = await opener()
            except asyncssh.ChannelOpenError as exc:
                await self._settle(opened=False)
                if exc.code not in _LIMIT_CODES or self.open == 0:
                    raise SessionRefusedError(self.host, what, exc.reason) from exc
                if self.limit != self.open:
                    logger.info("host %s allows %d SSH sessions per connection (sshd "
                                "MaxSessions); more work waits for a free one", self.host, self.open)
                self.limit = self.open
                continue
            except BaseException:
                await self._settle(opened=False)
                raise
            await self._settle(opened=True)
            return result

    async def _settle(self, opened: bool) -> None:
        """An opening ended: count it, learn a higher limit, wake whoever waits."""
        async with self._changed:
            self.pending -= 1
            if opened:
                self.open += 1
                if self.limit is not None and self.open > self.limit:
                    self.limit = self.open  # a refusal came while sshd freed a session late
            self._changed.notify_all()

    async def create_process(
        self, conn: asyncssh.SSHClientConnection, command: str, what: str, **kwargs: Any
    ) -> asyncssh.SSHClientProcess[Any]:
        """Start a remote command in a session that is given back when its channel closes.

        Args:
            conn: The connection.
            command: The shell command.
            what: What it is for, for errors.
            **kwargs: For ``create_process`` (e.g. ``encoding=None``).

        Returns:
            The process.
        """
        process: asyncssh.SSHClientProcess[Any] = await self.opened(
            lambda: conn.create_process(command, **kwargs), what)
        asyncio.ensure_future(self._release_when_closed(process.channel))
        return process

    async def _release_when_closed(self, channel: asyncssh.SSHClientChannel[Any]) -> None:
        try:
            await channel.wait_closed()
        finally:
            await self.release()

    async def run(
        self, conn: asyncssh.SSHClientConnection, command: str, what: str
    ) -> asyncssh.SSHCompletedProcess:
        """Run a short command and return its result (its exit status is not checked).

        Args:
            conn: The connection.
            command: The shell command.
            what: What it is for, for errors.

        Returns:
            The completed process.
        """
        process = await self.create_process(conn, command, what)
        try:
            return await process.wait()
        finally:
            process.close()

    @contextlib.asynccontextmanager
    async def sftp(
        self, conn: asyncssh.SSHClientConnection, what: str
    ) -> AsyncIterator[asyncssh.SFTPClient]:
        """An SFTP client in a session of its own, given back on exit.

        Args:
            conn: The connection.
            what: What it is for, for errors.

        Yields:
            The SFTP client.
        """
        client = await self.opened(conn.start_sftp_client, what)
        try:
            yield client
        finally:
            client.exit()
            with contextlib.suppress(Exception):
                await client.wait_closed()
            await self.release()
