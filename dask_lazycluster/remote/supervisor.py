"""The per-host supervisor: the parent of every Dask process a cluster runs on a host.

One supervisor runs per host (and interpreter) over one SSH session. It imports
``distributed`` once, then starts each Dask server by forking itself, so a new worker costs
no interpreter start-up and no import, and no spare process waits idle beside it.

Requests (JSON lines on stdin, the SSH channel)::

    {"op": "start", "id": ..., "cls": ..., "scheduler": ..., "options": {...}, "env": {...},
     "tls": {...} | null, "cwd": ...}
    {"op": "stop", "id": ..., "grace": seconds}   graceful close, killed after ``grace``
    {"op": "kill", "id": ...}
    {"op": "ports", "req": n}                     the listening-socket tables
    {"op": "ping"}                                the manager is alive
    {"op": "preload", "modules": [...]}           import modules ahead of need
    {"op": "shutdown", "remove_dir": path | null} stop everything, then remove the dir

Events (JSON lines on stdout): ``ready`` (once distributed is imported, or with an
``error``), ``started``/``error``/``log``/``exited`` with the server's ``id``, ``ports`` with
the request's ``req``, and ``bye`` after a shutdown.

The lifeline: when stdin ends without a shutdown (the manager died, the link is gone past
keepalive), or nothing arrives for ``silence`` seconds although the manager pings every few
seconds (a manager that lost its network while sshd keeps the channel open), every process
group is killed, the private temp working dir is removed once
every child has exited, and the supervisor exits. Each child watches a pipe from the
supervisor the same way, so a killed supervisor takes its children along.
"""

from __future__ import annotations

import collections
import json
import os
import selectors
import signal
import sys
import time
import traceback
from typing import Any, BinaryIO

from .protocol import BYE, Input, emit, read_proc_net_tcp, remove_dir

#: Output lines of a server kept for its ``exited`` event.
TAIL_LINES = 40
#: Seconds to wait for killed children to be reaped before giving up on them.
REAP_TIMEOUT = 10.0


class _Child:
    """One forked Dask server and its pipes."""

    def __init__(self, ident: str, pid: int, out_fd: int, ev_fd: int, ctl_fd: int) -> None:
        self.id = ident
        self.pid = pid
        self.out_fd = out_fd
        self.ev_fd = ev_fd
        self.ctl_fd = ctl_fd
        self.open_fds = {out_fd, ev_fd}
        self.buffers: dict[int, bytes] = {out_fd: b"", ev_fd: b""}
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.kill_at: float | None = None
        self.code: int | None = None

    @property
    def done(self) -> bool:
        """Reaped, and its pipes read to the end."""
        return self.code is not None and not self.open_fds


