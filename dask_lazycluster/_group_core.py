"""A group's async operations (:class:`GroupCore`): ports, forwards, reachability.

The cluster layer awaits them on the SSH loop; :class:`~dask_lazycluster.runtime_mgmt.RuntimeGroup`'s
public methods are thin sync wrappers over them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from dask_lazycluster._ports import pick_port
from dask_lazycluster._reach import direct_hosts
from dask_lazycluster.exceptions import PortInUseError
from dask_lazycluster.runtimes import Runtime
from dask_lazycluster.utils import localhost_has_free_port


def host_list(hosts: Iterable[str] | str | None, argument: str) -> list[str]:
    """A host argument as a list: None is empty, a str is one host.

    Args:
        hosts: The argument's value.
        argument: Its name (for errors; unused today).

    Returns:
        The host names.
    """
    if hosts is None:
        return []
    if isinstance(hosts, str):
        return [hosts]
    return list(hosts)


class GroupCore:
    """The async operations of a group (used on the SSH loop).

    Args:
        runtimes: The group's runtimes by host (the group's own dict: membership changes
            show here).
    """

    def __init__(self, runtimes: dict[str, Runtime]) -> None:
        self.runtimes = runtimes

    def others(self, exclude_hosts: Iterable[str]) -> list[Runtime]:
        """The runtimes not excluded, in group order.

        Args:
            exclude_hosts: Hosts to leave out.

        Returns:
            The runtimes.
        """
        skip = set(exclude_hosts)
        return [r for h, r in self.runtimes.items() if h not in skip]

    async def busy_ports(
        self, runtimes: list[Runtime], max_age: float = 0.0
    ) -> dict[str, set[int]]:
        """Listening ports per host.

        Args:
            runtimes: The hosts to read.
            max_age: Seconds the probe's reading may be old to be used instead.

        Returns:
            Host name to busy ports.
        """
        found = await asyncio.gather(*(r.core.listening_ports(max_age) for r in runtimes))
        return {r.host: ports for r, ports in zip(runtimes, found, strict=True)}

    async def pick_port(
        self,
        ports: int | list[int],
        runtimes: list[Runtime],
        check_localhost: bool,
        argument: str,
        busy: dict[str, set[int]] | None = None,
    ) -> int:
        """Apply the port rules over ``runtimes`` (and the manager) and return the port.

        Args:
            ports: A single port (exactly it) or a list (the first free one).
            runtimes: The hosts where it must be free.
            check_localhost: Whether it must be free on the manager too.
            argument: The argument named in errors.
            busy: A snapshot of listening ports per host, to spare a round trip per host.

        Returns:
            The port.

        Raises:
            PortInUseError: If a single port is busy.
            NoPortsLeftError: If no port of the list is free.
        """
        wanted = {r.host for r in runtimes}
        if busy is None:
            busy = await self.busy_ports(runtimes)
        busy = {h: used for h, used in busy.items() if h in wanted}
        manager = (lambda p: not localhost_has_free_port(p)) if check_localhost else None
        return pick_port(ports, busy, argument, manager)

    async def expose_to_runtimes(
        self,
        local_port: int,
        runtime_port: int | list[int] | None,
        exclude_hosts: list[str] | str | None,
        relay_from: Runtime | None = None,
    ) -> int:
        """Forward ``runtime_port`` on the runtimes to the manager's ``local_port``.

        With ``relay_from``, to that runtime's ``local_port`` instead, spliced in the manager.
        Nothing is left forwarded when one runtime fails.

        Args:
            local_port: The port on the manager (or on ``relay_from``).
            runtime_port: The port on the runtimes: a port, a list (the first port free on
                every runtime concerned) or None (``local_port``).
            exclude_hosts: Runtimes to leave out.
            relay_from: The runtime serving the port, or None for the manager.

        Returns:
            The port on the runtimes.

        Raises:
            PortInUseError: If a single port is busy on a runtime (all such hosts named).
            NoPortsLeftError: If no port of a list is free.
        """
        runtimes = self.others(host_list(exclude_hosts, "exclude_hosts"))
        if isinstance(runtime_port, list):
            target = await self.pick_port(runtime_port, runtimes, False, "runtime_port")
        else:
            target = local_port if runtime_port is None else runtime_port
        results = await asyncio.gather(
            *(r.core.forwards.to_runtime(local_port, target) if relay_from is None
              else r.core.forwards.relay_from(relay_from.core.forwards, local_port, target)
              for r in runtimes),
            return_exceptions=True,
        )
        failed = [(r, e) for r, e in zip(runtimes, results, strict=True) if isinstance(e, Exception)]
        if failed:
            await asyncio.gather(*(r.core.forwards.close(target) for r in runtimes
                                   if r not in [f for f, _ in failed]))
            if all(isinstance(e, PortInUseError) for _, e in failed):
                raise PortInUseError(target, where=", ".join(r.host for r, _ in failed))
            raise failed[0][1]
        return target

    async def forward_to_group(self, host: str, runtime_port: int, group_port: int) -> None:
        """Forward ``group_port`` on the manager and every other runtime to ``host``.

        No free-port check first: a busy port makes the forward itself fail with
        PortInUseError, and whatever was set up is closed again. Runtimes whose connection is
        lost are skipped (their forwards are restored when they reconnect).

        Args:
            host: The runtime serving the port.
            runtime_port: Its port there.
            group_port: The port everywhere else.
        """
        source = self.runtimes[host]
        await source.core.forwards.from_runtime(runtime_port, group_port)
        skip = [host] + [r.host for r in self.runtimes.values() if not r.is_alive]
        try:
            await self.expose_to_runtimes(runtime_port, group_port, skip, relay_from=source)
        except BaseException:
            await source.core.forwards.close(group_port)
            raise

    async def expose_from_runtime_to_group(
        self, host: str, runtime_port: int, group_port: int | list[int] | None
    ) -> int:
        """Choose a group port by the port rules and forward it to ``host``'s port.

        Args:
            host: The runtime serving the port.
            runtime_port: Its port there.
            group_port: A port, a list (first free), or None (``runtime_port``).

        Returns:
            The group port.
        """
        others = self.others([host])
        wanted = runtime_port if group_port is None else group_port
        port = await self.pick_port(wanted, others, True, "group_port")
        await self.forward_to_group(host, runtime_port, port)
        return port

    async def close_port(self, port: int) -> None:
        """Close every forward of ``port`` made through any runtime of the group.

        Args:
            port: The listening port.
        """
        await asyncio.gather(*(r.core.forwards.close(port) for r in self.runtimes.values()))

    async def direct_hosts(self, timeout: float = 2.0) -> set[str]:
        """Hosts whose workers can talk plain TCP: what ``tunnel="auto"`` makes direct.

        Args:
            timeout: Seconds per connection attempt.

        Returns:
            The host names.
        """
        return await direct_hosts([r.core.state for r in self.runtimes.values()], timeout)

    async def cleanup(self) -> None:
        """Clean up every runtime of the group."""
        await asyncio.gather(*(r.core.cleanup() for r in self.runtimes.values()))
