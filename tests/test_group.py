"""RuntimeGroup against real sshd test hosts: membership, ports, tunnels, tasks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dask_lazycluster import (
    InvalidRuntimeError,
    NoPortsLeftError,
    PortInUseError,
    Runtime,
    RuntimeGroup,
    RuntimeTask,
    TaskExecutionError,
)
from dask_lazycluster._core import live_cores
from dask_lazycluster.testing import TestHosts
from dask_lazycluster.testing.system import ENV

from .helpers import (
    echo_from_host,
    echo_from_manager,
    echo_server_in_host,
    echo_server_on_manager,
    free_port,
)


def test_constructor_arguments(hosts: TestHosts) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RuntimeGroup()
    with pytest.raises(ValueError, match="exactly one"):
        RuntimeGroup(runtimes=[], hosts=hosts.names)
    with pytest.raises(ValueError, match="empty"):
        RuntimeGroup(hosts=[])
    with pytest.raises(ValueError, match="more than once"):
        RuntimeGroup(hosts=[hosts.names[0], hosts.names[0]])
    with pytest.raises(TypeError):
        RuntimeGroup(hosts=[hosts.names[0], 7])  # type: ignore[list-item]


def test_one_bad_host_fails_the_group_and_leaves_no_connection(hosts: TestHosts) -> None:
    before = len(live_cores())
    with pytest.raises(InvalidRuntimeError, match="bad-host.invalid"):
        RuntimeGroup(hosts=[hosts.names[0], "bad-host.invalid", hosts.names[1]])
    assert len(live_cores()) == before


def test_membership(hosts: TestHosts, group: RuntimeGroup) -> None:
    assert group.hosts == hosts.names
    assert group.runtime_count == len(hosts.names)
    assert [r.host for r in group.runtimes] == hosts.names
    assert group.contains_runtime(hosts.names[0]) and not group.contains_runtime("nope")
    assert group.get_runtime(hosts.names[1]).host == hosts.names[1]
    assert group.get_runtime().host in hosts.names
    assert list(group.get_runtimes(exclude_hosts=hosts.names[0])) == hosts.names[1:]
    assert list(group.get_runtimes(include_hosts=[hosts.names[2]])) == [hosts.names[2]]
    with pytest.raises(ValueError, match="not in the group"):
        group.get_runtime("nope")
    with pytest.raises(ValueError, match="not in the group"):
        group.get_runtimes(include_hosts=["nope"])
    with pytest.raises(ValueError, match="already in the group"):
        group.add_runtime(group.runtimes[0])
    with pytest.raises(TypeError):
        group.add_runtime(3)  # type: ignore[arg-type]


def test_add_and_remove_runtime(hosts: TestHosts) -> None:
    small = RuntimeGroup(runtimes=[Runtime(hosts.names[0])])
    added = small.add_runtime(hosts.names[1])
    assert small.hosts == hosts.names[:2] and isinstance(added, Runtime)
    removed = small.remove_runtime(hosts.names[1])
    assert removed is added and small.hosts == hosts.names[:1]
    with pytest.raises(ValueError):
        small.remove_runtime(hosts.names[1])
    removed.cleanup()
    small.cleanup()


def test_group_port_rules(hosts: TestHosts, group: RuntimeGroup) -> None:
    busy, spare = free_port(), free_port()
    with echo_server_in_host(hosts, hosts.names[1], busy):
        assert not group.has_free_port(busy)
        assert group.has_free_port(busy, exclude_hosts=[hosts.names[1]])
        assert group.get_free_port([busy, spare]) == spare
        with pytest.raises(PortInUseError, match=hosts.names[1]):
            group.get_free_port(busy)
        with pytest.raises(NoPortsLeftError):
            group.get_free_port([busy])
    with echo_server_on_manager(spare):
        assert group.get_free_port([spare]) == spare
        with pytest.raises(PortInUseError, match="localhost"):
            group.get_free_port(spare, enforce_check_on_localhost=True)


def _check_service_on_host_reached_everywhere(hosts: TestHosts) -> None:
    group = RuntimeGroup(hosts=hosts.names)
    try:
        service_port = free_port()
        with echo_server_in_host(hosts, hosts.names[0], service_port):
            group_port = group.expose_port_from_runtime_to_group(
                hosts.names[0], service_port, [free_port()]
            )
            expected = f"echo:ping:{hosts.names[0]}"
            assert echo_from_manager(group_port) == expected
            for other in hosts.names[1:]:
                assert echo_from_host(hosts, other, group_port) == expected
        with pytest.raises(ValueError):
            group.expose_port_from_runtime_to_group("nope", service_port)
        manager_port = free_port()
        with echo_server_on_manager(manager_port):
            assert group.expose_port_to_runtimes(manager_port) == manager_port
            for name in hosts.names:
                assert echo_from_host(hosts, name, manager_port) == "echo:ping:manager"
            with pytest.raises(PortInUseError):
                group.expose_port_to_runtimes(manager_port)
    finally:
        group.cleanup()


def test_ports_exposed_across_the_group(netns: TestHosts) -> None:
    _check_service_on_host_reached_everywhere(netns)


def test_ports_exposed_when_hosts_open_only_ssh(fw_hosts: TestHosts) -> None:
    # Direct TCP to the service is blocked by the hosts' firewall; the tunnel still works.
    port = free_port()
    with echo_server_in_host(fw_hosts, fw_hosts.names[0], port):
        reply = fw_hosts.run(fw_hosts.names[1], ["python3", "-c", (
            "import socket,sys\n"
            f"try: socket.create_connection(('{fw_hosts.hosts[0].address}', {port}), 2)\n"
            "except OSError: print('blocked')")])
        assert reply.stdout.strip() == "blocked"
    _check_service_on_host_reached_everywhere(fw_hosts)


def test_tasks_broadcast_join_and_returns(hosts: TestHosts, group: RuntimeGroup,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Each test host's sessions carry its own marker variable (in both harness modes).
    task = (RuntimeTask("where").run_command(f'echo on-$(basename "${ENV}")')
            .run_function(lambda: os.path.basename(os.environ[ENV])))
    started = group.execute_task(task, broadcast=True)
    assert isinstance(started, list) and len(started) == len(hosts.names)
    group.join()
    assert [next(t.function_returns) for t in started] == hosts.names
    assert len(list(group.function_returns)) >= len(hosts.names)
    single = group.execute_task(RuntimeTask("one").run_function(lambda: 5), host=hosts.names[2],
                                execute_async=False)
    assert isinstance(single, RuntimeTask) and single.host == hosts.names[2]
    assert list(single.function_returns) == [5]
    never = group.execute_task(RuntimeTask("bad").run_command("exit 1"), omit_on_join=True)
    group.join()  # the failing task is omitted, so join succeeds
    assert isinstance(never, RuntimeTask)
    with pytest.raises(TaskExecutionError):
        never.join()
    group.print_log()
    out = capsys.readouterr().out
    assert all(f"on-{n}" in out for n in hosts.names), out
    with pytest.raises(ValueError):
        group.execute_task(task, host="nope")


def test_env_and_send_file(hosts: TestHosts, group: RuntimeGroup, tmp_path: Path) -> None:
    group.set_env_variables({"A": "1"})
    group.add_env_variables({"B": "2"})
    source = tmp_path / "data.txt"
    source.write_text("shared")
    sent = group.send_file(str(source), execute_async=False)  # lazycluster's default: async
    assert [t.host for t in sent] == group.hosts
    tasks = group.execute_task(RuntimeTask("env").run_command('echo "$A$B-$(cat data.txt)"'),
                               broadcast=True, execute_async=False)
    assert isinstance(tasks, list)
    assert all("12-shared" in t.execution_log for t in tasks)
    with pytest.raises(ValueError):
        group.send_file(str(tmp_path / "missing"))
