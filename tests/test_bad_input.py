"""Bad input, table-driven: each case raises its documented typed error naming the argument or
host, within 30 s, and leaves nothing running."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import dask
import pytest

from dask_lazycluster import (
    DaskCluster,
    InvalidRuntimeError,
    LazyclusterError,
    NoPortsLeftError,
    PortInUseError,
    Runtime,
    RuntimeGroup,
    RuntimeManager,
)
from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers
from .helpers import echo_server_on_manager, free_port


class Env:
    """What the cases need: host names, a shared group, a scratch dir."""

    def __init__(self, hosts: TestHosts, group: RuntimeGroup, tmp: Path,
                 python_without_distributed: str) -> None:
        self.hosts, self.group, self.tmp = hosts, group, tmp
        self.python_without_distributed = python_without_distributed
        self.h = hosts.names[0]

    def wrong_known_hosts(self) -> str:
        path = self.tmp / "known_hosts"
        key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        path.write_text(f"{self.hosts.hosts[0].address} {key}")
        return str(path)

    def scale_beyond_ports(self) -> None:
        ports = [free_port() for _ in range(2)]
        with DaskCluster(self.group, ports=ports, n_workers=1,
                         worker_class="distributed.Worker", tunnel=True) as cluster:
            cluster.scale(3)

    def busy_master_port(self) -> None:
        port = free_port()
        with echo_server_on_manager(port):
            DaskCluster(self.group, master_port=port)

    def cluster_without_distributed(self) -> None:
        group = RuntimeGroup(runtimes=[Runtime(self.h, python=self.python_without_distributed)])
        try:
            DaskCluster(group, n_workers=1)
        finally:
            group.cleanup()

    def manager_config_wrong_type(self) -> None:
        with dask.config.set({"lazycluster.python": 3}):
            RuntimeManager(ssh_config=str(self.hosts.home / ".ssh" / "config"))

    def config_wrong_type(self) -> None:
        with dask.config.set({"lazycluster.n-workers": "three"}):
            DaskCluster(self.group)


Case = tuple[str, Callable[[Env], Any], type[BaseException], str]

CASES: list[Case] = [
    ("unknown host", lambda e: Runtime("no-such-host.invalid"), InvalidRuntimeError,
     "no-such-host.invalid.*resolve"),
    ("unreachable address", lambda e: Runtime("10.231.0.250",
                                              connect_options={"connect_timeout": 2}),
     InvalidRuntimeError, "10.231.0.250.*timed out"),
    ("refused port", lambda e: Runtime("127.0.0.1", connect_options={"port": 1}),
     InvalidRuntimeError, "refused"),
    ("refused auth", lambda e: Runtime(e.h, connect_options={
        "client_keys": [asyncssh.generate_private_key("ssh-ed25519")], "agent_path": None}),
     InvalidRuntimeError, "authentication failed"),
    ("host key mismatch", lambda e: Runtime(e.h, connect_options={
        "known_hosts": e.wrong_known_hosts()}), InvalidRuntimeError, "host key"),
    ("wrong python", lambda e: Runtime(e.h, python="/no/python"), InvalidRuntimeError,
     "/no/python"),
    ("working dir not creatable", lambda e: Runtime(e.h, working_dir="/proc/x/y"),
     InvalidRuntimeError, "working dir"),
    ("host not a str", lambda e: Runtime(42), TypeError, "host"),  # type: ignore[arg-type]
    ("group without hosts", lambda e: RuntimeGroup(), ValueError, "exactly one"),
    ("empty host list", lambda e: RuntimeGroup(hosts=[]), ValueError, "hosts"),
    ("duplicate hosts", lambda e: RuntimeGroup(hosts=[e.h, e.h]), ValueError, "more than once"),
    ("one unknown host in a group", lambda e: RuntimeGroup(hosts=[e.h, "nope.invalid"]),
     InvalidRuntimeError, "nope.invalid"),
    ("runtime_group not a group", lambda e: DaskCluster("h"),  # type: ignore[arg-type]
     TypeError, "runtime_group"),
    ("tunnel value", lambda e: DaskCluster(e.group, tunnel="maybe"), ValueError, "tunnel"),
    ("n_workers negative", lambda e: DaskCluster(e.group, n_workers=-1), ValueError, "n_workers"),
    ("n_workers a str", lambda e: DaskCluster(e.group, n_workers="3"),  # type: ignore[arg-type]
     TypeError, "n_workers"),
    ("worker_options a list", lambda e: DaskCluster(e.group, worker_options=[]),  # type: ignore[arg-type]
     TypeError, "worker_options"),
    ("env not str values", lambda e: DaskCluster(e.group, env={"A": 1}),  # type: ignore[dict-item]
     ValueError, "env"),
    ("death_timeout unparsable", lambda e: DaskCluster(e.group, death_timeout="soon"),
     ValueError, "death_timeout"),
    ("max_workers_per_host zero", lambda e: DaskCluster(e.group, max_workers_per_host=0),
     ValueError, "max_workers_per_host"),
    ("security not a Security", lambda e: DaskCluster(e.group, security="yes"), TypeError,
     "security"),
    ("busy master port", lambda e: e.busy_master_port(), PortInUseError, "in use"),
    ("exhausted port list", lambda e: DaskCluster(e.group, ports=[free_port()], tunnel=True),
     NoPortsLeftError, "port"),
    ("port list too small for scale", lambda e: e.scale_beyond_ports(), NoPortsLeftError, "port"),
    ("wrong remote python for workers", lambda e: DaskCluster(e.group, python="/no/python",
                                                              n_workers=1),
     LazyclusterError, "/no/python"),
    ("distributed missing on the host", lambda e: e.cluster_without_distributed(),
     LazyclusterError, "distributed is not installed"),
    ("config file with a wrong type", lambda e: e.config_wrong_type(), TypeError,
     "lazycluster.n-workers"),
    ("RuntimeManager with a wrong config type", lambda e: e.manager_config_wrong_type(),
     TypeError, "lazycluster.python"),
    ("RuntimeManager connect_options a list",
     lambda e: RuntimeManager(connect_options=[]),  # type: ignore[arg-type]
     TypeError, "connect_options"),
    ("port out of range", lambda e: e.group.get_free_port(70000), ValueError, "ports"),
    ("start_workers negative", lambda e: DaskCluster.start_workers(
        _Stub(e.group), -1),  # type: ignore[arg-type]
     ValueError, "count"),
]


class _Stub:
    """The smallest object start_workers() needs to check its argument."""

    def __init__(self, group: RuntimeGroup) -> None:
        self._group = group


@pytest.fixture(scope="module")
def env(hosts: TestHosts, group: RuntimeGroup, tmp_path_factory: pytest.TempPathFactory,
        python_without_distributed: str) -> Iterator[Env]:
    yield Env(hosts, group, tmp_path_factory.mktemp("bad-input"), python_without_distributed)


@pytest.mark.parametrize("label, call, error, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env: Env, label: str, call: Callable[[Env], Any],
                   error: type[BaseException], match: str) -> None:
    started = time.monotonic()
    with pytest.raises(error, match=match):
        call(env)
    assert time.monotonic() - started < 30, f"{label} took too long"
    assert wait_no_leftovers(env.hosts) == {}

