"""One SSH host as a runtime (:class:`Runtime`) and the work run on it (:class:`RuntimeTask`).

Every method of :class:`Runtime` is a thin sync wrapper over a coroutine that runs on the
private SSH loop (see ``_loop``); the cluster layer awaits the coroutines directly.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import cloudpickle

from dask_lazycluster import _remote
from dask_lazycluster._batching import batch_writes
from dask_lazycluster._loop import get_loop, on_loop, run_sync
from dask_lazycluster._process import RemoteProcess, _say_bye, _tail
from dask_lazycluster._relay import relay_factory
from dask_lazycluster._task import RuntimeTask
from dask_lazycluster.exceptions import (
    InvalidRuntimeError,
    LazyclusterError,
    NoPortsLeftError,
    PortInUseError,
    TaskExecutionError,
)
from dask_lazycluster.utils import parse_listening_ports, validate_port, validate_ports

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
# How long a probe's interpreter waits to become the first warm process (see ``_take_parked``),
# and how much sooner than that the manager stops counting on it (the two clocks race).
PROBE_PARK_SECONDS = 30.0
_PARK_MARGIN = 5.0
# AES-GCM measured ~1.3x the default cipher's tunnel throughput here; keep the rest as fallback.
_PREFERRED_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
_REMOTE_SOURCE = Path(_remote.__file__).read_bytes()
_SOURCE_PREFIX = str(len(_REMOTE_SOURCE)).encode() + b"\n" + _REMOTE_SOURCE  # what BOOTSTRAP reads
# Runs a task command read from stdin; a watcher on the rest of stdin kills the whole process
# group when the SSH channel closes. (Background jobs get /dev/null as stdin unless redirected
# explicitly, hence fd 3.)
# $2 is the private temp working dir, removed when the manager vanished ('' otherwise).
_COMMAND_WRAPPER = (
    's=$(head -c "$1"); exec 3<&0; (cat <&3 >/dev/null; [ -n "$2" ] && rm -rf "$2"; kill -KILL 0) & '
    'w=$!; (eval "$s") </dev/null 3<&-; rc=$?; kill $w 2>/dev/null; exit $rc'
)

_live_runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()


def _cipher_preference() -> list[str]:
    defaults = [alg.decode() for alg in asyncssh.encryption.get_default_encryption_algs()]
    return _PREFERRED_CIPHERS + [alg for alg in defaults if alg not in _PREFERRED_CIPHERS]


def _describe_connect_error(exc: BaseException, timeout: float) -> str:
    """Turn a connection failure into words a user can act on."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return f"timed out after {timeout:g} s while connecting"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is sshd running on that port?)"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"host key not verified: {exc.reason} (add the host to ~/.ssh/known_hosts)"
    if isinstance(exc, asyncssh.PermissionDenied):
        return f"authentication failed: {exc.reason}"
    if isinstance(exc, asyncssh.DisconnectError):
        return f"SSH connection failed: {exc.reason}"
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


class _LifelineClient(asyncssh.SSHClient):
    """Tells its runtime when the connection drops (the runtime may be gone already)."""

    def __init__(self, runtime: weakref.ref[Runtime]) -> None:
        self._runtime = runtime

    def connection_lost(self, exc: Exception | None) -> None:
        runtime = self._runtime()
        if runtime is not None:
            runtime._connection_lost(exc)


#: Seconds a reachability test may keep its remote listener open at most.
REACH_WAIT = 30


