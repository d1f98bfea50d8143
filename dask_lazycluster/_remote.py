"""Code that runs on the runtimes, not on the manager.

The manager starts ``python -c BOOTSTRAP`` over SSH and writes this file's source to its stdin,
then one JSON request line, then the request's payload. Requests, environment and pickles travel
over stdin, so nothing secret ever shows on a remote command line (``ps``). Only the standard
library is imported at module level: the remote may lack everything else.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from typing import Any, BinaryIO

# The remote command line: read N, then exec the next N bytes of stdin (this module).
BOOTSTRAP = "import sys;exec(sys.stdin.buffer.read(int(sys.stdin.buffer.readline())))"
RESULT_HEADER = b"LAZYCLUSTER-RESULT "


def _events_stream() -> BinaryIO:
    """Keep the real stdout for protocol messages and point fd 1 at stderr.

    User code (functions, Dask) may print freely; its output lands in the captured log.
    """
    events = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


def _emit(stream: BinaryIO, **message: Any) -> None:
    stream.write(json.dumps(message).encode() + b"\n")


def _read_proc_net_tcp() -> str:
    """The listening-socket tables, so the manager needs no second round trip for ports."""
    text = ""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                text += f.read()
        except OSError:
            pass
    return text


def probe(request: dict[str, Any]) -> None:
    """Print facts about this host as one JSON line."""
    import platform
    import shutil
    import socket
    import subprocess
    import tempfile

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        memory = 0
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5)
            gpus = [line for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            gpus = []
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            distributed = version("distributed")
        except PackageNotFoundError:
            distributed = None
    except ImportError:  # pragma: no cover - python < 3.8
        distributed = None
    info = {
        "os": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_cores": cores,
        "memory": memory,
        "python_version": platform.python_version(),
        "python": sys.executable,
        "gpus": gpus,
        "distributed_version": distributed,
        "tmp": tempfile.gettempdir(),
        "proc_net_tcp": _read_proc_net_tcp(),
        "pid": os.getpid(),
    }
    print(json.dumps(info), flush=True)
    if request.get("park"):
        _park(request)


def _park(request: dict[str, Any]) -> None:
    """Wait a while for a follow-up request, so this interpreter can serve it.

    A cluster started right after connecting asks the probe's interpreter to become its first
    warm process: one login shell and interpreter start-up fewer per host. Unclaimed, it ends.
    """
    # Nothing is sent before the manager has read the probe's line: select sees all input.
    follow_up = _next_request(request, timeout=float(request["park"]))
    if follow_up is None:
        sys.exit(0)
    dispatch(follow_up)


def _next_request(request: dict[str, Any], timeout: float | None = None) -> dict[str, Any] | None:
    """Read the next request line from stdin.

    Returns None when the manager said ``bye``, is gone (end of input: the private temp dir
    is removed too, nobody else will) or wrote nothing within ``timeout`` seconds.
    """
    if timeout is not None:
        import select

        ready, _, _ = select.select([sys.stdin.buffer], [], [], timeout)
        if not ready:
            return None
    line = sys.stdin.buffer.readline()
    if line.strip() and line.strip() != b"bye":
        return dict(json.loads(line))
    if not line and request.get("cleanup_dir"):  # manager gone without a word
        import shutil

        shutil.rmtree(request["cleanup_dir"], ignore_errors=True)
    return None


def run_function(request: dict[str, Any]) -> None:
    """Unpickle ``(function, kwargs)`` from stdin, call it and write the pickled outcome."""
    events = _events_stream()
    data = sys.stdin.buffer.read(int(request["size"]))
    _watch_lifeline(request)
    import cloudpickle

    try:
        function, kwargs = cloudpickle.loads(data)
        outcome: tuple[str, Any] = ("ok", function(**kwargs))
        payload = cloudpickle.dumps(outcome)
    except BaseException:
        traceback.print_exc()
        payload = cloudpickle.dumps(("error", traceback.format_exc()))
    sys.stderr.flush()
    events.write(RESULT_HEADER + str(len(payload)).encode() + b"\n" + payload)


def _watch_lifeline(request: dict[str, Any], on_line: Any = None) -> None:
    """Watch stdin in a thread: pass each line to ``on_line``; at its end kill the group.

    stdin is the SSH channel: it ends when the manager is done with us, dies or loses the host.
    An orderly end is announced by a ``bye`` line; without it the manager is gone, so the
    private temp working dir (``cleanup_dir``) is removed too: nobody else will.
    """
    try:
        os.setsid()  # own process group even when sshd did not make us a leader
    except OSError:
        pass

    stream = sys.stdin.buffer
    # Nobody else may touch stdin: a forked child (a worker) closing it would wait forever
    # for the lock this thread holds while it reads.
    sys.stdin = None

    def watch() -> None:
        orderly = False
        for line in stream:
            if line.strip() == b"bye":
                orderly = True
            elif on_line is not None:
                on_line(line)
        if not orderly and request.get("cleanup_dir"):
            import shutil

            shutil.rmtree(request["cleanup_dir"], ignore_errors=True)
        _kill_group()

    threading.Thread(target=watch, name="lazycluster-lifeline", daemon=True).start()


def _kill_group() -> None:
    """Kill this process and everything it started (same process group)."""
    import signal

    sys.stderr.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def serve(request: dict[str, Any]) -> None:
    """Run a Dask server (Nanny, Worker, ...) in this process until told to stop.

    A ``stop`` line on stdin closes it gracefully. End of stdin means the SSH channel is gone
    (cleanup, or the manager died): the whole process group is killed at once, so no worker
    outlives its manager.
    """
    import asyncio

    events = _events_stream()
    stop_requested: list[bool] = []
    loop_box: list[asyncio.AbstractEventLoop] = []
    stop_event_box: list[asyncio.Event] = []

    def on_line(line: bytes) -> None:
        if line.strip() == b"stop":
            stop_requested.append(True)
            if loop_box and stop_event_box:
                loop_box[0].call_soon_threadsafe(stop_event_box[0].set)

    _watch_lifeline(request, on_line)

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
        server = cls(request["scheduler"], **options)
        await server
        _emit(
            events,
            event="started",
            address=server.address,
            worker_address=getattr(server, "worker_address", server.address),
            pid=os.getpid(),
        )
        finished = asyncio.ensure_future(server.finished())
        stopping = asyncio.ensure_future(stop_event.wait())
        await asyncio.wait([finished, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await server.close()

    try:
        asyncio.run(run())
    except BaseException:
        _emit(events, event="error", message=traceback.format_exc())
        # Take a half-started worker process along: nothing of a failed server may linger.
        _kill_group()
    _emit(events, event="exited")
    # Take helpers along (a nanny's fork server): they hold the channel's pipes open.
    _kill_group()


def warm(request: dict[str, Any]) -> None:
    """Import distributed now, then wait for one serve request line and serve it.

    The manager starts these ahead of need, so a worker's start skips the interpreter start-up
    and imports. With ``forkserver`` (worker-start-method forkserver) the nanny's fork server
    is started ahead of need too.
    """
    try:
        os.setsid()
    except OSError:
        pass
    if request.get("forkserver"):  # before distributed reads its config
        os.environ["DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"] = "forkserver"

    def preload() -> None:
        try:
            import distributed  # noqa: F401

            if request.get("forkserver"):
                import multiprocessing.forkserver

                from distributed.utils import get_mp_context

                get_mp_context()  # registers distributed's preload list first
                multiprocessing.forkserver.ensure_running()
        except BaseException:
            pass  # serve() reports import problems with the full traceback

    loader = threading.Thread(target=preload, name="lazycluster-preload", daemon=True)
    loader.start()
    serve_request = _next_request(request)
    if serve_request is None:
        _kill_group()
        return
    loader.join()
    env = serve_request.pop("env", None) or {}
    os.environ.update(env)
    if any(key.startswith("DASK_") for key in env):
        import dask.config

        dask.config.refresh()
    serve({**request, **serve_request})


def _dial(address: str, port: int, timeout: float) -> bool:
    import socket

    try:
        socket.create_connection((address, port), timeout).close()
    except OSError:
        return False
    return True


def reachability(request: dict[str, Any]) -> None:
    """Test plain TCP between this host, the manager and the other hosts of the group.

    Prints ``{"out": bool, "port": int}``: whether the manager's listener was reachable, and
    the port of a listener on ``bind`` that the manager (inbound test) and the other hosts
    dial. Then, for each line ``{"dial": [[address, port], ...]}`` on stdin, dials those in
    parallel and prints ``{"dialed": [bool, ...]}``. Stdin's end (or ``wait`` seconds) ends it.
    """
    import socket

    timeout = float(request.get("timeout", 2))
    outbound = _dial(request["manager"], request["manager_port"], timeout)
    server = socket.socket()
    server.bind((request["bind"], 0))
    server.listen(64)

    def accept_all() -> None:
        while True:
            try:
                server.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=accept_all, daemon=True).start()
    print(json.dumps({"out": outbound, "port": server.getsockname()[1]}), flush=True)
    # The manager ends the test by closing stdin; a timer bounds it if it never does.
    threading.Timer(float(request.get("wait", 30)), os._exit, (0,)).start()
    for line in sys.stdin.buffer:
        targets = json.loads(line)["dial"]
        results = [False] * len(targets)

        def dial(i: int, address: str, port: int, into: list[bool] = results) -> None:
            into[i] = _dial(address, port, timeout)

        threads = [threading.Thread(target=dial, args=(i, a, p), daemon=True)
                   for i, (a, p) in enumerate(targets)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(json.dumps({"dialed": results}), flush=True)
    os._exit(0)  # the timer thread must not keep the process alive


def dispatch(request: dict[str, Any]) -> None:
    """Run one request: its environment and working dir first, then its action.

    Args:
        request: The decoded request line.
    """
    os.environ.update(request.get("env") or {})
    cwd = request.get("cwd")
    if cwd:
        os.makedirs(cwd, mode=0o700, exist_ok=True)
        os.chdir(cwd)
    actions = {"probe": probe, "function": run_function, "warm": warm, "reach": reachability}
    actions[request["action"]](request)


def main() -> None:
    """Read the request line from stdin and run the requested action."""
    dispatch(json.loads(sys.stdin.buffer.readline()))


if __name__ == "__main__":
    main()
