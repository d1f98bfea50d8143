"""One Dask server (Nanny, Worker, Scheduler...) in a forked child of the supervisor.

The child talks to its supervisor over two pipes: events (``started``, ``error``) and control
(``stop`` asks for a graceful close; the pipe's end means the supervisor is gone, and the
child's whole process group is killed at once, so nothing outlives its supervisor).
"""

from __future__ import annotations

import json
import os
import threading
import traceback
from typing import Any

from .protocol import Input, kill_group


def _apply_environment(request: dict[str, Any]) -> None:
    env = request.get("env") or {}
    os.environ.update(env)
    if any(key.startswith("DASK_") for key in env):
        import dask.config

        dask.config.refresh()  # picks up DASK_* values and the manager's inherited config
    cwd = request.get("cwd")
    if cwd:
        os.makedirs(cwd, mode=0o700, exist_ok=True)
        os.chdir(cwd)


def run_server(request: dict[str, Any], events_fd: int, control_fd: int) -> int:
    """Run the requested Dask server until it closes or is told to stop.

    Args:
        request: ``cls`` (import path), ``scheduler`` (address), ``options`` (keyword
            arguments), ``env``, ``tls`` (``distributed.Security`` keyword arguments), ``cwd``.
        events_fd: Pipe for ``started``/``error`` events.
        control_fd: Pipe from the supervisor (the child's lifeline).

    Returns:
        The exit status: 0 after a normal close, 1 after a failure.
    """
    import asyncio

    events = os.fdopen(events_fd, "wb", buffering=0)

    def send(**message: Any) -> None:
        events.write(json.dumps(message).encode() + b"\n")

    stop_requested: list[bool] = []
    loop_box: list[asyncio.AbstractEventLoop] = []
    stop_event_box: list[asyncio.Event] = []

    def watch_control() -> None:
        control = Input(control_fd)
        while True:
            line = control.readline()
            if not line:
                kill_group()  # the supervisor is gone: so is everything of ours
                return
            if line.strip() == b"stop":
                stop_requested.append(True)
                if loop_box and stop_event_box:
                    loop_box[0].call_soon_threadsafe(stop_event_box[0].set)

    threading.Thread(target=watch_control, name="lazycluster-control", daemon=True).start()

    async def run() -> None:
        from distributed.utils import import_term

        loop_box.append(asyncio.get_running_loop())
        stop_event = asyncio.Event()
        stop_event_box.append(stop_event)
        if stop_requested:
            return
        cls = import_term(request["cls"])
        options = dict(request["options"])
        if request.get("tls"):
            from distributed.security import Security

            options["security"] = Security(**request["tls"])
        server = cls(request["scheduler"], **options) if request.get("scheduler") else cls(
            **options)
        await server
        send(event="started", address=server.address,
             worker_address=getattr(server, "worker_address", server.address), pid=os.getpid())
        finished = asyncio.ensure_future(server.finished())
        stopping = asyncio.ensure_future(stop_event.wait())
        await asyncio.wait([finished, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await server.close()

    try:
        _apply_environment(request)
        asyncio.run(run())
    except BaseException:
        traceback.print_exc()
        send(event="error", message=traceback.format_exc())
        return 1
    return 0
