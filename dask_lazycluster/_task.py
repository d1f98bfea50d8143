"""Work run on a runtime: :class:`RuntimeTask`, a named sequence of steps, and its execution.

The step runners live here with the class, so a task's log and results stay this module's
business; a runtime only calls :func:`start_task`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import asyncssh
import cloudpickle

from dask_lazycluster._host import HostState
from dask_lazycluster._loop import get_loop
from dask_lazycluster._shell import kill_group, read_group, shell_script
from dask_lazycluster._supervisor import tail
from dask_lazycluster.exceptions import LazyclusterError, TaskExecutionError
from dask_lazycluster.remote.actions import RESULT_HEADER

logger = logging.getLogger(__name__)


class TaskRunner(Protocol):
    """What :meth:`RuntimeTask.execute` needs of a runtime (a ``Runtime`` is one)."""

    def execute_task(
        self,
        task: RuntimeTask,
        execute_async: bool = True,
        omit_on_join: bool = False,
        debug: bool = False,
    ) -> RuntimeTask:
        """Run the task; see ``Runtime.execute_task``."""


@dataclass
class _Step:
    kind: str  # "command" | "function" | "send_file" | "get_file"
    args: tuple[Any, ...]

    def describe(self, index: int) -> str:
        shown = self.args[0].__name__ if self.kind == "function" else self.args[0]
        return f"{index + 1} ({self.kind} {shown!s})"


class RuntimeTask:
    """A named sequence of steps (commands, functions, file transfers) run on one runtime.

    Steps are added with the chainable methods and run in order by
    :meth:`Runtime.execute_task` or :meth:`RuntimeGroup.execute_task`; the first failing step
    stops the task with :class:`TaskExecutionError`.

    Args:
        name: A name for logs; a unique one is generated when omitted.

    Examples:
        >>> def add(a, b):
        ...     return a + b
        >>> task = (RuntimeTask("prepare")
        ...         .send_file("requirements.txt")
        ...         .run_command("pip install -q -r requirements.txt")
        ...         .run_function(add, a=1, b=2))                 # doctest: +SKIP
        >>> runtime.execute_task(task, execute_async=False)       # doctest: +SKIP
        >>> list(task.function_returns)                           # doctest: +SKIP
        [3]
    """

    def __init__(self, name: str | None = None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {name!r}")
        self.name = name or f"task-{uuid.uuid4().hex[:8]}"
        self._steps: list[_Step] = []
        self._log: list[str] = []
        self._step_logs: list[list[str]] = []  # the output lines of each step begun
        self._returns: list[Any] = []
        self._future: concurrent.futures.Future[None] | None = None
        self.host: str | None = None
        #: Leave the task out of ``join()`` of its runtime or group, and of the waiting of
        #: ``function_returns`` (set by ``execute_task``).
        self.omit_on_join = False
        self._env: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<RuntimeTask {self.name!r}: {len(self._steps)} steps, host={self.host!r}>"

    def run_command(self, command: str) -> RuntimeTask:
        """Add a shell command step, run in the runtime's working directory.

        Args:
            command: The shell command.

        Returns:
            The task itself, for chaining.

        Raises:
            ValueError: If the command is empty or not a str.
        """
        if not isinstance(command, str) or not command.strip():
            raise ValueError(f"command must be a non-empty str, got {command!r}")
        self._steps.append(_Step("command", (command,)))
        return self

    def run_function(self, function: Callable[..., Any], **func_kwargs: Any) -> RuntimeTask:
        """Add a step that calls a Python function on the runtime (pickled with cloudpickle).

        Its return value is appended to :attr:`function_returns`.

        Args:
            function: The function to call.
            **func_kwargs: Keyword arguments for it.

        Returns:
            The task itself, for chaining.

        Raises:
            TypeError: If ``function`` is not callable.
        """
        if not callable(function):
            raise TypeError(f"function must be callable, got {function!r}")
        self._steps.append(_Step("function", (function, func_kwargs)))
        return self

    def send_file(self, local_path: str, remote_path: str | None = None) -> RuntimeTask:
        """Add a step that copies a local file or directory to the runtime.

        Args:
            local_path: The local path.
            remote_path: Where to put it; relative paths and None mean the working directory.

        Returns:
            The task itself, for chaining.

        Raises:
            ValueError: If ``local_path`` does not exist.
        """
        if not os.path.exists(local_path):
            raise ValueError(f"local_path {local_path!r} does not exist")
        self._steps.append(_Step("send_file", (local_path, remote_path)))
        return self

    def get_file(self, remote_path: str, local_path: str | None = None) -> RuntimeTask:
        """Add a step that copies a file or directory from the runtime to the manager.

        Args:
            remote_path: The remote path; relative to the working directory unless absolute.
            local_path: Where to put it locally; defaults to the current directory.

        Returns:
            The task itself, for chaining.

        Raises:
            ValueError: If ``remote_path`` is empty.
        """
        if not isinstance(remote_path, str) or not remote_path:
            raise ValueError(f"remote_path must be a non-empty str, got {remote_path!r}")
        self._steps.append(_Step("get_file", (remote_path, local_path)))
        return self

    def copy(self) -> RuntimeTask:
        """Return a fresh task with the same steps (used to run one task on many runtimes).

        Returns:
            The copy, not yet executed.
        """
        twin = RuntimeTask(self.name)
        twin._steps = copy.copy(self._steps)
        return twin

    @property
    def execution_log(self) -> list[str]:
        """The output of each step begun so far, one entry per step (index 0 is step 1).

        An entry holds the step's output lines (stderr lines prefixed ``stderr: ``) joined
        with newlines; it is empty for a step without output. :meth:`print_log` shows them
        with step headers.
        """
        return ["\n".join(lines) for lines in self._step_logs]

    @property
    def execution_log_file_path(self) -> str | None:
        """Always None: the log is kept in memory (:attr:`execution_log`), not in a file."""
        return None

    @property
    def env_variables(self) -> dict[str, str]:
        """Environment variables the task ran with (its runtime's, set by ``execute_task``)."""
        return dict(self._env)

    @env_variables.setter
    def env_variables(self, env_variables: dict[str, str]) -> None:
        if not isinstance(env_variables, dict):
            raise TypeError(f"env_variables must be a dict, got {env_variables!r}")
        self._env = dict(env_variables)

    @property
    def function_returns(self) -> Iterator[Any]:
        """The return values of the task's function steps, in order.

        Waits for a running task to end first, unless it was started with ``omit_on_join``;
        a failed step has no value (``join()`` raises its error).
        """
        if self._future is not None and not self.omit_on_join:
            concurrent.futures.wait([self._future])
        yield from self._returns

    @property
    def is_running(self) -> bool:
        """Whether the task is executing right now."""
        return self._future is not None and not self._future.done()

    def print_log(self) -> None:
        """Print the execution log to stdout: each step's header and output lines."""
        for line in self._log:
            print(line)

    def execute(self, connection: TaskRunner, debug: bool = False) -> None:
        """Run the task on a runtime and wait for it (``connection.execute_task(...)``).

        Args:
            connection: The [Runtime][dask_lazycluster.runtimes.Runtime] to run on
                (lazycluster took a fabric ``Connection`` here).
            debug: Print the remote output live.

        Raises:
            TypeError: If ``connection`` is not a Runtime.
            TaskExecutionError: If a step fails.
        """
        if not callable(getattr(connection, "execute_task", None)):
            raise TypeError(
                f"connection must be a Runtime (fabric Connections are not used), got "
                f"{connection!r}"
            )
        ran = connection.execute_task(self, execute_async=False, debug=debug)
        if ran is not self:  # it ran a copy (this task was executed before): take its results
            self._step_logs, self._log, self._returns = ran._step_logs, ran._log, ran._returns

    def cleanup(self) -> None:
        """Release local resources: there are none (kept for lazycluster's API)."""

    def join(self) -> None:
        """Wait for an asynchronous execution to finish (at once if it was stopped).

        Raises:
            TaskExecutionError: If a step failed.
        """
        if self._future is not None and not self._future.cancelled():
            self._future.result()

    def _begin_step(self, header: str, debug: bool) -> None:
        self._step_logs.append([])
        self._record(header, debug, output=False)

    def _record(self, line: str, debug: bool, output: bool = True) -> None:
        self._log.append(line)
        if output and self._step_logs:
            self._step_logs[-1].append(line)
        if debug:
            print(f"[{self.host}] {line}", flush=True)


def join_all(tasks: Iterable[RuntimeTask]) -> None:
    """Wait for every task, then raise the first failure (one must not hide the others' end).

    Args:
        tasks: The tasks; those with ``omit_on_join`` are not waited for.

    Raises:
        TaskExecutionError: The first failure, after all tasks finished.
    """
    errors = []
    for task in list(tasks):
        if task.omit_on_join:
            continue
        try:
            task.join()
        except Exception as exc:  # collect, so one failure does not hide the others' end
            errors.append(exc)
    if errors:
        raise errors[0]


# -- execution on a host ------------------------------------------------------------------------


def start_task(task: RuntimeTask, state: HostState, debug: bool) -> RuntimeTask:
    """Run a task's steps on a host in the background (``task.join()`` waits).

    Args:
        task: The task; one already started elsewhere is copied.
        state: The host.
        debug: Print remote output live.

    Returns:
        The task being executed.
    """
    if task._future is not None:
        task = task.copy()
    task.host = state.host
    task.env_variables = state.env
    task._future = asyncio.run_coroutine_threadsafe(_execute(task, state, debug), get_loop())
    return task


def stop_task(task: RuntimeTask) -> None:
    """Stop a running task: its SSH channel closes, and the host kills what it started.

    ``task.join()`` then returns at once. A task that ended already is left as it is.

    Args:
        task: The task.
    """
    if task._future is not None:
        task._future.cancel()


async def _execute(task: RuntimeTask, state: HostState, debug: bool) -> None:
    for index, step in enumerate(task._steps):
        label = step.describe(index)
        task._begin_step(f"--- step {label}", debug)
        try:
            if step.kind == "command":
                await _run_command(task, index, state, step.args[0], debug)
            elif step.kind == "function":
                await _run_function(task, index, state, step.args[0], step.args[1], debug)
            elif step.kind == "send_file":
                await send_file(state, *step.args)
            else:
                await get_file(state, *step.args)
        except TaskExecutionError:
            raise
        except (OSError, asyncssh.Error, LazyclusterError) as exc:
            raise TaskExecutionError(index, task, state.host, "", f"step {label}: {exc}") from exc
        if not debug:
            logger.debug("%s on %s step %s:\n%s", task.name, state.host, label, tail(task._log))


async def _run_command(
    task: RuntimeTask, index: int, state: HostState, command: str, debug: bool
) -> None:
    process = await state.start_script(
        shell_script(state, command, announce_group=True), f"task {task.name!r}")

    async def pump(stream: asyncssh.SSHReader[str], label: str) -> None:
        async for line in stream:
            if not line:  # asyncssh yields an empty read at EOF
                continue
            task._record(f"{label}{line.rstrip()}", debug)

    group = None
    try:
        group = await read_group(process)
        await asyncio.gather(pump(process.stdout, ""), pump(process.stderr, "stderr: "))
        process.stdin.write_eof()
        result = await process.wait()
    except asyncio.CancelledError:  # stop_task
        await kill_group(state, process, group)
        raise
    if result.exit_status != 0:
        raise TaskExecutionError(
            index, task, state.host, "",
            f"command {command!r}: exit status {result.exit_status}\n{tail(task._log)}")


async def _run_function(
    task: RuntimeTask, index: int, state: HostState, function: Callable[..., Any],
    kwargs: dict[str, Any], debug: bool,
) -> None:
    wd = state.working_dir_path
    state.wd_ready = True  # created by the remote side (same round trip)
    payload = cloudpickle.dumps((function, kwargs))
    process = await state.start_python(f"task {task.name!r}")
    # stdin stays open: its end tells the remote side to kill the function's process group.
    process.stdin.write(state.request("function", size=len(payload), cwd=wd) + payload)

    async def pump_log() -> None:
        async for raw in process.stderr:
            if raw:
                task._record(raw.decode(errors="replace").rstrip(), debug)

    try:
        output, _ = await asyncio.gather(process.stdout.read(), pump_log())
    finally:  # also when stopped (stop_task): the host then kills the function
        state.release_parked(process)  # "bye": an orderly end keeps the working dir
    await process.wait()
    name = getattr(function, "__name__", "function")
    _, sep, rest = output.partition(RESULT_HEADER)
    if not sep:
        raise TaskExecutionError(
            index, task, state.host, "",
            f"function {name}: the remote python gave no result\n{tail(task._log)}")
    size_text, _, data = rest.partition(b"\n")
    status, value = cloudpickle.loads(data[: int(size_text)])
    if status != "ok":
        raise TaskExecutionError(index, task, state.host, "", f"function {name}: {value}")
    task._returns.append(value)


def remote_path(state: HostState, path: str | None, default_name: str) -> str:
    """A remote path: relative ones and None are taken in the working directory.

    Args:
        state: The host.
        path: The path given, or None.
        default_name: The name used when ``path`` is None.

    Returns:
        The absolute remote path.
    """
    wd = state.working_dir_path
    if path is None:
        return f"{wd}/{default_name}"
    return path if path.startswith("/") else f"{wd}/{path}"


async def _prepare_working_dir(state: HostState, sftp: asyncssh.SFTPClient) -> None:
    """(Re)create the working dir through SFTP: no extra session needed."""
    wd = state.working_dir_path
    if not await sftp.isdir(wd):
        await sftp.makedirs(wd, attrs=asyncssh.SFTPAttrs(permissions=0o700), exist_ok=True)
    state.wd_ready = True


async def send_file(state: HostState, local_path: str, remote: str | None = None) -> str:
    """Copy a local file or directory to the host.

    Args:
        state: The host.
        local_path: The local path.
        remote: Target path; relative to the working directory, default its basename.

    Returns:
        The remote path written.
    """
    target = remote_path(state, remote, os.path.basename(local_path.rstrip("/")))
    async with state.ssh.gate.sftp(state.ssh.conn, "a file transfer") as sftp:
        await _prepare_working_dir(state, sftp)
        await sftp.put(local_path, target, recurse=True, preserve=True)
    return target


async def get_file(state: HostState, remote: str, local_path: str | None = None) -> str:
    """Copy a file or directory from the host to the manager.

    Args:
        state: The host.
        remote: Remote path, relative to the working directory unless absolute.
        local_path: Local target; default its basename in the current directory.

    Returns:
        The local path written.
    """
    source = remote_path(state, remote, "")
    target = local_path or os.path.join(os.getcwd(), os.path.basename(source.rstrip("/")))
    async with state.ssh.gate.sftp(state.ssh.conn, "a file transfer") as sftp:
        await _prepare_working_dir(state, sftp)
        await sftp.get(source, target, recurse=True, preserve=True)
    return target
