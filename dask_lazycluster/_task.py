"""Work run on a runtime: :class:`RuntimeTask`, a named sequence of steps."""

from __future__ import annotations

import concurrent.futures
import copy
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


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
    """

    def __init__(self, name: str | None = None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {name!r}")
        self.name = name or f"task-{uuid.uuid4().hex[:8]}"
        self._steps: list[_Step] = []
        self._log: list[str] = []
        self._returns: list[Any] = []
        self._future: concurrent.futures.Future[None] | None = None
        self.host: str | None = None

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
        """Lines of output and step headers recorded so far."""
        return list(self._log)

    @property
    def function_returns(self) -> Iterator[Any]:
        """The return values of the task's function steps, in order."""
        yield from self._returns

    @property
    def is_running(self) -> bool:
        """Whether the task is executing right now."""
        return self._future is not None and not self._future.done()

    def print_log(self) -> None:
        """Print the execution log to stdout."""
        for line in self._log:
            print(line)

    def join(self) -> None:
        """Wait for an asynchronous execution to finish.

        Raises:
            TaskExecutionError: If a step failed.
        """
        if self._future is not None:
            self._future.result()

    def _record(self, line: str, debug: bool) -> None:
        self._log.append(line)
        if debug:
            print(f"[{self.host}] {line}", flush=True)
