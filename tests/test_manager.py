"""RuntimeManager (host discovery from the SSH config) against real sshd test hosts."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dask_lazycluster import InvalidRuntimeError, NoRuntimesDetectedError, RuntimeGroup
from dask_lazycluster import runtime_manager as rm
from dask_lazycluster._core import live_cores
from dask_lazycluster.runtime_manager import RuntimeManager, ssh_config_hosts
from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers

DEAD = "lzdead"  # an address on the test bridge where nothing answers
UNRESOLVABLE = "lznohost"


@pytest.fixture(scope="module")
def ssh_config(hosts: TestHosts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config that includes the fake home's (relative Include) and adds two unusable hosts."""
    path = tmp_path_factory.mktemp("sshconfig") / "config"
    path.write_text(
        "# test config\n"
        "Include config\n"  # relative: ~/.ssh/config, i.e. the fake home's
        f"Host {DEAD}\n    HostName 10.231.0.250\n    ConnectTimeout 2\n\n"
        f"Host={UNRESOLVABLE}\n    HostName lz-no-such-host.invalid\n\n"
        "Host web? !bastion *.example.com\n    User nobody\n\n"
        "Host *\n    ServerAliveInterval 30\n"
    )
    return path


@pytest.fixture(scope="module")
def manager(ssh_config: Path) -> Iterator[RuntimeManager]:
    mgr = RuntimeManager(ssh_config=str(ssh_config), connect_options={"connect_timeout": 3})
    yield mgr
    mgr.cleanup()


def test_ssh_config_hosts_follows_includes_and_skips_patterns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    ssh = tmp_path / ".ssh"
    (ssh / "conf.d").mkdir(parents=True)
    (ssh / "conf.d" / "b.conf").write_text("Host bee\n")
    (ssh / "conf.d" / "a.conf").write_text("host ay ay2 'quoted name'\n  Include ../config\n")
    (ssh / "config").write_text(
        "Include conf.d/*.conf ~/missing.conf\n"
        "HOST first  # trailing comment\n"
        "Host = second\n"
        "Match host second exec true\n"
        "Host *.internal gpu? !first first\n"
        "Host *\n"
    )
    assert ssh_config_hosts() == ["ay", "ay2", "quoted name", "bee", "first", "second"]
    other = tmp_path / "other"
    other.write_text(f"Include {ssh / 'conf.d' / 'b.conf'}\nHost own\n")
    assert ssh_config_hosts(str(other)) == ["bee", "own"]
    (ssh / "config").unlink()
    assert ssh_config_hosts() == []
    with pytest.raises(ValueError, match="does-not-exist"):
        ssh_config_hosts(str(tmp_path / "does-not-exist"))


def test_discovery_sorts_hosts_into_active_and_inactive(
    hosts: TestHosts, manager: RuntimeManager
) -> None:
    assert set(hosts.names) <= set(manager.hosts)
    assert manager.inactive_hosts == [DEAD, UNRESOLVABLE]
    reasons = manager.inactive_reasons
    assert "resolve" in reasons[UNRESOLVABLE]
    # nothing answers there: dropped (timed out) or refused by the network, depending on it
    assert re.search(r"timed out|unreachable|No route to host", reasons[DEAD]), reasons[DEAD]
    assert not any(c in h for h in manager.hosts + manager.inactive_hosts for c in "*?!")
    assert [r.host for r in manager.runtimes] == manager.hosts
    assert manager.get_runtime(hosts.names[0]).cpu_cores >= 1
    with pytest.raises(ValueError, match="inactive"):
        manager.get_runtime(DEAD)
    with pytest.raises(ValueError, match="nope"):
        manager.get_runtime("nope")
    assert DEAD in repr(manager)


def test_default_config_is_the_fake_home(hosts: TestHosts) -> None:
    mgr = RuntimeManager()
    try:
        assert set(hosts.names) <= set(mgr.hosts)
        assert mgr.inactive_hosts == []
    finally:
        mgr.cleanup()


def test_print_functions(hosts: TestHosts, manager: RuntimeManager,
                         capsys: pytest.CaptureFixture[str]) -> None:
    manager.print_hosts()
    assert capsys.readouterr().out.split() == manager.hosts
    manager.print_inactive_hosts()
    out = capsys.readouterr().out
    assert f"{DEAD}: " in out and f"{UNRESOLVABLE}: " in out
    manager.print_runtime_info()
    out = capsys.readouterr().out
    for name in hosts.names:
        assert f"{name}:" in out
    assert "cpu cores" in out and "memory" in out and "distributed" in out


