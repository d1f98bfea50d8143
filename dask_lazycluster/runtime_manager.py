"""Host discovery (:class:`RuntimeManager`): every usable host of the user's SSH config.

The manager reads the ``Host`` entries of ``~/.ssh/config`` (following ``Include``), connects
to all of them in parallel and keeps the reachable ones as runtimes; :meth:`create_group`
then picks those that meet a job's requirements and returns them as a
:class:`~dask_lazycluster.runtime_mgmt.RuntimeGroup`.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import re
import shlex
from collections.abc import Iterable
from typing import Any

import asyncssh
from dask.utils import format_bytes, parse_bytes

from dask_lazycluster._loop import on_loop, run_sync
from dask_lazycluster.config import setting
from dask_lazycluster.exceptions import (
    InvalidRuntimeError,
    LazyclusterError,
    NoRuntimesDetectedError,
)
from dask_lazycluster.runtime_mgmt import RuntimeGroup, _connect_all
from dask_lazycluster.runtimes import Runtime

logger = logging.getLogger(__name__)

DEFAULT_SSH_CONFIG = "~/.ssh/config"
#: Seconds a host may take to connect and answer the probe during discovery.
DISCOVERY_CONNECT_TIMEOUT = 5.0
#: Seconds an ``installed_executables`` / ``filter_commands`` check may run on a host.
CHECK_TIMEOUT = 60.0
# Hosts probed at the same time (each probe holds a socket and an SSH handshake).
_MAX_PARALLEL_PROBES = 64
# OpenSSH gives up on deeper Include nesting too.
_MAX_INCLUDE_DEPTH = 16
_KEYWORD = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)(?:\s*=\s*|\s+|$)(.*)")
_WILDCARD = re.compile(r"[*?!]")
# Runs "$1" with stdin open as a lifeline: when the SSH channel closes (timeout, Ctrl-C,
# manager gone) the watcher kills the command's whole process group.
_LIFELINE = (
    'exec 3<&0; (cat <&3; kill -KILL 0) >/dev/null 2>&1 & w=$!; '
    '(eval "$1") </dev/null 3<&-; rc=$?; kill $w 2>/dev/null; exit $rc'
)


def _split_line(line: str) -> tuple[str, list[str]] | None:
    """Return the lower-case keyword and the arguments of an ssh_config line, or None."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    match = _KEYWORD.match(stripped)
    if match is None:
        return None
    rest = match.group(2)
    try:
        args = shlex.split(rest, comments=True)
    except ValueError:  # unbalanced quotes: take the words as they are
        args = rest.split()
    return match.group(1).lower(), args


def _include_paths(argument: str) -> list[str]:
    """Files an ``Include`` argument names: ``~`` expanded, relative to ``~/.ssh``, globbed."""
    path = os.path.expanduser(argument)
    if not os.path.isabs(path):
        path = os.path.join(os.path.expanduser("~/.ssh"), path)
    return sorted(glob.glob(path))


def _collect_hosts(path: str, found: list[str], stack: tuple[str, ...]) -> None:
    real = os.path.realpath(path)
    if real in stack or len(stack) >= _MAX_INCLUDE_DEPTH:
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return
    for line in lines:
        parsed = _split_line(line)
        if parsed is None:
            continue
        keyword, args = parsed
        if keyword == "host":
            found.extend(a for a in args if not _WILDCARD.search(a) and a not in found)
        elif keyword == "include":
            for argument in args:
                for included in _include_paths(argument):
                    _collect_hosts(included, found, (*stack, real))


def ssh_config_hosts(ssh_config: str | None = None) -> list[str]:
    """Return the host names defined by ``Host`` entries of an SSH client config.

    ``Include`` directives are followed (relative paths are taken from ``~/.ssh``, globs are
    expanded, missing files are ignored, as OpenSSH does). Patterns holding ``*``, ``?`` or
    ``!`` describe no single host and are skipped; each name is listed once, in file order.

    Args:
        ssh_config: Path of the config; default ``~/.ssh/config`` (``~`` is expanded at call
            time, so a changed ``HOME`` applies).

    Returns:
        The host names.

    Raises:
        ValueError: If an explicitly given ``ssh_config`` does not exist.
    """
    path = os.path.expanduser(ssh_config or DEFAULT_SSH_CONFIG)
    if ssh_config is not None and not os.path.isfile(path):
        raise ValueError(f"ssh config {ssh_config!r} does not exist")
    found: list[str] = []
    _collect_hosts(path, found, ())
    return found


def _names(value: str | Iterable[str] | None, argument: str) -> list[str]:
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"{argument} must hold non-empty str, got {name!r}")
    return names


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, InvalidRuntimeError):
        return exc.cause
    return f"{type(exc).__name__}: {exc}"


