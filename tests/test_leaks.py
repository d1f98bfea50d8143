"""The shared leak check (tests/conftest.py) itself: it names what a module leaves behind.

An inner pytest session with this suite's conftest runs modules that leak on purpose, one kind
of leak each, and a clean module after them that must not be blamed for its neighbours'.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

LEAKY_MODULES = {
    # an open runtime: its connection, working dir and parked probe are the runtime's
    "test_a_open_runtime": """
from dask_lazycluster import Runtime
KEEP = []
def test_a_open_runtime_leaks(hosts):
    KEEP.append(Runtime(hosts.names[0]))
""",
    # a process and a temp entry on a host, nothing on the manager
    "test_b_host_side": """
import subprocess
def test_b_host_side_leaks(hosts):
    name = hosts.names[1]
    subprocess.run(hosts.ssh_argv(name, "nohup sleep 300 >/dev/null 2>&1 &"), check=True)
    (hosts.host_tmpdir(name) / "left-by-b").write_text("x")
""",
    # a listener, a child process and a temp entry on the manager
    "test_c_manager_side": """
import socket, subprocess, tempfile
KEEP = []
def test_c_manager_side_leaks():
    server = socket.create_server(("127.0.0.1", 0))
    KEEP.append(server)
    KEEP.append(subprocess.Popen(["sleep", "300"]))
    KEEP.append(tempfile.mkdtemp(prefix="left-by-c-"))
    print("PORT", server.getsockname()[1])
""",
    # an SSH connection that no runtime owns
    "test_d_ssh_connection": """
import asyncio, asyncssh, threading
KEEP = []
def test_d_ssh_connection_leaks(hosts):
    async def connect():
        return await asyncssh.connect(hosts.names[2])

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    KEEP.append(asyncio.run_coroutine_threadsafe(connect(), loop).result(30))
""",
    "test_e_clean": """
from dask_lazycluster import Runtime, RuntimeTask
def test_clean(hosts):
    runtime = Runtime(hosts.names[0])
    runtime.execute_task(RuntimeTask("t").run_command("sleep 1"), execute_async=False)
    runtime.cleanup()
""",
}


def test_the_leak_check_names_every_kind_of_leak(pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(**LEAKY_MODULES)
    monkeypatch.setenv("LAZYCLUSTER_LEAK_WAIT", "2")  # these leaks stay: no need to wait long
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", timeout=600)
    out = result.stdout.str()
    result.assert_outcomes(passed=5, errors=4)

    def report_of(test: str) -> list[str]:
        """The leak lines (``where: what``) reported after the module of ``test``."""
        sections = re.findall(rf"_ ERROR at teardown of {test}_leaks _+\n(.*?)(?=\n_{{5,}} |\n=+ )",
                              out, re.S)
        assert len(sections) == 1, (test, out)
        assert "left behind after the module" in sections[0], sections[0]
        return re.findall(r"^  (\S+: .*)$", sections[0], re.M)

    name = r"lzhost[a-z]*"
    a = report_of("test_a_open_runtime")
    assert len(a) == 1 and re.fullmatch(rf"manager: runtime of {name}1 left open", a[0]), a

    b = report_of("test_b_host_side")
    assert len(b) == 2, b
    assert re.fullmatch(rf"{name}2: sleep 300", b[0]), b
    assert re.fullmatch(rf"{name}2: temp entry /\S+/{name}2/tmp/left-by-b", b[1]), b

    c = report_of("test_c_manager_side")
    port = re.search(r"PORT (\d+)", out)
    assert port is not None, out
    assert len(c) == 3, c
    assert c[0] == f"manager: listening socket on port {port.group(1)}", c
    assert re.fullmatch(r"manager: child process \d+: sleep 300", c[1]), c
    assert re.fullmatch(r"manager: temp entry /\S+/left-by-c-\w+", c[2]), c

    d = report_of("test_d_ssh_connection")
    assert len(d) == 1, d
    assert re.fullmatch(r"manager: SSH connection [\d.]+:\d+ -> [\d.]+:\d+", d[0]), d

    assert "ERROR at teardown of test_clean" not in out
