"""TLS for a cluster: the user's ``distributed.Security`` or a temporary one.

The workers' share travels over SSH stdin only, never on a command line or in a spec.
"""

from __future__ import annotations

from typing import Any

from distributed.security import Security


def resolve_security(security: Any) -> Security | None:
    """The cluster's security: ``True`` makes a temporary self-signed one, a ``Security`` is used.

    Args:
        security: None/False (plain TCP), True, or a ``distributed.Security``.

    Returns:
        The security object, or None for plain TCP.

    Raises:
        ValueError: If a given ``Security`` lacks worker certificates or does not require
            encryption.
        TypeError: If ``security`` is of another type.
    """
    if security is None or security is False:
        return None
    if security is True:
        return Security.temporary()
    if isinstance(security, Security):
        if not security.require_encryption or not getattr(security, "tls_worker_cert", None):
            raise ValueError("security= needs TLS certificates for the workers "
                             "(tls_worker_cert/tls_worker_key) and require_encryption=True")
        return security
    raise TypeError(f"security must be True, False or a distributed.Security, got {security!r}")


def pem(value: str | None) -> str | None:
    """A certificate or key as PEM text: in memory already, or read from the manager's file.

    Args:
        value: PEM text, a file path, or None.

    Returns:
        PEM text, or None.
    """
    if value is None or "-----BEGIN" in value:
        return value
    with open(value) as f:
        return f.read()


def worker_tls(security: Security | None) -> dict[str, Any] | None:
    """``Security`` keyword arguments for a worker, with PEM text in place of file paths.

    A worker also acts as a client (of the scheduler and of its peers), so the client
    certificate falls back to the worker's.

    Args:
        security: The cluster's security, or None.

    Returns:
        The keyword arguments, or None for plain TCP.
    """
    if security is None:
        return None
    tls: dict[str, Any] = {"require_encryption": True}
    for field, fallback in (("tls_ca_file", None), ("tls_worker_cert", None),
                            ("tls_worker_key", None), ("tls_client_cert", "tls_worker_cert"),
                            ("tls_client_key", "tls_worker_key")):
        value = getattr(security, field, None) or (
            getattr(security, fallback, None) if fallback else None)
        if value is not None:
            tls[field] = pem(value)
    return tls
