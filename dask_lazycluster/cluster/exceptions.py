"""Errors of the cluster layer."""

from __future__ import annotations

from dask_lazycluster.exceptions import LazyclusterError


class MasterStartError(LazyclusterError):
    """The master (Dask scheduler) could not be started.

    Args:
        host: Where the master was to run.
        port: The port it was to listen on.
        cause: Why it failed.
    """

    def __init__(self, host: str, port: int | None, cause: str) -> None:
        self.host = host
        self.port = port
        self.cause = cause
        super().__init__(f"master could not be started on {host}:{port}: {cause}")
