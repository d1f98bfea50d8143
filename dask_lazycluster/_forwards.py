"""Port forwards through one host's connection (:class:`Forwards`), by listening port.

Both directions listen on loopback only: a forwarded port is reachable as ``localhost:port``
on the other side and from nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncssh

from dask_lazycluster._host import HostState
from dask_lazycluster._relay import relay_factory
from dask_lazycluster.exceptions import ForwardRefusedError, PortInUseError


class Forwards:
    """The forwards one runtime holds.

    Args:
        state: The runtime's host state.
    """

    def __init__(self, state: HostState) -> None:
        self.state = state
        self.listeners: dict[int, asyncssh.SSHListener] = {}

    @property
    def ports(self) -> list[int]:
        """Listening ports of the open forwards, sorted."""
        return sorted(self.listeners)

    async def to_runtime(self, local_port: int, runtime_port: int) -> int:
        """Make the manager's ``local_port`` reachable as the host's ``localhost:runtime_port``.

        Args:
            local_port: The port on the manager.
            runtime_port: The port on the host.

        Returns:
            The port on the host.

        Raises:
            PortInUseError: If ``runtime_port`` is busy on the host.
            ForwardRefusedError: If the host refuses forwarding a free port.
        """
        conn = self.state.ssh.conn
        return await self._listen_on_runtime(runtime_port, lambda: conn.forward_remote_port(
            "127.0.0.1", runtime_port, "127.0.0.1", local_port))

    async def relay_from(self, source: Forwards, source_port: int, runtime_port: int) -> int:
        """Make ``source``'s ``source_port`` reachable here, spliced inside the manager.

        Args:
            source: The forwards of the host where the service listens.
            source_port: Its port there.
            runtime_port: The port on this host.

        Returns:
            The port on this host.

        Raises:
            PortInUseError: If ``runtime_port`` is busy on this host.
            ForwardRefusedError: If this host refuses forwarding a free port.
        """
        conn = self.state.ssh.conn
        factory = relay_factory(lambda: source.state.ssh.conn, source_port)
        return await self._listen_on_runtime(runtime_port, lambda: conn.create_server(
            factory, "127.0.0.1", runtime_port))

    async def _listen_on_runtime(
        self, runtime_port: int, listen: Callable[[], Awaitable[asyncssh.SSHListener]]
    ) -> int:
        try:
            listener = await listen()
        except asyncssh.ChannelListenError as exc:
            if runtime_port in await self.state.listening_ports():
                raise PortInUseError(runtime_port, where=self.state.host) from exc
            raise ForwardRefusedError(
                self.state.host, runtime_port,
                "the port is free there: is AllowTcpForwarding disabled in its sshd_config?",
            ) from exc
        port = listener.get_port()
        self.listeners[port] = listener
        return port

    async def from_runtime(self, runtime_port: int, local_port: int) -> int:
        """Make the host's ``localhost:runtime_port`` reachable as the manager's ``local_port``.

        Args:
            runtime_port: The port on the host.
            local_port: The port on the manager.

        Returns:
            The port on the manager.

        Raises:
            PortInUseError: If ``local_port`` is busy on the manager.
        """
        try:
            listener = await self.state.ssh.conn.forward_local_port(
                "127.0.0.1", local_port, "127.0.0.1", runtime_port)
        except OSError as exc:
            raise PortInUseError(local_port, where="localhost") from exc
        port = listener.get_port()
        self.listeners[port] = listener
        return port

    async def close(self, port: int) -> None:
        """Close the forward listening on ``port`` (no-op if none).

        Args:
            port: The listening port.
        """
        listener = self.listeners.pop(port, None)
        if listener is not None:
            listener.close()
            await listener.wait_closed()

    async def close_all(self) -> None:
        """Close every forward."""
        await asyncio.gather(*(self.close(port) for port in list(self.listeners)))

    def forget(self) -> None:
        """Drop the records after a lost connection (the listeners died with it)."""
        self.listeners.clear()
