"""Many runtimes as one group (:class:`RuntimeGroup`) with group-wide ports and tunnels.

Its async operations live in :class:`~dask_lazycluster._group_core.GroupCore` (``group.core``).
The class is re-exported from ``dask_lazycluster.runtime_mgmt``, lazycluster's module path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from dask_lazycluster._group_core import GroupCore, host_list
from dask_lazycluster._loop import on_loop, run_sync
from dask_lazycluster._task import join_all
from dask_lazycluster.runtimes import Runtime, RuntimeTask, connect_runtimes
from dask_lazycluster.utils import preload_dashboard, validate_port, validate_ports

logger = logging.getLogger(__name__)


class RuntimeGroup:
    """A set of runtimes used together: tasks on all of them, ports free on all of them.

    "Free in the group" means free on every runtime (and on the manager where it takes part).
    A port list means "the first port that is free"; a single port means "exactly this one or
    :class:`PortInUseError`"; an exhausted list is :class:`NoPortsLeftError`.

    Args:
        runtimes: Existing runtimes to group.
        hosts: Host names to connect to (validated in parallel); exactly one of ``runtimes``
            and ``hosts`` must be given.
        working_dir: Remote working directory for runtimes created from ``hosts``.
        connect_options: ``asyncssh.connect`` options for runtimes created from ``hosts``.
        python: Remote python for runtimes created from ``hosts``.

    Raises:
        ValueError: If both or neither of ``runtimes``/``hosts`` are given, the list is empty or
            holds a host twice.
        TypeError: If a host name is not a non-empty str.
        InvalidRuntimeError: If a host cannot be used (no connection is left open then).

    Examples:
        >>> group = RuntimeGroup(hosts=["node1", "node2"])          # doctest: +SKIP
        >>> task = RuntimeTask("where").run_command("hostname")
        >>> group.execute_task(task, broadcast=True, execute_async=False)  # doctest: +SKIP
        >>> port = group.get_free_port(list(range(9000, 9100)))     # free on every host
        >>> group.expose_port_from_runtime_to_group("node1", 8888)  # node1's 8888 everywhere
        >>> group.cleanup()                                         # doctest: +SKIP
    """

    def __init__(
        self,
        runtimes: list[Runtime] | None = None,
        hosts: list[str] | None = None,
        working_dir: str | None = None,
        connect_options: dict[str, Any] | None = None,
        python: str | None = None,
    ) -> None:
        if (runtimes is None) == (hosts is None):
            raise ValueError("give exactly one of runtimes= or hosts=")
        self._runtimes: dict[str, Runtime] = {}
        self._tasks: list[tuple[RuntimeTask, bool]] = []
        #: The async group operations the cluster layer uses (ports, forwards, reachability).
        self.core = GroupCore(self._runtimes)
        if runtimes is not None:
            if not runtimes:
                raise ValueError("runtimes must not be empty")
            for runtime in runtimes:
                self.add_runtime(runtime)
            return
        names = host_list(hosts, "hosts")
        if not names:
            raise ValueError("hosts must not be empty")
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise TypeError(f"hosts must hold non-empty str host names, got {name!r}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"hosts lists {', '.join(duplicates)} more than once")
        # Groups are made for Dask clusters: their scheduler's slowest import runs meanwhile.
        preload_dashboard()
        created = run_sync(connect_runtimes(names, working_dir, connect_options, python))
        self._runtimes.update((r.host, r) for r in created)

    def __repr__(self) -> str:
        return f"<RuntimeGroup {self.hosts}>"

    # -- membership -----------------------------------------------------------------------------

    @property
    def hosts(self) -> list[str]:
        """Host names, in group order."""
        return list(self._runtimes)

    @property
    def runtimes(self) -> list[Runtime]:
        """The runtimes, in group order."""
        return list(self._runtimes.values())

    @property
    def runtime_count(self) -> int:
        """Number of runtimes in the group."""
        return len(self._runtimes)

    def add_runtime(
        self, host: str | Runtime | None = None, runtime: Runtime | str | None = None
    ) -> Runtime:
        """Add a runtime, or connect to a host name and add its runtime.

        Give exactly one of the two (either may be a host name or a Runtime).

        Args:
            host: A host name to create the runtime from.
            runtime: A Runtime.

        Returns:
            The added runtime.

        Raises:
            ValueError: If a runtime for that host is already in the group, or not exactly
                one of ``host`` and ``runtime`` is given.
            InvalidRuntimeError: If a host name cannot be used.
            TypeError: If the value is neither a Runtime nor a str.
        """
        if (host is None) == (runtime is None):
            raise ValueError("give exactly one of host= or runtime=")
        runtime = host if runtime is None else runtime
        if isinstance(runtime, str):
            if runtime in self._runtimes:
                raise ValueError(f"host {runtime!r} is already in the group")
            runtime = Runtime(runtime)
        if not isinstance(runtime, Runtime):
            raise TypeError(f"runtime must be a Runtime or a host name, got {runtime!r}")
        if runtime.host in self._runtimes:
            raise ValueError(f"host {runtime.host!r} is already in the group")
        self._runtimes[runtime.host] = runtime
        return runtime

    def remove_runtime(self, host: str) -> Runtime:
        """Take a runtime out of the group (it stays connected; call its ``cleanup``).

        Args:
            host: Its host name.

        Returns:
            The removed runtime.

        Raises:
            ValueError: If the host is not in the group.
        """
        self._check_hosts([host])
        return self._runtimes.pop(host)

    def contains_runtime(self, host: str) -> bool:
        """Whether a runtime for ``host`` is in the group.

        Args:
            host: The host name.

        Returns:
            True if it is.
        """
        return host in self._runtimes

    def _check_hosts(self, hosts: Iterable[str]) -> None:
        unknown = [h for h in hosts if h not in self._runtimes]
        if unknown:
            raise ValueError(f"host(s) {', '.join(map(repr, unknown))} not in the group {self.hosts}")

    def get_runtime(self, host: str | None = None) -> Runtime:
        """Return the runtime of ``host``, or the least busy one.

        Args:
            host: A host name; None picks the runtime with the fewest running tasks.

        Returns:
            The runtime.

        Raises:
            ValueError: If the host is not in the group.
        """
        if host is None:
            return min(self._runtimes.values(), key=lambda r: r.alive_task_count)
        self._check_hosts([host])
        return self._runtimes[host]

    def get_runtimes(
        self,
        include_hosts: list[str] | str | None = None,
        exclude_hosts: list[str] | str | None = None,
    ) -> dict[str, Runtime]:
        """Return runtimes by host, filtered.

        Args:
            include_hosts: Only these hosts (all if None): a host name or a list of them.
            exclude_hosts: Not these hosts: a host name or a list of them.

        Returns:
            Host name to runtime, in group order.

        Raises:
            ValueError: If a named host is not in the group, or both arguments are given.
        """
        include = host_list(include_hosts, "include_hosts")
        exclude = host_list(exclude_hosts, "exclude_hosts")
        if include and exclude:
            raise ValueError("give include_hosts or exclude_hosts, not both")
        self._check_hosts(include + exclude)
        return {
            host: runtime
            for host, runtime in self._runtimes.items()
            if (not include or host in include) and host not in exclude
        }

    # -- ports ----------------------------------------------------------------------------------

    def has_free_port(self, port: int, exclude_hosts: list[str] | str | None = None) -> bool:
        """Whether ``port`` is free on every runtime of the group.

        Args:
            port: The port.
            exclude_hosts: Hosts not to check.

        Returns:
            True if free everywhere checked.
        """
        validate_port(port, "port")
        runtimes = list(self.get_runtimes(exclude_hosts=exclude_hosts).values())
        busy = run_sync(on_loop(self.core.busy_ports(runtimes)))
        return not any(port in used for used in busy.values())

    def get_free_port(
        self, ports: int | list[int], enforce_check_on_localhost: bool = False
    ) -> int:
        """Return the first port free on every runtime (and the manager if asked).

        Args:
            ports: A port list (first free wins) or a single port (it or an error).
            enforce_check_on_localhost: Also require the port free on the manager.

        Returns:
            The port.

        Raises:
            PortInUseError: If a single port was given and it is busy.
            NoPortsLeftError: If no port of the list is free.
        """
        return run_sync(
            on_loop(self.core.pick_port(ports, self.runtimes, enforce_check_on_localhost, "ports"))
        )

    def expose_port_to_runtimes(
        self,
        local_port: int,
        runtime_port: int | list[int] | None = None,
        exclude_hosts: list[str] | str | None = None,
    ) -> int:
        """Make a manager port reachable as ``localhost:runtime_port`` on every runtime.

        Args:
            local_port: The port on the manager.
            runtime_port: The port on the runtimes: a port (it, or PortInUseError), a list
                (the first port free on every runtime concerned), or None (``local_port``).
            exclude_hosts: Runtime(s) to leave out: a host name or a list of them.

        Returns:
            The port on the runtimes.

        Raises:
            PortInUseError: If a single port is busy on a runtime (nothing is left forwarded).
            NoPortsLeftError: If no port of a ``runtime_port`` list is free.
            ValueError: If an excluded host is not in the group.
            TypeError: If a port is not an int.
        """
        validate_port(local_port, "local_port")
        if isinstance(runtime_port, list):
            validate_ports(runtime_port, "runtime_port")
        elif runtime_port is not None:
            validate_port(runtime_port, "runtime_port")
        return run_sync(
            on_loop(self.core.expose_to_runtimes(local_port, runtime_port, exclude_hosts))
        )

    def expose_port_from_runtime_to_group(
        self, host: str, runtime_port: int, group_port: int | list[int] | None = None
    ) -> int:
        """Make a service on one runtime reachable as ``localhost:group_port`` everywhere.

        Traffic to ``localhost:group_port`` on the manager or on any other runtime reaches
        ``localhost:runtime_port`` on ``host``; only SSH has to be open between machines.

        Args:
            host: The runtime where the service listens.
            runtime_port: Its port there.
            group_port: Port to use in the group: a port, a list (first free), or None
                (``runtime_port``).

        Returns:
            The group port.

        Raises:
            ValueError: If ``host`` is not in the group.
            PortInUseError: If a single ``group_port`` is busy on the manager or a runtime.
            NoPortsLeftError: If no port of a ``group_port`` list is free.
        """
        self._check_hosts([host])
        validate_port(runtime_port, "runtime_port")
        return run_sync(
            on_loop(self.core.expose_from_runtime_to_group(host, runtime_port, group_port))
        )

    def close_port_forward(self, port: int) -> None:
        """Close every forward of ``port`` made through any runtime of the group.

        Args:
            port: The forwarded (listening) port.
        """
        run_sync(on_loop(self.core.close_port(port)))

    # -- tasks ----------------------------------------------------------------------------------

    def execute_task(
        self,
        task: RuntimeTask,
        host: str | None = None,
        broadcast: bool = False,
        execute_async: bool = True,
        omit_on_join: bool = False,
        debug: bool = False,
    ) -> RuntimeTask | list[RuntimeTask]:
        """Run a task on one runtime (``host``, or the least busy) or on all (``broadcast``).

        Args:
            task: The task.
            host: The runtime to use; ignored when broadcasting.
            broadcast: Run a copy on every runtime.
            execute_async: Return at once (see :meth:`join`) instead of waiting.
            omit_on_join: Leave the task out of :meth:`join` (e.g. a service that never ends).
            debug: Print remote output live.

        Returns:
            The task, or one task per runtime when broadcasting.

        Raises:
            TypeError: If ``task`` is not a RuntimeTask.
            ValueError: If ``host`` is not in the group.
            TaskExecutionError: If a step fails and ``execute_async`` is False.
        """
        if not isinstance(task, RuntimeTask):
            raise TypeError(f"task must be a RuntimeTask, got {task!r}")
        targets = self.runtimes if broadcast else [self.get_runtime(host)]
        started = [
            r.execute_task(task.copy() if broadcast else task, True, omit_on_join, debug)
            for r in targets
        ]
        self._tasks.extend((t, omit_on_join) for t in started)
        if not execute_async:
            for t in started:
                t.join()
        return started if broadcast else started[0]

    def send_file(
        self, local_path: str, remote_path: str | None = None, execute_async: bool = True
    ) -> list[RuntimeTask]:
        """Copy a local file or directory to every runtime, in parallel.

        Args:
            local_path: The local path.
            remote_path: Target path, relative to each runtime's working directory.
            execute_async: Return at once (wait with :meth:`join`) instead of waiting.

        Returns:
            One transfer task per runtime.

        Raises:
            ValueError: If ``local_path`` does not exist.
            TaskExecutionError: If a transfer fails (from :meth:`join` when async).
        """
        task = RuntimeTask("send-file").send_file(local_path, remote_path)
        tasks = self.execute_task(task, broadcast=True, execute_async=execute_async)
        assert isinstance(tasks, list)  # broadcast
        return tasks

    def join(self) -> None:
        """Wait for every task started through the group, except those with ``omit_on_join``.

        Raises:
            TaskExecutionError: The first failure, after all tasks finished.
        """
        join_all(task for task, omit in self._tasks if not omit)

    @property
    def function_returns(self) -> Iterator[Any]:
        """Return values of every function step of the group's tasks, task by task."""
        for task, _ in self._tasks:
            yield from task.function_returns

    def clear_tasks(self) -> None:
        """Forget the tasks run so far, here and on every runtime (running ones keep running)."""
        self._tasks = []
        for runtime in self._runtimes.values():
            runtime.clear_tasks()

    def print_log(self) -> None:
        """Print the execution logs of every runtime."""
        for runtime in self._runtimes.values():
            runtime.print_log()

    def print_hosts(self) -> None:
        """Print the host names of the group, one per line."""
        for host in self._runtimes:
            print(host)

    def print_runtime_info(self) -> None:
        """Print the facts of every runtime (see ``Runtime.print_info``)."""
        for runtime in self._runtimes.values():
            runtime.print_info()
            print()

    def fill_runtime_info_buffers_async(self) -> None:
        """Kept for lazycluster's API: every runtime reads its facts when it connects."""

    def set_env_variables(self, env_variables: dict[str, str]) -> None:
        """Replace the environment variables of every runtime.

        Args:
            env_variables: Names and values.
        """
        for runtime in self._runtimes.values():
            runtime.env_variables = env_variables

    def add_env_variables(self, env_variables: dict[str, str]) -> None:
        """Add environment variables on every runtime.

        Args:
            env_variables: Names and values.
        """
        for runtime in self._runtimes.values():
            runtime.add_env_variables(env_variables)

    def cleanup(self) -> None:
        """Clean up every runtime (processes, forwards, temp dirs, connections)."""
        run_sync(on_loop(self.core.cleanup()))
