"""The command line interface (``dask lazycluster`` / ``dask-lazycluster``), run as subprocesses."""

from __future__ import annotations

import contextlib
import os
import pty
import queue
import re
import select
import signal
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from distributed import Client

from dask_lazycluster.cli import lazycluster
from dask_lazycluster.runtime_manager import ssh_config_hosts
from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sysconfig.get_path("scripts"))
COMMANDS = ["add-runtime", "check", "delete-runtime", "list-runtimes", "up"]


def cli_env(home: Path | str | None = None) -> dict[str, str]:
    """This checkout first on the path; HOME as given (default: the current, fake one)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if home is not None:
        env["HOME"] = str(home)
    return env


def run_cli(*args: str, home: Path | str | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dask_lazycluster.cli", *args],
                          env=cli_env(home), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors, result.stderr
    for word in words:
        assert any(word in line for line in errors), (word, result.stderr)


# -- entry points ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["dask", "lazycluster", "--help"], ["dask-lazycluster", "--help"]])
def test_help_through_both_entry_points(argv: list[str]) -> None:
    script = SCRIPTS / argv[0]
    assert script.exists(), f"{script} missing: run pip install -e '.[test]'"
    result = subprocess.run([str(script), *argv[1:]], env=cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


def test_usage_errors_are_one_line_with_status_1() -> None:
    for args, word in [(["up", "--adapt", "5:1"], "--adapt"), (["up", "--n-workers", "x"], "--n-workers"),
                       (["check"], "HOST"), (["no-such-command"], "no-such-command")]:
        result = CliRunner().invoke(lazycluster, args)
        assert result.exit_code == 1, (args, result.output)
        assert word in result.output and "Traceback" not in result.output


# -- list-runtimes and check -----------------------------------------------------------------------


def test_list_runtimes_long(hosts: TestHosts, tmp_path: Path) -> None:
    result = run_cli("list-runtimes", "-l")
    assert result.returncode == 0, result.stderr
    assert "CORES" in result.stdout and "MEMORY" in result.stdout
    for name in hosts.names:
        assert re.search(rf"^\s+{name}\s+\d+\s+", result.stdout, re.M), result.stdout
    short = run_cli("list-runtimes")
    assert short.returncode == 0 and all(n in short.stdout for n in hosts.names)
    nothing = tmp_path / "config"
    nothing.write_text("Host lzgone\n    HostName lz-no-such-host.invalid\n")
    failed = run_cli("list-runtimes", "--ssh-config", str(nothing))
    assert_one_line_error(failed, "lzgone")


def test_check_a_good_and_an_unknown_host(hosts: TestHosts) -> None:
    import distributed

    good = run_cli("check", hosts.names[0])
    assert good.returncode == 0, good.stderr
    assert f"{hosts.names[0]}: ok" in good.stdout
    assert distributed.__version__ in good.stdout and "port 8786" in good.stdout
    assert f"({sys.version.split()[0]})" in good.stdout  # the host's python and its version
    mixed = run_cli("check", hosts.names[0], "lz-no-such-host.invalid")
    assert_one_line_error(mixed, "lz-no-such-host.invalid", "resolve")
    assert "lz-no-such-host.invalid: UNUSABLE" in mixed.stdout


def test_check_a_python_without_distributed(hosts: TestHosts,
                                            python_without_distributed: str) -> None:
    result = run_cli("check", "--python", python_without_distributed, hosts.names[0])
    assert_one_line_error(result, hosts.names[0], "cannot import distributed")


# -- up --------------------------------------------------------------------------------------------


def _reader(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


def _wait_for(lines: queue.Queue[str], pattern: str, seen: list[str], timeout: float = 90) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no {pattern!r} in output: {''.join(seen)}")


def _stderr_after_abort(proc: subprocess.Popen[str]) -> str:
    """Make a stuck ``up`` dump every thread's stack (faulthandler on SIGABRT); return stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stderr.read() if proc.stderr else ""


