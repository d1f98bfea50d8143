"""Runtime management (lazycluster's module path): :class:`RuntimeGroup` and :class:`RuntimeManager`.

``RuntimeGroup`` lives in ``dask_lazycluster._group`` and ``RuntimeManager`` in
``dask_lazycluster.runtime_manager``; both are importable from here as in lazycluster.
"""

from dask_lazycluster._group import RuntimeGroup
from dask_lazycluster.runtime_manager import RuntimeManager

__all__ = ["RuntimeGroup", "RuntimeManager"]
