"""Host discovery (:class:`RuntimeManager`): every usable host of the user's SSH config.

The manager reads the ``Host`` entries of ``~/.ssh/config`` (following ``Include``), connects
to all of them in parallel and keeps the reachable ones as runtimes; :meth:`create_group`
then picks those that meet a job's requirements and returns them as a
:class:`~dask_lazycluster.runtime_mgmt.RuntimeGroup`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from dask.utils import format_bytes

from dask_lazycluster._group import RuntimeGroup
from dask_lazycluster._loop import on_loop, run_sync
from dask_lazycluster._requirements import CHECK_TIMEOUT, Requirements, name_list
from dask_lazycluster._ssh_config import DEFAULT_SSH_CONFIG, ssh_config_hosts
from dask_lazycluster.config import setting
from dask_lazycluster.exceptions import InvalidRuntimeError, NoRuntimesDetectedError
from dask_lazycluster.runtimes import Runtime, connect_runtimes

logger = logging.getLogger(__name__)

#: Seconds a host may take to connect and answer the probe during discovery.
DISCOVERY_CONNECT_TIMEOUT = 5.0
# Hosts probed at the same time (each probe holds a socket and an SSH handshake).
_MAX_PARALLEL_PROBES = 64


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, InvalidRuntimeError):
        return exc.cause
    return f"{type(exc).__name__}: {exc}"


class RuntimeManager:
    """Finds every usable host of the user's SSH config and builds groups from them.

    At construction every ``Host`` entry of the SSH config is probed in parallel by creating a
    :class:`~dask_lazycluster.runtimes.Runtime`; reachable hosts become :attr:`runtimes`,
    the others are listed in :attr:`inactive_hosts` with the reason in
    :attr:`inactive_reasons`. Arguments left as None fall back to the ``lazycluster.*`` Dask
    config.

    Args:
        ssh_config: Path of the SSH client config to read; default ``~/.ssh/config``. When
            given, hosts are also resolved through it (asyncssh's ``config`` option).
        connect_options: Extra ``asyncssh.connect`` options for every host; default the
            ``lazycluster.connect-options`` config. ``connect_timeout`` defaults to 5 s so
            that dead hosts do not hold discovery up for long.
        python: Remote python for every runtime (default: found per host).
        working_dir: Remote working directory (default: a private temp dir per host).

    Raises:
        TypeError: If an argument or its config value has the wrong type.
        ValueError: If an explicitly given ``ssh_config`` does not exist.
        NoRuntimesDetectedError: If no host of the config is reachable (or there is none).

    Examples:
        >>> manager = RuntimeManager()                  # every Host of ~/.ssh/config  # doctest: +SKIP
        >>> manager.print_inactive_hosts()              # which were left out, and why
        >>> group = manager.create_group(min_memory="8GiB", installed_executables="nvidia-smi")
        >>> cluster = DaskCluster(group)                                # doctest: +SKIP
        >>> manager.cleanup()                                           # doctest: +SKIP
    """

    def __init__(
        self,
        ssh_config: str | None = None,
        connect_options: dict[str, Any] | None = None,
        python: str | None = None,
        working_dir: str | None = None,
    ) -> None:
        options = dict(setting("connect-options", connect_options))
        options.setdefault("connect_timeout", DISCOVERY_CONNECT_TIMEOUT)
        if ssh_config is not None:
            options.setdefault("config", [os.path.expanduser(ssh_config)])
        self._ssh_config = ssh_config
        self._connect_options = options
        self._python: str | None = setting("python", python)
        self._working_dir: str | None = setting("working-dir", working_dir)
        self._runtimes: dict[str, Runtime] = {}
        self._inactive: dict[str, str] = {}
        # Runtimes made for groups with their own working_dir; cleaned up with the rest.
        self._extra: list[Runtime] = []
        names = ssh_config_hosts(ssh_config)
        where = ssh_config or DEFAULT_SSH_CONFIG
        if not names:
            raise NoRuntimesDetectedError(f"no Host entries found in {where}")
        run_sync(self._probe_all(names))
        if not self._runtimes:
            reasons = "; ".join(f"{h}: {r}" for h, r in self._inactive.items())
            raise NoRuntimesDetectedError(f"no host of {where} is reachable ({reasons})")

    async def _probe_all(self, names: list[str]) -> None:
        limit = asyncio.Semaphore(_MAX_PARALLEL_PROBES)

        async def probe(name: str) -> Runtime:
            async with limit:
                (runtime,) = await connect_runtimes(
                    [name], self._working_dir, self._connect_options, self._python)
                return runtime

        results = await asyncio.gather(*(probe(n) for n in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, Runtime):
                self._runtimes[name] = result
            elif isinstance(result, Exception):
                self._inactive[name] = _describe_failure(result)
            else:  # pragma: no cover - cancellation: let it through
                raise result

    def __repr__(self) -> str:
        return f"<RuntimeManager active={self.hosts} inactive={self.inactive_hosts}>"

    # -- what was found -------------------------------------------------------------------------

    @property
    def runtimes(self) -> list[Runtime]:
        """The reachable runtimes, in config order."""
        return list(self._runtimes.values())

    @property
    def hosts(self) -> list[str]:
        """Host names of the reachable runtimes, in config order."""
        return list(self._runtimes)

    @property
    def inactive_hosts(self) -> list[str]:
        """Host names of the config that could not be used, in config order."""
        return list(self._inactive)

    @property
    def inactive_reasons(self) -> dict[str, str]:
        """Why each inactive host could not be used (host name to reason)."""
        return dict(self._inactive)

    def get_runtime(self, host: str) -> Runtime:
        """Return the runtime of a reachable host.

        Args:
            host: The host name.

        Returns:
            Its runtime.

        Raises:
            ValueError: If the host is not a reachable host of the config.
        """
        self._check_known([host])
        if host in self._inactive:
            raise ValueError(f"host {host!r} is inactive: {self._inactive[host]}")
        return self._runtimes[host]

    def print_hosts(self) -> None:
        """Print the names of the reachable hosts, one per line."""
        for host in self._runtimes:
            print(host)

    def print_inactive_hosts(self) -> None:
        """Print each inactive host with the reason it could not be used."""
        for host, reason in self._inactive.items():
            print(f"{host}: {reason}")

    def print_runtime_info(self) -> None:
        """Print the facts of every reachable runtime (cores, memory, GPUs, python, ...)."""
        for runtime in self._runtimes.values():
            info = runtime.info
            print(f"{runtime.host}:")
            print(f"  hostname     {info.get('hostname')}")
            print(f"  os           {info.get('os')}")
            print(f"  cpu cores    {runtime.cpu_cores}")
            print(f"  memory       {format_bytes(runtime.memory)}")
            print(f"  gpus         {', '.join(runtime.gpus) or 'none'}")
            print(f"  python       {runtime.python} ({info.get('python_version')})")
            print(f"  distributed  {info.get('distributed_version') or 'not installed'}")

    # -- groups ------------------------------------------------------------------------------

    def _check_known(self, hosts: list[str]) -> None:
        unknown = [h for h in hosts if h not in self._runtimes and h not in self._inactive]
        if unknown:
            raise ValueError(
                f"unknown host(s) {', '.join(map(repr, unknown))}: not in "
                f"{self._ssh_config or DEFAULT_SSH_CONFIG} (known: {', '.join(self.hosts)})"
            )

    def create_group(
        self,
        include_hosts: str | list[str] | None = None,
        exclude_hosts: str | list[str] | None = None,
        gpu_required: bool = False,
        min_memory: int | str | None = None,
        min_cpu_cores: int | None = None,
        installed_executables: str | list[str] | None = None,
        filter_commands: str | list[str] | None = None,
        working_dir: str | None = None,
    ) -> RuntimeGroup:
        """Group the reachable runtimes that meet every requirement.

        Hardware requirements are checked against the facts read at discovery; executables
        and filter commands are checked on all candidate hosts in parallel over their SSH
        connections. Hosts left out stay in the manager.

        Args:
            include_hosts: Only consider these hosts (default: all reachable ones).
            exclude_hosts: Never use these hosts.
            gpu_required: Only hosts where ``nvidia-smi -L`` lists a GPU.
            min_memory: Least total memory: MiB as an int (lazycluster's "MB"), or a Dask size
                string (``"4GiB"``).
            min_cpu_cores: Least number of usable CPU cores.
            installed_executables: Executable name(s) that ``command -v`` must find.
            filter_commands: Shell command(s) that must succeed on the host: exit with status
                0 without printing ``false`` as their last line (lazycluster's style,
                ``... && echo true || echo false``, works too). They run in the runtime's
                working directory with its environment variables.
            working_dir: Remote working directory for the group; when given, the selected
                hosts get new runtimes (new connections) using it, which :meth:`cleanup`
                also closes.

        Returns:
            A group of the selected runtimes, in config order.

        Raises:
            ValueError: If a host name is not in the config, or ``min_memory`` is not a size.
            TypeError: If an argument has the wrong type.
            InvalidRuntimeError: If an included host is inactive, or a new runtime for
                ``working_dir`` cannot be created.
            NoRuntimesDetectedError: If no runtime meets the requirements (the message says
                what excluded each host).
        """
        include = name_list(include_hosts, "include_hosts")
        exclude = name_list(exclude_hosts, "exclude_hosts")
        self._check_known(include + exclude)
        for host in include:
            if host in self._inactive:
                raise InvalidRuntimeError(host, self._inactive[host])
        wanted = Requirements.from_arguments(gpu_required, min_memory, min_cpu_cores,
                                             installed_executables, filter_commands)
        if working_dir is not None and not isinstance(working_dir, str):
            raise TypeError(f"working_dir must be a str or None, got {working_dir!r}")

        candidates = [
            r for h, r in self._runtimes.items() if (not include or h in include) and h not in exclude
        ]
        if not candidates:
            raise NoRuntimesDetectedError("include_hosts/exclude_hosts leave no reachable host")
        reasons = {r.host: wanted.hardware_failures(r.core.state) for r in candidates}
        remaining = [r for r in candidates if not reasons[r.host]]
        if remaining and (wanted.executables or wanted.commands):
            failures = run_sync(on_loop(self._check_all(remaining, wanted)))
            for runtime, why in zip(remaining, failures, strict=True):
                reasons[runtime.host].extend(why)
        selected = [r for r in candidates if not reasons[r.host]]
        for host, why in reasons.items():
            if why:
                logger.info("create_group leaves %s out: %s", host, "; ".join(why))
        if not selected:
            detail = "; ".join(f"{h}: {', '.join(why)}" for h, why in reasons.items())
            raise NoRuntimesDetectedError(f"no runtime meets the requirements ({detail})")
        if working_dir is not None:
            selected = run_sync(connect_runtimes(
                [r.host for r in selected], working_dir, self._connect_options, self._python))
            self._extra.extend(selected)
        return RuntimeGroup(runtimes=selected)

    @staticmethod
    async def _check_all(runtimes: list[Runtime], wanted: Requirements) -> list[list[str]]:
        # CHECK_TIMEOUT is read here at each call, so it can be changed on this module.
        return list(await asyncio.gather(
            *(wanted.command_failures(r.core.state, CHECK_TIMEOUT) for r in runtimes)))

    # -- cleanup -------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Clean up every runtime the manager created (processes, forwards, temp dirs, SSH).

        Groups made by :meth:`create_group` share these runtimes, so they are closed too.
        Calling it twice is harmless.
        """
        runtimes = [*self._runtimes.values(), *self._extra]

        async def close_all() -> None:
            await asyncio.gather(*(r.core.cleanup() for r in runtimes), return_exceptions=True)

        run_sync(on_loop(close_all()))
