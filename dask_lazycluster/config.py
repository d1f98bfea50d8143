"""Register dask-lazycluster's defaults (``lazycluster.yaml``) with ``dask.config``.

Users override them in ``~/.config/dask/lazycluster.yaml`` or with ``DASK_LAZYCLUSTER__*``
environment variables, as with every Dask package. :func:`setting` resolves one option: an
explicit argument wins, else the config value; a bad value is an error naming the argument,
or the config key and where it was set.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "lazycluster.yaml")

with open(_DEFAULTS_FILE) as _f:
    _defaults = yaml.safe_load(_f)

dask.config.update_defaults(_defaults)
dask.config.ensure_file(source=_DEFAULTS_FILE, comment=True)


def config_source(key: str) -> str:
    """Say where ``lazycluster.<key>`` was set, as far as Dask lets us tell.

    Args:
        key: Config key below ``lazycluster.``.

    Returns:
        An environment variable name, a config file path, or a generic description.
    """
    env_name = "DASK_LAZYCLUSTER__" + key.upper().replace("-", "_")
    if env_name in os.environ:
        return f"environment variable {env_name}"
    for directory in dask.config.paths:
        for path in sorted(glob.glob(os.path.join(directory, "*.y*ml"))):
            try:
                with open(path) as f:
                    data = yaml.safe_load(f) or {}
            except (OSError, yaml.YAMLError):
                continue
            section = data.get("lazycluster") if isinstance(data, dict) else None
            if isinstance(section, dict) and (key in section or key.replace("-", "_") in section):
                return f"config file {path}"
    return "dask.config (set in code or a config file)"


def setting(
    key: str,
    value: Any,
    types: type | tuple[type, ...],
    check: Callable[[Any], bool] | None = None,
    expected: str = "",
    optional: bool = False,
) -> Any:
    """Resolve one option: the explicit ``value`` if not None, else ``lazycluster.<key>``.

    Args:
        key: Config key below ``lazycluster.`` (its argument name uses ``_`` for ``-``).
        value: The explicitly passed argument, or None.
        types: Accepted types (bool is never taken for int).
        check: Extra validity test.
        expected: Words for the error message, e.g. ``"an int >= 0"``.
        optional: Whether None is a valid (config) value.

    Returns:
        The value to use.

    Raises:
        TypeError: If the value has the wrong type (naming argument, or key and source).
        ValueError: If ``check`` rejects it.
    """
    from_config = value is None
    if from_config:
        value = dask.config.get(f"lazycluster.{key}")
        if value is None and optional:
            return None
    name = (f"config lazycluster.{key} (from {config_source(key)})" if from_config
            else key.replace("-", "_"))
    wanted = expected or (types.__name__ if isinstance(types, type) else " or ".join(
        t.__name__ for t in types))
    is_bool = isinstance(value, bool)
    bool_ok = bool in (types if isinstance(types, tuple) else (types,))
    if not isinstance(value, types) or (is_bool and not bool_ok):
        raise TypeError(f"{name} must be {wanted}, got {value!r}")
    if check is not None and not check(value):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value


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
