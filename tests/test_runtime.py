"""Runtime (one host) against real sshd test hosts."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest

from dask_lazycluster import (
    InvalidRuntimeError,
    LazyclusterError,
    NoPortsLeftError,
    PortInUseError,
    Runtime,
    RuntimeTask,
    TaskExecutionError,
)
from dask_lazycluster.testing import TestHosts

from .helpers import (
    echo_from_host,
    echo_from_manager,
    echo_server_in_host,
    echo_server_on_manager,
    free_port,
    wait_until,
)


@pytest.fixture(scope="module")
def runtime(hosts: TestHosts):
    rt = Runtime(hosts.names[0])
    yield rt
    rt.cleanup()


def test_resolves_like_ssh_and_reads_info(hosts: TestHosts, runtime: Runtime) -> None:
    assert runtime.host == hosts.names[0]
    info = runtime.info
    assert info["cpu_cores"] >= 1 and info["memory"] > 0
    assert info["python_version"].count(".") == 2
    assert info["gpus"] == []
    # netns hosts have their own hostnames; local-mode hosts share the manager's
    assert info["hostname"] == (hosts.names[0] if hosts.mode == "netns" else socket.gethostname())
    # a private dir in the host's own temp dir (the harness gives each host its own TMPDIR)
    assert runtime.working_dir.startswith(f"{hosts.host_tmpdir(runtime.host)}/lazycluster-")
    assert runtime.info is not runtime.core.state.info  # a copy: callers cannot corrupt the cache


@pytest.mark.parametrize(
    "host, options, cause",
    [
        ("no-such-host.invalid", {}, "cannot resolve"),
        ("127.0.0.1", {"port": 1}, "refused"),
        ("10.231.0.250", {"connect_timeout": 2}, "timed out"),
    ],
)
def test_unusable_hosts_raise_in_time(hosts: TestHosts, host: str, options: dict,
                                      cause: str) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidRuntimeError, match=cause) as info:
        Runtime(host, connect_options=options)
    assert info.value.host == host
    assert time.monotonic() - started < 10


def test_refused_key_and_wrong_host_key(hosts: TestHosts, tmp_path: Path) -> None:
    name = hosts.names[0]
    other_key = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(InvalidRuntimeError, match="authentication failed"):
        Runtime(name, connect_options={"client_keys": [other_key], "agent_path": None})
    bad_known = tmp_path / "known_hosts"
    wrong = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    bad_known.write_text(f"{hosts.hosts[0].address} {wrong}")
    with pytest.raises(InvalidRuntimeError, match="host key"):
        Runtime(name, connect_options={"known_hosts": str(bad_known)})


def ssh_connections(hosts: TestHosts, name: str, log_from: int = 0) -> set[str]:
    """Client ports of the SSH connections in a host's sshd log (from offset ``log_from``)."""
    return set(re.findall(r" from \S+ port (\d+)", hosts.sshd_log(name)[log_from:]))


def test_untrusted_host_key_fails_once_and_is_never_retried(
        make_hosts: Callable[..., TestHosts], tmp_path: Path) -> None:
    # a host of its own: nothing else connects to it while we count
    host = make_hosts(1, "lzkey")
    name = host.names[0]
    untrusted = tmp_path / "known_hosts"
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    untrusted.write_text(f"{host.hosts[0].address} {key}")
    log_from = len(host.sshd_log(name))
    with pytest.raises(InvalidRuntimeError, match=f"{name}.*host key"):
        Runtime(name, connect_options={"known_hosts": str(untrusted),
                                       "config": [str(host.ssh_config)]})
    assert wait_until(lambda: ssh_connections(host, name, log_from), timeout=10)
    time.sleep(6)  # a background reconnect would try again within 1-5 s
    assert len(ssh_connections(host, name, log_from)) == 1, host.sshd_log(name)[log_from:]


def test_function_task_logs_end_with_the_functions_output(runtime: Runtime) -> None:
    # The log used to end with "Fatal Python error: _enter_buffered_busy ..." from the remote
    # interpreter's shutdown, which reads as a crash although the result was right.
    def shout(i: int) -> int:
        print(f"output of task {i}")
        return i * 10

    tasks = [runtime.execute_task(RuntimeTask(f"f{i}").run_function(shout, i=i))
             for i in range(3)]
    for i, task in enumerate(tasks):
        task.join()
        assert list(task.function_returns) == [i * 10]
        log = task.execution_log
        assert log[-1] == f"output of task {i}", log
        assert not [line for line in log if "Fatal Python error" in line], log


def test_bad_python_and_working_dir(hosts: TestHosts) -> None:
    name = hosts.names[0]
    with pytest.raises(InvalidRuntimeError, match="/no/such/python"):
        Runtime(name, python="/no/such/python")
    with pytest.raises(InvalidRuntimeError, match="working dir"):
        Runtime(name, working_dir="/proc/lazycluster-cannot-be-here")


@pytest.mark.parametrize(
    "kwargs",
    [{"host": ""}, {"host": 5}, {"host": "x", "working_dir": 3},
     {"host": "x", "connect_options": "port=22"}, {"host": "x", "python": ""}],
)
def test_bad_argument_types(kwargs: dict) -> None:
    with pytest.raises(TypeError):
        Runtime(**kwargs)


