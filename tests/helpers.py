"""Small real-network helpers for the tests: echo servers and clients inside test hosts."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from dask_lazycluster.testing import TestHosts

ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    data = c.recv(1024)
    c.sendall(b"echo:" + data + b":" + socket.gethostname().encode())
    c.close()
"""

ECHO_CLIENT = """
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5)
c.sendall(b"ping"); print(c.recv(1024).decode()); c.close()
"""


@contextmanager
def server_in_host(hosts: TestHosts, name: str, script: str, port: int) -> Iterator[None]:
    """Run a python server ``script`` (prints ``ready`` once listening on port) in a test host."""
    proc = hosts.popen(name, [sys.executable, "-c", script, str(port)],
                       stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.wait()


def echo_server_in_host(hosts: TestHosts, name: str, port: int) -> AbstractContextManager[None]:
    """Run an echo server on ``127.0.0.1:port`` inside a test host."""
    return server_in_host(hosts, name, ECHO_SERVER, port)


@contextmanager
def echo_server_on_manager(port: int) -> Iterator[None]:
    """Run an echo server on the manager's ``127.0.0.1:port`` (a thread)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            data = conn.recv(1024)
            conn.sendall(b"echo:" + data + b":manager")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        server.close()


def echo_from_host(hosts: TestHosts, name: str, port: int) -> str:
    """Connect to ``127.0.0.1:port`` from inside a host; return the reply ('' on failure)."""
    out = hosts.run(name, [sys.executable, "-c", ECHO_CLIENT, str(port)], timeout=20)
    return out.stdout.strip()


def echo_from_manager(port: int) -> str:
    """Connect to the manager's ``127.0.0.1:port``; return the reply."""
    with socket.create_connection(("127.0.0.1", port), 5) as conn:
        conn.sendall(b"ping")
        return conn.recv(1024).decode()


@contextmanager
def new_tcp_refused(hosts: TestHosts, index: int, peer: str, outgoing: bool,
                    table: str) -> Iterator[None]:
    """In test host ``index``'s namespace, refuse new TCP connections to or from ``peer``.

    SSH (port 22) and replies on existing connections still pass. Needs netns hosts.

    Args:
        hosts: The test hosts.
        index: Which host gets the rule.
        peer: The other side's address.
        outgoing: True: connections the host opens to ``peer``; False: ``peer``'s to the host.
        table: The nft table to hold the rule (removed afterwards).

    Yields:
        Nothing; the rule holds until the block ends.
    """
    nft = ["ip", "netns", "exec", str(hosts.hosts[index].netns), "nft"]
    chain, hook, field = ("out", "output", "daddr") if outgoing else ("in", "input", "saddr")
    subprocess.run([*nft, "add", "table", "inet", table], check=True)
    try:
        subprocess.run([*nft, "add", "chain", "inet", table, chain,
                        f"{{ type filter hook {hook} priority 0 ; }}"], check=True)
        subprocess.run([*nft, "add", "rule", "inet", table, chain, "ip", field, peer,
                        "tcp", "dport", "!=", "22", "ct", "state", "new", "reject"], check=True)
        yield
    finally:
        subprocess.run([*nft, "delete", "table", "inet", table], check=False)


def ssh_config_block(hosts: TestHosts, name: str) -> list[str]:
    """The option lines of ``Host name`` in the test hosts' ssh config."""
    lines = hosts.ssh_config.read_text().splitlines()
    start = lines.index(f"Host {name}")
    body = []
    for line in lines[start + 1:]:
        if not line.startswith((" ", "\t")):
            break
        body.append(line)
    return body


def free_port() -> int:
    """A port free on the manager right now (and, by the test hosts' design, on them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until true or ``timeout``; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(interval)


def worker_hosts(client: Any) -> Counter[str]:
    """Hostname of each worker the scheduler knows, counted."""
    return Counter(client.run(socket.gethostname).values())


def wait_layout(client: Any, expected: Counter[str], timeout: float = 90) -> Counter[str]:
    """Wait until the workers sit on hosts as ``expected``; return the last layout seen.

    The worker count reaches its target before the layout settles: a host whose share
    changed has its resized workers replaced one by one, so for a moment one host can hold
    an extra worker and another one too few. A worker closing while it is asked counts as
    "not settled yet".
    """
    seen: Counter[str] = Counter()

    def settled() -> bool:
        nonlocal seen
        try:
            seen = worker_hosts(client)
        except OSError:  # a replaced worker closed its comm during the call
            return False
        return seen == expected

    wait_until(settled, timeout, interval=0.25)
    return seen
