"""Host requirements (:class:`Requirements`), checked by ``create_group`` and ``check_filter``.

``RuntimeManager.create_group`` and ``Runtime.check_filter`` share them. Hardware requirements
are checked against the facts the probe read at connection; executables and filter commands
run on the host, in the runtime's working directory with its environment (lazycluster ran
them as tasks).
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncssh
from dask.utils import format_bytes, parse_bytes

from dask_lazycluster._host import HostState
from dask_lazycluster._shell import run_shell
from dask_lazycluster.exceptions import LazyclusterError

#: Seconds an ``installed_executables`` / ``filter_commands`` check may run on a host.
CHECK_TIMEOUT = 60.0


def name_list(value: str | Iterable[str] | None, argument: str) -> list[str]:
    """A names argument as a list: None is empty, a str is one name.

    Args:
        value: The argument's value.
        argument: Its name, for errors.

    Returns:
        The names.

    Raises:
        TypeError: If a name is not a non-empty str.
    """
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"{argument} must hold non-empty str, got {name!r}")
    return names


def min_memory_bytes(min_memory: int | str | None) -> int | None:
    """``min_memory`` in bytes: an int counts MiB (lazycluster's "MB"), a str is a size.

    Args:
        min_memory: MiB as an int, a Dask size string such as ``"4GiB"``, or None.

    Returns:
        Bytes, or None.

    Raises:
        TypeError: If it is neither an int nor a str.
        ValueError: If the str is not a size.
    """
    if min_memory is None:
        return None
    if isinstance(min_memory, str):
        try:
            return int(parse_bytes(min_memory))
        except ValueError as exc:
            raise ValueError(f"min_memory {min_memory!r} is not a size: {exc}") from exc
    if isinstance(min_memory, bool) or not isinstance(min_memory, int):
        raise TypeError(f"min_memory must be MiB (int) or a size string, got {min_memory!r}")
    return min_memory * 2**20


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else ""


@dataclass
class Requirements:
    """What a host must offer; build it with :meth:`from_arguments`.

    Args:
        gpu_required: A GPU must be listed by ``nvidia-smi -L``.
        min_memory: Least total memory in bytes (None: any).
        min_cpu_cores: Least number of usable CPU cores (None: any).
        executables: Executables ``command -v`` must find.
        commands: Shell commands that must succeed.
    """

    gpu_required: bool = False
    min_memory: int | None = None
    min_cpu_cores: int | None = None
    executables: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    @classmethod
    def from_arguments(
        cls,
        gpu_required: bool = False,
        min_memory: int | str | None = None,
        min_cpu_cores: int | None = None,
        installed_executables: str | Iterable[str] | None = None,
        filter_commands: str | Iterable[str] | None = None,
    ) -> Requirements:
        """Check and convert the arguments of ``create_group`` / ``check_filter``.

        Args:
            gpu_required: Require a GPU.
            min_memory: MiB as an int, or a Dask size string.
            min_cpu_cores: Least number of CPU cores.
            installed_executables: Executable name(s).
            filter_commands: Shell command(s).

        Returns:
            The requirements.

        Raises:
            TypeError: If an argument has the wrong type.
            ValueError: If ``min_memory`` is not a size.
        """
        if min_cpu_cores is not None and (
            isinstance(min_cpu_cores, bool) or not isinstance(min_cpu_cores, int)
        ):
            raise TypeError(f"min_cpu_cores must be an int or None, got {min_cpu_cores!r}")
        return cls(
            bool(gpu_required),
            min_memory_bytes(min_memory),
            min_cpu_cores,
            name_list(installed_executables, "installed_executables"),
            name_list(filter_commands, "filter_commands"),
        )

    def hardware_failures(self, state: HostState) -> list[str]:
        """Why a host fails the hardware requirements, from its probed facts.

        Args:
            state: The host.

        Returns:
            The reasons; empty if it passes.
        """
        info = state.info
        reasons = []
        if self.gpu_required and not info["gpus"]:
            reasons.append("no GPU")
        memory = int(info["memory"])
        if self.min_memory is not None and memory < self.min_memory:
            reasons.append(
                f"memory {format_bytes(memory)} < min_memory {format_bytes(self.min_memory)}")
        cores = int(info["cpu_cores"])
        if self.min_cpu_cores is not None and cores < self.min_cpu_cores:
            reasons.append(f"{cores} cpu cores < min_cpu_cores {self.min_cpu_cores}")
        return reasons

    async def command_failures(self, state: HostState, timeout: float = CHECK_TIMEOUT) -> list[str]:
        """Why a host fails the executable and command requirements (run there in parallel).

        A filter command passes when it exits with status 0 without printing ``false`` as its
        last line, so lazycluster's ``... && echo true || echo false`` style works too.

        Args:
            state: The host.
            timeout: Seconds each check may run; it is killed then.

        Returns:
            The reasons; empty if it passes.
        """
        checks = []
        if self.executables:
            words = " ".join(shlex.quote(e) for e in self.executables)
            checks.append(f'for e in {words}; do command -v "$e" >/dev/null 2>&1 || '
                          f'echo "missing:$e"; done')
        checks.extend(self.commands)
        # Every check ends before we answer, so none outlives a failed sibling.
        outcomes = await asyncio.gather(
            *(_run_checked(state, check, timeout) for check in checks), return_exceptions=True)
        results: list[tuple[int | None, str, str]] = []
        for outcome in outcomes:
            if isinstance(outcome, OSError | asyncssh.Error | LazyclusterError):
                return [f"checks failed: {outcome}"]
            if isinstance(outcome, BaseException):
                raise outcome
            results.append(outcome)
        reasons = []
        if self.executables:
            status, out, err = results.pop(0)
            missing = [line[8:] for line in out.splitlines() if line.startswith("missing:")]
            if status is None:
                reasons.append(f"looking for executables timed out after {timeout:g} s")
            elif missing:
                reasons.append(f"missing executable(s) {', '.join(missing)}")
            elif status != 0:
                reasons.append(f"looking for executables failed (exit {status}): "
                               f"{_last_line(err)}")
        for command, (status, out, err) in zip(self.commands, results, strict=True):
            if status is None:
                reasons.append(f"filter command {command!r} timed out after {timeout:g} s")
            elif status != 0:
                tail = _last_line(err) or _last_line(out)
                reasons.append(f"filter command {command!r} exited with {status}"
                               + (f": {tail}" if tail else ""))
            elif _last_line(out).strip().lower() == "false":
                reasons.append(f"filter command {command!r} printed false")
        return reasons

    async def failures(self, state: HostState, timeout: float = CHECK_TIMEOUT) -> list[str]:
        """Why a host fails the requirements: hardware first, then (if it passes) commands.

        Args:
            state: The host.
            timeout: Seconds each command check may run.

        Returns:
            The reasons; empty if it meets every requirement.
        """
        reasons = self.hardware_failures(state)
        if not reasons and (self.executables or self.commands):
            reasons = await self.command_failures(state, timeout)
        return reasons


async def _run_checked(
    state: HostState, command: str, timeout: float
) -> tuple[int | None, str, str]:
    """Exit status (None: timed out and killed), stdout and stderr of a check."""
    try:
        result = await run_shell(state, command, "a requirement check", timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return None, "", ""
    return result.exit_status, str(result.stdout or ""), str(result.stderr or "")
