"""Which hosts can use plain TCP: the probe behind ``tunnel="auto"`` (:func:`direct_hosts`).

A host qualifies when it and the manager reach each other, and every other host of the group
reaches it too: the others (tunneled ones included) fetch data from its workers at its real
address. Hosts are tested in parallel, each dialing all candidates at once; a host that
cannot be tested counts as unreachable (a tunnel is always safe).
"""

from __future__ import annotations

import asyncio
import json
import logging

import asyncssh

from dask_lazycluster._host import HostState

logger = logging.getLogger(__name__)

#: Seconds a reachability test may keep its remote listener open at most.
REACH_WAIT = 30


class Reach:
    """One host's part of the plain-TCP test.

    Args:
        state: The host.
    """

    def __init__(self, state: HostState) -> None:
        self.state = state
        self.process: asyncssh.SSHClientProcess[bytes] | None = None
        self.port: int | None = None
        self.outbound = False
        self.inbound = False

    @property
    def host(self) -> str:
        """The host's name."""
        return self.state.host

    @property
    def both_ways(self) -> bool:
        """Whether the host and the manager reached each other."""
        return self.outbound and self.inbound

    async def start(self, timeout: float) -> Reach:
        """Test TCP to the manager and from it; the host's listener stays open for :meth:`dial`.

        Args:
            timeout: Seconds for each connection attempt.

        Returns:
            Itself.
        """
        ssh = self.state.ssh
        server = await asyncio.start_server(lambda r, w: w.close(), ssh.local_address, 0)
        manager_port = server.sockets[0].getsockname()[1]
        try:
            self.process = await self.state.start_python("the reachability probe")
            self.process.stdin.write(self.state.request(
                "reach", manager=ssh.local_address, manager_port=manager_port,
                bind=ssh.remote_address, timeout=timeout, wait=REACH_WAIT))
            try:
                line = await asyncio.wait_for(self.process.stdout.readline(), timeout + 5)
                report = json.loads(line)
            except (asyncio.TimeoutError, ValueError):
                return self
            self.port = int(report["port"])
            self.outbound = bool(report["out"])
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(ssh.remote_address, self.port), timeout)
                writer.close()
                self.inbound = True
            except (OSError, asyncio.TimeoutError):
                pass
        finally:
            server.close()
        return self

    async def dial(self, targets: list[tuple[str, int]], timeout: float) -> list[bool] | None:
        """Have the host dial ``(address, port)`` targets; None if it could not answer.

        Args:
            targets: What to dial.
            timeout: Seconds per attempt.

        Returns:
            One result per target, or None.
        """
        if self.process is None or self.port is None:
            return None
        try:
            self.process.stdin.write(json.dumps({"dial": targets}).encode() + b"\n")
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout + 5)
            return [bool(ok) for ok in json.loads(line)["dialed"]]
        except (asyncio.TimeoutError, ValueError, KeyError, OSError, asyncssh.Error):
            return None

    def close(self) -> None:
        """End the remote test process (its listener goes with it)."""
        if self.process is not None:
            self.process.close()


async def direct_hosts(states: list[HostState], timeout: float = 2.0) -> set[str]:
    """The hosts whose workers can talk plain TCP (see the module docstring).

    Args:
        states: The group's hosts.
        timeout: Seconds per connection attempt.

    Returns:
        The names of the hosts that may go direct.
    """
    reaches = await asyncio.gather(*(Reach(s).start(timeout) for s in states))
    try:
        candidates = [x for x in reaches if x.both_ways]
        blocked: dict[str, list[str]] = {x.host: [] for x in candidates}
        if len(reaches) > 1 and candidates:

            async def dial_from(x: Reach) -> None:
                others = [c for c in candidates if c is not x]
                # A candidate's listener answered the manager, so its port is known.
                targets = [(c.state.ssh.remote_address, c.port) for c in others
                           if c.port is not None]
                answers = await x.dial(targets, timeout) if others else []
                if answers is None:
                    logger.info("tunnel='auto': %s could not run the host-to-host test; "
                                "the hosts it should have reached are tunneled", x.host)
                for c, ok in zip(others, answers or [False] * len(others), strict=True):
                    if not ok:
                        blocked[c.host].append(x.host)

            await asyncio.gather(*(dial_from(x) for x in reaches))
        for host, dialers in blocked.items():
            if dialers:
                logger.info("tunnel='auto': %s is tunneled: %s cannot reach it directly",
                            host, ", ".join(dialers))
        return {host for host, dialers in blocked.items() if not dialers}
    finally:
        for x in reaches:
            x.close()
