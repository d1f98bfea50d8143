"""The scheduler's own process (``lazycluster.scheduler-process``), run by file path.

Run by path rather than as ``-m dask_lazycluster...`` so the child imports only ``distributed``,
not this package (and ``asyncssh``). It imports ``distributed`` (and the dashboard with
``--dashboard``) first, then waits for its options. Protocol on the pipes, one line each way:

- stdin: a line with the byte length of a pickled dict ``{"options": Scheduler kwargs,
  "log_level": int}``, then those bytes. After that stdin is the lifeline: EOF (the manager
  closed it, or died) closes the scheduler and ends the process.
- stdout: ``READY {"address": ...}`` once the scheduler listens, or ``ERROR {"error": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import shutil
import signal
import sys
from typing import Any


def _answer(kind: str, **fields: Any) -> None:
    sys.stdout.write(f"{kind} {json.dumps(fields)}\n")
    sys.stdout.flush()


async def _serve(options: dict[str, Any], log_level: int) -> None:
    from distributed import Scheduler

    # As silence_logs does in-process: the handlers Dask installed on import filter.
    for handler in logging.getLogger("distributed").handlers:
        handler.setLevel(log_level)
    try:
        scheduler = await Scheduler(**options)
    except Exception as exc:
        _answer("ERROR", error=f"{type(exc).__name__}: {exc}")
        return
    _answer("READY", address=scheduler.address)
    loop = asyncio.get_running_loop()
    lifeline = loop.run_in_executor(None, sys.stdin.buffer.read)
    finished = asyncio.ensure_future(scheduler.finished())
    await asyncio.wait([lifeline, finished], return_when=asyncio.FIRST_COMPLETED)
    if not finished.done():
        await asyncio.wait_for(scheduler.close(), 10)


def main() -> None:
    """Read the options, run the scheduler until stdin ends or it is closed, then exit."""
    # Ctrl-C reaches the whole terminal process group: the manager decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Import while the manager still connects to its hosts (it may start us that early).
    import distributed  # noqa: F401

    if "--dashboard" in sys.argv[1:]:
        try:
            import distributed.dashboard.scheduler  # noqa: F401
        except ImportError:  # no bokeh: the scheduler serves no dashboard either
            pass
    header = sys.stdin.buffer.readline()
    if not header.strip():  # the manager went away before sending the options
        _finish(0)
    payload = pickle.loads(sys.stdin.buffer.read(int(header)))
    status = 0
    try:
        asyncio.run(_serve(payload["options"], payload["log_level"]))
    except BaseException:
        logging.getLogger("distributed").exception("the scheduler process failed")
        status = 1
    sys.stdout.flush()
    _finish(status)


def _finish(status: int) -> None:
    """Remove our scratch space (a killed manager cannot), then exit at once.

    ``os._exit``: the lifeline thread may still block on stdin and must not keep us alive.
    """
    scratch = os.environ.get("DASK_TEMPORARY_DIRECTORY", "")
    if os.path.basename(scratch).startswith("lazycluster-scheduler-"):
        shutil.rmtree(scratch, ignore_errors=True)
    os._exit(status)


if __name__ == "__main__":
    main()
