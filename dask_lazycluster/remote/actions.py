"""One-shot actions run on a host, and the entry point that dispatches a request.

The manager starts the bootstrap over SSH, writes the bundle, then one JSON request line and
the request's payload. Requests, environment and pickles travel over stdin, so nothing secret
ever shows on a remote command line (``ps``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from typing import Any

from .protocol import (
    Input,
    events_stream,
    exit_now,
    parse_request,
    read_proc_net_tcp,
    remove_dir,
    watch_lifeline,
)

RESULT_HEADER = b"LAZYCLUSTER-RESULT "


def _cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), if one is set."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: the unified hierarchy
            candidates = [f"/sys/fs/cgroup{path}/memory.max",
                          f"/sys/fs/cgroup/unified{path}/memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"]
        else:
            continue
        for candidate in candidates:
            try:
                with open(candidate) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text.isdigit():
                limits.append(int(text))
    return min(limits) if limits else None


def host_memory() -> int:
    """Memory this host's processes may use: physical memory, capped by a cgroup limit."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        memory = 0
    limit = _cgroup_memory_limit()
    return min(memory, limit) if limit and memory else (limit or memory)


def probe(request: dict[str, Any], inp: Input) -> None:
    """Print facts about this host as one JSON line, then park (see :func:`_park`)."""
    import platform
    import shutil
    import socket
    import subprocess
    import tempfile

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
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
            distributed: str | None = version("distributed")
        except PackageNotFoundError:
            distributed = None
    except ImportError:  # pragma: no cover - python < 3.8
        distributed = None
    info = {
        "os": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_cores": cores,
        "memory": host_memory(),
        "python_version": platform.python_version(),
        "python": sys.executable,
        "gpus": gpus,
        "distributed_version": distributed,
        "tmp": tempfile.gettempdir(),
        "proc_net_tcp": read_proc_net_tcp(),
        "pid": os.getpid(),
    }
    print(json.dumps(info), flush=True)
    if request.get("park"):
        _park(request, inp)


def _park(request: dict[str, Any], inp: Input) -> None:
    """Wait a while for a follow-up request, so this interpreter can serve it.

    A cluster started right after connecting asks the probe's interpreter to become the host's
    supervisor: one login shell and interpreter start-up fewer per host. Unclaimed, it ends.
    """
    if not inp.wait_readable(float(request["park"])):
        exit_now(0)
    line = inp.readline()
    follow_up = parse_request(line)
    if follow_up is None:
        if not line:  # manager gone without a word
            remove_dir(request.get("cleanup_dir"))
        exit_now(0)
        return
    dispatch(follow_up, inp)


def run_function(request: dict[str, Any], inp: Input) -> None:
    """Unpickle ``(function, kwargs)`` from stdin, call it and write the pickled outcome."""
    events = events_stream()
    data = inp.read(int(request["size"]))
    watch_lifeline(inp, request.get("cleanup_dir"))
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
    exit_now(0)


def _dial(address: str, port: int, timeout: float) -> bool:
    import socket

    try:
        socket.create_connection((address, port), timeout).close()
    except OSError:
        return False
    return True


def reachability(request: dict[str, Any], inp: Input) -> None:
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
    threading.Timer(float(request.get("wait", 30)), exit_now, (0,)).start()
    while True:
        line = inp.readline()
        if not line.strip():
            break
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
    exit_now(0)


def supervise(request: dict[str, Any], inp: Input) -> None:
    """Become the host's supervisor (see :mod:`.supervisor`)."""
    from .supervisor import Supervisor

    Supervisor(request, inp, events_stream()).run()


def dispatch(request: dict[str, Any], inp: Input) -> None:
    """Run one request: its environment and working dir first, then its action.

    Args:
        request: The decoded request line.
        inp: stdin, positioned after the request line.
    """
    os.environ.update(request.get("env") or {})
    cwd = request.get("cwd")
    if cwd:
        os.makedirs(cwd, mode=0o700, exist_ok=True)
        os.chdir(cwd)
    actions = {"probe": probe, "function": run_function, "reach": reachability,
               "supervise": supervise}
    actions[request["action"]](request, inp)
    exit_now(0)


def main() -> None:
    """Read the request line from stdin and run the requested action."""
    inp = Input()
    request = parse_request(inp.readline())
    if request is None:
        exit_now(0)
        return
    dispatch(request, inp)
