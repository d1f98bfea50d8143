"""Promises of docs/jupyterlab.md, troubleshooting.md, migrating.md and testing.md that no other
test proved (see docs/claims.md): each test checks what the page says, against real SSH test
hosts where hosts are involved, and the exact message text where the page quotes one."""

from __future__ import annotations

import configparser
import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import dask
import pytest
import yaml
from distributed import Client

import dask_lazycluster
from dask_lazycluster import (
    ConnectionLostError,
    DaskCluster,
    ForwardRefusedError,
    InvalidRuntimeError,
    LazyclusterError,
    NoPortsLeftError,
    PathCreationError,
    PortInUseError,
    Runtime,
    RuntimeGroup,
    RuntimeTask,
    TaskExecutionError,
    WorkerStartError,
    WorkerStartTimeoutError,
)
from dask_lazycluster import exceptions as exceptions_module
from dask_lazycluster._bootstrap import python_command
from dask_lazycluster._core import live_cores
from dask_lazycluster.cluster.dask_cluster import LocalMasterLauncher, RoundRobinLauncher
from dask_lazycluster.cluster.exceptions import MasterStartError
from dask_lazycluster.testing import TestHosts
from dask_lazycluster.testing.hosts import clear_stale
from dask_lazycluster.testing.pytest_plugin import start_hosts
from dask_lazycluster.testing.system import state_dir

from .conftest import wait_no_leftovers
from .helpers import echo_server_in_host, echo_server_on_manager, free_port, wait_until

REPO = Path(__file__).resolve().parents[1]


# -- jupyterlab.md ---------------------------------------------------------------------------


def test_lab_extra_brings_the_sidebar_packages() -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    lab = {re.split(r"[<>=\[ ]", line.strip())[0]
           for line in setup["options.extras_require"]["lab"].splitlines() if line.strip()}
    assert lab == {"dask-labextension", "jupyterlab", "jupyter-server-proxy", "bokeh"}


@contextlib.contextmanager
def jupyter_server(hosts: TestHosts, tmp_path: Path, files: dict[str, Any],
                   env: dict[str, str] | None = None) -> Iterator[Any]:
    """A Jupyter server (as tests/test_labextension.py starts it) with these Dask config files.

    Args:
        hosts: The test hosts (their fake home is the server's HOME).
        tmp_path: Where the config dir, root dir and log go.
        files: File name in the server's DASK_CONFIG dir -> its YAML content.
        env: More environment variables of the server.

    Yields:
        The running ``JupyterServer``; stopped afterwards.
    """
    for module in ("jupyter_server", "jupyter_server_proxy", "dask_labextension"):
        pytest.importorskip(module)
    from .test_labextension import running_jupyter_server

    config = tmp_path / "dask"
    config.mkdir()
    for name, content in files.items():
        (config / name).write_text(yaml.safe_dump(content))
    with running_jupyter_server(hosts, tmp_path, config, env) as server:
        yield server


def workers_of(address: str, n: int) -> None:
    """Wait until the scheduler at ``address`` has exactly ``n`` workers."""
    from .test_labextension import wait_workers

    with Client(address, timeout=30) as client:
        wait_workers(client, n, 120)


def test_sidebar_settings_from_environment_and_files_initial_and_default_clusters(
        hosts: TestHosts, tmp_path: Path) -> None:
    # The file names a class and hosts that do not exist: the environment must win over it.
    recipe = {
        "labextension": {
            "factory": {"module": "dask_lazycluster", "class": "NoSuchClass", "args": [],
                        "kwargs": {"n-workers": 0}},
            "default": {"workers": 1, "adapt": None},
            "initial": [{"name": "nodes", "adapt": {"minimum": 1, "maximum": 2}}],
        },
        "lazycluster": {"hosts": ["no-such-host.invalid"]},
    }
    later = {"labextension": {"default": {"workers": 2}}}  # sorts after lazycluster.yaml: wins
    env = {"DASK_LABEXTENSION__FACTORY__CLASS": "DaskCluster",
           "DASK_LAZYCLUSTER__HOSTS": json.dumps(hosts.names)}
    files = {"lazycluster.yaml": recipe, "zz-later.yaml": later}
    with jupyter_server(hosts, tmp_path, files, env) as jupyter:
        # The initial cluster starts with the server, adaptive within its bounds.
        assert wait_until(lambda: jupyter.json("GET", "dask/clusters"), 120), jupyter.log_tail()
        [initial] = jupyter.json("GET", "dask/clusters")
        assert initial["name"] == "nodes" and initial["adapt"] == {"minimum": 1, "maximum": 2}
        # tunnel mode (the default): the scheduler listens on the server machine's loopback
        assert initial["scheduler_address"].startswith("tcp://127.0.0.1:"), initial
        workers_of(initial["scheduler_address"], 1)  # n-workers 0, then adapt's minimum
        # "+ NEW": n-workers from the factory kwargs, then default.workers of the later file.
        made = jupyter.json("PUT", "dask/clusters")
        assert made["name"] == "DaskCluster 2" and "adapt" not in made, made
        workers_of(made["scheduler_address"], 2)
        # dask-labextension wrote its own defaults next to ours, all commented out.
        written = (tmp_path / "dask" / "labextension.yaml").read_text()
        assert [line for line in written.splitlines()
                if line.strip() and not line.lstrip().startswith("#")] == []
        for model in (initial, made):
            assert jupyter.call("DELETE", f"dask/clusters/{model['id']}")[0] == 204
    assert wait_no_leftovers(hosts) == {}


