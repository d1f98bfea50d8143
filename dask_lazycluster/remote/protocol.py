"""What every remote action shares: stdin without locks, events, process groups.

stdin is the SSH channel. It is read with ``os.read`` through :class:`Input` only, never
through ``sys.stdin``: a buffered reader would read ahead (hiding data from ``select``) and a
thread blocked in it holds a lock that interpreter shutdown then cannot take.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

#: A line that ends a lifeline in order: the manager is alive and keeps the working dir.
BYE = b"bye"


class Input:
    """Lines and exact byte counts from a file descriptor (stdin by default).

    Args:
        fd: The descriptor to read.
    """

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.eof = False

    def fill(self) -> bool:
        """Read what is available (blocking once); return False at end of input."""
        if self.eof:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            return True
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def has_line(self) -> bool:
        """Whether a whole line is buffered already."""
        return b"\n" in self.buffer

    def readline(self) -> bytes:
        """Return the next line (with its newline); at end of input, what is left."""
        while b"\n" not in self.buffer and self.fill():
            pass
        end = self.buffer.find(b"\n") + 1 or len(self.buffer)
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line

    def read(self, size: int) -> bytes:
        """Return exactly ``size`` bytes, or fewer at end of input."""
        while len(self.buffer) < size and self.fill():
            pass
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def wait_readable(self, timeout: float) -> bool:
        """Whether a line is buffered or input arrives within ``timeout`` seconds."""
        if self.has_line() or self.eof:
            return True
        import select

        ready, _, _ = select.select([self.fd], [], [], timeout)
        return bool(ready)


def read_proc_net_tcp() -> str:
    """The listening-socket tables, so the manager needs no second round trip for ports.

    Returns:
        The text of ``/proc/net/tcp`` and ``/proc/net/tcp6`` (what exists of them).
    """
    text = ""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                text += f.read()
        except OSError:
            pass
    return text


def events_stream() -> BinaryIO:
    """Keep the real stdout for protocol messages and point fd 1 at stderr.

    User code (functions, Dask) may print freely: its output lands in the captured log and
    cannot corrupt the protocol.

    Returns:
        An unbuffered binary stream on the original stdout.
    """
    events = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


def emit(stream: BinaryIO, **message: Any) -> None:
    """Write one JSON message line to ``stream``.

    Args:
        stream: The events stream.
        **message: The message's fields.
    """
    stream.write(json.dumps(message).encode() + b"\n")


def parse_request(line: bytes) -> dict[str, Any] | None:
    """Decode a request line; None for ``bye``, an empty line or end of input.

    Args:
        line: The raw line.

    Returns:
        The request, or None.
    """
    stripped = line.strip()
    if not stripped or stripped == BYE:
        return None
    return dict(json.loads(stripped))


def remove_dir(path: str | None) -> None:
    """Remove a private temp working dir (the manager is gone: nobody else will).

    Args:
        path: The directory, or None for nothing to do.
    """
    if path:
        shutil.rmtree(path, ignore_errors=True)


def kill_group() -> None:
    """Kill this process and everything it started (its process group)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


def become_group_leader() -> None:
    """Own a process group, so a lifeline can kill everything this process starts."""
    try:
        os.setsid()
    except OSError:
        pass  # sshd made us a session leader already


def watch_lifeline(
    inp: Input, cleanup_dir: str | None, on_line: Callable[[bytes], None] | None = None
) -> None:
    """Watch the rest of ``inp`` in a thread; at its end kill the process group.

    The input is the SSH channel: it ends when the manager is done with us, dies or loses the
    host. An orderly end is announced by a ``bye`` line; without it the manager is gone, so the
    private temp working dir is removed too.

    Args:
        inp: The input; nobody else may read it from now on.
        cleanup_dir: The private temp working dir, or None.
        on_line: Called with every other line.
    """
    become_group_leader()

    def watch() -> None:
        orderly = False
        while True:
            line = inp.readline()
            if not line:
                break
            if line.strip() == BYE:
                orderly = True
            elif on_line is not None:
                on_line(line)
        if not orderly:
            remove_dir(cleanup_dir)
        kill_group()

    threading.Thread(target=watch, name="lazycluster-lifeline", daemon=True).start()


def exit_now(code: int = 0) -> None:
    """Flush and leave without interpreter shutdown (a lifeline thread may still be reading).

    Args:
        code: The exit status.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)
