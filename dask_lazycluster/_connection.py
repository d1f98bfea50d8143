"""The one SSH connection of a host (:class:`HostConnection`): open, watch, reconnect.

Everything on a host (commands, transfers, forwards, the supervisor) is a channel of this one
connection. Only a connection that was once established reconnects after a drop: a host that
refused us at first (unknown, untrusted key, refused) is never retried in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import weakref
from collections.abc import Callable
from typing import Any

import asyncssh

from dask_lazycluster._batching import batch_writes
from dask_lazycluster._sessions import SessionGate
from dask_lazycluster.exceptions import ConnectionLostError, InvalidRuntimeError

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
# AES-GCM measured ~1.3x the default cipher's tunnel throughput here; keep the rest as fallback.
_PREFERRED_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]

#: ``listener(host, alive)``: called on the SSH loop when the connection drops or returns.
ConnectionListener = Callable[[str, bool], None]


def _cipher_preference() -> list[str]:
    defaults = [alg.decode() for alg in asyncssh.encryption.get_default_encryption_algs()]
    return _PREFERRED_CIPHERS + [alg for alg in defaults if alg not in _PREFERRED_CIPHERS]


def describe_connect_error(exc: BaseException, timeout: float) -> str:
    """Turn a connection failure into words a user can act on.

    Args:
        exc: The failure.
        timeout: The connect timeout in force (named when it expired).

    Returns:
        The description.
    """
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return f"timed out after {timeout:g} s while connecting"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is sshd running on that port?)"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"host key not verified: {exc.reason} (add the host to ~/.ssh/known_hosts)"
    if isinstance(exc, asyncssh.PermissionDenied):
        return f"authentication failed: {exc.reason}"
    if isinstance(exc, asyncssh.DisconnectError):
        return f"SSH connection failed: {exc.reason}"
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


class _Watcher(asyncssh.SSHClient):
    """Tells its connection owner when the connection drops (the owner may be gone)."""

    def __init__(self, owner: weakref.ref[HostConnection]) -> None:
        self._owner = owner

    def connection_lost(self, exc: Exception | None) -> None:
        owner = self._owner()
        if owner is not None:
            owner.lost(self, exc)


class HostConnection:
    """One host's SSH connection, its sessions, and its reconnection after a drop.

    Args:
        host: The SSH host name or alias (resolved like ``ssh host``).
        connect_options: Extra ``asyncssh.connect`` keyword arguments; ``connect_timeout``
            (seconds, default 10) bounds connecting.
    """

    def __init__(self, host: str, connect_options: dict[str, Any]) -> None:
        self.host = host
        self.options = dict(connect_options)
        self.timeout = float(self.options.pop("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        self.gate = SessionGate(host)
        self.closed = False
        self.is_lost = False
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: _Watcher | None = None
        self._listeners: list[ConnectionListener] = []
        self._reconnector: asyncio.Future[None] | None = None

    def _ssh_options(self) -> dict[str, Any]:
        options = dict(self.options)
        options.setdefault("encryption_algs", _cipher_preference())
        # A dead host or link is noticed within ~6 s, so its work is rescheduled quickly.
        options.setdefault("keepalive_interval", 2)
        options.setdefault("keepalive_count_max", 3)
        if options.get("known_hosts", ()) is None:
            logger.warning("host key checking is OFF for %s (known_hosts=None): the connection "
                           "can be intercepted", self.host)
        return options

    async def _open(self) -> asyncssh.SSHClientConnection:
        ref = weakref.ref(self)
        client = _Watcher(ref)
        conn, _ = await asyncio.wait_for(
            asyncssh.create_connection(lambda: client, self.host, **self._ssh_options()),
            self.timeout)
        batch_writes(conn)
        self._client = client  # only this connection's drop counts, not a failed attempt's
        return conn

    async def connect(self) -> None:
        """Open the connection.

        Raises:
            InvalidRuntimeError: If the host cannot be connected to or authenticated against,
                or its host key cannot be verified (the cause in words).
        """
        try:
            self._conn = await self._open()
        except Exception as exc:
            self.closed = True
            raise InvalidRuntimeError(self.host, describe_connect_error(exc, self.timeout)) from exc

    @property
    def conn(self) -> asyncssh.SSHClientConnection:
        """The live connection.

        Raises:
            ConnectionLostError: If it is closed, or lost and reconnecting.
        """
        if self._conn is None or self.closed:
            raise ConnectionLostError(self.host, "the runtime is closed")
        if self.is_lost:
            raise ConnectionLostError(self.host, "it dropped; reconnecting in the background")
        return self._conn

    @property
    def is_alive(self) -> bool:
        """Whether the connection is up."""
        return not self.closed and not self.is_lost and self._conn is not None

    @property
    def local_address(self) -> str:
        """The manager's address on this connection: one the host can route back to."""
        return str(self.conn.get_extra_info("sockname")[0])

    @property
    def remote_address(self) -> str:
        """The host's address as the manager reaches it."""
        return str(self.conn.get_extra_info("peername")[0])

    # -- listeners -------------------------------------------------------------------------

    def add_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(host, alive)`` on the SSH loop when the connection drops or returns.

        Args:
            listener: The callback; it must not block.
        """
        self._listeners.append(listener)

    def remove_listener(self, listener: ConnectionListener) -> None:
        """Stop calling a listener.

        Args:
            listener: The callback.
        """
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _notify(self, alive: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(self.host, alive)
            except Exception:  # a listener's bug must not stop the others
                logger.exception("connection listener failed for %s", self.host)

    # -- drops -----------------------------------------------------------------------------

    def lost(self, client: asyncssh.SSHClient, exc: BaseException | None) -> None:
        """The connection of ``client`` dropped without our asking: reconnect in the background.

        Args:
            client: The dropped connection's client object.
            exc: Why, if known.
        """
        if self.closed or self.is_lost or client is not self._client:
            return
        self.is_lost = True
        logger.warning("SSH connection to %s lost (%s); reconnecting", self.host, exc or "closed")
        self._reconnector = asyncio.ensure_future(self._reconnect())
        self._notify(False)

    async def _reconnect(self) -> None:
        delay = 1.0
        while not self.closed:
            await asyncio.sleep(delay)
            try:
                conn = await self._open()
            except Exception as exc:  # keep trying: hosts come back after reboots and outages
                logger.debug("reconnect to %s failed: %s", self.host, exc)
                delay = min(delay * 1.5, 5.0)
                continue
            if self.closed:
                conn.close()
                return
            self._conn, self.is_lost = conn, False
            self.gate = SessionGate(self.host)
            logger.warning("SSH connection to %s is back", self.host)
            self._notify(True)
            return

    async def close(self) -> None:
        """Close the connection and stop any reconnection (twice is harmless)."""
        self.closed = True
        if self._reconnector is not None:
            self._reconnector.cancel()
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(asyncio.TimeoutError, OSError):
                await asyncio.wait_for(self._conn.wait_closed(), 5)
