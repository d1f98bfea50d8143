"""Errors of the cluster layer (lazycluster's module path); they live in ``dask_lazycluster.exceptions``."""

from dask_lazycluster.exceptions import MasterStartError

__all__ = ["MasterStartError"]
