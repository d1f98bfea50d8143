"""Host-to-host forwards spliced inside the manager: SSH channel to SSH channel.

A port of host B exposed on host A could be two forwards: A's port to a manager port (remote
forward), and that manager port to B (local forward). Every byte would then leave asyncssh
through a loopback socket and come back in through another: two system calls and two copies
per chunk in the manager's one Python process. A :class:`Relay` pair joins the channel from A
straight to a channel opened to B instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh


class Relay(asyncssh.SSHTCPSession[bytes]):
    """One end of a relay: what its channel receives is written to the peer's channel.

    Data or EOF arriving before the peer's channel exists is held and passed on once it does.
    """

    def __init__(self) -> None:
        self.peer: Relay | None = None
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._held: list[bytes] = []
        self._held_eof = False
        self.eof_seen = False

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        """Take the channel; pass on what the peer held for it."""
        self._chan = chan
        peer = self.peer
        if peer is not None and (peer._held or peer._held_eof):
            held, peer._held = peer._held, []
            if held:
                chan.write(b"".join(held))
            if peer._held_eof:
                chan.write_eof()

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        """Pass data to the peer's channel, or hold it until that channel exists."""
        target = self.peer._chan if self.peer is not None else None
        if target is None:
            self._held.append(data)
        else:
            target.write(data)

    def eof_received(self) -> bool:
        """Half-close toward the peer; keep our channel open until both sides are done."""
        self.eof_seen = True
        target = self.peer._chan if self.peer is not None else None
        if target is None:
            self._held_eof = True
        else:
            target.write_eof()
        return not (self.peer is not None and self.peer.eof_seen)

    def connection_lost(self, exc: Exception | None) -> None:
        """Close the peer's channel too."""
        self._chan = None
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            if peer._chan is not None:
                peer._chan.close()

    def pause_writing(self) -> None:
        """Our channel is full: stop reading from the peer's."""
        if self.peer is not None and self.peer._chan is not None:
            self.peer._chan.pause_reading()

    def resume_writing(self) -> None:
        """Our channel drained: read from the peer's again."""
        if self.peer is not None and self.peer._chan is not None:
            self.peer._chan.resume_reading()


def relay_factory(
    connection: Callable[[], asyncssh.SSHClientConnection], port: int
) -> Callable[[str, int], Awaitable[Relay]]:
    """A ``create_server`` session factory relaying each connection to ``127.0.0.1:port``.

    Args:
        connection: Returns the connection to the host serving ``port`` (looked up per
            connection, so a reconnected host is used); it may raise if that host is lost.
        port: The port on that host.

    Returns:
        The session factory (a coroutine function of the originator's host and port).
    """

    async def open_relay(_orig_host: str, _orig_port: int) -> Relay:
        near, far = Relay(), Relay()
        near.peer, far.peer = far, near
        try:
            conn = connection()
        except Exception as exc:  # the target host is lost: refuse this one connection
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from exc
        await conn.create_connection(lambda: far, "127.0.0.1", port)
        return near

    return open_relay
