"""Register dask-lazycluster's defaults (``lazycluster.yaml``) with ``dask.config``.

Users override them in ``~/.config/dask/lazycluster.yaml`` or with ``DASK_LAZYCLUSTER__*``
environment variables, as with every Dask package. :func:`setting` resolves one option: an
explicit argument wins, else the config value; a bad value is an error naming the argument,
or the config key and where it was set. ``lazycluster.yaml`` and its comments are the one
description of every key; the rules here only say what a valid value looks like.

Entries of ``lazycluster.hosts`` may be mappings with per-host options (:data:`HOST_KEYS`);
:func:`host_entries` reads them and :func:`check_host_options` checks the same keys given in
Python (``DaskCluster(host_options=...)``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping
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
class Rule:
    """What a valid value of one key looks like.

    Attributes:
        types: Accepted types (bool is accepted only where listed).
        check: Further check of a value of the right type.
        expected: Words for errors, e.g. "an int >= 0".
        optional: Whether None (the YAML null) is valid.
    """

    types: type | tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    expected: str = ""
    optional: bool = False


def _str_to_str(value: dict[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _str_list(value: list[Any]) -> bool:
    return all(isinstance(v, str) and v.strip() for v in value)


def _is_timedelta(value: Any) -> bool:
    try:
        parse_timedelta(value)
    except (ValueError, KeyError, TypeError):
        return False
    return True


def _is_port_range(value: list[Any]) -> bool:
    return (len(value) == 2 and all(isinstance(p, int) and not isinstance(p, bool) for p in value)
            and 1 <= value[0] <= value[1] <= 65535)


def _is_host_entry(value: Any) -> bool:
    return (isinstance(value, str) and bool(value.strip())) or (
        isinstance(value, dict) and isinstance(value.get("host"), str) and bool(value["host"]))


#: Keys a host may set for itself (in a ``lazycluster.hosts`` mapping or ``host_options``).
HOST_KEYS = ("python", "env", "setup", "upload", "worker-class", "worker-options", "max-workers")

# One rule per key of lazycluster.yaml (and per-host key), for arguments and config alike.
RULES: dict[str, Rule] = {
    "hosts": Rule(list, lambda v: all(_is_host_entry(h) for h in v),
                  "a list of host names or mappings with a 'host' key"),
    "n-workers": Rule(int, lambda v: v >= 0, "an int >= 0", optional=True),
    "master-port": Rule(int, lambda v: 0 < v < 65536, "a port number", optional=True),
    "port-range": Rule(list, _is_port_range, "[first, last] with 1 <= first <= last <= 65535"),
    "tunnel": Rule((bool, str), lambda v: v in (True, False, "auto"), "True, False or 'auto'"),
    "python": Rule(str, bool, "a path", optional=True),
    "working-dir": Rule(str, bool, "a path", optional=True),
    "env": Rule(dict, _str_to_str, "a dict of str to str"),
    "connect-options": Rule(dict, expected="a dict of asyncssh.connect options"),
    "worker-class": Rule(str, bool, "an import path such as 'distributed.Nanny'"),
    "worker-options": Rule(dict),
    "scheduler-options": Rule(dict),
    "scheduler-process": Rule(bool),
    "scheduler-host": Rule(str, lambda v: bool(v.strip()), "a host name of the group",
                           optional=True),
    "setup": Rule(list, _str_list, "a list of shell lines (str)"),
    "upload": Rule(list, _str_list, "a list of local paths (str)"),
    "prologue": Rule(str, optional=True),
    "death-timeout": Rule((int, float, str), _is_timedelta, "seconds or a time like '30s'"),
    "max-workers-per-host": Rule(int, lambda v: v >= 1, "an int >= 1", optional=True),
    "max-workers": Rule(int, lambda v: v >= 1, "an int >= 1", optional=True),
    "worker-start-method": Rule(str, lambda v: v in ("fork", "spawn", "forkserver"),
                                "'fork', 'spawn' or 'forkserver'"),
    "worker-start-timeout": Rule((int, float), lambda v: v > 0, "seconds > 0"),
}
# Keys that only exist per host, not as cluster-wide config keys.
_HOST_ONLY = {"max-workers"}


def check(key: str, value: Any, name: str) -> Any:
    """Check ``value`` against the rule of ``key``.

    Args:
        key: The key (below ``lazycluster.``, or a per-host key).
        value: The value.
        name: How to name the value in errors (an argument, or a key and its source).

    Returns:
        The value.

    Raises:
        TypeError: If it has the wrong type.
        ValueError: If it has the right type but a wrong value.
    """
    rule = RULES[key]
    if value is None and rule.optional:
        return None
    types = rule.types if isinstance(rule.types, tuple) else (rule.types,)
    wanted = rule.expected or " or ".join(t.__name__ for t in types)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise TypeError(f"{name} must be {wanted}, got {value!r}")
    if rule.check is not None and not rule.check(value):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value


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
    if key not in RULES or key in _HOST_ONLY:
        known = ", ".join(sorted(set(RULES) - _HOST_ONLY))
        raise KeyError(f"lazycluster.{key} is not a dask-lazycluster setting; known: {known}")
    resolved = dask.config.get(f"lazycluster.{key}", override_with=value)
    try:
        return check(key, resolved, key.replace("-", "_"))
    except (TypeError, ValueError) as exc:
        if value is None:  # name the config key and where it was set (only now: it reads files)
            name = f"config lazycluster.{key} (from {config_source(key)})"
            raise type(exc)(str(exc).replace(key.replace("-", "_"), name, 1)) from None
        raise


def _normal(key: str) -> str:
    return key.replace("_", "-")


def _check_options(host: str, options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One host's options with canonical keys, each checked; errors name host, key and where."""
    out: dict[str, Any] = {}
    for raw_key, value in options.items():
        key = _normal(str(raw_key))
        if key == "host":
            continue
        if key not in HOST_KEYS:
            raise ValueError(f"{where}: host {host!r} has an unknown key {raw_key!r} "
                             f"(per-host keys: {', '.join(HOST_KEYS)})")
        out[key] = check(key, value, f"{where}: {key} of host {host!r}")
    return out


