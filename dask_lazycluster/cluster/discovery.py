"""dask-ctl's cluster discovery for named ``DaskCluster`` objects.

This is the ``lazycluster`` entry point of the ``dask_cluster_discovery`` group. dask-ctl
iterates :func:`discover` for ``(name, class)`` pairs and calls ``class.from_name(name)`` to get
a cluster object; see [Named clusters](../named-clusters.md#dask-ctl).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from dask_lazycluster.cluster._registry import live_records
from dask_lazycluster.cluster.dask_cluster import DaskCluster

__all__ = ["discover"]


async def discover() -> AsyncIterator[tuple[str, type[DaskCluster]]]:
    """Yield the name of every named cluster of this user running on this machine.

    Records left by killed owners are removed on the way, not yielded.

    Yields:
        ``(name, DaskCluster)``: ``DaskCluster.from_name(name)`` drives that cluster.
    """
    for record in live_records():
        yield record.name, DaskCluster
