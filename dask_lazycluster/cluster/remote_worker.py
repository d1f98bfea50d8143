"""A Dask worker on a runtime, as a ``SpecCluster`` process interface (:class:`RemoteWorker`)."""

from __future__ import annotations

import asyncio
import weakref
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface

from dask_lazycluster._loop import on_loop
from dask_lazycluster.exceptions import LazyclusterError
from dask_lazycluster.runtime_mgmt import RuntimeGroup
from dask_lazycluster.runtimes import RemoteProcess

if TYPE_CHECKING:
    from dask_lazycluster.cluster.dask_cluster import DaskCluster


def is_nanny(worker_class: str) -> bool:
    """Whether a worker class path names a nanny (it needs a second port and a worker process).

    Args:
        worker_class: Import path such as ``"distributed.Nanny"``.

    Returns:
        True for a nanny class.
    """
    return worker_class.rsplit(".", 1)[-1] == "Nanny"


class RemoteWorker(ProcessInterface):
    """A Dask worker (or nanny) on one runtime, started and stopped over its SSH connection.

    In tunnel mode its ports are exposed to the manager and to every runtime *before* it starts,
    so it is reachable the moment it registers. ``close()`` retires it through the scheduler
    (its data moves to other workers), then stops the remote process group and its forwards.

    Args:
        scheduler: The scheduler address as the manager sees it.
        name: The worker name (its spec key).
        host: The runtime host.
        ports: Tunnel mode: ``[worker_port]`` or ``[worker_port, nanny_port]``; empty: direct.
        cluster: Weak reference to the owning cluster.
        worker_class: Import path of the server class.
        worker_options: Its keyword arguments.
        python: Remote interpreter override, or None for the runtime's.
        debug: Print remote output live.
        start_timeout: Seconds from launch to registered.
    """

    def __init__(
        self,
        scheduler: str,
        *,
        name: str,
        host: str,
        ports: list[int],
        cluster: weakref.ref[DaskCluster],
        worker_class: str,
        worker_options: dict[str, Any],
        python: str | None,
        debug: bool,
        start_timeout: float,
    ) -> None:
        super().__init__(scheduler, name)
        self.name = name
        self.host = host
        self.ports = list(ports)
        self.scheduler = scheduler
        self.worker_address: str | None = None
        self.process: RemoteProcess | None = None
        self._owner = cluster
        self._worker_class = worker_class
        self._options = worker_options
        self._python = python
        self._debug = debug
        self._start_timeout = start_timeout
        self._tunnels: list[tuple[str, int]] = []

    def __repr__(self) -> str:
        return f"<RemoteWorker {self.name!r} on {self.host}: {self.status.name}>"

    @property
    def _nanny(self) -> bool:
        return is_nanny(self._worker_class)

    def _group(self) -> RuntimeGroup:
        cluster = self._owner()
        if cluster is None:
            raise LazyclusterError(f"worker {self.name}: its cluster is gone")
        return cluster.runtime_group

    async def start(self) -> None:
        """Launch the worker and wait until it is registered with the scheduler.

        Raises:
            LazyclusterError: If it fails to start (host, python and output tail named).
        """
        await on_loop(self._launch())
        await super().start()

    async def _ensure_tunnels(self) -> None:
        if not self.ports:
            return
        group = self._group()
        runtime = group.get_runtime(self.host)
        worker_port = self.ports[0]
        if ("group", worker_port) not in self._tunnels:
            await group._forward_to_group(self.host, worker_port, worker_port)
            self._tunnels.append(("group", worker_port))
        if self._nanny and len(self.ports) > 1 and ("local", self.ports[1]) not in self._tunnels:
            # Only the scheduler talks to a nanny: the manager needs it, the runtimes do not.
            await runtime._expose_from_runtime(self.ports[1], self.ports[1])
            self._tunnels.append(("local", self.ports[1]))

    async def _launch(self) -> None:
        group = self._group()
        runtime = group.get_runtime(self.host)
        scheme = self.scheduler.split("://", 1)[0] if "://" in self.scheduler else "tcp"
        scheduler_port = int(self.scheduler.rsplit(":", 1)[1])
        cluster = self._owner()
        if cluster is None:
            raise LazyclusterError(f"worker {self.name}: its cluster is gone")
        env, tls = cluster._launch_secrets()
        options = dict(self._options)
        options.setdefault("name", self.name)
        if tls is not None:
            options["protocol"] = scheme
        try:
            if self.ports:
                await self._ensure_tunnels()
                scheduler = f"{scheme}://127.0.0.1:{scheduler_port}"
                options["host"] = "127.0.0.1"
                if self._nanny:
                    options["worker_port"] = self.ports[0]
                    options["port"] = self.ports[1]
                else:
                    options["port"] = self.ports[0]
            else:
                scheduler = f"{scheme}://{runtime.local_address}:{scheduler_port}"
                options["host"] = runtime.remote_address
            options.setdefault("local_directory", runtime._working_dir_path)
            self.process = await runtime.start_server(
                self.name, self._worker_class, scheduler, options, env, self._debug,
                self._python, tls,
            )
            started = await self.process.wait_started(self._start_timeout)
        except asyncio.TimeoutError as exc:
            await self._teardown()
            raise LazyclusterError(
                f"worker {self.name} on host {self.host!r} did not start within "
                f"{self._start_timeout:g} s:\n" + "\n".join(self.process.log[-20:] if self.process else [])
            ) from exc
        except BaseException:
            await self._teardown()
            raise
        self.address = started["address"]
        self.worker_address = started["worker_address"]

    async def _teardown(self, graceful: bool = False) -> None:
        if self.process is not None:
            await (self.process.stop(5, settle=5) if graceful else self.process.kill())
        group = self._group()
        runtime = group.get_runtime(self.host)
        for kind, port in self._tunnels:
            if kind == "group":
                await group._close_port(port)
            else:
                await runtime._close_forward(port)
        self._tunnels.clear()

    async def close(self) -> None:
        """Retire the worker through the scheduler (unless the cluster is closing), then stop it.

        Calling it again is harmless.
        """
        if self.status == Status.closed:
            return
        cluster = self._owner()
        graceful = cluster is not None and cluster.status == Status.running
        comm = cluster.scheduler_comm if cluster is not None else None
        if graceful and self.status == Status.running and comm is not None:
            with suppress(Exception):
                await asyncio.wait_for(
                    comm.retire_workers(
                        names=[self.name], close_workers=True, remove=True
                    ),
                    30,
                )
        with suppress(LazyclusterError):
            await on_loop(self._teardown(graceful))
        if cluster is not None:
            cluster._release_ports(self.name)
        await super().close()
