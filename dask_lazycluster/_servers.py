"""The Dask servers of one host, through its supervisors (:class:`HostServers`).

A host gets one supervisor per interpreter and setup (almost always exactly one), started on
first need, or earlier with :meth:`HostServers.prestart`, so it imports ``distributed`` while
the manager does other work. The first one reuses the probe's parked interpreter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

from dask_lazycluster._bootstrap import bundle
from dask_lazycluster._host import HostState
from dask_lazycluster._supervisor import SILENCE, HostSupervisor, RemoteServer
from dask_lazycluster.utils import parse_listening_ports

_Key = tuple[str | None, tuple[str, ...]]


class HostServers:
    """The supervisors of one host.

    Args:
        state: The runtime's host state.
    """

    def __init__(self, state: HostState) -> None:
        self.state = state
        self._supervisors: dict[_Key, asyncio.Future[HostSupervisor]] = {}
        #: Supervisors that ended (their servers' logs stay readable).
        self.ended: collections.deque[HostSupervisor] = collections.deque(maxlen=10)

    @property
    def supervisors(self) -> list[HostSupervisor]:
        """The supervisors started so far and not ended."""
        return [f.result() for f in self._supervisors.values()
                if f.done() and not f.cancelled() and f.exception() is None]

    async def supervisor(
        self, python: str | None = None, setup: list[str] | None = None
    ) -> HostSupervisor:
        """The live supervisor for ``python`` and ``setup``, started if needed.

        Args:
            python: The interpreter (None: the runtime's).
            setup: Shell lines its shell runs before python.

        Returns:
            The supervisor (it may still be importing ``distributed``).
        """
        key: _Key = (python, tuple(setup or ()))
        future = self._supervisors.get(key)
        if future is not None and future.done():
            if future.cancelled() or future.exception() is not None or not future.result().alive:
                if not future.cancelled() and future.exception() is None:
                    self.ended.append(future.result())
                future = None
        if future is None:
            future = asyncio.ensure_future(self._launch(python, list(setup or [])))
            self._supervisors[key] = future
        return await asyncio.shield(future)

    def prestart(
        self, python: str | None = None, setup: list[str] | None = None,
        preload: list[str] | None = None,
    ) -> None:
        """Start the supervisor in the background, so a first worker finds it ready.

        Args:
            python: See :meth:`supervisor`.
            setup: See :meth:`supervisor`.
            preload: Modules the supervisor imports ahead of need (e.g. a scheduler's web
                modules): every server it forks later finds them imported.
        """
        if not self.state.ssh.is_alive:
            return

        async def start() -> None:
            supervisor = await self.supervisor(python, setup)
            if preload:
                supervisor.send(op="preload", modules=list(preload))

        task = asyncio.ensure_future(start())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _launch(self, python: str | None, setup: list[str]) -> HostSupervisor:
        state = self.state
        process = None if setup else state.take_parked(python)
        if process is None:
            process = await state.start_python("the Dask supervisor", python, setup)
            process.stdin.write(bundle())
        process.stdin.write(state.request_line("supervise", cwd=state.working_dir_path,
                                               silence=SILENCE))
        state.wd_ready = True  # the supervisor creates it (mode 0700)
        return HostSupervisor(state.host, process, python or state.python, setup)

    async def start_server(
        self,
        name: str,
        request: dict[str, Any],
        debug: bool = False,
        python: str | None = None,
        setup: list[str] | None = None,
    ) -> RemoteServer:
        """Start a Dask server; returns at once (await the handle's ``wait_started``).

        Args:
            name: Label for logs and errors (the worker name).
            request: ``cls``, ``scheduler``, ``options``, ``env``, ``tls``.
            debug: Print its output live.
            python: The interpreter (None: the runtime's).
            setup: Shell lines run before python on this host.

        Returns:
            The server's handle.
        """
        supervisor = await self.supervisor(python, setup)
        return supervisor.start(name, request, debug)

    async def listening_ports(self) -> set[int] | None:
        """The host's listening ports, read by a live supervisor (None if there is none)."""
        for supervisor in self.supervisors:
            if supervisor.alive and supervisor.ready.done():
                with contextlib.suppress(Exception):
                    return parse_listening_ports(await supervisor.listening_ports_text())
        return None

    async def shutdown(self, remove_dir: str | None) -> bool:
        """Stop every Dask process on the host; the last supervisor removes ``remove_dir``.

        Args:
            remove_dir: The private temp working dir, or None.

        Returns:
            Whether a supervisor took care of ``remove_dir``.
        """
        pending = list(self._supervisors.values())
        self._supervisors.clear()
        results = await asyncio.gather(*pending, return_exceptions=True)
        live = [s for s in results if isinstance(s, HostSupervisor)]
        # Every child must be gone before the dir goes: the last one removes it.
        await asyncio.gather(*(s.shutdown(None) for s in live[:-1]))
        removed = False
        if live:
            removed = live[-1].alive and remove_dir is not None
            await live[-1].shutdown(remove_dir)
        self.ended.extend(live)
        return removed

    def forget(self) -> None:
        """The connection dropped: the supervisors ended with it (they cleaned up there)."""
        for future in self._supervisors.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                self.ended.append(future.result())
        self._supervisors.clear()

    def logs(self) -> list[tuple[str, list[str]]]:
        """Every supervisor's and server's log, oldest first, as (label, lines).

        Returns:
            The logs.
        """
        out: list[tuple[str, list[str]]] = []
        for supervisor in [*self.ended, *self.supervisors]:
            if supervisor.log:
                out.append((f"supervisor ({supervisor.python})", list(supervisor.log)))
            for server in [*supervisor.finished, *supervisor.servers.values()]:
                out.append((server.name, list(server.log)))
        return out
