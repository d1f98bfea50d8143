"""Named clusters on the manager: the user's private directory, the records, the control socket.

Each named cluster has, in a directory only its user can enter (mode 0700), a JSON record
(``NAME.json``, mode 0600) and a Unix domain socket (``NAME.sock``, mode 0600) on which the
owning process answers requests, one JSON line in, one JSON document out. No network port is
opened, and the owner also checks the peer's user id on every connection.

The directory is ``~/.dask-lazycluster/<hostname>``: the home directory, because a session's
runtime directory (``$XDG_RUNTIME_DIR``) is unset in some processes of the same user (cron,
``sudo``, services) and removed at logout while a cluster started with ``nohup`` still runs;
the host name, because a home directory may be shared by several machines.

A record is *stale* when nobody listens on its socket any more (its owner was killed): the
kernel refuses the connection. Whoever notices removes it. A lock file serialises claiming a
name and removing a stale record; a random token per claim makes sure nobody removes a record
that a new owner has written since.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import secrets
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dask_lazycluster import exceptions
from dask_lazycluster.exceptions import (
    ClusterNameInUseError,
    LazyclusterError,
    StaleClusterError,
    UnknownClusterError,
)

NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# sun_path holds 108 bytes, the terminating NUL included.
SOCKET_PATH_MAX = 107
# Builtin errors a request may raise that are rebuilt as themselves on the caller's side.
BUILTIN_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e for e in (ValueError, TypeError, KeyError, TimeoutError, RuntimeError)}

Handler = Callable[..., Awaitable[Any]]


def check_name(name: object, argument: str = "name") -> str:
    """Return ``name`` if it can name a cluster (it becomes a file name), else raise.

    Args:
        name: The proposed name.
        argument: The argument's name, for the error.

    Returns:
        The name.

    Raises:
        ValueError: If it is not 1 to 64 letters, digits, ``.``, ``_`` or ``-`` starting with
            a letter or digit.
    """
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise ValueError(f"{argument} must be 1 to 64 letters, digits, '.', '_' or '-', starting "
                         f"with a letter or digit; got {name!r}")
    return name


def registry_dir(create: bool = False) -> Path:
    """The directory of this user's named clusters on this machine.

    Args:
        create: Create it (and its parent) with mode 0700 if missing.

    Returns:
        Its path.

    Raises:
        PermissionError: If it (or its parent) exists but is not a directory of this user.
    """
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
    path = Path.home() / ".dask-lazycluster" / host
    if create:
        for directory in (path.parent, path):
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o700)
            _make_private(directory)
    return path


def _make_private(path: Path) -> None:
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(f"{path} must be a directory of your own (named clusters keep "
                              f"their control sockets there): remove or fix it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


@dataclass
class Record:
    """What a named cluster's record file says.

    Attributes:
        name: The cluster name.
        pid: The owning process.
        token: Random per claim: tells this owner's record from a later one of the same name.
        started: When the name was claimed (seconds since the epoch).
        state: ``"starting"`` until the cluster serves requests, then ``"running"``.
        scheduler_address: The scheduler's address, once running.
        dashboard_link: The dashboard's link, once running.
        hosts: The cluster's hosts, once running.
    """

    name: str
    pid: int
    token: str
    started: float
    state: str = "starting"
    scheduler_address: str | None = None
    dashboard_link: str | None = None
    hosts: list[str] = field(default_factory=list)

    @property
    def socket_path(self) -> Path:
        """The owner's control socket."""
        return registry_dir() / f"{self.name}.sock"


def read_record(name: str) -> Record | None:
    """The record of ``name``, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads((registry_dir() / f"{name}.json").read_text())
        return Record(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # not ours, or from an incompatible version
        return None


def _write_record(record: Record) -> None:
    """Replace the record atomically; readers see the old or the new file, never a part."""
    directory = registry_dir()
    temporary = directory / f".{record.name}.{record.token}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f)
    os.replace(temporary, directory / f"{record.name}.json")


def _remove_files(name: str) -> None:
    for suffix in (".json", ".sock"):
        (registry_dir() / f"{name}{suffix}").unlink(missing_ok=True)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    fd = os.open(registry_dir(create=True) / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def owner_alive(path: Path) -> bool:
    """Whether a process listens on the control socket ``path`` (one local connect).

    A refused connection or a missing socket means its owner is gone; a listening owner that
    has not accepted yet (still starting, or busy) counts as alive.

    Args:
        path: The socket.

    Returns:
        True if a process listens there.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:  # its backlog is full: busy, not gone
        return True
    finally:
        probe.close()
    return True


