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
from dataclasses import dataclass
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

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


@dataclass(frozen=True)
class _Rule:
    """What a valid value of one key looks like."""

    types: type | tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    expected: str = ""
    optional: bool = False  # whether None (the YAML null) is valid


def _str_to_str(value: dict[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _is_timedelta(value: Any) -> bool:
    try:
        parse_timedelta(value)
    except (ValueError, KeyError, TypeError):
        return False
    return True


def _is_port_range(value: list[Any]) -> bool:
    return (len(value) == 2 and all(isinstance(p, int) and not isinstance(p, bool) for p in value)
            and 1 <= value[0] <= value[1] <= 65535)


# One rule per key of lazycluster.yaml, used for arguments and config values alike.
_RULES: dict[str, _Rule] = {
    "hosts": _Rule(list, lambda v: all(isinstance(h, str) for h in v), "a list of host names"),
    "n-workers": _Rule(int, lambda v: v >= 0, "an int >= 0", optional=True),
    "master-port": _Rule(int, lambda v: 0 < v < 65536, "a port number", optional=True),
    "port-range": _Rule(list, _is_port_range, "[first, last] with 1 <= first <= last <= 65535"),
    "tunnel": _Rule((bool, str), lambda v: v in (True, False, "auto"), "True, False or 'auto'"),
    "python": _Rule(str, bool, "a path", optional=True),
    "working-dir": _Rule(str, bool, "a path", optional=True),
    "env": _Rule(dict, _str_to_str, "a dict of str to str"),
    "connect-options": _Rule(dict, expected="a dict of asyncssh.connect options"),
    "worker-class": _Rule(str, bool, "an import path such as 'distributed.Nanny'"),
    "worker-options": _Rule(dict),
    "scheduler-options": _Rule(dict),
    "scheduler-process": _Rule(bool),
    "prologue": _Rule(str, optional=True),
    "death-timeout": _Rule((int, float, str), _is_timedelta, "seconds or a time like '30s'"),
    "max-workers-per-host": _Rule(int, lambda v: v >= 1, "an int >= 1", optional=True),
    "worker-start-method": _Rule(str, lambda v: v in ("fork", "spawn", "forkserver"),
                                 "'fork', 'spawn' or 'forkserver'"),
    "warm-spares": _Rule(int, lambda v: v >= 0, "an int >= 0"),
    "worker-start-timeout": _Rule((int, float), lambda v: v > 0, "seconds > 0"),
}


def setting(key: str, value: Any = None) -> Any:
    """Resolve one option: the explicit ``value`` if not None, else ``lazycluster.<key>``.

    Either way the value is checked against the key's rule, so a bad argument and a bad config
    value fail alike, early, with a message naming the argument or the key and its source.

    Args:
        key: Config key below ``lazycluster.``, e.g. ``"n-workers"`` (the matching argument
            name uses ``_`` for ``-``).
        value: The explicitly passed argument, or None for the configured value.

    Returns:
        The value to use (None only for keys where null is allowed, e.g. ``python``).

    Raises:
        KeyError: If ``key`` is not a dask-lazycluster setting.
        TypeError: If the value has the wrong type (naming argument, or key and source).
        ValueError: If the value has the right type but is out of range.
    """
    rule = _RULES.get(key)
    if rule is None:
        raise KeyError(f"lazycluster.{key} is not a dask-lazycluster setting; known: "
                       f"{', '.join(sorted(_RULES))}")
    from_config = value is None
    if from_config:
        value = dask.config.get(f"lazycluster.{key}")
    if value is None and rule.optional:
        return None
    name = (f"config lazycluster.{key} (from {config_source(key)})" if from_config
            else key.replace("-", "_"))
    types = rule.types if isinstance(rule.types, tuple) else (rule.types,)
    wanted = rule.expected or " or ".join(t.__name__ for t in types)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise TypeError(f"{name} must be {wanted}, got {value!r}")
    if rule.check is not None and not rule.check(value):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value
