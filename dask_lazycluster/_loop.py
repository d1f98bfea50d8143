"""The one event loop that owns every SSH connection.

asyncssh connections are bound to the loop that opened them, while users call us from plain
scripts, from Jupyter (a loop already running) and from Dask's own loop thread. So every SSH
coroutine runs on a private loop in a daemon thread; sync wrappers block on it, async callers
hop onto it. That makes the sync API safe inside a running loop and lets a cluster on any loop
share one connection per host.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    """Return the SSH loop, starting its thread on first use.

    Returns:
        The running event loop that owns every SSH connection.
    """
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="lazycluster-ssh", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def in_loop_thread() -> bool:
    """Return whether the caller runs on the SSH loop's thread."""
    return _thread is not None and threading.current_thread() is _thread


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine on the SSH loop and wait for its result from a plain thread.

    Args:
        coro: The coroutine to run.
        timeout: Seconds to wait; None waits forever.

    Returns:
        The coroutine's result.

    Raises:
        RuntimeError: If called from the SSH loop itself (it would deadlock).
        TimeoutError: If ``timeout`` expires (the coroutine is cancelled).
    """
    if in_loop_thread():
        coro.close()
        raise RuntimeError("a sync lazycluster call was made on its own SSH loop; await it")
    fut = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return fut.result(timeout)
    except (KeyboardInterrupt, concurrent.futures.TimeoutError):
        # Ctrl-C or timeout: stop the remote work too instead of leaving it running.
        fut.cancel()
        raise


async def on_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Await a coroutine on the SSH loop from any event loop.

    Args:
        coro: The coroutine to run.

    Returns:
        The coroutine's result.
    """
    loop = get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:  # pragma: no cover - always called from a coroutine
        running = None
    if running is loop:
        return await coro
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return await asyncio.wrap_future(fut)
    except asyncio.CancelledError:
        fut.cancel()
        raise
