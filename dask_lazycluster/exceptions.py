"""Every error raised by dask-lazycluster; all derive from :class:`LazyclusterError`."""

from __future__ import annotations


class LazyclusterError(Exception):
    """Base class of every error raised by dask-lazycluster."""


class InvalidRuntimeError(LazyclusterError):
    """A host cannot be used as a runtime (unknown, unreachable, refused, no python...).

    Args:
        host: The host that failed.
        cause: Why it failed, in words a user can act on.
    """

    def __init__(self, host: str, cause: str) -> None:
        self.host = host
        self.cause = cause
        super().__init__(f"host {host!r} is not a valid runtime: {cause}")


class PortInUseError(LazyclusterError):
    """A single requested port is not free where it must be.

    Args:
        port: The busy port.
        where: Where it is busy (host names, or ``"localhost"`` for the manager).
    """

    def __init__(self, port: int, where: str = "") -> None:
        self.port = port
        self.where = where
        msg = f"port {port} is already in use"
        super().__init__(f"{msg} on {where}" if where else msg)


class NoPortsLeftError(LazyclusterError):
    """None of the ports of a port list is free (or the list is exhausted).

    Args:
        detail: What was being allocated and from which list.
    """

    def __init__(self, detail: str = "") -> None:
        msg = "no free port left in the given port list"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class NoRuntimesDetectedError(LazyclusterError):
    """No reachable runtime was found (e.g. by ``RuntimeManager``)."""


class TaskExecutionError(LazyclusterError):
    """A step of a :class:`~dask_lazycluster.runtimes.RuntimeTask` failed on a host.

    Args:
        task_name: Name of the task.
        step: Description of the failing step (its number and kind where known).
        host: The runtime host the task ran on.
        detail: The tail of the step's output / the cause.
    """

    def __init__(self, task_name: str, step: str, host: str, detail: str = "") -> None:
        self.task_name = task_name
        self.step = step
        self.host = host
        self.detail = detail
        msg = f"task {task_name!r} failed on host {host!r} at step {step}"
        super().__init__(f"{msg}:\n{detail}" if detail else msg)
