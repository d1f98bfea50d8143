"""Fewer, larger socket writes for an SSH connection.

asyncssh writes every SSH packet to its socket at once, and a channel's packets are at most
32 KiB (the size OpenSSH's sshd asks for). A forward moving bulk data therefore costs one
``send()`` system call per 32 KiB, which is most of the manager's CPU time in a tunnel. OpenSSH
gathers its output and writes once per turn of its event loop; :class:`BatchedWrites` does the
same for asyncssh: writes made by the callbacks of one loop turn leave as one ``send()`` right
after them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh


class BatchedWrites:
    """Stand-in for a connection's transport that joins the writes of one event-loop turn.

    Only ``write`` changes; every other attribute is the wrapped transport's. Order is kept:
    everything goes through ``write``, and ``close`` sends what is pending first.

    Args:
        transport: The connection's asyncio transport.
        loop: The loop the connection runs on.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Queue ``data``; the queue is sent right after the loop's current callbacks.

        Args:
            data: Bytes to send.
        """
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Send what is queued now, as one write."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        """Send what is queued, then close the transport."""
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        """Drop what is queued and close the transport at once."""
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def batch_writes(conn: asyncssh.SSHClientConnection) -> None:
    """Make an open connection send through :class:`BatchedWrites` (best effort).

    Relies on asyncssh keeping its transport in ``_transport`` and writing only through it; on
    an asyncssh where that is not so, the connection is left as it is.

    Args:
        conn: An open asyncssh connection; call on its loop.
    """
    transport = getattr(conn, "_transport", None)
    if isinstance(transport, asyncio.Transport):
        conn._transport = BatchedWrites(transport, asyncio.get_running_loop())  # type: ignore[assignment]
