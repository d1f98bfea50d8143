"""Shell commands on a host, in the runtime's working dir and environment, and stopping them.

Scripts run behind the host's lifeline (``HostState.start_script``): closing the channel kills
everything they started. A deliberate stop kills the script's process group from a session of
its own instead, since the lifeline takes a closed channel for a vanished manager and removes
a private temp working dir with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex

import asyncssh

from dask_lazycluster._host import HostState


def shell_script(state: HostState, command: str, announce_group: bool = False) -> str:
    """A script that runs ``command`` in the working dir with the runtime's environment.

    The working dir is created first (same round trip): it may have been removed under us.

    Args:
        state: The host.
        command: The shell command.
        announce_group: Print the script's process group id as the first stdout line.

    Returns:
        The script, for ``HostState.start_script``.
    """
    quoted = shlex.quote(state.working_dir_path)
    state.wd_ready = True  # created by the script
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in state.env.items())
    # Field 5 of /proc/PID/stat is the process group ($$ is the lifeline wrapper's shell).
    first = "{ cut -d' ' -f5 /proc/$$/stat 2>/dev/null || echo 0; }\n" if announce_group else ""
    return f"{first}mkdir -p -m 700 {quoted} && cd {quoted} || exit 1\n{exports}{command}\n"


def _group_id(line: str) -> int | None:
    text = line.strip()
    return int(text) if text.isdigit() and int(text) > 1 else None


async def read_group(process: asyncssh.SSHClientProcess[str]) -> int | None:
    """Read the process group a script of :func:`shell_script` announced (its first line).

    Args:
        process: The script's process, nothing read from its stdout yet.

    Returns:
        The process group id; None if the host could not tell it.
    """
    return _group_id(await process.stdout.readline())


async def kill_group(
    state: HostState, process: asyncssh.SSHClientProcess[str], group: int | None
) -> None:
    """Stop a script from a session of its own: kill its process group, then close it.

    Closing the channel alone would kill it too, but the lifeline would then take the manager
    for gone and remove a private temp working dir the runtime still uses.

    Args:
        state: The host.
        process: The script's process (of :func:`shell_script` with ``announce_group``).
        group: Its process group, or None if not read yet (it is read here then).
    """
    if group is None:  # stopped before the script said it: it comes at once
        with contextlib.suppress(Exception):
            group = await asyncio.wait_for(read_group(process), 5)
    if group is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(state.ssh.gate.run(
                state.ssh.conn, f"kill -KILL -- -{group}", "stopping a task"), 10)
    process.close()


async def run_shell(
    state: HostState, command: str, what: str, timeout: float | None = None
) -> asyncssh.SSHCompletedProcess:
    """Run a short shell command as :func:`shell_script` does and return its result.

    Args:
        state: The host.
        command: The shell command.
        what: What it is for, for errors.
        timeout: Seconds it may run; then it is killed (None: no limit).

    Returns:
        The completed process (its exit status is not checked).

    Raises:
        TimeoutError: If it ran out of time; nothing of it is left running.
    """
    process = await state.start_script(shell_script(state, command, announce_group=True), what)

    async def finish() -> asyncssh.SSHCompletedProcess:
        group = None
        try:
            group = await read_group(process)
            return await process.wait()
        except asyncio.CancelledError:  # stopped, or out of time
            await kill_group(state, process, group)
            raise

    try:
        return await asyncio.wait_for(finish(), timeout)
    finally:
        process.close()
