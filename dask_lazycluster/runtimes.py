"""One SSH host as a runtime (:class:`Runtime`) and the work run on it (:class:`RuntimeTask`).

Every method of :class:`Runtime` is a thin sync wrapper over a coroutine of its
:attr:`Runtime.core` that runs on the private SSH loop (see ``_loop``); the group and cluster
layers await the coroutines directly.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from dask_lazycluster._connection_kwargs import asyncssh_options
from dask_lazycluster._core import RuntimeCore, connect_cores
from dask_lazycluster._loop import on_loop, run_sync
from dask_lazycluster._runtime_extras import (
    FROM_RUNTIME,
    TO_RUNTIME,
    LazyclusterExtras,
    process_key,
)
from dask_lazycluster._runtime_tasks import TaskMethods
from dask_lazycluster._task import RuntimeTask
from dask_lazycluster.exceptions import NoPortsLeftError, PathCreationError
from dask_lazycluster.utils import validate_port, validate_ports

__all__ = ["Runtime", "RuntimeTask", "connect_runtimes"]

#: Name of the environment variable holding a runtime's working directory on its host.
WORKING_DIR_ENV_VAR_NAME = "WORKING_DIR"


def _check_arguments(
    host: object, working_dir: object, connect_options: object, python: object
) -> None:
    if not isinstance(host, str) or not host.strip():
        raise TypeError(f"host must be a non-empty str, got {host!r}")
    if working_dir is not None and not isinstance(working_dir, str):
        raise TypeError(f"working_dir must be a str or None, got {working_dir!r}")
    if connect_options is not None and not isinstance(connect_options, dict):
        raise TypeError(f"connect_options must be a dict or None, got {connect_options!r}")
    if python is not None and (not isinstance(python, str) or not python.strip()):
        raise TypeError(f"python must be a non-empty str or None, got {python!r}")


def _init_env(core: RuntimeCore) -> RuntimeCore:
    """Set ``WORKING_DIR`` for everything run on a newly connected host."""
    core.state.env.setdefault(WORKING_DIR_ENV_VAR_NAME, core.state.working_dir_path)
    return core


class Runtime(TaskMethods, LazyclusterExtras):
    """A host reachable by SSH, used to run tasks, Dask processes and port forwards.

    ``host`` resolves exactly as ``ssh host`` would: ``~/.ssh/config`` (HostName, User, Port,
    IdentityFile, ProxyJump, ...), ``~/.ssh/known_hosts``, keys and the agent. One SSH
    connection is opened at construction, validated with a probe, and reused by everything.
    The working directory is also the environment variable ``WORKING_DIR``
    (``Runtime.WORKING_DIR_ENV_VAR_NAME``) of everything run on the host.

    Args:
        host: The SSH host name or alias.
        working_dir: Remote working directory; a private temp dir (removed at cleanup) if None.
        connection_kwargs: lazycluster's connection arguments (fabric/paramiko
            ``connect_kwargs`` names: ``key_filename``, ``password``, ``passphrase``, ``port``,
            ``username``, ``timeout``, ``allow_agent``, ``look_for_keys``, ``auth_timeout``,
            ``banner_timeout``, ``compress``, ``sock``, ``gss_*``), translated to asyncssh's.
        python: The remote python; default: the manager's ``sys.executable`` if it exists on
            the host, else ``python3``, else ``python``.
        connect_options: Extra keyword arguments for ``asyncssh.connect`` (they win over
            ``connection_kwargs`` and ``~/.ssh/config``), e.g. ``{"username": "me", "port":
            2222}``. ``connect_timeout`` (seconds, default 10) bounds the whole validation.

    Raises:
        InvalidRuntimeError: If the host cannot be connected to, authenticated against, its host
            key cannot be verified, no python is found or the working dir cannot be created.
        TypeError: If an argument has the wrong type, or ``connection_kwargs`` holds a name
            that has no asyncssh equivalent.

    Examples:
        >>> runtime = Runtime("node1")                      # doctest: +SKIP
        >>> runtime.cpu_cores, runtime.memory               # doctest: +SKIP
        (64, 270582939648)
        >>> task = RuntimeTask("hello").run_command("echo hello from $(hostname)")
        >>> runtime.execute_task(task, execute_async=False).print_log()  # doctest: +SKIP
        hello from node1
        >>> runtime.cleanup()                               # doctest: +SKIP
    """

    #: Name of the environment variable holding the working directory on the host.
    WORKING_DIR_ENV_VAR_NAME = WORKING_DIR_ENV_VAR_NAME
    #: The host name of the manager itself.
    LOCALHOST = "localhost"

    def __init__(
        self,
        host: str,
        working_dir: str | None = None,
        connection_kwargs: dict[str, Any] | None = None,
        python: str | None = None,
        *,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        _check_arguments(host, working_dir, connect_options, python)
        options = dict(connect_options or {})
        if connection_kwargs is not None:
            options = {**asyncssh_options(connection_kwargs), **options}
        core = RuntimeCore(host, working_dir, options, python)
        run_sync(core.connect())
        #: The async implementation (used by the group and cluster layers on the SSH loop).
        self.core = _init_env(core)

    @classmethod
    def _wrap(cls, core: RuntimeCore) -> Runtime:
        runtime = cls.__new__(cls)
        runtime.core = core
        return runtime

    def __repr__(self) -> str:
        state = "closed" if self.core.closed else "connected"
        return f"<Runtime {self.host!r} ({state})>"

    # -- connection ---------------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        """Whether the SSH connection is up (False while lost and reconnecting, or closed)."""
        return self.core.is_alive

    def add_connection_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(host, alive)`` on the SSH loop when the connection drops or returns.

        Args:
            listener: The callback; it must not block.
        """
        self.core.add_listener(listener)

    def remove_connection_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Stop calling a listener added with :meth:`add_connection_listener`.

        Args:
            listener: The callback.
        """
        self.core.remove_listener(listener)

    # -- facts --------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The host name or alias the runtime was created with."""
        return self.core.host

    @property
    def python(self) -> str:
        """Path of the remote python interpreter used for functions and Dask processes."""
        return self.core.state.python

    @property
    def working_dir(self) -> str:
        """The remote working directory (created on first use, mode 0700).

        Setting it creates the new directory if missing (it is kept at cleanup; a private
        temp dir it replaces is removed) and updates ``WORKING_DIR``. Set it before starting
        tasks or Dask processes here: they work in the directory they started in.

        Raises:
            TypeError: If the new value is not a non-empty str (on set).
            ValueError: If tasks or Dask processes run on the host (on set).
            PathCreationError: If the directory cannot be created (on set).
        """
        # Always (re)create: a process that lost its manager may have removed it.
        return run_sync(on_loop(self.core.state.ensure_working_dir(force=True)))

    @working_dir.setter
    def working_dir(self, working_dir: str) -> None:
        if not isinstance(working_dir, str) or not working_dir.strip():
            raise TypeError(f"working_dir must be a non-empty str, got {working_dir!r}")
        busy = self.alive_task_count + sum(
            len(s.servers) for s in self.core.servers.supervisors if s.alive)
        if busy:
            raise ValueError(f"working_dir of {self.host!r} cannot change while tasks or Dask "
                             f"processes run there ({busy})")
        run_sync(on_loop(_switch_working_dir(self.core, working_dir)))

    @property
    def env_variables(self) -> dict[str, str]:
        """Environment variables set for every command, function and process on this host.

        ``WORKING_DIR`` always holds the working dir, also after the variables are replaced.
        """
        return dict(self.core.state.env)

    @env_variables.setter
    def env_variables(self, env_variables: dict[str, str]) -> None:
        checked = self._check_env(env_variables)
        checked.setdefault(WORKING_DIR_ENV_VAR_NAME, self.core.state.working_dir_path)
        self.core.state.env = checked

    def add_env_variables(self, env_variables: dict[str, str]) -> None:
        """Add or update environment variables for later work on this runtime.

        Args:
            env_variables: Names and values.

        Raises:
            TypeError: If names or values are not str.
        """
        self.core.state.env.update(self._check_env(env_variables))

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
        return {k: v for k, v in self.core.state.info.items() if k != "tmp"}

    @property
    def os(self) -> str:
        """The host's operating system description."""
        return str(self.core.state.info["os"])

    @property
    def cpu_cores(self) -> int:
        """Number of usable CPU cores on the host (its CPU affinity)."""
        return int(self.core.state.info["cpu_cores"])

    @property
    def memory(self) -> int:
        """Memory usable on the host in bytes (physical memory, capped by a cgroup limit)."""
        return int(self.core.state.info["memory"])

    @property
    def gpus(self) -> list[str]:
        """GPUs found by ``nvidia-smi -L`` (empty when none)."""
        return list(self.core.state.info["gpus"])

    @property
    def local_address(self) -> str:
        """The manager's address on this SSH connection: one the host can route back to."""
        return self.core.state.ssh.local_address

    @property
    def remote_address(self) -> str:
        """The host's address as the manager reaches it."""
        return self.core.state.ssh.remote_address

    # -- ports ----------------------------------------------------------------------------------

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
        return port not in run_sync(on_loop(self.core.listening_ports()))

    def get_free_port(self, ports: list[int] | int) -> int:
        """Return the first port of the list that is free on the host.

        Args:
            ports: Candidate ports, in order of preference (a single port: it, if free).

        Returns:
            The first free port.

        Raises:
            NoPortsLeftError: If none is free.
        """
        candidates = validate_ports(ports, "ports")
        busy = run_sync(on_loop(self.core.listening_ports()))
        for port in candidates:
            if port not in busy:
                return port
        raise NoPortsLeftError(f"none of {len(candidates)} ports is free on {self.host!r}")

    def expose_port_to_runtime(self, local_port: int, runtime_port: int | None = None) -> str:
        """Make a manager port reachable on the host (SSH remote forward, loopback both ends).

        Args:
            local_port: The port on the manager.
            runtime_port: The port on the host; defaults to ``local_port``.

        Returns:
            The process key of the forward, for ``stop_process``: lazycluster's
            ``"<host>::-R::<runtime_port>::<local_port>"``; empty when the runtime is
            ``localhost`` and both ports are the same (nothing to forward).

        Raises:
            PortInUseError: If ``runtime_port`` is busy on the host.
            ForwardRefusedError: If the host refuses port forwarding.
        """
        validate_port(local_port, "local_port")
        target = local_port if runtime_port is None else validate_port(runtime_port, "runtime_port")
        if self.host == self.LOCALHOST and target == local_port:
            return ""
        run_sync(on_loop(self.core.forwards.to_runtime(local_port, target)))
        return process_key(self.host, TO_RUNTIME, target, local_port)

    def expose_port_from_runtime(self, runtime_port: int, local_port: int | None = None) -> str:
        """Make a host port reachable on the manager (SSH local forward, loopback both ends).

        Args:
            runtime_port: The port on the host.
            local_port: The port on the manager; defaults to ``runtime_port``.

        Returns:
            The process key of the forward, for ``stop_process``: lazycluster's
            ``"<host>::-L::<local_port>::<runtime_port>"``; empty when the runtime is
            ``localhost`` and both ports are the same (nothing to forward).

        Raises:
            PortInUseError: If ``local_port`` is busy on the manager.
        """
        validate_port(runtime_port, "runtime_port")
        target = runtime_port if local_port is None else validate_port(local_port, "local_port")
        if self.host == self.LOCALHOST and target == runtime_port:
            return ""
        run_sync(on_loop(self.core.forwards.from_runtime(runtime_port, target)))
        return process_key(self.host, FROM_RUNTIME, target, runtime_port)

    def close_port_forward(self, port: int) -> None:
        """Close the forward this runtime holds for ``port`` (either direction); no-op if none.

        Args:
            port: The listening port of the forward (on the host or on the manager).
        """
        run_sync(on_loop(self.core.forwards.close(port)))

    @property
    def forwarded_ports(self) -> list[int]:
        """Listening ports of the forwards currently open through this runtime."""
        return self.core.forwards.ports

    def cleanup(self) -> None:
        """Stop every process and forward of this runtime, remove its temp dir, disconnect.

        Calling it twice is harmless.
        """
        run_sync(on_loop(self.core.cleanup()))