class Supervisor:
    """Run the supervisor loop for one request (see the module docstring).

    Args:
        request: The ``supervise`` request (``cleanup_dir``: the private temp working dir).
        inp: stdin, positioned after the request.
        events: The stream for events (the real stdout).
    """

    def __init__(self, request: dict[str, Any], inp: Input, events: BinaryIO) -> None:
        self.request = request
        self.inp = inp
        self.events = events
        self.children: dict[str, _Child] = {}
        self.selector = selectors.DefaultSelector()
        self.import_error: str | None = None
        self.manager_gone = False

    # -- set-up --------------------------------------------------------------------------------

    def _import(self) -> None:
        try:
            import distributed  # noqa: F401  (every forked server finds it imported)
        except BaseException:
            self.import_error = traceback.format_exc()

    def run(self) -> None:
        """Serve requests until shutdown or the end of the lifeline."""
        started = time.monotonic()
        self._import()
        self.emit(event="ready", pid=os.getpid(), python=sys.executable,
                  error=self.import_error, import_seconds=round(time.monotonic() - started, 3))
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        # SIGCHLD wakes select through this pipe; the handler itself needs to do nothing.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(wake_w)
        self.selector.register(self.inp.fd, selectors.EVENT_READ, "stdin")
        self.selector.register(wake_r, selectors.EVENT_READ, "wake")
        self.wake_fd = wake_r
        remove = self.request.get("cleanup_dir")
        # The manager pings; silence this long means it is gone even if the channel stays
        # open (a manager that lost its network, with sshd not probing its clients).
        silence = float(self.request.get("silence") or 0)
        self.heard = time.monotonic()
        while True:
            outcome = self._handle_lines()
            if outcome is not None:
                remove = outcome
                break
            if self.inp.eof or (silence and time.monotonic() - self.heard > silence):
                self.manager_gone = True
                break
            self._wait_and_dispatch(silence)
        self._shutdown(remove)

    def emit(self, **message: Any) -> None:
        """Send an event to the manager; a vanished manager is noticed by the lifeline."""
        try:
            emit(self.events, **message)
        except OSError:
            self.manager_gone = True

    # -- the loop ------------------------------------------------------------------------------

    def _handle_lines(self) -> str | None:
        """Handle every buffered request line.

        Returns:
            None to go on; on shutdown the dir to remove ("" for none).
        """
        while self.inp.has_line():
            line = self.inp.readline()
            if line.strip() == BYE:
                return ""  # orderly end: keep the working dir
            if not line.strip():
                continue
            request = json.loads(line)
            op = request.get("op")
            if op == "shutdown":
                return str(request.get("remove_dir") or "")
            try:
                getattr(self, f"_op_{op}")(request)
            except Exception:
                self.emit(event="error", id=request.get("id"), message=traceback.format_exc())
                if op == "start":  # no child came of it (fork failed): say it ended too
                    self.emit(event="exited", id=request.get("id"), code=1, tail=[])
        return None

    def _wait_and_dispatch(self, silence: float) -> None:
        deadlines = [c.kill_at for c in self.children.values() if c.kill_at is not None]
        if silence:
            deadlines.append(self.heard + silence)
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for key, _ in self.selector.select(timeout):
            if key.data == "stdin":
                if self.inp.fill():
                    self.heard = time.monotonic()
            elif key.data == "wake":
                self._drain_wake()
                self._reap()
            else:
                self._read_child(key.data, key.fd)
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.kill_at is not None and child.kill_at <= now:
                child.kill_at = None
                self._kill(child)

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_fd, 512):
                pass
        except BlockingIOError:
            pass

    # -- operations ----------------------------------------------------------------------------

    def _op_start(self, request: dict[str, Any]) -> None:
        ident = str(request["id"])
        if self.import_error is not None:
            self.emit(event="error", id=ident, message=self.import_error)
            self.emit(event="exited", id=ident, code=1, tail=[])
            return
        out_r, out_w = os.pipe()
        ev_r, ev_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            _child_main(request, out_w, ev_w, ctl_r)
        for fd in (out_w, ev_w, ctl_r):
            os.close(fd)
        child = _Child(ident, pid, out_r, ev_r, ctl_w)
        self.children[ident] = child
        for fd in (out_r, ev_r):
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ, child)

    def _op_stop(self, request: dict[str, Any]) -> None:
        child = self.children.get(str(request["id"]))
        if child is None or child.code is not None:
            return
        try:
            os.write(child.ctl_fd, b"stop\n")
        except OSError:
            pass
        child.kill_at = time.monotonic() + float(request.get("grace", 10))

    def _op_kill(self, request: dict[str, Any]) -> None:
        child = self.children.get(str(request["id"]))
        if child is not None:
            self._kill(child)

    def _op_preload(self, request: dict[str, Any]) -> None:
        """Import modules now, so servers forked later find them imported."""
        import importlib

        for module in request.get("modules") or []:
            try:
                importlib.import_module(str(module))
            except Exception:
                pass  # the server that needs it reports the error with its traceback

    def _op_ping(self, request: dict[str, Any]) -> None:
        """The manager is alive (noted when its line was read): nothing else to do."""

    def _op_ports(self, request: dict[str, Any]) -> None:
        self.emit(event="ports", req=request.get("req"), proc_net_tcp=read_proc_net_tcp())

    # -- children ------------------------------------------------------------------------------

    @staticmethod
    def _kill(child: _Child) -> None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except OSError:
            pass  # the group is gone already

    def _read_child(self, child: _Child, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close_fd(child, fd)
            return
        data = child.buffers[fd] + chunk
        *lines, child.buffers[fd] = data.split(b"\n")
        for raw in lines:
            self._child_line(child, fd, raw)

    def _child_line(self, child: _Child, fd: int, raw: bytes) -> None:
        if fd == child.ev_fd:
            try:
                message = json.loads(raw)
            except ValueError:
                return
            self.emit(id=child.id, **message)
            return
        line = raw.decode(errors="replace")
        child.tail.append(line)
        self.emit(event="log", id=child.id, line=line)

    def _close_fd(self, child: _Child, fd: int) -> None:
        rest = child.buffers.get(fd, b"")
        if rest:
            self._child_line(child, fd, rest)
            child.buffers[fd] = b""
        if fd in child.open_fds:
            child.open_fds.discard(fd)
            self.selector.unregister(fd)
            os.close(fd)
        self._finish_if_done(child)

    def _reap(self) -> None:
        by_pid = {c.pid: c for c in self.children.values()}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = by_pid.get(pid)
            if child is None:
                continue
            child.code = os.waitstatus_to_exitcode(status)
            # Take along whatever it left running (a nanny's worker, a fork server).
            self._kill(child)
            self._finish_if_done(child)

    def _finish_if_done(self, child: _Child) -> None:
        if not child.done or child.id not in self.children:
            return
        del self.children[child.id]
        try:
            os.close(child.ctl_fd)
        except OSError:
            pass
        self.emit(event="exited", id=child.id, code=child.code, tail=list(child.tail))

    # -- the end -------------------------------------------------------------------------------

    def _shutdown(self, remove: str | None) -> None:
        """Kill every child, wait until each has exited, then remove the dir and say bye."""
        for child in list(self.children.values()):
            self._kill(child)
        deadline = time.monotonic() + REAP_TIMEOUT
        while self.children and time.monotonic() < deadline:
            for key, _ in self.selector.select(0.2):
                if key.data == "wake":
                    self._drain_wake()
                elif isinstance(key.data, _Child):
                    self._read_child(key.data, key.fd)
            self._reap()
        if self.manager_gone:
            remove = self.request.get("cleanup_dir")
        remove_dir(remove or None)
        if not self.manager_gone:
            self.emit(event="bye")


def _child_main(request: dict[str, Any], out_w: int, ev_w: int, ctl_r: int) -> None:
    """In the forked child: own process group, own pipes, then run the server and exit."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.dup2(ev_w, 3)
        os.dup2(ctl_r, 4)
        # Nothing of the supervisor's may stay open here: stdin (the SSH channel), the
        # selector, other children's pipes.
        os.closerange(5, 65536)
        from .server import run_server

        code = run_server(request, events_fd=3, control_fd=4)
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)