def test_sidebar_in_direct_mode_needs_a_local_dashboard_link(hosts: TestHosts,
                                                              tmp_path: Path) -> None:
    recipe = {
        "labextension": {"factory": {"module": "dask_lazycluster", "class": "DaskCluster",
                                     "args": [], "kwargs": {"n-workers": 1, "tunnel": False}}},
        "lazycluster": {"hosts": hosts.names},
    }
    with jupyter_server(hosts, tmp_path, {"lazycluster.yaml": recipe}) as jupyter:
        model = jupyter.json("PUT", "dask/clusters")
        link = model["dashboard_link"]
        assert "127.0.0.1" not in link and "localhost" not in link, link
        code, _ = jupyter.call("GET", f"dask/dashboard/{model['id']}/individual-plots.json")
        assert code == 403, code
        assert jupyter.call("DELETE", f"dask/clusters/{model['id']}")[0] == 204
    assert wait_no_leftovers(hosts) == {}


def test_a_failed_new_cluster_says_why_in_the_reply_and_the_log(hosts: TestHosts,
                                                                 tmp_path: Path) -> None:
    recipe = {
        "labextension": {"factory": {"module": "dask_lazycluster", "class": "DaskCluster",
                                     "args": [], "kwargs": {}}},
        "lazycluster": {"hosts": [hosts.names[0], "no-such-host.invalid"]},
    }
    reason = "host 'no-such-host.invalid' is not a valid runtime: cannot resolve the host name"
    with jupyter_server(hosts, tmp_path, {"lazycluster.yaml": recipe}) as jupyter:
        code, body = jupyter.call("PUT", "dask/clusters")
        assert code == 500 and reason in body.decode(), (code, body)
        assert wait_until(lambda: reason in jupyter.log.read_text(errors="replace"), 10), (
            jupyter.log_tail())
        assert jupyter.json("GET", "dask/clusters") == []
    assert wait_no_leftovers(hosts) == {}


# -- troubleshooting.md ----------------------------------------------------------------------


def test_every_error_class_is_a_lazycluster_error_where_the_tree_says() -> None:
    tree = {
        "InvalidRuntimeError": "LazyclusterError", "PathCreationError": "InvalidRuntimeError",
        "PortInUseError": "LazyclusterError", "NoPortsLeftError": "LazyclusterError",
        "NoRuntimesDetectedError": "LazyclusterError", "TaskExecutionError": "LazyclusterError",
        "MasterStartError": "LazyclusterError", "ConnectionLostError": "LazyclusterError",
        "SessionRefusedError": "LazyclusterError", "ForwardRefusedError": "LazyclusterError",
        "WorkerStartError": "LazyclusterError", "WorkerStartTimeoutError": "WorkerStartError",
        "SetupError": "WorkerStartError", "WorkersUnavailableError": "LazyclusterError",
    }
    for name, parent in tree.items():
        cls = getattr(exceptions_module, name)
        assert getattr(dask_lazycluster, name) is cls, name
        assert cls.__bases__ == (getattr(exceptions_module, parent),), name
    assert issubclass(exceptions_module.LazyclusterError, Exception)


