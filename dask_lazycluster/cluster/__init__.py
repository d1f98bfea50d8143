"""Cluster layer: generic master/worker strategies and the Dask cluster.

Like lazycluster's ``lazycluster.cluster``, the package exports the generic launcher and
cluster classes.
"""

from dask_lazycluster.cluster.runtime_cluster import (
    MasterLauncher,
    MasterWorkerCluster,
    RuntimeCluster,
    WorkerLauncher,
)

__all__ = ["MasterLauncher", "MasterWorkerCluster", "RuntimeCluster", "WorkerLauncher"]