def test_no_reachable_host(hosts: TestHosts, tmp_path: Path) -> None:
    dead = tmp_path / "dead"
    dead.write_text(f"Host {UNRESOLVABLE}\n    HostName lz-no-such-host.invalid\n")
    with pytest.raises(NoRuntimesDetectedError, match=UNRESOLVABLE):
        RuntimeManager(ssh_config=str(dead))
    empty = tmp_path / "empty"
    empty.write_text("Host *\n    User nobody\n")
    with pytest.raises(NoRuntimesDetectedError, match="no Host entries"):
        RuntimeManager(ssh_config=str(empty))
    with pytest.raises(ValueError, match="missing"):
        RuntimeManager(ssh_config=str(tmp_path / "missing"))


def test_create_group_by_hardware(hosts: TestHosts, manager: RuntimeManager) -> None:
    group = manager.create_group(min_cpu_cores=1, min_memory="1 KiB")
    assert isinstance(group, RuntimeGroup) and group.hosts == manager.hosts
    assert group.runtimes[0] is manager.runtimes[0]  # the manager's runtimes, no new connection
    with pytest.raises(NoRuntimesDetectedError, match="min_cpu_cores"):
        manager.create_group(min_cpu_cores=100_000)
    with pytest.raises(NoRuntimesDetectedError, match="min_memory"):
        manager.create_group(min_memory=2**60)
    with pytest.raises(NoRuntimesDetectedError, match="no GPU"):
        manager.create_group(gpu_required=True)
    with pytest.raises(ValueError, match="min_memory"):
        manager.create_group(min_memory="lots")
    with pytest.raises(TypeError):
        manager.create_group(min_cpu_cores="2")  # type: ignore[arg-type]


def test_create_group_include_exclude(hosts: TestHosts, manager: RuntimeManager) -> None:
    first, *rest = hosts.names
    assert manager.create_group(include_hosts=first).hosts == [first]
    assert manager.create_group(include_hosts=hosts.names, exclude_hosts=[first]).hosts == rest
    assert first not in manager.create_group(exclude_hosts=[first, DEAD]).hosts
    with pytest.raises(ValueError, match="'nope'.*'nada'"):
        manager.create_group(include_hosts=[first, "nope"], exclude_hosts="nada")
    with pytest.raises(InvalidRuntimeError, match=DEAD):
        manager.create_group(include_hosts=[DEAD])
    with pytest.raises(NoRuntimesDetectedError, match="leave no"):
        manager.create_group(include_hosts=first, exclude_hosts=first)


def test_create_group_by_remote_checks(hosts: TestHosts, manager: RuntimeManager) -> None:
    assert manager.create_group(installed_executables=["sh"]).hosts == manager.hosts
    assert manager.create_group(installed_executables="sh").hosts == manager.hosts
    with pytest.raises(NoRuntimesDetectedError, match="no-such-exe"):
        manager.create_group(installed_executables=["sh", "no-such-exe"])
    # Select by each host's own hostname (each test host has its own in netns mode).
    wanted = manager.get_runtime(hosts.names[1]).info["hostname"]
    expected = [r.host for r in manager.runtimes if r.info["hostname"] == wanted]
    group = manager.create_group(filter_commands=[f'test "$(hostname)" = {wanted}', "true"])
    assert group.hosts == expected
    with pytest.raises(NoRuntimesDetectedError, match="exited with 3"):
        manager.create_group(include_hosts=hosts.names[0], filter_commands="echo why; exit 3")


def test_filter_command_timeout_leaves_nothing_running(
    hosts: TestHosts, manager: RuntimeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rm, "CHECK_TIMEOUT", 1.0)
    with pytest.raises(NoRuntimesDetectedError, match="timed out"):
        manager.create_group(include_hosts=hosts.names[0], filter_commands="sleep 300")
    left = wait_no_leftovers(hosts)
    assert not left, left


def test_create_group_with_working_dir(hosts: TestHosts, manager: RuntimeManager,
                                       tmp_path: Path) -> None:
    wd = str(tmp_path / "wd")
    group = manager.create_group(include_hosts=hosts.names[0], working_dir=wd)
    runtime = group.runtimes[0]
    assert runtime is not manager.get_runtime(hosts.names[0])
    assert runtime.working_dir == wd and os.path.isdir(wd)
    with pytest.raises(TypeError):
        manager.create_group(working_dir=3)  # type: ignore[arg-type]


def test_cleanup_closes_every_runtime(hosts: TestHosts, ssh_config: Path) -> None:
    mgr = RuntimeManager(ssh_config=str(ssh_config), connect_options={"connect_timeout": 3})
    extra = mgr.create_group(include_hosts=hosts.names[0], working_dir="/tmp").runtimes[0]
    runtimes = [*mgr.runtimes, extra]
    mgr.cleanup()
    mgr.cleanup()  # harmless twice
    assert all("closed" in repr(r) for r in runtimes)
    assert not {r.core for r in runtimes} & set(live_cores())
    assert not wait_no_leftovers(hosts)
