"""Register dask-lazycluster's defaults (``lazycluster.yaml``) with ``dask.config``.

Users override them in ``~/.config/dask/lazycluster.yaml`` or with ``DASK_LAZYCLUSTER__*``
environment variables, as with every Dask package.
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "lazycluster.yaml")

with open(_DEFAULTS_FILE) as _f:
    _defaults = yaml.safe_load(_f)

dask.config.update_defaults(_defaults)
dask.config.ensure_file(source=_DEFAULTS_FILE, comment=True)



def config_value(key: str, value: Any = None) -> Any:
    """Return ``value`` unless it is None, else the ``lazycluster.<key>`` config value.

    Args:
        key: Config key below ``lazycluster.``, e.g. ``"n-workers"``.
        value: An explicitly passed argument.

    Returns:
        The argument or its configured default.
    """
    if value is not None:
        return value
    return dask.config.get(f"lazycluster.{key}")