def remove_if_stale(record: Record) -> bool:
    """Remove ``record`` (and its socket) if its owner is gone and nobody replaced it.

    Args:
        record: The record as read earlier.

    Returns:
        True if it was stale and is removed.
    """
    with _locked():
        current = read_record(record.name)
        if current is None or current.token != record.token or owner_alive(record.socket_path):
            return False
        _remove_files(record.name)
        return True


def live_records() -> list[Record]:
    """Records of running clusters, by name; stale ones found on the way are removed."""
    directory = registry_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.json")):
        record = read_record(path.stem)
        if record is None:
            continue
        if owner_alive(record.socket_path):
            found.append(record)
        else:
            remove_if_stale(record)
    return found


def find_record(name: str) -> Record:
    """The record of the running cluster ``name``.

    Args:
        name: The cluster name.

    Returns:
        Its record.

    Raises:
        ValueError: If ``name`` cannot name a cluster.
        UnknownClusterError: If no cluster of that name is recorded.
        StaleClusterError: If its owner is gone (the record is removed).
    """
    check_name(name)
    record = read_record(name)
    if record is None:
        raise UnknownClusterError(name, str(registry_dir()))
    if not owner_alive(record.socket_path):
        remove_if_stale(record)
        raise StaleClusterError(name, record.pid)
    return record


# -- the owner's side ---------------------------------------------------------------------------


class Registration:
    """One process's claim on a cluster name, and the control socket it serves requests on.

    Args:
        name: The cluster name.

    Raises:
        ValueError: If ``name`` cannot name a cluster.
    """

    def __init__(self, name: str) -> None:
        self.name = check_name(name)
        self.record: Record | None = None
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._handlers: dict[str, Handler] = {}

    def claim(self) -> None:
        """Take the name: bind its socket and write a ``starting`` record (no network work).

        Raises:
            ClusterNameInUseError: If a running cluster has the name.
            ValueError: If the socket's path is too long for a Unix socket.
        """
        if self.record is not None:
            return  # ours already
        path = registry_dir(create=True) / f"{self.name}.sock"
        if len(os.fsencode(path)) > SOCKET_PATH_MAX:
            raise ValueError(f"the control socket path {path} is longer than a Unix socket "
                             f"allows ({SOCKET_PATH_MAX} bytes): choose a shorter cluster name")
        with _locked():
            if owner_alive(path):
                old = read_record(self.name)
                raise ClusterNameInUseError(self.name, old.pid if old else -1)
            _remove_files(self.name)  # a stale record, if any
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(path))
                os.chmod(path, 0o600)
                sock.listen(64)
                self.record = Record(self.name, os.getpid(), secrets.token_hex(8), time.time())
                _write_record(self.record)
            except BaseException:
                sock.close()
                _remove_files(self.name)
                raise
            self._sock = sock

    async def serve(self, handlers: dict[str, Handler], **details: Any) -> None:
        """Answer requests on the current event loop; record the cluster as running.

        Args:
            handlers: Operation name to a coroutine function taking the request's fields.
            **details: Record fields to set (``scheduler_address``, ``dashboard_link``,
                ``hosts``).
        """
        assert self._sock is not None and self.record is not None
        self._handlers = handlers
        self._server = await asyncio.start_unix_server(self._handle, sock=self._sock)
        self._sock = None  # the server owns it now
        with _locked():
            current = read_record(self.name)
            if current is not None and current.token == self.record.token:
                self.record.state = "running"
                for key, value in details.items():
                    setattr(self.record, key, value)
                _write_record(self.record)

    def release(self) -> None:
        """Stop answering and remove the record and socket, if they are still ours (idempotent).

        Requests being answered finish.
        """
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        record, self.record = self.record, None
        if record is not None:
            with _locked():
                current = read_record(self.name)
                if current is not None and current.token == record.token:
                    _remove_files(self.name)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _same_user(writer):
                return
            line = await reader.readline()
            if line:
                writer.write(json.dumps(await self._answer(line)).encode())
                await writer.drain()
        except (ConnectionError, ValueError):  # the caller went away, or sent too much
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op = request.pop("op")
            handler = self._handlers.get(op)
            if handler is None:
                raise ValueError(f"unknown request {op!r}")
            return {"ok": True, "result": await handler(**request)}
        except Exception as exc:
            return {"ok": False, "error": encode_error(exc)}


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer runs as this user (Linux ``SO_PEERCRED``; elsewhere the mode decides)."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    sock = writer.get_extra_info("socket")
    if peercred is None or sock is None:
        return True
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred, 12))
    return bool(uid == os.geteuid())