class _Reach:
    """One host's part of the plain-TCP test (``tunnel="auto"``); see Runtime._reach_start."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.process: asyncssh.SSHClientProcess[bytes] | None = None
        self.port: int | None = None
        self.outbound = False
        self.inbound = False

    @property
    def both_ways(self) -> bool:
        """Whether the host and the manager reached each other."""
        return self.outbound and self.inbound

    async def dial(self, targets: list[tuple[str, int]], timeout: float) -> list[bool] | None:
        """Have the host dial ``(address, port)`` targets; None if it could not answer."""
        if self.process is None or self.port is None:
            return None
        try:
            self.process.stdin.write(json.dumps({"dial": targets}).encode() + b"\n")
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout + 5)
            return [bool(ok) for ok in json.loads(line)["dialed"]]
        except (asyncio.TimeoutError, ValueError, KeyError, OSError, asyncssh.Error):
            return None

    def close(self) -> None:
        """End the remote test process (its listener goes with it)."""
        if self.process is not None:
            self.process.close()


class Runtime:
    """A host reachable by SSH, used to run tasks, Dask processes and port forwards.

    ``host`` resolves exactly as ``ssh host`` would: ``~/.ssh/config`` (HostName, User, Port,
    IdentityFile, ...), ``~/.ssh/known_hosts``, keys and the agent. One SSH connection is opened
    at construction, validated with a probe, and reused by everything.

    Args:
        host: The SSH host name or alias.
        working_dir: Remote working directory; a private temp dir (removed at cleanup) if None.
        connect_options: Extra keyword arguments for ``asyncssh.connect`` (they win over
            ``~/.ssh/config``), e.g. ``{"username": "me", "port": 2222}``. ``connect_timeout``
            (seconds, default 10) bounds the whole validation.
        python: The remote python; default: the manager's ``sys.executable`` if it exists on
            the host, else ``python3``, else ``python``.

    Raises:
        InvalidRuntimeError: If the host cannot be connected to, authenticated against, its host
            key cannot be verified, no python is found or the working dir cannot be created.
        TypeError: If an argument has the wrong type.
    """

    def __init__(
        self,
        host: str,
        working_dir: str | None = None,
        connect_options: dict[str, Any] | None = None,
        python: str | None = None,
    ) -> None:
        self._setup(host, working_dir, connect_options, python)
        run_sync(self._connect())

    @classmethod
    async def _create(
        cls,
        host: str,
        working_dir: str | None = None,
        connect_options: dict[str, Any] | None = None,
        python: str | None = None,
    ) -> Runtime:
        """Build and connect a runtime on the SSH loop (used to validate many in parallel)."""
        runtime = cls.__new__(cls)
        runtime._setup(host, working_dir, connect_options, python)
        await runtime._connect()
        return runtime

    def _setup(
        self,
        host: str,
        working_dir: str | None,
        connect_options: dict[str, Any] | None,
        python: str | None,
    ) -> None:
        if not isinstance(host, str) or not host.strip():
            raise TypeError(f"host must be a non-empty str, got {host!r}")
        if working_dir is not None and not isinstance(working_dir, str):
            raise TypeError(f"working_dir must be a str or None, got {working_dir!r}")
        if connect_options is not None and not isinstance(connect_options, dict):
            raise TypeError(f"connect_options must be a dict or None, got {connect_options!r}")
        if python is not None and (not isinstance(python, str) or not python.strip()):
            raise TypeError(f"python must be a non-empty str or None, got {python!r}")
        self._host = host
        self._requested_wd = working_dir
        self._connect_options = dict(connect_options or {})
        self._requested_python = python
        self._conn: asyncssh.SSHClientConnection | None = None
        self._info: dict[str, Any] = {}
        self._env: dict[str, str] = {}
        self._wd: str | None = working_dir
        self._wd_is_temp = working_dir is None
        self._wd_ready = False
        self._forwards: dict[int, asyncssh.SSHListener] = {}
        self._servers: set[RemoteProcess] = set()
        self._warm: list[tuple[str | None, asyncio.Future[RemoteProcess]]] = []
        # Logs of ended servers stay readable by print_log() (bounded: scale cycles add many).
        self._finished_servers: collections.deque[RemoteProcess] = collections.deque(maxlen=100)
        self._tasks: list[RuntimeTask] = []
        self._closed = False
        self._lost = False
        self._probed_ports: tuple[float, set[int]] = (float("-inf"), set())
        self._parked: tuple[float, RemoteProcess] | None = None
        self._parked_pid = 0
        self._listeners: list[Callable[[str, bool], None]] = []
        self._reconnector: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected"
        return f"<Runtime {self._host!r} ({state})>"

    # -- connection -------------------------------------------------------------------------

    def _ssh_options(self) -> tuple[dict[str, Any], float]:
        options = dict(self._connect_options)
        timeout = float(options.pop("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        options.setdefault("encryption_algs", _cipher_preference())
        # A dead host or link is noticed within ~6 s, so its work is rescheduled quickly.
        options.setdefault("keepalive_interval", 2)
        options.setdefault("keepalive_count_max", 3)
        if options.get("known_hosts", ()) is None:
            logger.warning("host key checking is OFF for %s (known_hosts=None): the connection "
                           "can be intercepted", self._host)
        ref = weakref.ref(self)
        options["client_factory"] = lambda: _LifelineClient(ref)
        return options, timeout

    async def _open_connection(
        self, options: dict[str, Any], timeout: float
    ) -> asyncssh.SSHClientConnection:
        conn = await asyncio.wait_for(asyncssh.connect(self._host, **options), timeout)
        batch_writes(conn)
        return conn

    async def _connect(self) -> None:
        options, timeout = self._ssh_options()
        try:
            self._conn = await self._open_connection(options, timeout)
        except Exception as exc:
            raise InvalidRuntimeError(self._host, _describe_connect_error(exc, timeout)) from exc
        try:
            await asyncio.wait_for(self._probe(), timeout)
        except BaseException as exc:
            self._closed = True  # a failed probe is no lost connection: do not reconnect
            self._conn.close()
            if isinstance(exc, InvalidRuntimeError):
                raise
            if isinstance(exc, asyncio.TimeoutError | TimeoutError):
                raise InvalidRuntimeError(self._host, f"probe timed out after {timeout:g} s") from exc
            if isinstance(exc, asyncssh.Error | OSError):
                raise InvalidRuntimeError(self._host, f"probe failed: {exc}") from exc
            raise
        _live_runtimes.add(self)

    def _python_command(self, python: str | None = None) -> str:
        """Shell command that execs the remote python (``python`` or the probed one)."""
        boot = shlex.quote(_remote.BOOTSTRAP)
        chosen = python or self._info.get("python")
        if chosen:
            return f"exec {shlex.quote(chosen)} -c {boot}"
        candidates = [self._requested_python] if self._requested_python else [
            sys.executable, "python3", "python"]
        quoted = " ".join(shlex.quote(c) for c in candidates)
        return (
            f'for p in {quoted}; do if command -v "$p" >/dev/null 2>&1; then exec "$p" -c {boot}; '
            f'fi; done; echo "no python found (tried: {" ".join(candidates)})" >&2; exit 127'
        )

    def _request_line(self, action: str, env: dict[str, str] | None = None, **fields: Any) -> bytes:
        """One request for the remote module (:func:`_remote.dispatch`), as a JSON line."""
        header = {"action": action, "env": {**self._env, **(env or {})},
                  "cleanup_dir": self._wd if self._wd_is_temp else None, **fields}
        return json.dumps(header).encode() + b"\n"

    def _request(self, action: str, env: dict[str, str] | None = None, **fields: Any) -> bytes:
        """The bytes to write to a bootstrapped python: this module's source, then the request."""
        return _SOURCE_PREFIX + self._request_line(action, env, **fields)

    async def _probe(self) -> None:
        assert self._conn is not None
        process = await self._conn.create_process(self._python_command(), encoding=None)
        process.stdin.write(self._request("probe", park=PROBE_PARK_SECONDS))
        line = b""
        while not line.startswith(b"{"):  # skip anything a login script printed
            line = await process.stdout.readline()
            if not line:
                break
        if not line:
            result = await process.wait()
            stderr = result.stderr if isinstance(result.stderr, bytes) else b""
            what = self._requested_python or "python"
            raise InvalidRuntimeError(
                self._host,
                f"cannot run {what!r} (exit {result.exit_status}): "
                f"{stderr.decode(errors='replace').strip()[-500:]}",
            )
        self._info = json.loads(line)
        # The probe's interpreter waits a while: the first warm process can be this one.
        parked = RemoteProcess(self, process, "probe", False, self._info["python"])
        self._servers.add(parked)
        self._parked = (time.monotonic(), parked)
        self._parked_pid = int(self._info.pop("pid"))
        self._probed_ports = (time.monotonic(), parse_listening_ports(self._info.pop("proc_net_tcp")))
        if self._wd is None:
            self._wd = f"{self._info['tmp']}/lazycluster-{uuid.uuid4().hex[:12]}"
        else:
            await self._ensure_working_dir()

    @property
    def _connection(self) -> asyncssh.SSHClientConnection:
        if self._conn is None or self._closed:
            raise LazyclusterError(f"runtime {self._host!r} is closed")
        if self._lost:
            raise LazyclusterError(
                f"the SSH connection to host {self._host!r} is lost; reconnecting in the background"
            )
        return self._conn

    @property
    def is_alive(self) -> bool:
        """Whether the SSH connection is up (False while lost and reconnecting, or closed)."""
        return not self._closed and not self._lost and self._conn is not None

    def add_connection_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(host, alive)`` on the SSH loop when the connection drops or returns.

        Args:
            listener: The callback; it must not block.
        """
        self._listeners.append(listener)

    def remove_connection_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Stop calling a listener added with :meth:`add_connection_listener`.

        Args:
            listener: The callback.
        """
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _notify(self, alive: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(self._host, alive)
            except Exception:  # a listener's bug must not stop the others
                logger.exception("connection listener failed for %s", self._host)

    def _connection_lost(self, exc: BaseException | None) -> None:
        """The SSH connection dropped without our asking: reconnect in the background."""
        if self._closed or self._lost:
            return
        self._lost = True
        logger.warning("SSH connection to %s lost (%s); reconnecting", self._host, exc or "closed")
        self._warm = []  # those processes died with the connection
        self._parked = None
        self._servers.clear()
        self._forwards.clear()
        self._reconnector = asyncio.ensure_future(self._reconnect())
        self._notify(False)

    async def _reconnect(self) -> None:
        delay = 1.0
        while not self._closed:
            await asyncio.sleep(delay)
            options, timeout = self._ssh_options()
            try:
                conn = await self._open_connection(options, timeout)
            except Exception as exc:  # keep trying: hosts come back after reboots and outages
                logger.debug("reconnect to %s failed: %s", self._host, exc)
                delay = min(delay * 1.5, 5.0)
                continue
            if self._closed:
                conn.close()
                return
            self._conn, self._lost = conn, False
            logger.warning("SSH connection to %s is back", self._host)
            self._notify(True)
            return

    @contextlib.contextmanager
    def _session_limit(self, what: str) -> Iterator[None]:
        """Name the likely cause when the host refuses one more session on our connection."""
        try:
            yield
        except asyncssh.ChannelOpenError as exc:
            raise LazyclusterError(
                f"host {self._host!r} refused a new SSH session for {what} ({exc.reason}). All "
                f"work on a host shares one SSH connection, and each worker, warm spare, "
                f"running task and file transfer holds a session on it; sshd allows "
                f"MaxSessions of them (10 by default). Raise MaxSessions in that host's "
                f"sshd_config, or lower max-workers-per-host or warm-spares."
            ) from exc

    async def _ensure_working_dir(self, force: bool = False) -> str:
        assert self._wd is not None
        if force or not self._wd_ready:
            quoted = shlex.quote(self._wd)
            with self._session_limit("creating the working dir"):
                result = await self._connection.run(f"mkdir -p -m 700 {quoted}", check=False)
            if result.exit_status != 0:
                raise InvalidRuntimeError(
                    self._host,
                    f"working dir {self._wd!r} cannot be created: {str(result.stderr).strip()}",
                )
            self._wd_ready = True
        return self._wd

    # -- properties ---------------------------------------------------------------------------

    @property
    def _working_dir_path(self) -> str:
        assert self._wd is not None
        return self._wd

    @property
    def host(self) -> str:
        """The host name or alias the runtime was created with."""
        return self._host

    @property
    def python(self) -> str:
        """Path of the remote python interpreter used for functions and Dask processes."""
        return str(self._info.get("python") or self._requested_python or "python")

    @property
    def working_dir(self) -> str:
        """The remote working directory (created on first use, mode 0700)."""
        # Always (re)create: a process that lost its manager may have removed it.
        return run_sync(on_loop(self._ensure_working_dir(force=True)))

    @property
    def env_variables(self) -> dict[str, str]:
        """Environment variables set for every command, function and process on this host."""
        return dict(self._env)

    @env_variables.setter
    def env_variables(self, env_variables: dict[str, str]) -> None:
        self._env = self._check_env(env_variables)

    def add_env_variables(self, env_variables: dict[str, str]) -> None:
        """Add or update environment variables for later work on this runtime.

        Args:
            env_variables: Names and values.

        Raises:
            TypeError: If names or values are not str.
        """
        self._env.update(self._check_env(env_variables))

    @staticmethod
    def _check_env(env_variables: object) -> dict[str, str]:
        if not isinstance(env_variables, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_variables.items()
        ):
            raise TypeError(f"env_variables must be a dict of str to str, got {env_variables!r}")
        return dict(env_variables)

    @property
    def info(self) -> dict[str, Any]:
        """Host facts, read once at connection.

        Keys: os, hostname, cpu_cores, memory (bytes), python_version, python, gpus,
        distributed_version.
        """
        return {k: v for k, v in self._info.items() if k != "tmp"}

    @property
    def os(self) -> str:
        """The host's operating system description."""
        return str(self._info["os"])

    @property
    def cpu_cores(self) -> int:
        """Number of usable CPU cores on the host."""
        return int(self._info["cpu_cores"])

    @property
    def memory(self) -> int:
        """Total memory of the host in bytes."""
        return int(self._info["memory"])

    @property
    def gpus(self) -> list[str]:
        """GPUs found by ``nvidia-smi -L`` (empty when none)."""
        return list(self._info["gpus"])

    @property
    def alive_task_count(self) -> int:
        """Number of tasks currently running on this runtime (used to pick the least busy)."""
        return sum(1 for task in self._tasks if task.is_running)

    @property
    def local_address(self) -> str:
        """The manager's address on this SSH connection: one the host can route back to."""
        return str(self._connection.get_extra_info("sockname")[0])

    @property
    def remote_address(self) -> str:
        """The host's address as the manager reaches it."""
        return str(self._connection.get_extra_info("peername")[0])

    async def _reach_start(self, timeout: float = 2.0) -> _Reach:
        """Start the plain-TCP test of this host: to the manager, and from it.

        The host connects to a temporary listener on the manager's address of this SSH
        connection, and the manager connects to a temporary listener on the host's address.
        That listener stays open for the other hosts (:meth:`_Reach.dial`) until the returned
        handle is closed.
        """
        reach = _Reach(self)
        server = await asyncio.start_server(lambda r, w: w.close(), self.local_address, 0)
        manager_port = server.sockets[0].getsockname()[1]
        try:
            with self._session_limit("the reachability probe"):
                reach.process = await self._connection.create_process(self._python_command(),
                                                                      encoding=None)
            reach.process.stdin.write(self._request(
                "reach", manager=self.local_address, manager_port=manager_port,
                bind=self.remote_address, timeout=timeout, wait=REACH_WAIT,
            ))
            try:
                line = await asyncio.wait_for(reach.process.stdout.readline(), timeout + 5)
                report = json.loads(line)
            except (asyncio.TimeoutError, ValueError):
                return reach
            reach.port = int(report["port"])
            reach.outbound = bool(report["out"])
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.remote_address, reach.port), timeout
                )
                writer.close()
                reach.inbound = True
            except (OSError, asyncio.TimeoutError):
                pass
        finally:
            server.close()
        return reach

    # -- ports ----------------------------------------------------------------------------------

    async def _listening_ports(self, max_age: float = 0.0) -> set[int]:
        """Listening TCP ports on the host; the probe's reading if younger than ``max_age`` s."""
        taken_at, ports = self._probed_ports
        if max_age and time.monotonic() - taken_at <= max_age:
            return set(ports)
        with self._session_limit("reading its listening ports"):
            result = await self._connection.run(
                "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null", check=False
            )
        return parse_listening_ports(str(result.stdout))

    def has_free_port(self, port: int) -> bool:
        """Check whether a TCP port is free on the host.

        Args:
            port: The port.

        Returns:
            True if nothing listens on it.

        Raises:
            TypeError: If ``port`` is not an int.
            ValueError: If it is out of range.
        """
        validate_port(port, "port")
        return port not in run_sync(on_loop(self._listening_ports()))

    def get_free_port(self, ports: list[int]) -> int:
        """Return the first port of the list that is free on the host.

        Args:
            ports: Candidate ports, in order of preference.

        Returns:
            The first free port.

        Raises:
            NoPortsLeftError: If none is free.
        """
        candidates = validate_ports(ports, "ports")
        busy = run_sync(on_loop(self._listening_ports()))
        for port in candidates:
            if port not in busy:
                return port
        raise NoPortsLeftError(f"none of {len(candidates)} ports is free on {self._host!r}")

    async def _expose_to_runtime(self, local_port: int, runtime_port: int) -> int:
        conn = self._connection
        return await self._listen_on_runtime(runtime_port, lambda: conn.forward_remote_port(
            "127.0.0.1", runtime_port, "127.0.0.1", local_port))

    async def _relay_from(self, source: Runtime, source_port: int, runtime_port: int) -> int:
        """Make ``source``'s ``source_port`` reachable here, spliced inside the manager."""
        conn = self._connection
        factory = relay_factory(lambda: source._connection, source_port)
        return await self._listen_on_runtime(runtime_port, lambda: conn.create_server(
            factory, "127.0.0.1", runtime_port))

    async def _listen_on_runtime(
        self, runtime_port: int, listen: Callable[[], Awaitable[asyncssh.SSHListener]]
    ) -> int:
        """Open a listener on the host's ``127.0.0.1:runtime_port`` and record it."""
        try:
            listener = await listen()
        except asyncssh.ChannelListenError as exc:
            if runtime_port in await self._listening_ports():
                raise PortInUseError(runtime_port, self._host) from exc
            raise LazyclusterError(
                f"host {self._host!r} refused to forward port {runtime_port} although it is "
                f"free: is AllowTcpForwarding disabled in its sshd_config?"
            ) from exc
        port = listener.get_port()
        self._forwards[port] = listener
        return port

    async def _expose_from_runtime(self, runtime_port: int, local_port: int) -> int:
        try:
            listener = await self._connection.forward_local_port(
                "127.0.0.1", local_port, "127.0.0.1", runtime_port
            )
        except OSError as exc:
            raise PortInUseError(local_port, "localhost") from exc
        port = listener.get_port()
        self._forwards[port] = listener
        return port

    def expose_port_to_runtime(self, local_port: int, runtime_port: int | None = None) -> int:
        """Make a manager port reachable on the host (SSH remote forward, loopback both ends).

        Args:
            local_port: The port on the manager.
            runtime_port: The port on the host; defaults to ``local_port``.

        Returns:
            The port on the host.

        Raises:
            PortInUseError: If ``runtime_port`` is busy on the host.
        """
        validate_port(local_port, "local_port")
        target = local_port if runtime_port is None else validate_port(runtime_port, "runtime_port")
        return run_sync(on_loop(self._expose_to_runtime(local_port, target)))

    def expose_port_from_runtime(self, runtime_port: int, local_port: int | None = None) -> int:
        """Make a host port reachable on the manager (SSH local forward, loopback both ends).

        Args:
            runtime_port: The port on the host.
            local_port: The port on the manager; defaults to ``runtime_port``.

        Returns:
            The port on the manager.

        Raises:
            PortInUseError: If ``local_port`` is busy on the manager.
        """
        validate_port(runtime_port, "runtime_port")
        target = runtime_port if local_port is None else validate_port(local_port, "local_port")
        return run_sync(on_loop(self._expose_from_runtime(runtime_port, target)))

    async def _close_forward(self, port: int) -> None:
        listener = self._forwards.pop(port, None)
        if listener is not None:
            listener.close()
            await listener.wait_closed()

    def close_port_forward(self, port: int) -> None:
        """Close the forward this runtime holds for ``port`` (either direction); no-op if none.

        Args:
            port: The listening port of the forward (on the host or on the manager).
        """
        run_sync(on_loop(self._close_forward(port)))

    @property
    def forwarded_ports(self) -> list[int]:
        """Listening ports of the forwards currently open through this runtime."""
        return sorted(self._forwards)

    # -- tasks ----------------------------------------------------------------------------------

    async def _run_command(self, task: RuntimeTask, command: str, debug: bool) -> None:
        wd = self._working_dir_path
        self._wd_ready = True  # created by the remote side (same round trip)
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self._env.items())
        # mkdir each time (free: same round trip): the dir may have been removed under us.
        quoted = shlex.quote(wd)
        script = f"mkdir -p -m 700 {quoted} && cd {quoted} || exit 1\n{exports}{command}\n"
        # The script goes over stdin so env values never show in `ps`; stdin then stays open
        # as a lifeline, so closing the channel (cleanup, manager gone) kills the command.
        with self._session_limit(f"task {task.name!r}"):
            process = await self._connection.create_process(
                f"sh -c {shlex.quote(_COMMAND_WRAPPER)} lazycluster {len(script.encode())} "
                f"{shlex.quote(wd if self._wd_is_temp else '')}"
            )
        process.stdin.write(script)

        async def pump(stream: asyncssh.SSHReader[str], label: str) -> None:
            async for line in stream:
                if not line:  # asyncssh yields an empty read at EOF
                    continue
                task._record(f"{label}{line.rstrip()}", debug)

        await asyncio.gather(pump(process.stdout, ""), pump(process.stderr, "stderr: "))
        process.stdin.write_eof()
        result = await process.wait()
        if result.exit_status != 0:
            raise TaskExecutionError(
                task.name, f"(command {command!r})", self._host,
                f"exit status {result.exit_status}\n{_tail(task._log)}",
            )

    async def _run_function(
        self, task: RuntimeTask, function: Callable[..., Any], kwargs: dict[str, Any], debug: bool
    ) -> None:
        wd = self._working_dir_path
        self._wd_ready = True  # created by the remote side (same round trip)
        payload = cloudpickle.dumps((function, kwargs))
        with self._session_limit(f"task {task.name!r}"):
            process = await self._connection.create_process(self._python_command(),
                                                            encoding=None)
        # stdin stays open: its end tells the remote side to kill the function's process group.
        process.stdin.write(self._request("function", size=len(payload), cwd=wd) + payload)

        async def pump_log() -> None:
            async for raw in process.stderr:
                if not raw:
                    continue
                task._record(raw.decode(errors="replace").rstrip(), debug)

        output, _ = await asyncio.gather(process.stdout.read(), pump_log())
        _say_bye(process)
        await process.wait()
        head, sep, rest = output.partition(_remote.RESULT_HEADER)
        if not sep:
            raise TaskExecutionError(
                task.name, f"(function {function.__name__})", self._host,
                f"the remote python gave no result\n{_tail(task._log)}",
            )
        size_text, _, data = rest.partition(b"\n")
        status, value = cloudpickle.loads(data[: int(size_text)])
        if status != "ok":
            raise TaskExecutionError(
                task.name, f"(function {function.__name__})", self._host, str(value)
            )
        task._returns.append(value)

    def _remote_path(self, path: str | None, default_name: str) -> str:
        assert self._wd is not None
        if path is None:
            return f"{self._wd}/{default_name}"
        return path if path.startswith("/") else f"{self._wd}/{path}"

    async def _sftp_in_working_dir(self) -> asyncssh.SFTPClient:
        """An SFTP client, with the working dir (re)created through it (no extra exec)."""
        with self._session_limit("a file transfer"):
            sftp = await self._connection.start_sftp_client()
        wd = self._working_dir_path
        if not await sftp.isdir(wd):
            await sftp.makedirs(wd, attrs=asyncssh.SFTPAttrs(permissions=0o700), exist_ok=True)
        self._wd_ready = True
        return sftp

    async def _send_file(self, local_path: str, remote_path: str | None = None) -> str:
        target = self._remote_path(remote_path, os.path.basename(local_path.rstrip("/")))
        async with await self._sftp_in_working_dir() as sftp:
            await sftp.put(local_path, target, recurse=True, preserve=True)
        return target

    async def _get_file(self, remote_path: str, local_path: str | None = None) -> str:
        source = self._remote_path(remote_path, "")
        target = local_path or os.path.join(os.getcwd(), os.path.basename(source.rstrip("/")))
        async with await self._sftp_in_working_dir() as sftp:
            await sftp.get(source, target, recurse=True, preserve=True)
        return target

    async def _execute(self, task: RuntimeTask, debug: bool) -> None:
        for index, step in enumerate(task._steps):
            label = step.describe(index)
            task._record(f"--- step {label}", debug)
            try:
                if step.kind == "command":
                    await self._run_command(task, step.args[0], debug)
                elif step.kind == "function":
                    await self._run_function(task, step.args[0], step.args[1], debug)
                elif step.kind == "send_file":
                    await self._send_file(*step.args)
                else:
                    await self._get_file(*step.args)
            except TaskExecutionError:
                raise
            except (OSError, asyncssh.Error, LazyclusterError) as exc:
                raise TaskExecutionError(task.name, label, self._host, str(exc)) from exc
            if not debug:
                logger.debug("%s on %s step %s:\n%s", task.name, self._host, label, _tail(task._log))

    def execute_task(
        self, task: RuntimeTask, execute_async: bool = True, debug: bool = False
    ) -> RuntimeTask:
        """Run a task's steps on this runtime.

        Args:
            task: The task; a task already executed elsewhere is copied.
            execute_async: Return at once and let the task run in the background (wait with
                ``task.join()``); if False, block until it is done.
            debug: Print the remote output live instead of only logging it.

        Returns:
            The task being executed.

        Raises:
            TypeError: If ``task`` is not a RuntimeTask.
            TaskExecutionError: If a step fails (when ``execute_async`` is False; otherwise
                raised by ``task.join()``).
        """
        if not isinstance(task, RuntimeTask):
            raise TypeError(f"task must be a RuntimeTask, got {task!r}")
        if task._future is not None:
            task = task.copy()
        task.host = self._host
        self._tasks.append(task)
        task._future = asyncio.run_coroutine_threadsafe(self._execute(task, debug), get_loop())
        if not execute_async:
            task.join()
        return task

    def send_file(self, local_path: str, remote_path: str | None = None) -> str:
        """Copy a local file or directory to the host.

        Args:
            local_path: The local path.
            remote_path: Target path; relative to the working directory, default its basename.

        Returns:
            The remote path written.

        Raises:
            ValueError: If ``local_path`` does not exist.
            LazyclusterError: If the transfer fails.
        """
        if not os.path.exists(local_path):
            raise ValueError(f"local_path {local_path!r} does not exist")
        try:
            return run_sync(on_loop(self._send_file(local_path, remote_path)))
        except (OSError, asyncssh.Error) as exc:
            raise LazyclusterError(f"send_file to {self._host!r} failed: {exc}") from exc

    def get_file(self, remote_path: str, local_path: str | None = None) -> str:
        """Copy a file or directory from the host to the manager.

        Args:
            remote_path: Remote path, relative to the working directory unless absolute.
            local_path: Local target; default: its basename in the current directory.

        Returns:
            The local path written.

        Raises:
            LazyclusterError: If the transfer fails (e.g. the remote file does not exist).
        """
        try:
            return run_sync(on_loop(self._get_file(remote_path, local_path)))
        except (OSError, asyncssh.Error) as exc:
            raise LazyclusterError(f"get_file from {self._host!r} failed: {exc}") from exc

    def print_log(self) -> None:
        """Print the execution log of every task run on this runtime."""
        for task in self._tasks:
            print(f"=== {self._host}: {task.name}")
            task.print_log()
        parked = self._parked[1] if self._parked else None
        for server in [*self._finished_servers, *self._servers]:
            if server is parked and not server.log:
                continue  # a probe interpreter waiting to be used: nothing to show yet
            print(f"=== {self._host}: {server.name}")
            print("\n".join(server.log))

    # -- Dask servers -----------------------------------------------------------------------------

    def _take_parked(self, python: str | None) -> RemoteProcess | None:
        """The parked probe interpreter, if it runs ``python`` and surely waits still."""
        if self._parked is None:
            return None
        since, parked = self._parked
        self._parked = None
        fresh = time.monotonic() - since < PROBE_PARK_SECONDS - _PARK_MARGIN
        if fresh and not parked.exited and python in (None, parked.python):
            return parked
        asyncio.ensure_future(parked.kill())  # too old or the wrong python: let it go
        return None

    async def _launch_warm(self, python: str | None, debug: bool, forkserver: bool) -> RemoteProcess:
        """Start a python that imports distributed at once and then waits for a serve request."""
        server = self._take_parked(python)
        if server is None:
            with self._session_limit("a Dask server"):
                process = await self._connection.create_process(
                    self._python_command(python), encoding=None
                )
            server = RemoteProcess(self, process, "warm", debug, python or self.python)
            self._servers.add(server)
            process.stdin.write(_SOURCE_PREFIX)
        server.name, server._debug = "warm", debug
        self._wd_ready = True  # the remote side creates it (mode 0700)
        server._process.stdin.write(self._request_line("warm", cwd=self._wd, forkserver=forkserver))
        return server

    async def _prewarm(
        self, count: int, python: str | None = None, debug: bool = False, forkserver: bool = False
    ) -> None:
        """Start ``count`` warm processes in the background (returns at once).

        A Dask server started later takes one, so its imports (and, with ``forkserver``, the
        nanny's fork server) happen off the critical path.
        """
        if not self.is_alive:
            return  # a lost host gets no spares; start_server launches fresh once it is back
        for _ in range(count):
            task = asyncio.ensure_future(self._launch_warm(python, debug, forkserver))
            self._warm.append((python, task))

    @property
    def _warm_count(self) -> int:
        return len(self._warm)

    async def _drain_warm(self) -> None:
        """Stop every warm process not taken yet."""
        pending, self._warm = self._warm, []
        # Let launches finish rather than cancel them: a process cut off without "bye" would
        # take the working dir with it (it takes the manager for dead).
        results = await asyncio.gather(
            *(asyncio.wait_for(t, 10) for _, t in pending), return_exceptions=True
        )
        await asyncio.gather(
            *(r.kill() for r in results if isinstance(r, RemoteProcess)), return_exceptions=True
        )

    async def start_server(
        self,
        name: str,
        cls: str,
        scheduler: str,
        options: dict[str, Any],
        env: dict[str, str] | None = None,
        debug: bool = False,
        python: str | None = None,
        tls: dict[str, Any] | None = None,
    ) -> RemoteProcess:
        """Start a Dask server (Nanny/Worker) on the host and return its handle (coroutine).

        Uses a warm process when one is ready or on its way (see ``_prewarm``). Must run on the
        SSH loop (the cluster layer awaits it through ``on_loop``).

        Args:
            name: Label for logs.
            cls: Import path of the server class, e.g. ``"distributed.Nanny"``.
            scheduler: Scheduler address as seen from the host.
            options: Keyword arguments for the class (JSON-serialisable).
            env: Extra environment variables for this process.
            debug: Print its output live.
            python: Interpreter to use instead of the runtime's.
            tls: ``distributed.Security`` keyword arguments with in-memory PEM text; like
                ``env`` they travel over SSH stdin only.

        Returns:
            The supervised process; await ``wait_started`` for readiness.
        """
        server: RemoteProcess | None = None
        for index, (warm_python, task) in enumerate(self._warm):
            if warm_python == python:
                del self._warm[index]
                try:
                    server = await task
                except (LazyclusterError, asyncssh.Error, OSError):
                    server = None  # that spare died (e.g. with a lost connection): start fresh
                break
        if server is None:
            server = await self._launch_warm(python, debug, False)
        server.name = name
        server._debug = debug
        request = {"cls": cls, "scheduler": scheduler, "options": options, "env": env or {},
                   "tls": tls}
        try:
            server._process.stdin.write(json.dumps(request).encode() + b"\n")
        except (OSError, asyncssh.Error):
            pass  # it died already (e.g. no such python): wait_started() reports why
        return server

    # -- cleanup --------------------------------------------------------------------------------

    async def _cleanup(self) -> None:
        if self._closed:
            return
        self._closed = True
        _live_runtimes.discard(self)
        if self._reconnector is not None:
            self._reconnector.cancel()
        if self._lost:
            return  # nothing to stop remotely: the host killed our processes when we vanished
        await self._drain_warm()
        await asyncio.gather(*(s.kill() for s in list(self._servers)), return_exceptions=True)
        for port in list(self._forwards):
            listener = self._forwards.pop(port)
            listener.close()
        if self._conn is None:
            return
        if self._wd_is_temp and self._wd_ready and self._wd:
            try:
                await asyncio.wait_for(self._conn.run(f"rm -rf {shlex.quote(self._wd)}"), 10)
            except (OSError, asyncssh.Error, asyncio.TimeoutError):
                logger.warning("could not remove %s on %s", self._wd, self._host)
        self._conn.close()
        try:
            await asyncio.wait_for(self._conn.wait_closed(), 5)
        except (asyncio.TimeoutError, OSError):
            pass

    def cleanup(self) -> None:
        """Stop every process and forward of this runtime, remove its temp dir, disconnect.

        Calling it twice is harmless.
        """
        run_sync(on_loop(self._cleanup()))


@atexit.register
def _cleanup_all_runtimes() -> None:
    """Leave nothing running on any host when the interpreter exits."""
    runtimes = list(_live_runtimes)
    if not runtimes:
        return

    async def close_all() -> None:
        await asyncio.gather(*(r._cleanup() for r in runtimes), return_exceptions=True)

    try:
        run_sync(close_all(), timeout=20)
    except Exception:  # pragma: no cover - best effort at exit
        pass
