"""Where workers go and how big they are, as pure functions (no SSH: testable on their own).

Placement is lazycluster's round robin: a new worker goes to the host with the fewest
workers, ties in group order, skipping hosts at their ``max-workers``.

Sizing: by default each host is shared by the workers the cluster *plans* there, its
**slots**. A worker gets ``max(1, cores // slots)`` threads and ``memory // slots`` bytes
(the way ``dask worker --nworkers k`` splits a machine), and ``GPU`` resources from the
host's GPUs, shared out so that none is left over. ``scale(n)`` plans the round-robin layout
of ``n``; ``adapt(maximum=m)`` plans the layout of ``m``, so adaptive workers never
oversubscribe a host at the peak. Explicit ``nthreads`` / ``memory_limit`` /
``resources["GPU"]`` win and are not shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class HostCapacity:
    """What one host offers the cluster.

    Attributes:
        host: The host name.
        cores: Usable cores.
        memory: Usable memory in bytes.
        gpus: GPUs found on it.
        max_workers: Most workers it may run (None: no limit).
        limit_name: The setting ``max_workers`` came from, for messages.
    """

    host: str
    cores: int
    memory: int
    gpus: int = 0
    max_workers: int | None = None
    limit_name: str = "max-workers"


@dataclass(frozen=True)
class WorkerSize:
    """The size of one worker.

    Attributes:
        nthreads: Threads.
        memory: Memory limit in bytes.
        gpus: ``GPU`` resources (0: none declared).
    """

    nthreads: int
    memory: int
    gpus: int = 0


class NoRoomError(Exception):
    """No host can take another worker.

    Args:
        reasons: Host name to why it cannot.
    """

    def __init__(self, reasons: Mapping[str, str]) -> None:
        self.reasons = dict(reasons)
        super().__init__("; ".join(f"{h}: {r}" for h, r in self.reasons.items()))


def _room(capacity: HostCapacity, count: int) -> bool:
    return capacity.max_workers is None or count < capacity.max_workers


def place(
    count: int,
    hosts: list[HostCapacity],
    current: Mapping[str, int],
    select: Callable[[dict[str, int]], str] | None = None,
) -> list[str]:
    """Choose hosts for ``count`` new workers, one at a time, all or nothing.

    Args:
        count: Workers to place.
        hosts: The usable hosts, in group order.
        current: Workers each host runs or has planned already.
        select: Chooses among ``{host: count}`` of the hosts with room (default: the fewest,
            ties in group order).

    Returns:
        The host of each new worker, in placement order.

    Raises:
        NoRoomError: If a worker cannot be placed (nothing is placed then).
    """
    counts = {h.host: current.get(h.host, 0) for h in hosts}
    by_name = {h.host: h for h in hosts}
    chosen: list[str] = []
    for _ in range(count):
        open_counts = {h: c for h, c in counts.items() if _room(by_name[h], c)}
        if not open_counts:
            if not hosts:
                raise NoRoomError({"*": "no host is reachable right now"})
            raise NoRoomError({h.host: f"it runs its {h.limit_name}={h.max_workers}" for h in hosts})
        host = select(open_counts) if select else min(open_counts, key=lambda h: open_counts[h])
        if host not in open_counts:
            raise ValueError(f"the worker launcher chose {host!r}, which cannot take a worker "
                             f"now (open hosts: {', '.join(open_counts)})")
        counts[host] += 1
        chosen.append(host)
    return chosen


def layout(count: int, hosts: list[HostCapacity]) -> dict[str, int]:
    """The round-robin layout of ``count`` workers (as many as fit).

    Args:
        count: Workers wanted.
        hosts: The usable hosts, in group order.

    Returns:
        Host name to its number of workers.
    """
    counts = {h.host: 0 for h in hosts}
    for _ in range(count):
        open_hosts = [h for h in hosts if _room(h, counts[h.host])]
        if not open_hosts:
            break
        counts[min(open_hosts, key=lambda h: counts[h.host]).host] += 1
    return counts


def size(capacity: HostCapacity, slots: int) -> WorkerSize:
    """A worker's share of a host that ``slots`` workers share.

    Args:
        capacity: The host.
        slots: Workers sharing it (at least 1 is assumed).

    Returns:
        The size; GPUs are the share of a worker that gets the smaller part (see
        :func:`gpu_share` for handing out the remainder).
    """
    slots = max(1, slots)
    return WorkerSize(max(1, capacity.cores // slots), capacity.memory // slots,
                      capacity.gpus // slots)


def gpu_share(capacity: HostCapacity, slots: int, taken: Iterable[int]) -> int:
    """GPUs for the next worker of a host, so that ``slots`` workers use them all.

    Args:
        capacity: The host.
        slots: Workers planned on it.
        taken: The GPU shares of its other workers.

    Returns:
        The number of GPUs (0 when they are all taken).
    """
    shares = list(taken)
    free = max(0, capacity.gpus - sum(shares))
    remaining = max(1, slots - len(shares))
    return math.ceil(free / remaining) if free else 0


def workers_for(
    hosts: list[HostCapacity],
    sizes: Callable[[dict[str, int]], list[WorkerSize]],
    cores: int | None = None,
    memory: int | None = None,
) -> int:
    """The fewest workers whose real sizes add up to ``cores`` threads and ``memory`` bytes.

    Workers are placed as ``scale(n)`` would place them, and their actual sizes summed.

    Args:
        hosts: The usable hosts.
        sizes: The sizes of the workers of a layout (``{host: count}``).
        cores: Threads wanted, or None.
        memory: Bytes wanted, or None.

    Returns:
        The number of workers (the most that can help when even that is not enough:
        beyond one worker per core nothing grows).
    """
    most = sum(h.max_workers if h.max_workers is not None else max(h.cores, 1) for h in hosts)
    n = 0
    for n in range(1, max(most, 1) + 1):
        chosen = sizes(layout(n, hosts))
        if (cores is None or sum(s.nthreads for s in chosen) >= cores) and (
                memory is None or sum(s.memory for s in chosen) >= memory):
            return n
    return n
