"""Every error raised by dask-lazycluster; all derive from :class:`LazyclusterError`.

The constructors of lazycluster's errors take lazycluster's arguments (its
``lazycluster.exceptions`` module), so code that raises or inspects them keeps working after
the import prefix changes. The errors after :class:`TaskExecutionError` are this package's:
one class per cause, each with the host and the cause as attributes.
"""

from __future__ import annotations

from typing import Any


class LazyclusterError(Exception):
    """Base class of every error raised by dask-lazycluster.

    Args:
        msg: The error message.
        predecessor_excp: The exception that caused this one, if any; its text is appended
            to the message.
    """

    def __init__(self, msg: str = "", predecessor_excp: BaseException | None = None) -> None:
        self.msg = msg
        self.predecessor_excp = predecessor_excp
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.predecessor_excp is not None:
            return f"{self.msg} Predecessor Exception: {self.predecessor_excp}"
        return self.msg


class InvalidRuntimeError(LazyclusterError):
    """A host cannot be used as a runtime (unknown, unreachable, refused, no python...).

    Args:
        host: The host that failed.
        cause: Why it failed, in words a user can act on.
    """

    def __init__(self, host: str, cause: str = "") -> None:
        self.host = host
        self.cause = cause
        msg = f"host {host!r} is not a valid runtime"
        super().__init__(f"{msg}: {cause}" if cause else msg)


class PathCreationError(InvalidRuntimeError):
    """A directory could not be created on a runtime.

    It is an :class:`InvalidRuntimeError` too: a runtime without its working directory cannot
    be used.

    Args:
        path: The path that could not be created.
        host: The host where it was to be created (None: not on a host).
        detail: Why, e.g. the ``mkdir`` error.
    """

    def __init__(self, path: str, host: str | None = None, detail: str = "") -> None:
        self.path = path
        cause = f"directory {path!r} cannot be created" + (f": {detail}" if detail else "")
        super().__init__(host or "localhost", cause)
        self.host = host  # type: ignore[assignment]  # lazycluster's: None when not on a host


class PortInUseError(LazyclusterError):
    """A single requested port is not free where it must be.

    Args:
        port: The busy port.
        group: The ``RuntimeGroup`` where it is busy (lazycluster's argument). A str here is
            taken as ``where``.
        runtime: The ``Runtime`` where it is busy (lazycluster's argument).
        where: Where it is busy, in words (host names, or ``"localhost"`` for the manager);
            default: the hosts of ``group`` or the host of ``runtime``.
    """

    def __init__(
        self, port: int, group: Any = None, runtime: Any = None, where: str = ""
    ) -> None:
        if isinstance(group, str):  # PortInUseError(port, "host-1, host-2")
            where, group = where or group, None
        self.port = port
        self.group = group
        self.runtime = runtime
        if not where and group is not None:
            where = ", ".join(group.hosts)
        elif not where and runtime is not None:
            where = runtime.host
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
    """No reachable runtime was found (e.g. by ``RuntimeManager``).

    Args:
        predecessor_excp: Why: the exception that caused it (lazycluster's argument), or a
            description.
    """

    def __init__(self, predecessor_excp: BaseException | str | None = None) -> None:
        msg = "no runtimes detected"
        if isinstance(predecessor_excp, str):
            super().__init__(f"{msg}: {predecessor_excp}")
        else:
            super().__init__(msg, predecessor_excp)


class TaskExecutionError(LazyclusterError):
    """A step of a :class:`~dask_lazycluster.runtimes.RuntimeTask` failed on a host.

    Args:
        task_step_index: Index of the failing step (0-based, as in ``execution_log``).
        task: The task, or its name.
        host: The runtime host the task ran on.
        execution_log_file_path: Kept for lazycluster's signature; logs are kept in memory
            here (``task.execution_log``), so it is usually empty.
        output: The tail of the step's output, or the cause.
        predecessor_excp: The exception that caused it, if any.
    """

    def __init__(
        self,
        task_step_index: int,
        task: Any,
        host: str,
        execution_log_file_path: str = "",
        output: str = "",
        predecessor_excp: BaseException | None = None,
    ) -> None:
        self.task_step_index = task_step_index
        self.task = task
        self.task_name: str = task if isinstance(task, str) else task.name
        self.host = host
        self.execution_log_file_path = execution_log_file_path
        self.output = output
        msg = f"task {self.task_name!r} failed on host {host!r} at step {task_step_index + 1}"
        super().__init__(f"{msg}:\n{output}" if output else msg, predecessor_excp)


