"""A cluster's worker bookkeeping (:class:`WorkerPlanner`): hosts, sizes, ports, slots.

It decides, without touching the network, where each new worker goes, how big it is and which
tunnel ports it gets; the cluster turns its decisions into ``SpecCluster`` specs. The rules are
in :mod:`dask_lazycluster.cluster._placement`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping
from typing import Any

import dask.config
from dask.utils import parse_bytes

from dask_lazycluster._ports import take_free
from dask_lazycluster.cluster._options import HostPlan, is_nanny
from dask_lazycluster.cluster._placement import (
    HostCapacity,
    WorkerSize,
    gpu_share,
    layout,
    place,
    size,
    workers_for,
)

#: Worker options the planner sets from the host's share unless given explicitly.
SIZED = ("nthreads", "memory_limit")


def memory_bytes(limit: Any, host_memory: int, share: int) -> int:
    """A worker's ``memory_limit`` in bytes, the way Dask reads it.

    Args:
        limit: The option: None or ``"auto"`` (the share), a size string, bytes, or a
            fraction of the host's memory (a float <= 1).
        host_memory: The host's memory.
        share: The worker's share of it.

    Returns:
        Bytes.
    """
    if limit is None or limit == "auto":
        return share
    if isinstance(limit, str):
        return int(parse_bytes(limit))
    if isinstance(limit, float) and limit <= 1:
        return int(limit * host_memory)
    return int(limit)


class WorkerPlanner:
    """Placement, sizing and ports of a cluster's workers.

    Args:
        plans: Each host's options, in group order.
        capacities: Each host's cores, memory and GPUs.
        ports: The cluster's port list (for tunneled workers).
        busy: Ports busy on some host (a snapshot).
        manager_busy: Tells whether a port is busy on the manager now.
        direct_hosts: Hosts whose workers use plain TCP (they need no ports).
        max_per_host: The cluster-wide ``max-workers-per-host`` (for the launcher's hook).
    """

    def __init__(
        self,
        plans: Mapping[str, HostPlan],
        capacities: Mapping[str, HostCapacity],
        ports: list[int],
        busy: Collection[int],
        manager_busy: Callable[[int], bool],
        direct_hosts: Collection[str],
        max_per_host: int | None,
    ) -> None:
        self.plans = dict(plans)
        self.capacities = dict(capacities)
        self.ports = list(ports)
        self.busy = set(busy)
        self.manager_busy = manager_busy
        self.direct_hosts = set(direct_hosts)
        self.max_per_host = max_per_host
        self.reserved: set[int] = set()  # the scheduler's port
        self.hosts_of: dict[str, str] = {}
        self.allocated: dict[str, list[int]] = {}
        self.sizes: dict[str, WorkerSize] = {}
        self.unhealthy: set[str] = set()
        #: Workers each host is sized for (see the placement rules); adapt fixes them.
        self.slots: dict[str, int] = {}
        self.adaptive = False
        self._counter = 0

    # -- hosts ---------------------------------------------------------------------------------

    def usable(self) -> list[HostCapacity]:
        """The reachable hosts, in group order."""
        return [c for h, c in self.capacities.items() if h not in self.unhealthy]

    def counts(self, names: Collection[str]) -> Counter[str]:
        """Workers per host among ``names``.

        Args:
            names: Worker names.

        Returns:
            Host to count (hosts without any are left out).
        """
        return Counter(self.hosts_of[n] for n in names if n in self.hosts_of)

    # -- sizes ---------------------------------------------------------------------------------

    def size_for(self, host: str, others: Collection[str]) -> WorkerSize:
        """The size of a new worker on ``host`` next to its workers ``others``.

        Args:
            host: The host.
            others: The names of the host's other workers (running or planned).

        Returns:
            The size.
        """
        capacity = self.capacities[host]
        slots = max(self.slots.get(host, 0), len(others) + 1)
        share = size(capacity, slots)
        gpus = gpu_share(capacity, slots, (self.sizes[n].gpus for n in others if n in self.sizes))
        return WorkerSize(share.nthreads, share.memory, gpus)

    def options_for(self, host: str, worker_size: WorkerSize, death_timeout: float) -> dict[str, Any]:
        """The worker-class keyword arguments of a worker of ``host`` with ``worker_size``.

        Args:
            host: The host.
            worker_size: Its share of the host.
            death_timeout: Seconds it survives without a scheduler.

        Returns:
            The options; explicit ``nthreads``/``memory_limit``/``resources["GPU"]`` win.
        """
        options = dict(self.plans[host].worker_options)
        options.setdefault("nthreads", worker_size.nthreads)
        options.setdefault("memory_limit", worker_size.memory)
        # Without explicit resources the worker would take distributed.worker.resources from
        # the (inherited) config: adding GPU must keep those.
        resources = dict(options.get("resources")
                         or dask.config.get("distributed.worker.resources", None) or {})
        if worker_size.gpus and "GPU" not in resources:
            options["resources"] = {**resources, "GPU": worker_size.gpus}
        options.setdefault("death_timeout", death_timeout)
        return options

    def mismatched(self, names: Collection[str]) -> list[str]:
        """Workers whose size no longer is their host's share under the current slots.

        Only sizes the planner chose count: explicit ones never change.

        Args:
            names: The workers to look at.

        Returns:
            Their names, in the given order.
        """
        out = []
        for name in names:
            host = self.hosts_of.get(name)
            if host is None or name not in self.sizes:
                continue
            explicit = self.plans[host].worker_options
            want = size(self.capacities[host], self.slots.get(host, 1))
            have = self.sizes[name]
            if ("nthreads" not in explicit and have.nthreads != want.nthreads) or (
                    "memory_limit" not in explicit and have.memory != want.memory):
                out.append(name)
        return out

    def set_slots(self, counts: Mapping[str, int]) -> None:
        """Plan ``counts`` workers on each host (hosts left out: none).

        Args:
            counts: Host to its number of workers.
        """
        if not self.adaptive:
            self.slots = {h: c for h, c in counts.items() if c}

    def adapt_to(self, maximum: float) -> None:
        """Fix each host's slots for adaptive scaling up to ``maximum`` workers.

        Args:
            maximum: Adapt's maximum (``inf``: each host's ``max-workers``, else its cores).
        """
        hosts = self.usable()
        if maximum == float("inf"):
            self.slots = {h.host: h.max_workers or max(h.cores, 1) for h in hosts}
        else:
            self.slots = {h: c for h, c in layout(int(maximum), hosts).items() if c}
        self.adaptive = True

    def workers_for(self, cores: int | None, memory: int | None) -> int:
        """The fewest workers, placed as ``scale(n)`` would, whose sizes reach the targets.

        Args:
            cores: Threads wanted, or None.
            memory: Bytes wanted, or None.

        Returns:
            The number of workers.
        """
        hosts = self.usable()

        def sizes(counts: dict[str, int]) -> list[WorkerSize]:
            out = []
            for host, count in counts.items():
                explicit = self.plans[host].worker_options
                share = size(self.capacities[host], count)
                threads = int(explicit.get("nthreads", share.nthreads))
                mem = memory_bytes(explicit.get("memory_limit"), self.capacities[host].memory,
                                   share.memory)
                out += [WorkerSize(threads, mem)] * count
            return out

        return workers_for(hosts, sizes, cores, memory)

    # -- placing -------------------------------------------------------------------------------

    def place(
        self, count: int, existing: Collection[str],
        select: Callable[[dict[str, int]], str] | None = None,
    ) -> list[tuple[str, str, list[int], WorkerSize]]:
        """Plan ``count`` new workers next to ``existing`` ones: all or nothing.

        Args:
            count: Workers to add.
            existing: Names of the workers running or planned.
            select: The launcher's choice among hosts with room (default: round robin).

        Returns:
            ``(name, host, ports, size)`` of each new worker.

        Raises:
            NoRoomError: If no host can take a worker.
            NoPortsLeftError: If the port list runs out.
        """
        hosts = place(count, self.usable(), self.counts(existing), select)
        planned: list[tuple[str, str, list[int], WorkerSize]] = []
        names = set(existing)
        try:
            for host in hosts:
                while f"{host}-{self._counter}" in names:
                    self._counter += 1
                name = f"{host}-{self._counter}"
                self._counter += 1
                others = [n for n in names if self.hosts_of.get(n) == host]
                worker_size = self.size_for(host, others)
                ports = self._take_ports(self._ports_needed(host))
                self.allocated[name], self.hosts_of[name] = ports, host
                self.sizes[name] = worker_size
                names.add(name)
                planned.append((name, host, ports, worker_size))
        except BaseException:
            for name, *_ in planned:
                self.forget(name)
            raise
        return planned

    def _ports_needed(self, host: str) -> int:
        if host in self.direct_hosts:
            return 0
        return 2 if is_nanny(self.plans[host].worker_class) else 1

    def _take_ports(self, count: int) -> list[int]:
        if not count:
            return []
        taken = {p for ports in self.allocated.values() for p in ports} | self.busy | self.reserved
        return take_free(self.ports, count, taken, self.manager_busy)

    def reallocate(self, name: str) -> list[int]:
        """New ports for a worker whose ports are taken (they count as busy from now on).

        Args:
            name: The worker.

        Returns:
            Its new ports.

        Raises:
            NoPortsLeftError: If the port list runs out.
        """
        old = self.allocated.get(name, [])
        self.busy.update(old)
        self.allocated[name] = self._take_ports(len(old))
        return self.allocated[name]

    def to_remove(self, count: int, names: list[str], launched: Collection[str]) -> list[str]:
        """Workers to remove: not yet launched ones first, then the newest of the busiest hosts.

        Args:
            count: How many.
            names: The current workers, oldest first.
            launched: Names the scheduler knows (launched workers).

        Returns:
            The names.
        """
        order = {c.host: i for i, c in enumerate(self.capacities.values())}
        chosen = [n for n in reversed(names) if n not in launched][:count]
        remaining = [n for n in names if n not in chosen]
        while len(chosen) < count and remaining:
            counts = Counter(self.hosts_of.get(n, "") for n in remaining)
            busiest = max(counts, key=lambda h: (counts[h], order.get(h, -1)))
            victim = [n for n in remaining if self.hosts_of.get(n, "") == busiest][-1]
            remaining.remove(victim)
            chosen.append(victim)
        return chosen

    def release(self, name: str) -> None:
        """A worker ended: its ports are free again.

        Args:
            name: The worker.
        """
        self.allocated.pop(name, None)

    def forget(self, name: str) -> None:
        """A worker left the plan: drop everything about it.

        Args:
            name: The worker.
        """
        self.allocated.pop(name, None)
        self.hosts_of.pop(name, None)
        self.sizes.pop(name, None)

    def ports_per_host(self, hosts: list[str], names: list[str],
                       addresses: Mapping[str, str | None]) -> dict[str, list[int]]:
        """Host to the ports of its workers: tunnel ports, or the port of a direct address.

        Args:
            hosts: The hosts, in group order.
            names: The workers.
            addresses: Worker name to its worker address once started.

        Returns:
            Host to ports (every host listed).
        """
        result: dict[str, list[int]] = {host: [] for host in hosts}
        for name in names:
            host = self.hosts_of.get(name)
            if host is None:
                continue
            if self.allocated.get(name):
                result[host].append(self.allocated[name][0])
            elif addresses.get(name):
                result[host].append(int(str(addresses[name]).rsplit(":", 1)[1]))
        return result

    def unused_ports(self) -> list[int]:
        """Ports of the list that no worker holds."""
        in_use = {p for ports in self.allocated.values() for p in ports}
        return [p for p in self.ports if p not in in_use]
