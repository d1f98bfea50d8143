"""Security on real hosts: host keys, secrets off command lines and reprs, loopback-only
forwards, private working dirs, TLS."""

from __future__ import annotations

import logging
import os
import stat
import time

import pytest
from distributed import Client

from dask_lazycluster import DaskCluster, InvalidRuntimeError, Runtime, RuntimeGroup, RuntimeTask
from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers

SECRET = "s3cr3t-Value-42"


def listening_addresses(hosts: TestHosts, name: str) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket inside a host (IPv4 and IPv6)."""
    out = hosts.run(name, ["cat", "/proc/net/tcp", "/proc/net/tcp6"]).stdout
    found = set()
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":
            address, port = fields[1].rsplit(":", 1)
            if len(address) == 8:
                octets = [str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)]
                found.add((".".join(octets), int(port, 16)))
            else:
                found.add(("::1" if address.endswith("01000000") else address, int(port, 16)))
    return found


def test_host_keys_verified_unless_turned_off_with_a_warning(
        hosts: TestHosts, caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(InvalidRuntimeError, match="host key"):
        Runtime(hosts.names[0], connect_options={"known_hosts": str(empty)})
    with caplog.at_level(logging.WARNING, logger="dask_lazycluster"):
        runtime = Runtime(hosts.names[0], connect_options={"known_hosts": None})
    assert "host key checking is OFF" in caplog.text
    runtime.cleanup()


def test_secrets_stay_off_command_lines_reprs_and_logs(hosts: TestHosts, group: RuntimeGroup,
                                                       caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    group.add_env_variables({"API_TOKEN": SECRET})
    task = group.execute_task(RuntimeTask("sleeper").run_command("sleep 5"),
                              host=hosts.names[0])
    assert isinstance(task, RuntimeTask)
    with caplog.at_level(logging.DEBUG), DaskCluster(group, n_workers=3,
                                                     env={"WORKER_TOKEN": SECRET},
                                                     security=True) as cluster:
        time.sleep(1)
        for name in hosts.names:
            for cmdline in hosts.leftover_processes()[name]:
                assert SECRET not in cmdline and "BEGIN PRIVATE KEY" not in cmdline, cmdline
        shown = repr(cluster) + cluster._repr_html_() + repr(cluster.worker_spec)
        assert SECRET not in shown and "PRIVATE KEY" not in shown
        with Client(cluster) as client:
            client.wait_for_workers(3)
            workers = set(client.scheduler_info()["workers"])
        logs = cluster.get_logs()
        # the scheduler's and every worker's own log are there (the check below reads them)
        assert workers <= set(logs) and "distributed.scheduler" in logs["Scheduler"]
        assert all("Registered to" in logs[w] for w in workers), logs
        assert SECRET not in "\n".join(logs.values())
        cluster.print_log()
        printed = capsys.readouterr().out
        assert "distributed.worker" in printed and SECRET not in printed
    task.join()
    assert SECRET not in caplog.text
    group.set_env_variables({})


def test_tunnel_mode_listens_on_loopback_only(netns: TestHosts, group: RuntimeGroup) -> None:
    with DaskCluster(group) as cluster, Client(cluster) as client:
        client.wait_for_workers(3)
        for name in netns.names:
            exposed = {(a, p) for a, p in listening_addresses(netns, name)
                       if a not in ("127.0.0.1", "::1") and p != 22}
            assert not exposed, f"{name} listens beyond loopback: {exposed}"


def test_working_dirs_are_private_and_removed(hosts: TestHosts) -> None:
    runtime = Runtime(hosts.names[1])
    path = runtime.working_dir
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700  # the hosts share our filesystem
    runtime.cleanup()
    assert not os.path.exists(path)


@pytest.mark.parametrize("tunnel", [True, False])
def test_tls_everywhere_and_plain_tcp_refused(netns: TestHosts, group: RuntimeGroup,
                                              tunnel: bool) -> None:
    with DaskCluster(group, security=True, tunnel=tunnel) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        with Client(cluster) as client:
            client.wait_for_workers(3)
            assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
            assert client.submit(lambda: 6 * 7).result() == 42
        plain = cluster.scheduler_address.replace("tls://", "tcp://")
        with pytest.raises((OSError, TimeoutError)):
            Client(plain, timeout=3)
    assert wait_no_leftovers(netns) == {}
