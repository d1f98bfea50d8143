"""The speed-ups: parked probe interpreters, forked workers, batched writes, spliced relays."""

from __future__ import annotations

import hashlib
import os
import socket
import sys

import dask
import psutil
import pytest
from distributed import Client

from dask_lazycluster import DaskCluster, Runtime, RuntimeGroup, _host
from dask_lazycluster._bootstrap import BOOTSTRAP
from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers
from .helpers import free_port, server_in_host, wait_until

pytestmark = pytest.mark.usefixtures("leak_check")

# Inside a host: answer each connection with the byte count and sha256 of all it received.
DIGEST_SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    h, n = hashlib.sha256(), 0
    while True:
        data = c.recv(1 << 20)
        if not data:
            break
        h.update(data); n += len(data)
    c.sendall(f"{n} {h.hexdigest()}".encode()); c.close()
"""


# Inside a host: greet at once (the server speaks first), then answer like DIGEST_SERVER.
GREETING_SERVER = DIGEST_SERVER.replace("c, _ = s.accept()", "c, _ = s.accept(); c.sendall(b'hi|')")

# Inside another host: read the greeting, send N random bytes, half-close, print all replies.
DIGEST_CLIENT = """
import hashlib, os, socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 10)
greeting = c.recv(3)
data = os.urandom(int(sys.argv[2]))
c.sendall(data); c.shutdown(socket.SHUT_WR)
reply = b""
while chunk := c.recv(256):
    reply += chunk
print(greeting.decode(), len(data), hashlib.sha256(data).hexdigest(), reply.decode())
"""


def worker_cmdlines(client: Client) -> list[str]:
    return [" ".join(c) for c in client.run(lambda: psutil.Process().cmdline()).values()]


def grandparents(client: Client) -> list[int]:
    return sorted(client.run(lambda: psutil.Process(os.getppid()).ppid()).values())


def test_probe_interpreters_become_the_supervisors_that_fork_the_workers(
        hosts: TestHosts) -> None:
    group = RuntimeGroup(hosts=hosts.names)
    try:
        parked = {r.host: r.core.state.parked_pid for r in group.runtimes}
        assert all(psutil.pid_exists(pid) for pid in parked.values())
        with DaskCluster(group, n_workers=len(hosts.names)) as cluster, Client(cluster) as client:
            # Each worker process is a child of its nanny, and the nanny a child of the host's
            # supervisor: the probe's python, which waited for this.
            assert grandparents(client) == sorted(parked.values())
            # Forked (the default worker-start-method): a fork keeps the nanny's command line
            # (our bootstrap); a spawned worker's would run multiprocessing's spawn_main.
            assert all(BOOTSTRAP in c for c in worker_cmdlines(client))
            assert client.submit(sum, range(10)).result() == 45
    finally:
        group.cleanup()
    assert wait_no_leftovers(hosts) == {}


def test_forked_workers_restart_and_recover(hosts: TestHosts, group: RuntimeGroup) -> None:
    # A nanny forks again on restart and after a crash, by then with threads of its own.
    with DaskCluster(group, n_workers=2) as cluster, Client(cluster) as client:
        first = set(client.run(os.getpid).values())
        client.restart()
        assert sum(client.gather(client.map(lambda x: x * 2, range(100)))) == 9900
        second = client.run(os.getpid)
        assert first.isdisjoint(second.values()) and len(second) == 2
        victim = sorted(second)[0]
        with pytest.raises(Exception):  # noqa: B017 - the worker dies mid-call: any comm error
            client.run(lambda: os._exit(1), workers=[victim])
        assert wait_until(lambda: len(client.scheduler_info()["workers"]) == 2
                          and second[victim] not in client.run(os.getpid).values(), 30)
        assert all(BOOTSTRAP in c for c in worker_cmdlines(client))
        assert client.submit(lambda: 42).result() == 42


def test_worker_start_method_spawn_is_honoured(hosts: TestHosts, group: RuntimeGroup) -> None:
    with dask.config.set({"lazycluster.worker-start-method": "spawn"}):
        with DaskCluster(group, n_workers=1) as cluster, Client(cluster) as client:
            assert all("spawn_main" in c and BOOTSTRAP not in c
                       for c in worker_cmdlines(client))
            assert client.submit(sum, range(4)).result() == 6


def test_bad_worker_start_method_is_named(group: RuntimeGroup) -> None:
    with dask.config.set({"lazycluster.worker-start-method": "vfork"}):
        with pytest.raises(ValueError, match="worker-start-method"):
            DaskCluster(group, n_workers=1)


def test_print_log_leaves_out_a_waiting_probe(hosts: TestHosts,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    runtime = Runtime(hosts.names[0])
    try:
        assert runtime.core.state.parked is not None
        runtime.print_log()
        assert capsys.readouterr().out == ""
    finally:
        runtime.cleanup()


def test_unclaimed_probe_ends_by_itself(hosts: TestHosts,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_host, "PROBE_PARK_SECONDS", 1.0)
    monkeypatch.setattr(_host, "PARK_MARGIN", 0.5)
    runtime = Runtime(hosts.names[0])
    try:
        pid = runtime.core.state.parked_pid
        assert psutil.pid_exists(pid)
        assert wait_until(lambda: not psutil.pid_exists(pid), timeout=10)
        # Too old to count on: a cluster starts a fresh interpreter instead, and works.
        group = RuntimeGroup(runtimes=[runtime])
        with DaskCluster(group, n_workers=1) as cluster, Client(cluster) as client:
            assert client.submit(len, "abc").result() == 3
            assert pid not in grandparents(client)
    finally:
        runtime.cleanup()
    assert wait_no_leftovers(hosts) == {}


def test_bulk_data_through_a_forward_arrives_intact(netns: TestHosts) -> None:
    # SSH writes are batched per loop turn: order and content must survive, in volume.
    host, remote_port, local_port = netns.names[0], free_port(), free_port()
    with server_in_host(netns, host, DIGEST_SERVER, remote_port):
        runtime = Runtime(host)
        try:
            runtime.expose_port_from_runtime(remote_port, local_port)
            payload = os.urandom(48 << 20)
            with socket.create_connection(("127.0.0.1", local_port), 10) as conn:
                view = memoryview(payload)
                for offset in range(0, len(payload), 100_003):  # odd sizes: packets straddle
                    conn.sendall(view[offset:offset + 100_003])
                conn.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := conn.recv(256):
                    reply += chunk
            assert reply.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
        finally:
            runtime.cleanup()


def test_host_to_host_relay_keeps_early_data_half_close_and_volume(
        netns: TestHosts, group: RuntimeGroup) -> None:
    # A group port of host 0 used from host 1 is relayed channel to channel in the manager.
    source, user = netns.names[0], netns.names[1]
    port = free_port()
    with server_in_host(netns, source, GREETING_SERVER, port):
        try:
            assert group.expose_port_from_runtime_to_group(source, port) == port
            for size in (0, 1, 20 << 20):
                out = netns.run(user, [sys.executable, "-c", DIGEST_CLIENT, str(port),
                                       str(size)], timeout=60)
                greeting, sent, digest, reply = out.stdout.split(" ", 3)
                # The greeting came before the client sent anything (held until the relay
                # was joined); the server saw all data and our EOF, and its answer came back.
                assert greeting == "hi|" and reply.strip() == f"{sent} {digest}", out.stderr
        finally:
            group.close_port_forward(port)