@contextlib.contextmanager
def garbage_server() -> Iterator[int]:
    """A TCP server on the manager that answers every connection with non-SSH bytes."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                with conn:  # a version SSH-2 clients refuse; then wait for their close
                    conn.sendall(b"SSH-1.0-NotForYou\r\n")
                    conn.settimeout(10)
                    while conn.recv(4096):
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            socket.create_connection(server.getsockname(), timeout=2).close()
        thread.join(10)
        server.close()



def _unreachable_v6() -> bool:
    """Whether connecting to a documentation-only IPv6 address fails at once (no route)."""
    with socket.socket(socket.AF_INET6) as s:
        s.settimeout(3)
        try:
            s.connect(("2001:db8::1", 22))
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def _empty_known_hosts(hosts: TestHosts, tmp: Path) -> Runtime:
    empty = tmp / "known_hosts"
    empty.write_text("")
    return Runtime(hosts.names[0], connect_options={"known_hosts": str(empty)})


CAUSES: list[tuple[str, Callable[[TestHosts, Path], Any], str]] = [
    ("unknown name", lambda h, t: Runtime("no-such-host.invalid"),
     r"cannot resolve the host name \(.+\)"),
    ("nothing listens", lambda h, t: Runtime("127.0.0.1", connect_options={"port": 1}),
     r"connection refused \(is sshd running on that port\?\)"),
    ("no answer", lambda h, t: Runtime("10.231.0.250", connect_options={"connect_timeout": 2}),
     r"timed out after 2 s while connecting"),
    ("no key accepted", lambda h, t: Runtime(h.names[0], connect_options={
        "client_keys": [asyncssh.generate_private_key("ssh-ed25519")], "agent_path": None}),
     r"authentication failed: Permission denied for user \S+ on host \S+"),
    ("host key unknown", _empty_known_hosts,
     r"host key not verified: Host key is not trusted for host \S+ "
     r"\(add the host to ~/\.ssh/known_hosts\)"),
    ("not an SSH server", lambda h, t: _through_garbage(), r"SSH connection failed: .+"),
    ("no route", lambda h, t: Runtime("2001:db8::1", connect_options={"connect_timeout": 5}),
     r"cannot connect: .+"),
    ("interpreter missing", lambda h, t: Runtime(h.names[0], python="/no/python"),
     r"cannot run '/no/python' \(exit 127\): .*/no/python: No such file or directory"),
    ("interpreter fails", lambda h, t: Runtime(h.names[0], python=_failing_python(t)),
     r"cannot run '\S+/failing-python' \(exit 3\): this interpreter is broken"),
    ("probe hangs", lambda h, t: Runtime(h.names[0], python=_hanging_python(t),
                                         connect_options={"connect_timeout": 3}),
     r"probe timed out after 3 s"),
    ("working dir", lambda h, t: Runtime(h.names[0], working_dir="/proc/lz/x"),
     r"directory '/proc/lz/x' cannot be created: it is the working dir: "
     r"mkdir: cannot create directory '/proc/lz': .+"),
]


def _failing_python(tmp: Path) -> str:
    """An "interpreter" that exists but fails at once, with a word on stderr."""
    script = tmp / "failing-python"
    script.write_text("#!/bin/sh\necho 'this interpreter is broken' >&2\nexit 3\n")
    script.chmod(0o755)
    return str(script)


def _hanging_python(tmp: Path) -> str:
    """An "interpreter" that reads its input and never answers (the hosts share the manager's
    files); it ends when its SSH channel closes."""
    script = tmp / "hanging-python"
    script.write_text("#!/bin/sh\nexec cat >/dev/null\n")
    script.chmod(0o755)
    return str(script)


def _through_garbage() -> Runtime:
    with garbage_server() as port:
        return Runtime("127.0.0.1", connect_options={"port": port})


@pytest.mark.parametrize("label, call, cause", CAUSES, ids=[c[0] for c in CAUSES])
def test_invalid_runtime_causes_read_as_the_page_quotes_them(
        hosts: TestHosts, tmp_path: Path, label: str, call: Callable[[TestHosts, Path], Any],
        cause: str) -> None:
    if label == "no answer" and hosts.mode != "netns":
        pytest.skip("10.231.0.250 is on the netns hosts' network")
    if label == "no route" and not _unreachable_v6():
        pytest.skip("this machine has an IPv6 route: the address times out instead")
    before = len(live_cores())
    with pytest.raises(InvalidRuntimeError) as info:
        call(hosts, tmp_path)
    error = info.value
    assert re.fullmatch(cause, error.cause, re.S), error.cause
    assert str(error) == f"host {error.host!r} is not a valid runtime: {error.cause}"
    if label == "working dir":
        assert isinstance(error, PathCreationError) and error.path == "/proc/lz/x"
    assert len(live_cores()) == before  # no connection left open


def test_no_python_found_names_the_candidates(hosts: TestHosts) -> None:
    command = python_command(["/no/python3.11", "/no/python3"])
    done = subprocess.run(hosts.ssh_argv(hosts.names[0], command), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 127
    assert done.stderr.strip().endswith("no python found (tried: /no/python3.11 /no/python3)")


def test_a_group_names_the_first_failure_and_the_others(hosts: TestHosts) -> None:
    before = len(live_cores())
    with pytest.raises(InvalidRuntimeError) as info:
        RuntimeGroup(hosts=[hosts.names[0], "first.invalid", "second.invalid"])
    assert info.value.host == "first.invalid"
    assert re.fullmatch(r"host 'first\.invalid' is not a valid runtime: cannot resolve the host "
                        r"name \(.+\) \(also: host 'second\.invalid' is not a valid runtime: "
                        r"cannot resolve the host name \(.+\)\)", str(info.value)), info.value
    assert len(live_cores()) == before


def test_port_in_use_names_the_port_and_where(netns: TestHosts, group: RuntimeGroup) -> None:
    port = free_port()
    with echo_server_on_manager(port), pytest.raises(PortInUseError) as info:
        group.get_free_port(port, enforce_check_on_localhost=True)
    assert str(info.value) == f"port {port} is already in use on localhost"
    assert (info.value.port, info.value.where) == (port, "localhost")
    port = free_port()
    busy = netns.names[1]
    with echo_server_in_host(netns, busy, port), pytest.raises(PortInUseError) as info:
        group.get_free_port(port)
    assert str(info.value) == f"port {port} is already in use on {busy}"
    assert (info.value.port, info.value.where) == (port, busy)


def test_no_ports_left_messages(hosts: TestHosts, group: RuntimeGroup) -> None:
    with pytest.raises(NoPortsLeftError) as info:
        DaskCluster(group, ports=[free_port()], tunnel=True)
    assert str(info.value) == (
        "no free port left in the given port list: the port list (1 ports) has too few ports "
        "free on the manager and every runtime for another worker; pass more ports= or a "
        "larger port-range")
    port = free_port()
    with echo_server_on_manager(port), pytest.raises(NoPortsLeftError) as info:
        LocalMasterLauncher(group).start([port])
    assert re.fullmatch(rf"no free port left in the given port list: none of the 1 ports in "
                        rf"master_port is free on all of .*{hosts.names[-1]} and localhost",
                        str(info.value)), info.value
    assert wait_no_leftovers(hosts) == {}


def test_master_start_error_causes(hosts: TestHosts, group: RuntimeGroup) -> None:
    with pytest.raises(MasterStartError) as info:
        DaskCluster(group, n_workers=0, scheduler_options={"no_such_option": 1})
    assert info.value.host == "localhost" and isinstance(info.value.port, int)
    assert re.fullmatch(rf"master could not be started on localhost:{info.value.port}: "
                        r"TypeError: .*unexpected keyword argument 'no_such_option'",
                        str(info.value)), info.value

    class NoPortChosen(LocalMasterLauncher):
        def start(self, ports: list[int] | int, timeout: int = 3,
                  debug: bool = False) -> list[int]:
            return ports if isinstance(ports, list) else []

    with pytest.raises(MasterStartError, match=r"start\(\) must choose a port first"):
        DaskCluster(group, n_workers=0, master_launcher=NoPortChosen(group))

    with dask.config.set({"lazycluster.scheduler-process": True}), \
            pytest.raises(MasterStartError) as info:
        DaskCluster(group, n_workers=0, scheduler_options={"no_such_option": 1})
    assert re.match(rf"master could not be started on localhost:{info.value.port}: the "
                    r"scheduler process failed to start: .*no_such_option", str(info.value),
                    re.S), info.value

    class TakenAfterChoice(LocalMasterLauncher):
        """Chooses a free port; then another "program" binds it before the scheduler starts."""

        holder: socket.socket | None = None

        def start(self, ports: list[int] | int, timeout: int = 3,
                  debug: bool = False) -> list[int]:
            left = super().start(ports, timeout, debug)
            assert self.port is not None
            self.holder = socket.create_server(("127.0.0.1", self.port))
            return left

    taker = TakenAfterChoice(group)
    try:
        with pytest.raises(MasterStartError) as info:
            DaskCluster(group, n_workers=0, master_launcher=taker)
        assert str(info.value) == (f"master could not be started on localhost:{taker.port}: "
                                   "the port was taken after it was chosen")
    finally:
        if taker.holder is not None:
            taker.holder.close()

    with DaskCluster(group, n_workers=0) as cluster:
        port = cluster.master_port
        with pytest.raises(MasterStartError) as info:
            cluster.start_master(port + 1)
        assert str(info.value) == (f"master could not be started on localhost:{port + 1}: "
                                   f"the master already runs on port {port}")
    assert wait_no_leftovers(hosts) == {}


def test_worker_start_errors_show_the_workers_output(hosts: TestHosts, group: RuntimeGroup,
                                                     python_without_distributed: str) -> None:
    first = hosts.names[0]
    single = RuntimeGroup(runtimes=[group.get_runtime(first)])
    head = rf"{first}-0 failed to start on host '{first}': "
    with pytest.raises(WorkerStartError) as info:
        DaskCluster(single, python=python_without_distributed, n_workers=1)
    assert re.match(head + rf"\(python '{re.escape(python_without_distributed)}'\):\n",
                    str(info.value)), info.value
    assert "ModuleNotFoundError: No module named 'distributed'" in str(info.value)
    assert (info.value.host, info.value.worker) == (first, f"{first}-0")
    with pytest.raises(WorkerStartError) as info:
        DaskCluster(single, python="/no/such/python", n_workers=1)
    assert re.match(head + r"python '/no/such/python' could not start \(exit status 127\):\n.*"
                    r"/no/such/python: No such file or directory", str(info.value), re.S), info.value
    with pytest.raises(WorkerStartError) as info:
        DaskCluster(single, python="/bin/true", n_workers=1)
    assert str(info.value) == head + "python '/bin/true' could not start (exit status 0):\nno output"
    for worker_class, words in (("distributed.Worker", "unexpected keyword argument 'no_such'"),
                                ("distributed.Nanny", "Nanny failed to start.")):
        with pytest.raises(WorkerStartError, match=re.escape(words)):
            DaskCluster(single, n_workers=1, worker_class=worker_class,
                        worker_options={"no_such": 1})
    assert wait_no_leftovers(hosts) == {}


def test_distributed_missing_is_said_before_anything_starts(
        hosts: TestHosts, python_without_distributed: str) -> None:
    first = hosts.names[0]
    group = RuntimeGroup(runtimes=[Runtime(first, python=python_without_distributed)])
    try:
        with pytest.raises(LazyclusterError) as info:
            DaskCluster(group, n_workers=1)
        assert str(info.value) == (
            f"distributed is not installed for the remote python on {first} "
            f"({python_without_distributed}): install it there, pass python= (or a host's "
            "python), or use prologue='pip install distributed'")
        assert not isinstance(info.value, WorkerStartError)
        # With a prologue, the check is left to the workers.
        with pytest.raises(WorkerStartError, match="No module named 'distributed'"):
            DaskCluster(group, n_workers=1, prologue="true")
    finally:
        group.cleanup()
    assert wait_no_leftovers(hosts) == {}


def test_a_worker_that_does_not_register_in_time(hosts: TestHosts, group: RuntimeGroup) -> None:
    first = hosts.names[0]
    single = RuntimeGroup(runtimes=[group.get_runtime(first)])
    with dask.config.set({"lazycluster.worker-start-timeout": 3}), \
            pytest.raises(WorkerStartTimeoutError) as info:
        DaskCluster(single, n_workers=1, host_options={first: {"setup": ["sleep 60"]}})
    assert str(info.value).startswith(
        f"{first}-0 failed to start on host '{first}': not started within 3 s "
        "(lazycluster.worker-start-timeout):\n"), info.value
    assert wait_no_leftovers(hosts, timeout=30) == {}


def test_a_failed_task_names_task_host_step_status_and_output(hosts: TestHosts,
                                                               group: RuntimeGroup) -> None:
    runtime = group.runtimes[0]
    task = RuntimeTask("build").run_command("true").run_command(
        "echo compiling; echo 'no rule to make all' >&2; exit 2")
    with pytest.raises(TaskExecutionError) as info:
        runtime.execute_task(task, execute_async=False)
    assert str(info.value).startswith(
        f"task 'build' failed on host '{runtime.host}' at step 2:\ncommand "), info.value
    assert "exit status 2" in str(info.value) and "stderr: no rule to make all" in str(info.value)
    assert (info.value.task_name, info.value.task_step_index, info.value.host) == (
        "build", 1, runtime.host)
    # Asynchronous: execute_task returns, group.join() waits for every task, then raises.
    first, second = group.hosts[:2]
    slow = group.execute_task(RuntimeTask("slow").run_command("sleep 2; echo finished"),
                              host=first)
    group.execute_task(RuntimeTask("fails").run_command("exit 4"), host=second)
    try:
        with pytest.raises(TaskExecutionError, match=rf"^task 'fails' failed on host '{second}'"):
            group.join()
        assert isinstance(slow, RuntimeTask) and slow.execution_log == ["finished"]
    finally:
        group.clear_tasks()
    with pytest.raises(TaskExecutionError, match=r"^task 'prologue' failed on host '"):
        DaskCluster(group, n_workers=1, prologue="exit 3")
    assert wait_no_leftovers(hosts) == {}


def test_the_cli_lists_inactive_hosts_with_their_reasons(hosts: TestHosts,
                                                          tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(f"Include {hosts.ssh_config}\n"
                      "Host lzc3gone\n    HostName lz-no-such-host.invalid\n")
    listed = subprocess.run([sys.executable, "-m", "dask_lazycluster.cli", "list-runtimes", "-l",
                             "--ssh-config", str(config)], capture_output=True, text=True,
                            timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdin=subprocess.DEVNULL)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^  lzc3gone: cannot resolve the host name", listed.stdout, re.M), listed.stdout


def test_config_errors_name_the_key_and_the_environment_variable(
        group: RuntimeGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_LAZYCLUSTER__N_WORKERS", "-2")
    with dask.config.set({"lazycluster.n-workers": -2}), pytest.raises(ValueError) as info:
        DaskCluster(group)
    assert str(info.value) == ("config lazycluster.n-workers (from environment variable "
                               "DASK_LAZYCLUSTER__N_WORKERS) must be an int >= 0, got -2")


def test_a_closed_runtime_and_a_lone_launcher_say_so(hosts: TestHosts, group: RuntimeGroup,
                                                    tmp_path: Path) -> None:
    runtime = Runtime(hosts.names[0])
    runtime.cleanup()
    with pytest.raises(ConnectionLostError) as info:
        runtime.echo("hello")
    assert str(info.value) == (f"the SSH connection to host {hosts.names[0]!r} is not usable: "
                               "the runtime is closed")
    assert (info.value.host, info.value.cause) == (hosts.names[0], "the runtime is closed")
    with pytest.raises(LazyclusterError, match="^this launcher is not attached to a running "
                                               "DaskCluster$"):
        RoundRobinLauncher(group).start(1, 8786, [free_port()])
    with pytest.raises(TaskExecutionError) as failed:
        group.runtimes[0].get_file("no-such-file.txt", str(tmp_path / "x"))
    assert re.match(rf"task '\S+' failed on host '{hosts.names[0]}' at step \d+:",
                    str(failed.value)), failed.value
    assert "No such file" in str(failed.value)


@pytest.fixture
def no_forwarding(netns: TestHosts,
                  make_hosts: Callable[..., TestHosts]) -> Iterator[TestHosts]:
    """A host of its own whose sshd says ``AllowTcpForwarding no``."""
    host = make_hosts(1, "lzc3nofwd")
    name = host.names[0]
    config = Path(str(host.tmpdir)) / name / "sshd_config"
    host.kill_sshd(name)
    text = config.read_text()
    assert "AllowTcpForwarding yes\n" in text
    config.write_text(text.replace("AllowTcpForwarding yes\n", "AllowTcpForwarding no\n"))
    host.start_sshd(name)
    assert wait_until(lambda: subprocess.run(host.ssh_argv(name, "true"), capture_output=True,
                                             timeout=30).returncode == 0, 30)
    yield host


def test_a_host_without_tcp_forwarding_is_named(no_forwarding: TestHosts) -> None:
    name = no_forwarding.names[0]
    group = RuntimeGroup(hosts=[name])
    try:
        port = free_port()
        with echo_server_on_manager(port), pytest.raises(ForwardRefusedError) as info:
            group.runtimes[0].expose_port_to_runtime(port)
        assert str(info.value) == (f"host {name!r} refused to forward port {port}: the port is "
                                   "free there: is AllowTcpForwarding disabled in its sshd_config?")
        assert (info.value.host, info.value.port) == (name, port)
        with pytest.raises(MasterStartError) as started:
            DaskCluster(group, n_workers=1, tunnel=True)
        assert re.search(rf"cannot tunnel it: host '{name}' refused to forward port \d+: the "
                         "port is free there", str(started.value)), started.value
        # Direct mode needs no forwarding.
        with DaskCluster(group, n_workers=1, tunnel=False) as cluster, Client(cluster) as client:
            assert client.submit(sum, [1, 2]).result(timeout=60) == 3
    finally:
        group.cleanup()
    assert wait_no_leftovers(no_forwarding) == {}


def test_a_lost_host_is_logged_refused_and_logged_back(
        netns: TestHosts, make_hosts: Callable[..., TestHosts],
        caplog: pytest.LogCaptureFixture) -> None:
    host = make_hosts(1, "lzc3lost")
    name = host.names[0]
    runtime = Runtime(name)
    caplog.set_level(logging.WARNING, logger="dask_lazycluster")
    try:
        host.set_link(name, False)

        def logged(text: str) -> list[logging.LogRecord]:
            return [r for r in caplog.records if text in r.getMessage()]

        lost = f"SSH connection to {name} lost ("
        assert wait_until(lambda: logged(lost), 60), caplog.text
        assert logged(lost)[0].getMessage().endswith("; reconnecting")
        assert all(r.name.startswith("dask_lazycluster.") for r in logged(lost))
        with pytest.raises(ConnectionLostError) as info:
            runtime.echo("hello")
        assert str(info.value) == (f"the SSH connection to host {name!r} is not usable: it "
                                   "dropped; reconnecting in the background")
        host.set_link(name, True)
        assert wait_until(lambda: runtime.is_alive, 60)
        assert logged(f"SSH connection to {name} is back"), caplog.text
        assert runtime.echo("hello") == "hello\n"
    finally:
        host.set_link(name, True)
        runtime.cleanup()


# -- migrating.md ----------------------------------------------------------------------------


def test_a_leftover_warm_spares_key_is_ignored(hosts: TestHosts, group: RuntimeGroup) -> None:
    with dask.config.set({"lazycluster.warm-spares": 2}), \
            DaskCluster(group, n_workers=1) as cluster, Client(cluster) as client:
        assert client.submit(sum, [20, 22]).result(timeout=60) == 42
        assert len(cluster.worker_spec) == 1
    assert wait_no_leftovers(hosts) == {}


async def test_get_client_of_an_asynchronous_cluster_is_asynchronous(
        hosts: TestHosts, group: RuntimeGroup) -> None:
    async with DaskCluster(group, n_workers=1, asynchronous=True) as cluster:
        client = await cluster.get_client()
        try:
            assert client.asynchronous and client.status == "running"
            assert await client.submit(sum, [1, 2]) == 3
        finally:
            await client.close()


def test_the_default_port_range(tmp_path: Path) -> None:
    shipped = yaml.safe_load((REPO / "dask_lazycluster" / "lazycluster.yaml").read_text())
    assert shipped["lazycluster"]["port-range"] == [29000, 29999]
    assert 29999 < 32768  # below Linux's ephemeral ports


def test_working_dir_rules(hosts: TestHosts) -> None:
    name = hosts.names[0]
    chosen = f"{hosts.host_tmpdir(name)}/lzc3-wd"
    group = RuntimeGroup(hosts=[name], working_dir=chosen)
    try:
        runtime = group.runtimes[0]
        assert runtime.working_dir == chosen  # lazycluster 0.2.4 ignored it
        assert runtime.echo("$(pwd)") == chosen + "\n"
        sleeper = runtime.execute_task(RuntimeTask("sleeper").run_command("sleep 300"),
                                       omit_on_join=True)
        with pytest.raises(ValueError):
            runtime.working_dir = f"{chosen}-other"
        assert runtime.working_dir == chosen
        runtime.stop_process(runtime.task_process_key(sleeper))
        sleeper.join()
        assert runtime.delete_dir(chosen)
    finally:
        group.cleanup()
    assert wait_no_leftovers(hosts) == {}


# -- testing.md ------------------------------------------------------------------------------


def test_sshd_settings_differ_from_stock_only_as_documented(test_hosts: TestHosts) -> None:
    name = test_hosts.names[0]
    config = (Path(str(test_hosts.tmpdir)) / name / "sshd_config").read_text().splitlines()
    for line in ("PasswordAuthentication no", "PermitRootLogin prohibit-password",
                 "AllowTcpForwarding yes", "ClientAliveInterval 5", "ClientAliveCountMax 3"):
        assert line in config, (line, config)
    argv = test_hosts.ssh_argv(name, "true")
    password_only = [argv[0], "-o", "PubkeyAuthentication=no", "-o", "BatchMode=yes", *argv[1:]]
    assert subprocess.run(password_only, capture_output=True, timeout=30).returncode == 255
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def test_host_and_namespace_names(test_hosts: TestHosts) -> None:
    prefix = test_hosts.prefix
    assert test_hosts.names == [f"{prefix}{i}" for i in range(1, len(test_hosts.names) + 1)]
    if test_hosts.mode == "netns":
        spaces = [f"lzh{i}" if prefix == "lzhost" else f"{prefix}{i}"
                  for i in range(1, len(test_hosts.names) + 1)]
        assert [h.netns for h in test_hosts.hosts] == spaces


def test_a_taken_prefix_moves_to_the_next_free_one(test_hosts: TestHosts) -> None:
    candidates = ["lzc3dup" + s for s in ["", *"bcdefgh"]]
    with start_hosts("lzc3dup", 1, home=test_hosts.home, mode=test_hosts.mode) as first, \
            start_hosts("lzc3dup", 1, home=test_hosts.home, mode=test_hosts.mode) as second:
        assert first.prefix in candidates and second.prefix in candidates
        assert candidates.index(second.prefix) > candidates.index(first.prefix)
        assert first.hosts[0].address != second.hosts[0].address
        for hosts in (first, second):
            done = subprocess.run(hosts.ssh_argv(hosts.names[0], "echo", "up"),
                                  capture_output=True, text=True, timeout=30)
            assert done.stdout.strip() == "up", done.stderr


def test_the_state_file_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAZYCLUSTER_TESTHOSTS_DIR", raising=False)
    suffix = "" if os.geteuid() == 0 else f"-{os.geteuid()}"
    assert state_dir() == Path(f"/tmp/dask-lazycluster-testhosts{suffix}")
    monkeypatch.setenv("LAZYCLUSTER_TESTHOSTS_DIR", str(tmp_path))
    assert state_dir() == tmp_path
    status = subprocess.run([sys.executable, "-m", "dask_lazycluster.testing", "status"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert f"no test hosts recorded ({tmp_path / 'state.json'})" in status.stdout, status


def test_cli_up_with_specs_and_a_firewall(netns: TestHosts) -> None:
    cli = [sys.executable, "-m", "dask_lazycluster.testing"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    clear_stale("lzc3cli")
    up = subprocess.run([*cli, "up", "2", "--prefix", "lzc3cli", "--firewall",
                         "--spec", "1:cpus=1,gpus=2,env.SITE=a"],
                        capture_output=True, text=True, timeout=120, env=env)
    assert up.returncode == 0, up.stderr
    try:
        hosts = TestHosts.from_state("lzc3cli")
        one, two = hosts.names
        facts = subprocess.run(hosts.ssh_argv(one, "nproc; nvidia-smi -L | wc -l; echo $SITE"),
                               capture_output=True, text=True, timeout=30)
        assert facts.stdout.split() == ["1", "2", "a"], facts.stderr
        # the stand-in nvidia-smi: a table without arguments, help with -h, stable UUIDs
        table = subprocess.run(hosts.ssh_argv(one, "nvidia-smi"), capture_output=True,
                               text=True, timeout=30)
        assert table.returncode == 0 and "NVIDIA Stand-in" in table.stdout, table
        usage = subprocess.run(hosts.ssh_argv(one, "nvidia-smi -h"), capture_output=True,
                               text=True, timeout=30)
        assert usage.returncode == 0 and "--query-gpu" in usage.stdout, usage
        listings = [subprocess.run(hosts.ssh_argv(one, "nvidia-smi -L"), capture_output=True,
                                   text=True, timeout=30).stdout for _ in range(2)]
        assert listings[0] == listings[1] and listings[0].count("UUID: GPU-") == 2
        plain = subprocess.run(hosts.ssh_argv(two, "command -v nvidia-smi; echo [$SITE]"),
                               capture_output=True, text=True, timeout=30)
        assert plain.stdout.split() == ["[]"], plain.stderr
        # --firewall: new inbound connections reach port 22 only
        listener = hosts.popen(two, [sys.executable, "-c", "import socket, time; "
                                     "s = socket.create_server(('0.0.0.0', 8000)); time.sleep(60)"])
        try:
            assert wait_until(lambda: 8000 in hosts.listening_ports(two), 10)
            with pytest.raises(OSError):
                socket.create_connection((hosts.hosts[1].address, 8000), timeout=1).close()
            socket.create_connection((hosts.hosts[1].address, 22), timeout=2).close()
        finally:
            listener.kill()
            listener.wait()
    finally:
        down = subprocess.run([*cli, "down", "--prefix", "lzc3cli"], capture_output=True,
                              text=True, timeout=120, env=env)
    assert down.returncode == 0, down.stderr