def encode_error(exc: BaseException) -> dict[str, Any]:
    """An exception as JSON: its class, message and plain attributes.

    Args:
        exc: The exception.

    Returns:
        ``{"type", "module", "message", "attrs"}``.
    """
    attrs = {}
    for key, value in vars(exc).items():
        with contextlib.suppress(TypeError, ValueError):
            json.dumps(value)
            attrs[key] = value
    return {"type": type(exc).__name__, "module": type(exc).__module__, "message": str(exc),
            "attrs": attrs}


def decode_error(error: dict[str, Any]) -> Exception:
    """The exception ``encode_error`` described, to raise on the caller's side.

    The same class where it is one of ours or a plain builtin error, else a
    ``LazyclusterError`` quoting it.

    Args:
        error: The encoded exception.

    Returns:
        The exception to raise.
    """
    name, message = str(error.get("type")), str(error.get("message"))
    cls: Any = None
    if error.get("module") == exceptions.__name__:
        cls = getattr(exceptions, name, None)
        if not (isinstance(cls, type) and issubclass(cls, LazyclusterError)):
            cls = None
    elif error.get("module") == "builtins":
        cls = BUILTIN_ERRORS.get(name)
    if cls is None:
        return LazyclusterError(f"{name}: {message}")
    # Rebuilt without __init__ (ours take other arguments): same message and attributes.
    exc: Exception = cls.__new__(cls, message)
    exc.__dict__.update(error.get("attrs") or {})
    return exc


# -- the caller's side --------------------------------------------------------------------------


async def request(record: Record, op: str, timeout: float | None = None, **fields: Any) -> Any:
    """Send one request to a cluster's owner and return its answer.

    Args:
        record: The cluster's record.
        op: The operation (``info``, ``connect``, ``scale``, ``adapt``, ``logs``, ``close``).
        timeout: Seconds to wait for the answer; None waits as long as it takes.
        **fields: The operation's arguments (JSON-serialisable).

    Returns:
        The owner's result (None for a ``close`` whose owner ended before answering).

    Raises:
        StaleClusterError: If the owner is gone (its record is removed).
        TimeoutError: If the owner does not answer within ``timeout``.
        LazyclusterError: If it ended the connection without an answer.
        Exception: What the operation raised in the owner (see ``decode_error``).
    """
    message = json.dumps({"op": op, **fields}).encode() + b"\n"  # TypeError before connecting
    try:
        reader, writer = await asyncio.open_unix_connection(str(record.socket_path))
    except (ConnectionRefusedError, FileNotFoundError):
        remove_if_stale(record)
        raise StaleClusterError(record.name, record.pid) from None
    try:
        writer.write(message)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionError:
        data = b""
    finally:
        writer.close()
    if not data:
        if op == "close":
            return None  # the owner closed and ended at once
        if not owner_alive(record.socket_path):
            remove_if_stale(record)
            raise StaleClusterError(record.name, record.pid)
        raise LazyclusterError(f"cluster {record.name!r} (process {record.pid}) ended the "
                               f"connection without answering {op!r}")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise decode_error(reply.get("error") or {})
    return reply.get("result")