@contextlib.contextmanager
def diagnosed(proc: subprocess.Popen[str]) -> Iterator[None]:
    """On a failed assertion add ``up``'s thread dump and stderr; never leave it running."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstderr of up:\n{_stderr_after_abort(proc)}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def working_dirs(hosts: TestHosts) -> set[str]:
    """Temp working dirs in use by processes inside the test hosts right now."""
    found = set()
    for name in hosts.names:
        private = f"{hosts.host_tmpdir(name)}/lazycluster-"
        for pid in hosts.pids(name):
            with contextlib.suppress(psutil.Error):
                cwd = psutil.Process(pid).cwd()
                if cwd.startswith(private):
                    found.add(cwd)
    return found


def start_up(*args: str, env: dict[str, str] | None = None,
             **kwargs: object) -> subprocess.Popen[str]:
    """Run ``up`` with faulthandler on, so a hang can be diagnosed."""
    return subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-X", "faulthandler", "-m", "dask_lazycluster.cli", "up", *args],
        env={**cli_env(), **(env or {})}, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, **kwargs,
    )


@pytest.mark.parametrize("own_process", [False, True], ids=["in-process", "scheduler-process"])
def test_up_serves_until_sigint_and_leaves_nothing(hosts: TestHosts, own_process: bool) -> None:
    proc = start_up("--hosts", hosts.names[0], "--n-workers", "2", stdout=subprocess.PIPE,
                    env={"DASK_LAZYCLUSTER__SCHEDULER_PROCESS": str(own_process).lower()})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    with diagnosed(proc):
        address = _wait_for(lines, r"^Scheduler: (tcp://\S+)", seen).group(1)
        _wait_for(lines, r"^Ready: 2 worker", seen)
        assert not any("Workers ready" in line for line in seen)  # no progress without a tty
        with Client(address, timeout=30) as client:
            assert client.submit(lambda x: x + 1, 41).result(timeout=60) == 42
            assert len(client.scheduler_info()["workers"]) == 2
            scheduler_pid = client.run_on_scheduler(os.getpid)
        # SIGINT goes to `up` alone here (a terminal's Ctrl-C reaches the child too, which
        # ignores it): `up` must close its scheduler process itself.
        assert (scheduler_pid != proc.pid) == own_process
        ours = working_dirs(hosts)
        assert ours, "the workers should run in a temp working dir"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    _wait_for(lines, r"^Closed\.", seen, timeout=5)
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    assert not wait_no_leftovers(hosts)
    assert not [d for d in ours if os.path.exists(d)]
    assert not psutil.pid_exists(scheduler_pid) or (
        psutil.Process(scheduler_pid).status() == psutil.STATUS_ZOMBIE)


def test_up_with_the_scheduler_on_a_host(hosts: TestHosts) -> None:
    scheduler_host = hosts.names[1]
    proc = start_up("--hosts", ",".join(hosts.names[:2]), "--n-workers", "2",
                    "--scheduler-host", scheduler_host, stdout=subprocess.PIPE)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    with diagnosed(proc):
        address = _wait_for(lines, r"^Scheduler: (tcp://\S+)", seen).group(1)
        assert address.startswith("tcp://127.0.0.1:")  # reached through a local forward
        _wait_for(lines, r"^Ready: 2 worker", seen)
        with Client(address, timeout=30) as client:
            assert client.submit(lambda x: x + 1, 41).result(timeout=60) == 42
            where = client.run_on_scheduler(lambda: __import__("socket").gethostname())
        if hosts.mode == "netns":
            assert where == scheduler_host
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    assert not wait_no_leftovers(hosts)


def test_up_on_a_terminal_shows_progress_and_stops_on_sigterm(hosts: TestHosts) -> None:
    master, slave = pty.openpty()
    proc = start_up("--hosts", ",".join(hosts.names[:2]), "--adapt", "1:2", "--tunnel", "true",
                    stdout=slave)
    os.close(slave)
    output = b""
    with contextlib.ExitStack() as closing:
        closing.callback(os.close, master)
        closing.enter_context(diagnosed(proc))
        deadline = time.monotonic() + 90
        while b"Press Ctrl-C" not in output and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    output += os.read(master, 4096)
                except OSError:  # the child is gone
                    break
        text = output.decode()
        assert "Workers ready: 1/1" in text, text
        assert "adapting between 1 and 2" in text, text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    assert not wait_no_leftovers(hosts)


def test_up_errors(hosts: TestHosts, tmp_path: Path) -> None:
    no_hosts = run_cli("up", home=tmp_path)
    assert_one_line_error(no_hosts, "--hosts")
    bad_host = run_cli("up", "--hosts", f"{hosts.names[0]},lz-no-such-host.invalid")
    assert_one_line_error(bad_host, "lz-no-such-host.invalid")
    assert not wait_no_leftovers(hosts)


# -- add-runtime / delete-runtime --------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_and_delete_runtime_edit_the_ssh_config_safely(hosts: TestHosts, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    key = tmp_path / "id key"
    key.write_text("not really a key\n")
    config = home / ".ssh" / "config"
    backup = home / ".ssh" / "config.bak"

    added = run_cli("add-runtime", "node1", "alice@10.0.0.5:2222", "--id-file", str(key), home=home)
    assert added.returncode == 0, added.stderr
    assert _mode(home / ".ssh") == 0o700 and _mode(config) == 0o600
    assert not backup.exists()  # nothing to back up yet
    text = config.read_text()
    assert text == (f"Host node1\n    HostName 10.0.0.5\n    User alice\n    Port 2222\n"
                    f'    IdentityFile "{key}"\n')

    duplicate = run_cli("add-runtime", "node1", "bob@10.0.0.6", home=home)
    assert_one_line_error(duplicate, "node1", "already exists")
    assert config.read_text() == text

    # Defaults in a wildcard block stay after the specific hosts.
    config.write_text(text + "\nHost *\n    ServerAliveInterval 30\n")
    config.chmod(0o644)
    before = config.read_text()
    assert run_cli("add-runtime", "node2", "10.0.0.7", home=home).returncode == 0
    assert backup.read_text() == before and _mode(backup) == 0o600
    assert _mode(config) == 0o600
    assert config.read_text() == (before.replace("\nHost *", "\nHost node2\n    HostName 10.0.0.7\n\nHost *"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        assert ssh_config_hosts() == ["node1", "node2"]

    before = config.read_text()
    deleted = run_cli("delete-runtime", "node1", home=home)
    assert deleted.returncode == 0, deleted.stderr
    assert backup.read_text() == before
    assert config.read_text() == "Host node2\n    HostName 10.0.0.7\n\nHost *\n    ServerAliveInterval 30\n"
    assert _mode(config) == 0o600
    again = run_cli("delete-runtime", "node1", home=home)
    assert_one_line_error(again, "node1")
    assert not list((home / ".ssh").glob(".config.*"))  # no temp file left


def test_runtime_editing_errors(tmp_path: Path) -> None:
    config = tmp_path / ".ssh" / "config"
    config.parent.mkdir(mode=0o700)
    config.write_text("Host a b\n    User x\n# about c\nHost c\n    # c's own comment\n    User c\n"
                      "# next\nHost d\n")
    runner = CliRunner(env={"HOME": str(tmp_path)})
    for args, word in [
        (["add-runtime", "bad name", "h"], "bad name"),
        (["add-runtime", "ok", "u@"], "u@"),
        (["add-runtime", "ok", "u@h:99999"], "99999"),
        (["add-runtime", "ok", "h", "--id-file", str(tmp_path / "nokey")], "nokey"),
        (["add-runtime", "b", "h"], "already exists"),
        (["delete-runtime", "a"], "shares a Host line"),
        (["delete-runtime", "zzz"], "zzz"),
    ]:
        result = runner.invoke(lazycluster, args)
        assert result.exit_code == 1, (args, result.output)
        assert word in result.output and "Traceback" not in result.output, result.output
    ok = runner.invoke(lazycluster, ["add-runtime", "v6", "me@[::1]:2200"])
    assert ok.exit_code == 0, ok.output
    assert "HostName ::1\n    User me\n    Port 2200" in config.read_text()
    ok = runner.invoke(lazycluster, ["delete-runtime", "c"])
    assert ok.exit_code == 0, ok.output
    assert config.read_text() == ("Host a b\n    User x\n# about c\n# next\nHost d\n\n"
                                  "Host v6\n    HostName ::1\n    User me\n    Port 2200\n")