def host_entries() -> dict[str, dict[str, Any]]:
    """The hosts of ``lazycluster.hosts`` with their per-host options, in config order.

    Returns:
        Host name to its options (canonical keys, checked; empty for a plain name).

    Raises:
        TypeError: If the list or an entry has the wrong type (naming the key and source).
        ValueError: If an entry has an unknown key or a bad value, or a host is listed twice.
    """
    entries = setting("hosts")
    where = f"config lazycluster.hosts (from {config_source('hosts')})" if entries else ""
    out: dict[str, dict[str, Any]] = {}
    for entry in entries:
        host = entry if isinstance(entry, str) else entry["host"]
        if host in out:
            raise ValueError(f"{where}: host {host!r} is listed twice")
        out[host] = {} if isinstance(entry, str) else _check_options(host, entry, where)
    return out


def check_host_options(
    host_options: Mapping[str, Mapping[str, Any]] | None, argument: str = "host_options"
) -> dict[str, dict[str, Any]]:
    """Check per-host options given in Python (the keys of ``lazycluster.hosts`` mappings).

    Args:
        host_options: Host name to its options; keys may use ``_`` or ``-``.
        argument: The argument's name, for errors.

    Returns:
        Host name to its options with canonical (``-``) keys.

    Raises:
        TypeError: If it is not a mapping of host names to mappings, or a value has the
            wrong type (naming host and key).
        ValueError: If a key is unknown or a value is out of range (naming host and key).
    """
    if host_options is None:
        return {}
    if not isinstance(host_options, Mapping):
        raise TypeError(f"{argument} must be a dict of host name to options, got {host_options!r}")
    out = {}
    for host, options in host_options.items():
        if not isinstance(host, str) or not isinstance(options, Mapping):
            raise TypeError(f"{argument} must map host names to dicts of options, got "
                            f"{host!r}: {options!r}")
        out[host] = _check_options(host, options, argument)
    return out


def runtime_defaults(
    host: str,
    working_dir: str | None,
    connect_options: dict[str, Any] | None,
    python: str | None,
) -> tuple[str | None, dict[str, Any], str | None, dict[str, str]]:
    """What a runtime of ``host`` uses when arguments are left as None, as DaskCluster does.

    An argument wins; else the host's entry in ``lazycluster.hosts`` (python, env); else the
    cluster-wide ``lazycluster.working-dir``, ``connect-options`` and ``python``.

    Args:
        host: The host.
        working_dir: The argument, or None.
        connect_options: The argument, or None.
        python: The argument, or None.

    Returns:
        ``(working_dir, connect_options, python, env)`` to use.
    """
    entry = host_entries().get(host, {})
    return (
        setting("working-dir", working_dir),
        dict(setting("connect-options", connect_options)),
        python if python is not None else entry.get("python") or setting("python"),
        dict(entry.get("env", {})),
    )
