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
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Any

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface
from distributed.protocol.pickle import dumps

from dask_lazycluster.cluster.exceptions import MasterStartError

logger = logging.getLogger(__name__)

_CHILD = os.path.join(os.path.dirname(__file__), "_scheduler_child.py")
# Run the child by path with the manager's own sys.path, without importing this package.
_RUN_CHILD = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


def spawn_scheduler_child(dashboard: bool = True) -> subprocess.Popen[bytes]:
    """Start the scheduler's process now; it imports Dask, then waits for its options.

    A cluster calls this first thing, so the child's start-up overlaps the SSH connections and
    host probes; :class:`SchedulerProcess` then sends it the options.

    Args:
        dashboard: Import the dashboard too while waiting (it will be served).

    Returns:
        The child process, its stdin and stdout piped. Its Dask scratch space is a private
        temp dir, removed by :func:`end_scheduler_child` (a killed scheduler cannot remove it).
    """
    scratch = tempfile.mkdtemp(prefix="lazycluster-scheduler-")
    process = subprocess.Popen(
        [sys.executable, "-c", _RUN_CHILD, _CHILD, *(["--dashboard"] if dashboard else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "DASK_TEMPORARY_DIRECTORY": scratch},
    )
    _scratch[process.pid] = scratch
    return process


def end_scheduler_child(process: subprocess.Popen[bytes]) -> None:
    """Kill the child if it still runs, wait for it, and remove its scratch space.

    Args:
        process: A process from :func:`spawn_scheduler_child`.
    """
    if process.poll() is None:
        process.kill()
    process.wait()
    scratch = _scratch.pop(process.pid, None)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


# Scratch dir of each child by pid, until end_scheduler_child removes it.
_scratch: dict[int, str] = {}


class SchedulerProcess(ProcessInterface):
    """A ``distributed.Scheduler`` in a child process of the manager.

    The child's stdin is its lifeline: when this object closes it, or the manager dies, the
    scheduler closes and the process ends. Ctrl-C does not reach it directly; the manager's
    own shutdown closes it.

    Args:
        start_timeout: Seconds the child may take to start listening.
        log_level: Level of the child's ``distributed`` logger (the cluster's silence level).
        child: A process from :func:`spawn_scheduler_child` to use (this object owns it from
            now on); None starts one.
        **options: Keyword arguments for ``distributed.Scheduler``.
    """

    def __init__(
        self,
        start_timeout: float = 60,
        log_level: int = logging.WARNING,
        child: subprocess.Popen[bytes] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self._options = options
        self._start_timeout = start_timeout
        self._log_level = log_level
        self._process = child
        self.address: str | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id, or None before start."""
        return self._process.pid if self._process is not None else None

    def _failed(self, cause: str) -> MasterStartError:
        return MasterStartError("localhost", self._options.get("port"), cause)

    async def start(self) -> None:
        """Send the options to the child and wait until its scheduler listens.

        Raises:
            MasterStartError: If the options cannot be sent, or the scheduler fails to start
                (its error is in the message) or is not listening within ``start_timeout``.
        """
        try:
            # cloudpickle, as Dask ships functions: options such as plugins may be lambdas.
            payload = dumps({"options": self._options, "log_level": self._log_level})
        except Exception as exc:
            self._kill()
            raise self._failed(
                f"scheduler_options cannot be sent to the scheduler process ({exc}); "
                f"pass picklable options or set lazycluster.scheduler-process: false"
            ) from exc
        if self._process is None:
            self._process = spawn_scheduler_child(self._options.get("dashboard") is not False)
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        loop = asyncio.get_running_loop()
        try:
            # Pipe I/O in a thread: the child may have been started before this loop existed.
            await loop.run_in_executor(None, _send, process.stdin, payload)
            line = await asyncio.wait_for(
                loop.run_in_executor(None, process.stdout.readline), self._start_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            self._kill()
            raise self._failed(f"the scheduler process was not listening after "
                               f"{self._start_timeout:g} s") from None
        except OSError as exc:  # the child died before reading its options
            self._kill()
            raise self._failed(f"the scheduler process ended early ({exc})") from exc
        except BaseException:
            # Cancelled (Ctrl-C during start-up): no time for a polite stop, leave nothing.
            self._kill()
            raise
        kind, _, rest = line.decode(errors="replace").partition(" ")
        if kind != "READY":
            self._kill()
            why = json.loads(rest)["error"] if kind == "ERROR" else (
                f"it exited with status {process.poll()} before listening")
            raise self._failed(f"the scheduler process failed to start: {why}")
        self.address = json.loads(rest)["address"]
        threading.Thread(target=self._watch_exit, args=(loop,), daemon=True,
                         name="lazycluster-scheduler-watch").start()
        await super().start()

    def _watch_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        """Mark the scheduler failed if its process ends while we did not ask it to."""
        assert self._process is not None
        code = self._process.wait()
        if self.status == Status.running:
            self.status = Status.failed
            loop.call_soon_threadsafe(
                logger.error, "the scheduler process (pid %d) exited unexpectedly with status %s",
                self._process.pid, code)

    def _kill(self) -> None:
        if self._process is not None:
            end_scheduler_child(self._process)

    async def close(self, grace: float = 10) -> None:
        """Close the scheduler and wait for its process to end (killed after ``grace`` s).

        Args:
            grace: Seconds the child gets to close its scheduler.
        """
        self.status = Status.closing
        process = self._process
        if process is not None and process.poll() is None:
            assert process.stdin is not None
            try:
                process.stdin.close()  # the lifeline: the child closes its scheduler and exits
            except OSError:
                pass
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(loop.run_in_executor(None, process.wait), grace)
            except (asyncio.TimeoutError, TimeoutError):
                logger.warning("the scheduler process (pid %d) did not end in %g s: killing it",
                               process.pid, grace)
        self._kill()  # (ended by now, or killed here) and its scratch space removed
        await super().close()


def _send(stream: Any, payload: bytes) -> None:
    stream.write(b"%d\n" % len(payload) + payload)
    stream.flush()
