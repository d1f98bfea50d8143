"""The group's port rules as pure functions (no SSH: testable on their own).

"Free in the group" means free on every host (and on the manager where it takes part). A port
list means "the first port that is free"; a single port means "exactly this one or
:class:`PortInUseError`"; an exhausted list is :class:`NoPortsLeftError`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from dask_lazycluster.exceptions import NoPortsLeftError, PortInUseError
from dask_lazycluster.utils import validate_ports


def pick_port(
    ports: int | list[int],
    busy: Mapping[str, Collection[int]],
    argument: str,
    manager_busy: Callable[[int], bool] | None = None,
) -> int:
    """Apply the port rules: the first candidate free on every host (and on the manager).

    Args:
        ports: A single port (exactly it) or a list (the first free one).
        busy: Host name to the ports busy there (every host that must have the port free).
        argument: The argument the ports came from, named in errors.
        manager_busy: Tells whether a port is busy on the manager; None when the manager
            does not take part.

    Returns:
        The port.

    Raises:
        TypeError: If ``ports`` is neither an int nor a list of ints.
        ValueError: If a port is out of range.
        PortInUseError: If a single port is busy (``where`` names the hosts).
        NoPortsLeftError: If no port of the list is free.
    """
    single = isinstance(ports, int)
    candidates = validate_ports(ports, argument)
    for port in candidates:
        where = [host for host, used in busy.items() if port in used]
        if manager_busy is not None and manager_busy(port):
            where.append("localhost")
        if not where:
            return port
        if single:
            raise PortInUseError(port, where=", ".join(where))
    hosts = ", ".join(busy) + (" and localhost" if manager_busy is not None else "")
    raise NoPortsLeftError(
        f"none of the {len(candidates)} ports in {argument} is free on all of {hosts}")


def take_free(
    ports: list[int], count: int, taken: Collection[int], manager_busy: Callable[[int], bool]
) -> list[int]:
    """Take ``count`` ports of ``ports`` in order, skipping taken ones and those busy here.

    Args:
        ports: The port list.
        count: How many are needed.
        taken: Ports already in use (by us, or busy on some host).
        manager_busy: Tells whether a port is busy on the manager.

    Returns:
        The ports, in list order.

    Raises:
        NoPortsLeftError: If fewer than ``count`` are free.
    """
    chosen: list[int] = []
    for port in ports:
        if len(chosen) == count:
            break
        if port in taken or manager_busy(port):
            continue
        chosen.append(port)
    if len(chosen) < count:
        raise NoPortsLeftError(
            f"the port list ({len(ports)} ports) has too few ports free on the manager and "
            f"every runtime for another worker; pass more ports= or a larger port-range")
    return chosen
