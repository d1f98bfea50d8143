"""The Dask scheduler in a process of its own on the manager (:class:`SchedulerProcess`).

By default the scheduler shares the client's process, as in ``LocalCluster``: the fastest
start. With ``lazycluster.scheduler-process: true`` it runs in a child process instead, so it
has a core (and a GIL) of its own: many small tasks go faster, and a busy notebook does not
stall it. The cost is one more interpreter start-up and ``import distributed`` per cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from contextlib import suppress
from typing import Any

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface
from distributed.protocol.pickle import dumps

from dask_lazycluster.cluster.exceptions import MasterStartError

logger = logging.getLogger(__name__)

_CHILD = os.path.join(os.path.dirname(__file__), "_scheduler_child.py")
# Run the child by path with the manager's own sys.path, without importing this package.
_RUN_CHILD = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


class SchedulerProcess(ProcessInterface):
    """A ``distributed.Scheduler`` in a child process of the manager.

    The child's stdin is its lifeline: when this object closes it, or the manager dies, the
    scheduler closes and the process ends. Ctrl-C does not reach it directly; the manager's
    own shutdown closes it.

    Args:
        start_timeout: Seconds the child may take to start listening.
        log_level: Level of the child's ``distributed`` logger (the cluster's silence level).
        **options: Keyword arguments for ``distributed.Scheduler``.
    """

    def __init__(
        self, start_timeout: float = 60, log_level: int = logging.WARNING, **options: Any
    ) -> None:
        super().__init__()
        self._options = options
        self._start_timeout = start_timeout
        self._log_level = log_level
        self._process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self.address: str | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id, or None before start."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start the child and wait until its scheduler listens.

        Raises:
            MasterStartError: If the options cannot be sent, or the scheduler fails to start
                (its error is in the message) or is not listening within ``start_timeout``.
        """
        try:
            # cloudpickle, as Dask ships functions: options such as plugins may be lambdas.
            payload = dumps({"options": self._options, "log_level": self._log_level})
        except Exception as exc:
            raise MasterStartError(
                "localhost", self._options.get("port"),
                f"scheduler_options cannot be sent to the scheduler process ({exc}); "
                f"pass picklable options or set lazycluster.scheduler-process: false",
            ) from exc
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _RUN_CHILD, _CHILD,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(b"%d\n" % len(payload) + payload)
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(), self._start_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            await self._stop()
            raise MasterStartError("localhost", self._options.get("port"),
                                   f"the scheduler process was not listening after "
                                   f"{self._start_timeout:g} s") from None
        except BaseException:
            # Cancelled (Ctrl-C during start-up): no time for a polite stop, leave nothing.
            self._process.kill()
            raise
        kind, _, rest = line.decode(errors="replace").partition(" ")
        if kind != "READY":
            await self._stop()
            why = json.loads(rest)["error"] if kind == "ERROR" else (
                f"it exited with status {self._process.returncode} before listening")
            raise MasterStartError("localhost", self._options.get("port"),
                                   f"the scheduler process failed to start: {why}")
        self.address = json.loads(rest)["address"]
        self._watch = asyncio.ensure_future(self._watch_exit())
        await super().start()

    async def _watch_exit(self) -> None:
        """Mark the scheduler failed if its process ends while we did not ask it to."""
        assert self._process is not None
        code = await self._process.wait()
        if self.status == Status.running:
            self.status = Status.failed
            logger.error("the scheduler process (pid %d) exited unexpectedly with status %s",
                         self._process.pid, code)

    async def _stop(self, grace: float = 10) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        with suppress(OSError):
            process.stdin.close()  # the lifeline: the child closes its scheduler and exits
        try:
            await asyncio.wait_for(process.wait(), grace)
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning("the scheduler process (pid %d) did not end in %g s: killing it",
                           process.pid, grace)
            process.kill()
            await process.wait()

    async def close(self) -> None:
        """Close the scheduler and wait for its process to end (killed after 10 s)."""
        self.status = Status.closing
        await self._stop()
        if self._watch is not None:
            self._watch.cancel()
        await super().close()