class ConnectionLostError(LazyclusterError):
    """The SSH connection to a host dropped (or the runtime was closed) while it was needed.

    Args:
        host: The host.
        cause: What was being done, or why the connection is gone.
    """

    def __init__(self, host: str, cause: str) -> None:
        self.host = host
        self.cause = cause
        super().__init__(f"the SSH connection to host {host!r} is not usable: {cause}")


class SessionRefusedError(LazyclusterError):
    """A host refused to open an SSH session even with none of ours open on the connection.

    Sessions beyond sshd's ``MaxSessions`` are queued, not refused; this error means the host
    allows no session at all for this connection (e.g. ``MaxSessions 0``).

    Args:
        host: The host.
        what: What the session was for.
        reason: sshd's reason.
    """

    def __init__(self, host: str, what: str, reason: str) -> None:
        self.host = host
        self.what = what
        self.reason = reason
        super().__init__(
            f"host {host!r} refused an SSH session for {what} ({reason}) although none of ours "
            f"was open: check MaxSessions in that host's sshd_config"
        )


class ForwardRefusedError(LazyclusterError):
    """A host refused a port forward for a port that is free there.

    Args:
        host: The host.
        port: The port.
        cause: Why (e.g. ``AllowTcpForwarding no`` in its sshd_config).
    """

    def __init__(self, host: str, port: int, cause: str) -> None:
        self.host = host
        self.port = port
        self.cause = cause
        super().__init__(f"host {host!r} refused to forward port {port}: {cause}")


class WorkerStartError(LazyclusterError):
    """A Dask worker (or another Dask server) failed to start on a host.

    Args:
        host: The host.
        worker: The worker's name.
        cause: Why, with the tail of its output.
    """

    def __init__(self, host: str, worker: str, cause: str) -> None:
        self.host = host
        self.worker = worker
        self.cause = cause
        super().__init__(f"{worker} failed to start on host {host!r}: {cause}")


class WorkerStartTimeoutError(WorkerStartError):
    """A Dask worker did not register with the scheduler in time (``worker-start-timeout``).

    Args:
        host: The host.
        worker: The worker's name.
        cause: How long was waited, with the tail of its output.
    """


class SetupError(WorkerStartError):
    """A ``setup`` line failed on a host, so no Dask process could start there.

    Args:
        host: The host.
        worker: The worker whose start ran the setup.
        cause: The failing line and its output.
    """


class WorkersUnavailableError(LazyclusterError):
    """Requested workers cannot run: the causes per host, as recorded when placing or starting.

    Raised by ``DaskCluster.wait_for_workers`` instead of a timeout when the cluster knows why
    the workers it waits for will not come.

    Args:
        requested: Workers requested.
        running: Workers running.
        causes: Host (or ``"*"`` for the whole cluster) to the reason.
    """

    def __init__(self, requested: int, running: int, causes: dict[str, str]) -> None:
        self.requested = requested
        self.running = running
        self.causes = dict(causes)
        reasons = "; ".join(f"{host}: {cause}" for host, cause in causes.items())
        super().__init__(f"{running} of {requested} requested workers run: {reasons}")


class MasterStartError(LazyclusterError):
    """The master (Dask scheduler) could not be started.

    Also importable from ``dask_lazycluster.cluster.exceptions``, lazycluster's path.

    Args:
        host: Where the master was to run.
        port: The port it was to listen on.
        cause: Why it failed.
    """

    def __init__(self, host: str, port: int | None, cause: str) -> None:
        self.host = host
        self.port = port
        self.cause = cause
        super().__init__(f"master could not be started on {host}:{port}: {cause}")


class UnknownClusterError(LazyclusterError):
    """No running cluster of this user on this machine has the name asked for.

    Args:
        name: The cluster name.
        where: The directory that holds the records of named clusters.
    """

    def __init__(self, name: str, where: str) -> None:
        self.name = name
        self.where = where
        super().__init__(f"no cluster named {name!r} is running (no record in {where}): "
                         f"`dask lazycluster ls` lists the running ones")


class StaleClusterError(LazyclusterError):
    """The process that owned a named cluster is gone; its record was stale and is removed.

    Whatever that process ran on its hosts ended with it (their lifeline is its SSH
    connections).

    Args:
        name: The cluster name.
        pid: The process id the record named.
    """

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        super().__init__(f"cluster {name!r} is not running any more: its process {pid} is gone "
                         f"(the stale record was removed)")


class ClusterNameInUseError(LazyclusterError):
    """A running cluster already has the name a new cluster asked for.

    Args:
        name: The cluster name.
        pid: The process that owns the running cluster.
    """

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        super().__init__(f"a cluster named {name!r} is already running (process {pid}): stop it "
                         f"with `dask lazycluster down {name}` or choose another name")