def test_command_function_env_and_log(runtime: Runtime) -> None:
    runtime.add_env_variables({"GREETING": "hello 'world'"})
    assert runtime.env_variables["GREETING"] == "hello 'world'"
    task = (
        RuntimeTask("mixed")
        .run_command('echo "$GREETING"; pwd')
        .run_function(lambda a, b: a * b, a=6, b=7)
        .run_function(lambda: os.environ["GREETING"])
    )
    assert runtime.execute_task(task, execute_async=False) is task
    assert list(task.function_returns) == [42, "hello 'world'"]
    log = task.execution_log  # one entry per step
    assert log[0] == f"hello 'world'\n{runtime.working_dir}"
    assert oct(os.stat(runtime.working_dir).st_mode & 0o777) == "0o700"
    with pytest.raises(TypeError):
        runtime.add_env_variables({"X": 1})  # type: ignore[dict-item]


def test_failures_name_host_step_and_output(hosts: TestHosts, runtime: Runtime) -> None:
    failing = RuntimeTask("fails").run_command("echo about to fail >&2; exit 3")
    with pytest.raises(TaskExecutionError, match="about to fail") as info:
        runtime.execute_task(failing, execute_async=False)
    assert info.value.host == hosts.names[0] and "exit status 3" in str(info.value)

    def boom() -> None:
        raise ValueError("nope from the host")

    background = runtime.execute_task(RuntimeTask("boom").run_function(boom))
    with pytest.raises(TaskExecutionError, match="nope from the host"):
        background.join()
    with pytest.raises(TypeError):
        runtime.execute_task("echo hi")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RuntimeTask().run_command("  ")
    with pytest.raises(TypeError):
        RuntimeTask().run_function(42)  # type: ignore[arg-type]


def test_debug_streams_output_live(runtime: Runtime, capsys: pytest.CaptureFixture[str]) -> None:
    runtime.execute_task(RuntimeTask("loud").run_command("echo streamed-line"),
                         execute_async=False, debug=True)
    assert f"[{runtime.host}] streamed-line" in capsys.readouterr().out
    runtime.print_log()
    assert "streamed-line" in capsys.readouterr().out


def test_send_and_get_file(runtime: Runtime, tmp_path: Path) -> None:
    source = tmp_path / "payload.txt"
    source.write_text("some data\n")
    runtime.send_file(str(source))
    assert runtime.echo("$(cat payload.txt)") == "some data\n"
    task = RuntimeTask("check").run_command("cat payload.txt > copy.txt")
    runtime.execute_task(task, execute_async=False)
    runtime.get_file("copy.txt", str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_text() == "some data\n"
    with pytest.raises(TaskExecutionError, match="get_file"):
        runtime.get_file("does-not-exist.txt", str(tmp_path / "x"))
    with pytest.raises(ValueError):
        runtime.send_file(str(tmp_path / "missing"))


def test_free_ports(hosts: TestHosts, runtime: Runtime) -> None:
    port = free_port()
    with echo_server_in_host(hosts, runtime.host, port):
        assert not runtime.has_free_port(port)
        assert runtime.get_free_port([port, port + 1]) == port + 1
        with pytest.raises(NoPortsLeftError):
            runtime.get_free_port([port])
    assert runtime.has_free_port(port)
    with pytest.raises(ValueError):
        runtime.has_free_port(70000)
    with pytest.raises(TypeError):
        runtime.get_free_port("8786")  # type: ignore[arg-type]


def test_expose_port_to_runtime(netns: TestHosts, runtime: Runtime) -> None:
    port = free_port()
    with echo_server_on_manager(port):
        assert runtime.expose_port_to_runtime(port) == f"{runtime.host}::-R::{port}::{port}"
        assert echo_from_host(netns, runtime.host, port) == "echo:ping:manager"
        with pytest.raises(PortInUseError, match=runtime.host):
            runtime.expose_port_to_runtime(port)
        runtime.close_port_forward(port)
        assert echo_from_host(netns, runtime.host, port) == ""


def test_expose_port_from_runtime(netns: TestHosts, runtime: Runtime) -> None:
    remote_port, local_port = free_port(), free_port()
    with echo_server_in_host(netns, runtime.host, remote_port):
        key = runtime.expose_port_from_runtime(remote_port, local_port)
        assert key == f"{runtime.host}::-L::{local_port}::{remote_port}"
        assert echo_from_manager(local_port) == f"echo:ping:{runtime.host}"
        with pytest.raises(PortInUseError, match="localhost"):
            runtime.expose_port_from_runtime(remote_port, local_port)
        runtime.close_port_forward(local_port)
    assert runtime.forwarded_ports == []


async def test_sync_api_works_inside_a_running_loop(hosts: TestHosts) -> None:
    # Jupyter runs user code inside a running loop: the sync API must not need one free.
    assert asyncio.get_running_loop().is_running()
    rt = Runtime(hosts.names[1])
    task = rt.execute_task(RuntimeTask("in-loop").run_function(lambda: 1 + 1),
                           execute_async=False)
    assert list(task.function_returns) == [2]
    rt.cleanup()


def test_cleanup_removes_everything_and_is_idempotent(hosts: TestHosts) -> None:
    rt = Runtime(hosts.names[2])
    wd = rt.working_dir
    assert os.path.isdir(wd)  # the test hosts share the manager's filesystem (both modes)
    rt.execute_task(RuntimeTask("sleeper").run_command("sleep 300"))
    rt.cleanup()
    rt.cleanup()
    assert not os.path.exists(wd)
    with pytest.raises(LazyclusterError, match="closed"):
        rt.has_free_port(1234)
