"""Small helpers shared by the runtime and cluster layers."""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterable

from dask_lazycluster.config import setting

_LISTEN = "0A"  # TCP state code of a listening socket in /proc/net/tcp


def localhost_has_free_port(port: int) -> bool:
    """Check whether a TCP port is free on the manager (the machine running Python).

    Args:
        port: The port to check.

    Returns:
        True if nothing listens on the port on any local IPv4 address.
    """
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def parse_listening_ports(proc_net_tcp: str) -> set[int]:
    """Return the listening TCP ports found in the text of ``/proc/net/tcp`` (and ``tcp6``).

    Args:
        proc_net_tcp: The concatenated contents of the files.

    Returns:
        The set of ports in LISTEN state.
    """
    ports: set[int] = set()
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == _LISTEN and ":" in fields[1]:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def validate_port(port: object, argument: str) -> int:
    """Check that a value is a usable TCP port number.

    Args:
        port: The value to check.
        argument: The argument name to report.

    Returns:
        The port.

    Raises:
        TypeError: If it is not an int.
        ValueError: If it is out of range.
    """
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{argument} must be an int port number, got {port!r}")
    if not 0 < port < 65536:
        raise ValueError(f"{argument} must be in 1..65535, got {port}")
    return port


def validate_ports(ports: object, argument: str) -> list[int]:
    """Check a port or list of ports and return it as a list.

    Args:
        ports: An int or an iterable of ints.
        argument: The argument name to report.

    Returns:
        The ports as a list, order kept.

    Raises:
        TypeError: If it is neither an int nor an iterable of ints.
        ValueError: If a port is out of range.
    """
    if isinstance(ports, int) and not isinstance(ports, bool):
        return [validate_port(ports, argument)]
    if isinstance(ports, (str, bytes)) or not isinstance(ports, Iterable):
        raise TypeError(f"{argument} must be a port or a list of ports, got {ports!r}")
    return [validate_port(p, argument) for p in ports]


def preload_dashboard() -> None:
    """Import the scheduler's dashboard (bokeh, ~0.4 s of CPU) in a background thread.

    A scheduler imports it when it starts; doing it while the manager waits on SSH round trips
    takes that time off the start-up path. Returns at once; a no-op once imported or begun,
    and with ``lazycluster.scheduler-process: true`` (the scheduler's own process imports it).
    """
    global _dashboard_loader
    if setting("scheduler-process"):
        return  # it would only take CPU from that process's start-up
    with _dashboard_lock:
        if _dashboard_loader is not None or "distributed.dashboard.scheduler" in sys.modules:
            return

        def load() -> None:
            try:
                importlib.import_module("distributed.dashboard.scheduler")
            except ImportError:  # no bokeh: the scheduler runs without a dashboard anyway
                pass

        _dashboard_loader = threading.Thread(target=load, name="lazycluster-dashboard-import",
                                             daemon=True)
        _dashboard_loader.start()


_dashboard_lock = threading.Lock()
_dashboard_loader: threading.Thread | None = None


class Environment:
    """lazycluster's library-wide settings (its ``lazycluster.utils.Environment``).

    Attributes:
        main_directory: lazycluster's directory for execution log files on the manager.
            Kept for compatibility: execution logs are kept in memory here.
        third_party_log_level: Log level of the SSH library (asyncssh here, paramiko in
            lazycluster); set it with :meth:`set_third_party_log_level`.
        use_dev_version: Kept for compatibility: nothing is installed on the hosts.
    """

    main_directory = os.path.abspath("./lazycluster")
    third_party_log_level = logging.CRITICAL
    use_dev_version = False

    @classmethod
    def set_main_directory(cls, dir: str) -> None:  # noqa: A002  (lazycluster's name)
        """Set :attr:`main_directory` (a relative path is made absolute).

        Args:
            dir: The directory.
        """
        cls.main_directory = os.path.abspath(dir)

    @classmethod
    def set_third_party_log_level(cls, log_level: int) -> None:
        """Set the log level of the SSH library (asyncssh) on the manager.

        Unlike lazycluster, the root logger's configuration is left alone (Dask and the
        application own it).

        Args:
            log_level: A ``logging`` level such as ``logging.ERROR``.
        """
        cls.third_party_log_level = log_level
        logging.getLogger("asyncssh").setLevel(log_level)

    @classmethod
    def use_lazycluster_dev_version(cls) -> None:
        """Kept for compatibility: nothing is installed on the hosts, so it has no effect."""
        cls.use_dev_version = True