async def _run_checked(
    runtime: Runtime, command: str, timeout: float
) -> tuple[int | None, str, str]:
    """Run ``command`` on the runtime's host; return exit status (None: timed out), stdout, stderr.

    The command runs behind a lifeline, so nothing of it survives a timeout.
    """
    with runtime._session_limit("a requirement check"):
        process = await runtime._connection.create_process(
            f"sh -c {shlex.quote(_LIFELINE)} lazycluster-check {shlex.quote(command)}"
        )
    try:
        result = await asyncio.wait_for(process.wait(), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return None, "", ""
    finally:
        process.close()
    return result.exit_status, str(result.stdout or ""), str(result.stderr or "")


async def _requirement_failures(
    runtime: Runtime, executables: list[str], commands: list[str], timeout: float
) -> list[str]:
    """Why ``runtime`` fails the executable and command requirements (empty: it passes)."""
    reasons: list[str] = []
    checks = []
    if executables:
        words = " ".join(shlex.quote(e) for e in executables)
        script = f'for e in {words}; do command -v "$e" >/dev/null 2>&1 || echo "missing:$e"; done'
        checks.append(_run_checked(runtime, script, timeout))
    checks.extend(_run_checked(runtime, c, timeout) for c in commands)
    # Every check ends before we answer, so none outlives a failed sibling.
    outcomes = await asyncio.gather(*checks, return_exceptions=True)
    results: list[tuple[int | None, str, str]] = []
    for outcome in outcomes:
        if isinstance(outcome, (OSError, asyncssh.Error, LazyclusterError)):
            return [f"checks failed: {outcome}"]
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    if executables:
        status, out, err = results.pop(0)
        missing = [line[8:] for line in out.splitlines() if line.startswith("missing:")]
        if status is None:
            reasons.append(f"looking for executables timed out after {timeout:g} s")
        elif missing:
            reasons.append(f"missing executable(s) {', '.join(missing)}")
        elif status != 0:
            reasons.append(f"looking for executables failed (exit {status}): {_last_line(err)}")
    for command, (status, out, err) in zip(commands, results, strict=True):
        if status is None:
            reasons.append(f"filter command {command!r} timed out after {timeout:g} s")
        elif status != 0:
            tail = _last_line(err) or _last_line(out)
            reasons.append(f"filter command {command!r} exited with {status}"
                           + (f": {tail}" if tail else ""))
    return reasons


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else ""


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
                return await Runtime._create(
                    name, self._working_dir, self._connect_options, self._python
                )

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
            min_memory: Least total memory, in bytes or as a Dask size string (``"4GiB"``).
            min_cpu_cores: Least number of usable CPU cores.
            installed_executables: Executable name(s) that ``command -v`` must find.
            filter_commands: Shell command(s) that must exit with status 0 on the host.
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
        include = _names(include_hosts, "include_hosts")
        exclude = _names(exclude_hosts, "exclude_hosts")
        self._check_known(include + exclude)
        for host in include:
            if host in self._inactive:
                raise InvalidRuntimeError(host, self._inactive[host])
        memory = self._min_memory(min_memory)
        if min_cpu_cores is not None and (
            isinstance(min_cpu_cores, bool) or not isinstance(min_cpu_cores, int)
        ):
            raise TypeError(f"min_cpu_cores must be an int or None, got {min_cpu_cores!r}")
        executables = _names(installed_executables, "installed_executables")
        commands = _names(filter_commands, "filter_commands")
        if working_dir is not None and not isinstance(working_dir, str):
            raise TypeError(f"working_dir must be a str or None, got {working_dir!r}")

        candidates = [
            r for h, r in self._runtimes.items() if (not include or h in include) and h not in exclude
        ]
        if not candidates:
            raise NoRuntimesDetectedError("include_hosts/exclude_hosts leave no reachable host")
        reasons: dict[str, list[str]] = {r.host: [] for r in candidates}
        for runtime in candidates:
            if gpu_required and not runtime.gpus:
                reasons[runtime.host].append("no GPU")
            if memory is not None and runtime.memory < memory:
                reasons[runtime.host].append(
                    f"memory {format_bytes(runtime.memory)} < min_memory {format_bytes(memory)}"
                )
            if min_cpu_cores is not None and runtime.cpu_cores < min_cpu_cores:
                reasons[runtime.host].append(
                    f"{runtime.cpu_cores} cpu cores < min_cpu_cores {min_cpu_cores}"
                )
        remaining = [r for r in candidates if not reasons[r.host]]
        if remaining and (executables or commands):
            failures = run_sync(on_loop(self._check_all(remaining, executables, commands)))
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
            selected = run_sync(_connect_all(
                [r.host for r in selected], working_dir, self._connect_options, self._python
            ))
            self._extra.extend(selected)
        return RuntimeGroup(runtimes=selected)

    @staticmethod
    def _min_memory(min_memory: int | str | None) -> int | None:
        if min_memory is None:
            return None
        if isinstance(min_memory, str):
            try:
                return int(parse_bytes(min_memory))
            except ValueError as exc:
                raise ValueError(f"min_memory {min_memory!r} is not a size: {exc}") from exc
        if isinstance(min_memory, bool) or not isinstance(min_memory, int):
            raise TypeError(f"min_memory must be bytes (int) or a size string, got {min_memory!r}")
        return min_memory

    @staticmethod
    async def _check_all(
        runtimes: list[Runtime], executables: list[str], commands: list[str]
    ) -> list[list[str]]:
        return list(await asyncio.gather(
            *(_requirement_failures(r, executables, commands, CHECK_TIMEOUT) for r in runtimes)
        ))

    # -- cleanup -------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Clean up every runtime the manager created (processes, forwards, temp dirs, SSH).

        Groups made by :meth:`create_group` share these runtimes, so they are closed too.
        Calling it twice is harmless.
        """
        runtimes = [*self._runtimes.values(), *self._extra]

        async def close_all() -> None:
            await asyncio.gather(*(r._cleanup() for r in runtimes), return_exceptions=True)

        run_sync(on_loop(close_all()))
