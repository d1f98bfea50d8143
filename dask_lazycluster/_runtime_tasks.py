"""The tasks-and-files part of :class:`~dask_lazycluster.runtimes.Runtime` (:class:`TaskMethods`).

``Runtime`` inherits these methods; they are thin sync wrappers over its ``core``, which runs
each task on the SSH loop (``_task.start_task``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from dask_lazycluster._core import RuntimeCore
from dask_lazycluster._task import RuntimeTask, join_all


class TaskMethods:
    """Running tasks, functions and file transfers on a runtime, and their logs and results."""

    core: RuntimeCore

    def execute_task(
        self,
        task: RuntimeTask,
        execute_async: bool = True,
        omit_on_join: bool = False,
        debug: bool = False,
    ) -> RuntimeTask:
        """Run a task's steps on this runtime.

        Args:
            task: The task; a task already executed elsewhere is copied.
            execute_async: Return at once and let the task run in the background (wait with
                ``task.join()`` or :meth:`join`); if False, block until it is done.
            omit_on_join: Leave the task out of :meth:`join` and of the waiting done by
                ``function_returns`` (e.g. a service that never ends).
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
        task = self.core.execute_task(task, debug)
        task.omit_on_join = bool(omit_on_join)
        if not execute_async:
            task.join()
        return task

    def send_file(
        self, local_path: str, remote_path: str | None = None, execute_async: bool = False
    ) -> RuntimeTask:
        """Copy a local file or directory to the host (a one-step task).

        Args:
            local_path: The local path.
            remote_path: Target path; relative to the working directory, default its basename.
            execute_async: Return at once (wait with ``task.join()``) instead of waiting.

        Returns:
            The task doing the transfer.

        Raises:
            ValueError: If ``local_path`` does not exist.
            TaskExecutionError: If the transfer fails (from ``task.join()`` when async).
        """
        task = RuntimeTask(f"send-file-{local_path}-to-{self.core.host}")
        return self.execute_task(task.send_file(local_path, remote_path), execute_async)

    def get_file(
        self, remote_path: str, local_path: str | None = None, execute_async: bool = False
    ) -> RuntimeTask:
        """Copy a file or directory from the host to the manager (a one-step task).

        Args:
            remote_path: Remote path, relative to the working directory unless absolute.
            local_path: Local target; default: its basename in the current directory.
            execute_async: Return at once (wait with ``task.join()``) instead of waiting.

        Returns:
            The task doing the transfer.

        Raises:
            ValueError: If ``remote_path`` is empty.
            TaskExecutionError: If the transfer fails, e.g. the remote file does not exist
                (from ``task.join()`` when async).
        """
        task = RuntimeTask(f"get-file-{remote_path}-from-{self.core.host}")
        return self.execute_task(task.get_file(remote_path, local_path), execute_async)

    def execute_function(
        self,
        function: Callable[..., Any],
        execute_async: bool = False,
        debug: bool = False,
        **func_kwargs: Any,
    ) -> RuntimeTask:
        """Call a Python function on the host (a one-step task); see ``function_returns``.

        Args:
            function: The function (pickled with cloudpickle).
            execute_async: Return at once (wait with ``task.join()``) instead of waiting.
            debug: Print the remote output live.
            **func_kwargs: Keyword arguments for the function.

        Returns:
            The task; its ``function_returns`` yields the return value.

        Raises:
            TypeError: If ``function`` is not callable.
            TaskExecutionError: If the call fails (from ``task.join()`` when async).
        """
        if not callable(function):
            raise TypeError(f"function must be callable, got {function!r}")
        task = RuntimeTask(f"execute-function-{getattr(function, '__name__', 'function')}")
        return self.execute_task(task.run_function(function, **func_kwargs), execute_async,
                                 debug=debug)

    @property
    def function_returns(self) -> Iterator[Any]:
        """Return values of the function steps of every task run here, task by task.

        Each task is waited for before its values are yielded (except ``omit_on_join`` ones).
        """
        for task in list(self.core.tasks):
            yield from task.function_returns

    @property
    def alive_task_count(self) -> int:
        """Number of tasks currently running on this runtime (used to pick the least busy)."""
        return sum(1 for task in self.core.tasks if task.is_running)

    @property
    def alive_task_process_count(self) -> int:
        """Number of tasks currently running on this runtime (lazycluster's name)."""
        return self.alive_task_count

    def execution_log(self, task_name: str) -> list[str]:
        """The execution log of the task of that name run here (the first one, if several).

        Args:
            task_name: The task's name.

        Returns:
            Its ``execution_log``.

        Raises:
            ValueError: If no task of that name ran on this runtime.
        """
        for task in self.core.tasks:
            if task.name == task_name:
                return task.execution_log
        raise ValueError(f"no task {task_name!r} was executed on runtime {self.core.host!r}")

    def clear_tasks(self) -> None:
        """Forget the tasks run so far (their logs and returns); running ones keep running."""
        self.core.tasks.clear()

    def join(self) -> None:
        """Wait for every task started here, except those with ``omit_on_join``.

        Raises:
            TaskExecutionError: The first failure, after all tasks finished.
        """
        join_all(self.core.tasks)

    def print_log(self) -> None:
        """Print the execution log of every task and Dask process run on this runtime."""
        for task in list(self.core.tasks):  # with step headers (``task.print_log()``)
            print(f"=== {self.core.host}: {task.name}")
            task.print_log()
        for label, lines in self.core.servers.logs():
            print(f"=== {self.core.host}: {label}")
            print("\n".join(lines))