async def connect_runtimes(
    hosts: list[str],
    working_dir: str | None = None,
    connect_options: dict[str, Any] | None = None,
    python: str | None = None,
) -> list[Runtime]:
    """Connect to many hosts in parallel (a coroutine for the SSH loop).

    Args:
        hosts: Host names.
        working_dir: Working directory for all (None: a private temp dir each).
        connect_options: ``asyncssh.connect`` keyword arguments for all.
        python: Remote python for all (None: probe each).

    Returns:
        The runtimes, in order.

    Raises:
        TypeError: If an argument has the wrong type.
        InvalidRuntimeError: If a host cannot be used; no connection is left open then.
    """
    for host in hosts:
        _check_arguments(host, working_dir, connect_options, python)
    cores = await connect_cores(hosts, working_dir, connect_options, python)
    return [Runtime._wrap(_init_env(core)) for core in cores]


async def _switch_working_dir(core: RuntimeCore, path: str) -> None:
    """Make ``path`` the working dir (created if missing); a private temp dir is removed."""
    state = core.state
    result = await state.ssh.gate.run(state.ssh.conn, f"mkdir -p -m 700 {shlex.quote(path)}",
                                      "creating the working dir")
    if result.exit_status != 0:
        raise PathCreationError(path, state.host, str(result.stderr).strip())
    old, old_was_temp = state.wd, state.wd_is_temp and state.wd_ready
    state.wd, state.wd_is_temp, state.wd_ready = path, False, True
    state.env[WORKING_DIR_ENV_VAR_NAME] = path
    if old_was_temp and old and old != path:  # the private temp dir is no longer ours
        await state.ssh.gate.run(state.ssh.conn, f"rm -rf {shlex.quote(old)}",
                                 "removing the old working dir")
