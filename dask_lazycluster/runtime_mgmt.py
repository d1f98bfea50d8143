"""Many runtimes as one group (:class:`RuntimeGroup`) with group-wide ports and tunnels."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from dask_lazycluster._loop import on_loop, run_sync
from dask_lazycluster.exceptions import (
    InvalidRuntimeError,
    NoPortsLeftError,
    PortInUseError,
)
from dask_lazycluster.runtimes import Runtime, RuntimeTask, _Reach
from dask_lazycluster.utils import (
    localhost_has_free_port,
    preload_dashboard,
    validate_port,
    validate_ports,
)

logger = logging.getLogger(__name__)


def _host_list(hosts: Iterable[str] | None, argument: str) -> list[str]:
    if hosts is None:
        return []
    if isinstance(hosts, str):
        return [hosts]
    return list(hosts)


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
        if runtimes is not None:
            if not runtimes:
                raise ValueError("runtimes must not be empty")
            for runtime in runtimes:
                self.add_runtime(runtime)
            return
        names = _host_list(hosts, "hosts")
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
        created = run_sync(_connect_all(names, working_dir, connect_options, python))
        self._runtimes = {r.host: r for r in created}

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

    def add_runtime(self, runtime: Runtime | str) -> Runtime:
        """Add a runtime (or connect to a host name and add it).

        Args:
            runtime: A Runtime, or a host name to create one from.

        Returns:
            The added runtime.

        Raises:
            ValueError: If a runtime for that host is already in the group.
            InvalidRuntimeError: If a host name cannot be used.
            TypeError: If ``runtime`` is neither a Runtime nor a str.
        """
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
            include_hosts: Only these hosts (all if None).
            exclude_hosts: Not these hosts.

        Returns:
            Host name to runtime, in group order.

        Raises:
            ValueError: If a named host is not in the group.
        """
        include = _host_list(include_hosts, "include_hosts")
        exclude = _host_list(exclude_hosts, "exclude_hosts")
        self._check_hosts(include + exclude)
        return {
            host: runtime
            for host, runtime in self._runtimes.items()
            if (not include or host in include) and host not in exclude
        }

    # -- reachability -------------------------------------------------------------------------

    async def _direct_hosts(self, timeout: float = 2.0) -> set[str]:
        """Hosts whose workers can talk plain TCP: what ``tunnel="auto"`` makes direct.

        A host qualifies when it and the manager reach each other, and every other host of
        the group reaches it too: the others (tunneled ones included) fetch data from its
        workers at its real address. Hosts are tested in parallel, each dialing all
        candidates at once; a host that cannot be tested counts as unreachable (a tunnel is
        always safe).
        """
        reaches = await asyncio.gather(*(r._reach_start(timeout) for r in self.runtimes))
        try:
            candidates = [x for x in reaches if x.both_ways]
            blocked: dict[str, list[str]] = {x.runtime.host: [] for x in candidates}
            if len(reaches) > 1 and candidates:

                async def dial_from(x: _Reach) -> None:
                    others = [c for c in candidates if c is not x]
                    # A candidate's listener answered the manager, so its port is known.
                    targets = [(c.runtime.remote_address, c.port) for c in others
                               if c.port is not None]
                    answers = await x.dial(targets, timeout) if others else []
                    if answers is None:
                        logger.info("tunnel='auto': %s could not run the host-to-host test; "
                                    "the hosts it should have reached are tunneled",
                                    x.runtime.host)
                    for c, ok in zip(others, answers or [False] * len(others), strict=True):
                        if not ok:
                            blocked[c.runtime.host].append(x.runtime.host)

                await asyncio.gather(*(dial_from(x) for x in reaches))
            for host, dialers in blocked.items():
                if dialers:
                    logger.info("tunnel='auto': %s is tunneled: %s cannot reach it directly",
                                host, ", ".join(dialers))
            return {host for host, dialers in blocked.items() if not dialers}
        finally:
            for x in reaches:
                x.close()

    # -- ports ----------------------------------------------------------------------------------

    async def _busy_ports(
        self, runtimes: list[Runtime], max_age: float = 0.0
    ) -> dict[str, set[int]]:
        found = await asyncio.gather(*(r._listening_ports(max_age) for r in runtimes))
        return {r.host: ports for r, ports in zip(runtimes, found, strict=True)}

    async def _pick_port(
        self,
        ports: int | list[int],
        runtimes: list[Runtime],
        check_localhost: bool,
        argument: str,
        busy: dict[str, set[int]] | None = None,
    ) -> int:
        """Apply the port rules over ``runtimes`` (and the manager) and return the port.

        ``busy`` is a snapshot of listening ports per host, to spare a round trip per host.
        """
        single = isinstance(ports, int)
        candidates = validate_ports(ports, argument)
        if busy is None:
            busy = await self._busy_ports(runtimes)
        else:
            wanted = {r.host for r in runtimes}
            busy = {h: used for h, used in busy.items() if h in wanted}
        for port in candidates:
            where = [h for h, used in busy.items() if port in used]
            if check_localhost and not localhost_has_free_port(port):
                where.append("localhost")
            if not where:
                return port
            if single:
                raise PortInUseError(port, ", ".join(where))
        raise NoPortsLeftError(
            f"none of the {len(candidates)} ports in {argument} is free on all of "
            f"{', '.join(r.host for r in runtimes)}{' and localhost' if check_localhost else ''}"
        )

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
        busy = run_sync(on_loop(self._busy_ports(runtimes)))
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
            on_loop(self._pick_port(ports, self.runtimes, enforce_check_on_localhost, "ports"))
        )

    async def _expose_port_to_runtimes(
        self,
        local_port: int,
        runtime_port: int | None,
        exclude_hosts: list[str] | str | None,
        relay_from: Runtime | None = None,
    ) -> int:
        """Forward ``runtime_port`` on the runtimes to the manager's ``local_port``.

        With ``relay_from``, to that runtime's ``local_port`` instead, spliced in the manager.
        """
        target = local_port if runtime_port is None else runtime_port
        runtimes = list(self.get_runtimes(exclude_hosts=exclude_hosts).values())
        results = await asyncio.gather(
            *(r._expose_to_runtime(local_port, target) if relay_from is None
              else r._relay_from(relay_from, local_port, target) for r in runtimes),
            return_exceptions=True,
        )
        failed = [(r, e) for r, e in zip(runtimes, results, strict=True) if isinstance(e, Exception)]
        if failed:
            await asyncio.gather(*(r._close_forward(target) for r in runtimes
                                   if r not in [f for f, _ in failed]))
            if all(isinstance(e, PortInUseError) for _, e in failed):
                raise PortInUseError(target, ", ".join(r.host for r, _ in failed))
            raise failed[0][1]
        return target

    def expose_port_to_runtimes(
        self,
        local_port: int,
        runtime_port: int | None = None,
        exclude_hosts: list[str] | str | None = None,
    ) -> int:
        """Make a manager port reachable as ``localhost:runtime_port`` on every runtime.

        Args:
            local_port: The port on the manager.
            runtime_port: The port on the runtimes; defaults to ``local_port``.
            exclude_hosts: Runtimes to leave out.

        Returns:
            The port on the runtimes.

        Raises:
            PortInUseError: If the port is busy on a runtime (nothing is left forwarded).
            ValueError: If an excluded host is not in the group.
        """
        validate_port(local_port, "local_port")
        if runtime_port is not None:
            validate_port(runtime_port, "runtime_port")
        return run_sync(
            on_loop(self._expose_port_to_runtimes(local_port, runtime_port, exclude_hosts))
        )

    async def _expose_port_from_runtime_to_group(
        self, host: str, runtime_port: int, group_port: int | list[int] | None
    ) -> int:
        others = [r for r in self._runtimes.values() if r.host != host]
        wanted = runtime_port if group_port is None else group_port
        port = await self._pick_port(wanted, others, True, "group_port")
        await self._forward_to_group(host, runtime_port, port)
        return port

    async def _forward_to_group(self, host: str, runtime_port: int, group_port: int) -> None:
        """Forward ``group_port`` on the manager and every other runtime to ``host``.

        No free-port check first: a busy port makes the forward itself fail with
        PortInUseError, and whatever was set up is closed again. Runtimes whose connection is
        lost are skipped (their forwards are restored when they reconnect).
        """
        source = self._runtimes[host]
        await source._expose_from_runtime(runtime_port, group_port)
        skip = [host] + [r.host for r in self._runtimes.values() if not r.is_alive]
        try:
            await self._expose_port_to_runtimes(runtime_port, group_port, skip, relay_from=source)
        except BaseException:
            await source._close_forward(group_port)
            raise

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
            on_loop(self._expose_port_from_runtime_to_group(host, runtime_port, group_port))
        )

    async def _close_port(self, port: int) -> None:
        await asyncio.gather(*(r._close_forward(port) for r in self._runtimes.values()))

    def close_port_forward(self, port: int) -> None:
        """Close every forward of ``port`` made through any runtime of the group.

        Args:
            port: The forwarded (listening) port.
        """
        run_sync(on_loop(self._close_port(port)))

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
            r.execute_task(task.copy() if broadcast else task, True, debug) for r in targets
        ]
        self._tasks.extend((t, omit_on_join) for t in started)
        if not execute_async:
            for t in started:
                t.join()
        return started if broadcast else started[0]

    def send_file(self, local_path: str, remote_path: str | None = None) -> None:
        """Copy a local file or directory to every runtime.

        Args:
            local_path: The local path.
            remote_path: Target path, relative to each runtime's working directory.

        Raises:
            ValueError: If ``local_path`` does not exist.
            TaskExecutionError: If a transfer fails.
        """
        task = RuntimeTask("send-file").send_file(local_path, remote_path)
        self.execute_task(task, broadcast=True, execute_async=False)

    def join(self) -> None:
        """Wait for every task started through the group, except those with ``omit_on_join``.

        Raises:
            TaskExecutionError: The first failure, after all tasks finished.
        """
        errors = []
        for task, omit in self._tasks:
            if omit:
                continue
            try:
                task.join()
            except Exception as exc:  # collect, so one failure does not hide the others' end
                errors.append(exc)
        if errors:
            raise errors[0]

    @property
    def function_returns(self) -> Iterator[Any]:
        """Return values of every function step of the group's tasks, task by task."""
        for task, _ in self._tasks:
            yield from task.function_returns

    def print_log(self) -> None:
        """Print the execution logs of every runtime."""
        for runtime in self._runtimes.values():
            runtime.print_log()

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

        async def close_all() -> None:
            await asyncio.gather(*(r._cleanup() for r in self._runtimes.values()))

        run_sync(on_loop(close_all()))


async def _connect_all(
    hosts: list[str],
    working_dir: str | None,
    connect_options: dict[str, Any] | None,
    python: str | None,
) -> list[Runtime]:
    """Connect to every host in parallel; on any failure close the others and raise."""
    results = await asyncio.gather(
        *(Runtime._create(h, working_dir, connect_options, python) for h in hosts),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await asyncio.gather(
            *(r._cleanup() for r in results if isinstance(r, Runtime)), return_exceptions=True
        )
        first = failures[0]
        if isinstance(first, InvalidRuntimeError) and len(failures) > 1:
            others = "; ".join(str(f) for f in failures[1:])
            raise InvalidRuntimeError(first.host, f"{first.cause} (also: {others})") from first
        raise first
    return [r for r in results if isinstance(r, Runtime)]


def __getattr__(name: str) -> object:
    """Keep lazycluster's import path ``runtime_mgmt.RuntimeManager``.

    It lives in ``runtime_manager``, which imports this module, hence the lazy import.
    """
    if name == "RuntimeManager":
        from dask_lazycluster.runtime_manager import RuntimeManager

        return RuntimeManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
