"""lazycluster's ``connection_kwargs`` (fabric/paramiko names) as ``asyncssh.connect`` options.

lazycluster handed ``Runtime(host, working_dir, connection_kwargs)`` to fabric's
``Connection(connect_kwargs=...)``, i.e. to paramiko's ``SSHClient.connect``. Here asyncssh is
the SSH layer: each paramiko argument with an asyncssh equivalent is translated, the few that
only tune paramiko are dropped, and any other one is refused rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

# paramiko's connect() argument -> asyncssh.connect()'s, where only the name differs.
_RENAMED = {
    "port": "port",
    "username": "username",
    "password": "password",
    "passphrase": "passphrase",
    "timeout": "connect_timeout",
    "auth_timeout": "login_timeout",
    "sock": "sock",
    "gss_auth": "gss_auth",
    "gss_kex": "gss_kex",
    "gss_host": "gss_host",
    "gss_deleg_creds": "gss_delegate_creds",
}
# Tuning knobs of paramiko itself, with nothing to set in asyncssh.
_DROPPED = {"banner_timeout", "channel_timeout", "gss_trust_dns"}
# Handled below, with more than a new name.
_CONVERTED = {"key_filename", "allow_agent", "look_for_keys", "compress"}

#: The paramiko names :func:`asyncssh_options` accepts.
ACCEPTED_NAMES = frozenset(_RENAMED) | _DROPPED | _CONVERTED


def asyncssh_options(connection_kwargs: object) -> dict[str, Any]:
    """Translate lazycluster's ``connection_kwargs`` to ``asyncssh.connect`` keyword arguments.

    Args:
        connection_kwargs: paramiko ``connect()`` arguments, e.g. ``{"key_filename":
            "~/.ssh/id_rsa", "look_for_keys": False}``.

    Returns:
        The asyncssh options.

    Raises:
        TypeError: If it is not a dict, or holds a name without an asyncssh equivalent (such
            as a paramiko ``pkey`` object).
    """
    if not isinstance(connection_kwargs, dict):
        raise TypeError(f"connection_kwargs must be a dict or None, got {connection_kwargs!r}")
    unknown = sorted(str(name) for name in connection_kwargs if name not in ACCEPTED_NAMES)
    if unknown:
        raise TypeError(
            f"connection_kwargs: {', '.join(map(repr, unknown))} has no asyncssh equivalent; "
            f"pass asyncssh options with connect_options= instead"
        )
    options = {_RENAMED[k]: v for k, v in connection_kwargs.items() if k in _RENAMED}
    keys = connection_kwargs.get("key_filename")
    if keys is not None:
        options["client_keys"] = [keys] if isinstance(keys, str) else list(keys)
    if not connection_kwargs.get("allow_agent", True):
        options["agent_path"] = None
    if connection_kwargs.get("look_for_keys") is False and not options.get("client_keys"):
        options["client_keys"] = None  # no key files at all ([] would load ~/.ssh's)
    if "compress" in connection_kwargs:
        on = bool(connection_kwargs["compress"])
        options["compression_algs"] = ["zlib@openssh.com", "zlib"] if on else ["none"]
    return options
