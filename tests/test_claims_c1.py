"""Claims of README.md, docs/index.md, quickstart.md, hosts-and-ssh.md and configuration.md that
no other test proved (issue 17, the claims index: see docs/claims.md).

Each test names the page and the claim id(s) it proves. All SSH tests run against the project's
own sshd test hosts; nothing here mocks asyncssh, sockets or Dask.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh
import dask
import psutil
import pytest
import yaml
from distributed import Client
from distributed.deploy.spec import SpecCluster

from dask_lazycluster import (
    DaskCluster,
    InvalidRuntimeError,
    NoPortsLeftError,
    Runtime,
    RuntimeGroup,
    RuntimeTask,
    TaskExecutionError,
)
from dask_lazycluster._bootstrap import python_command
from dask_lazycluster._connection import HostConnection
from dask_lazycluster._core import live_cores
from dask_lazycluster.testing import HostSpec, TestHosts

from .conftest import wait_no_leftovers
from .helpers import free_port, ssh_config_block, wait_until

pytestmark = pytest.mark.usefixtures("leak_check")

REPO = Path(__file__).resolve().parents[1]


def worker_hosts(client: Client) -> Counter[str]:
    """Workers per host, from the names the cluster gives them (``<host>-<n>``)."""
    return Counter(str(w["name"]).rsplit("-", 1)[0]
                   for w in client.scheduler_info()["workers"].values())


def wait_workers(client: Client, n: int, timeout: float = 90) -> None:
    assert wait_until(lambda: len(client.scheduler_info()["workers"]) == n, timeout), (
        f"expected {n} workers, have {len(client.scheduler_info()['workers'])}")


def ssh_connections(hosts: TestHosts) -> Counter[str]:
    """This process's established TCP connections to each host's sshd."""
    servers = {(h.address, h.port): h.name for h in hosts.hosts}
    found: Counter[str] = Counter()
    for conn in psutil.Process().net_connections("tcp"):
        if conn.raddr and conn.status == psutil.CONN_ESTABLISHED:
            name = servers.get((conn.raddr.ip, conn.raddr.port))
            if name is not None:
                found[name] += 1
    return found


# -- README.md / index.md: the usage example ---------------------------------------------------


def test_readme_usage_example(hosts: TestHosts) -> None:
    """readme-usage, index-scheduler-here, readme-speccluster: the README's example, as written."""
    names = hosts.names
    group = RuntimeGroup(hosts=names)
    try:
        cluster = DaskCluster(group)  # scheduler here, one worker per host
        client = Client(cluster)
        try:
            assert isinstance(cluster, SpecCluster)
            assert client.run_on_scheduler(os.getpid) == os.getpid()  # in this process
            wait_workers(client, len(names))
            assert worker_hosts(client) == Counter({n: 1 for n in names})
            assert client.submit(sum, [1, 2, 3]).result() == 6
            cluster.scale(6)  # two workers per host, placed round robin
            # Each host's whole-host worker is replaced by two half-size ones (successors
            # first), so six can be registered before the layout settles.
            two_each = Counter({n: 2 for n in names})
            assert wait_until(lambda: len(client.scheduler_info()["workers"]) == 6
                              and worker_hosts(client) == two_each, 120), worker_hosts(client)
            # every process and forward of a host goes over its one SSH connection
            assert ssh_connections(hosts) == Counter({n: 1 for n in names})
            cluster.adapt(minimum=0, maximum=12)  # or let Dask decide: idle, it shrinks
            wait_workers(client, 0, timeout=120)
        finally:
            client.close()
            cluster.close()
    finally:
        group.cleanup()
    assert wait_no_leftovers(hosts) == {}


# -- quickstart.md -------------------------------------------------------------------------------


def test_quickstart_script_example(hosts: TestHosts, capsys: pytest.CaptureFixture[str]) -> None:
    """quickstart-script, quickstart-worker-size, quickstart-cleanup, hosts-working-dir-use."""
    group = RuntimeGroup(hosts=hosts.names[:2])  # connects to both hosts
    working_dirs = [r.working_dir for r in group.runtimes]
    try:
        with DaskCluster(group) as cluster, Client(cluster) as client:
            wait_workers(client, 2)
            shown = repr(cluster)
            assert shown.startswith("DaskCluster(") and "2 of 2 requested workers running" in shown
            assert "threads=" in shown and "memory=" in shown
            # the dashboard, served by the manager (this process listens on its port)
            port = int(cluster.dashboard_link.split(":")[2].split("/")[0])
            listening = {c.laddr.port for c in psutil.Process().net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN}
            assert port in listening
            with urllib.request.urlopen(cluster.dashboard_link, timeout=10) as page:
                assert page.status == 200
            futures = client.map(lambda x: x * x, range(1000))
            assert sum(client.gather(futures)) == sum(x * x for x in range(1000))
            # one Nanny per host, sized to its own host, working in the host's working dir
            facts = client.run(lambda dask_worker: (
                str(dask_worker.name), dask_worker.state.nthreads,
                dask_worker.memory_manager.memory_limit, dask_worker.nanny is not None,
                dask_worker.local_directory))
            for name, threads, memory, nanny, local in facts.values():
                runtime = group.get_runtime(name.rsplit("-", 1)[0])
                assert (threads, memory, nanny) == (runtime.cpu_cores, runtime.memory, True)
                assert local.startswith(runtime.working_dir + "/"), (local, runtime.working_dir)
        # leaving the block closed workers and scheduler; the group stays open
        assert all(r.is_alive for r in group.runtimes)
        assert all(os.path.isdir(wd) for wd in working_dirs)
        # other sizes on request
        with DaskCluster(group, worker_options={"nthreads": 2, "memory_limit": "1GiB"}) as cluster, \
                Client(cluster) as client:
            wait_workers(client, 2)
            sizes = client.run(lambda dask_worker: (dask_worker.state.nthreads,
                                                    dask_worker.memory_manager.memory_limit))
            assert set(sizes.values()) == {(2, 2**30)}
        # the lazycluster way: start() is a no-op, print_log() shows the workers' output
        cluster = DaskCluster(group)
        cluster.start()
        assert cluster.worker_count == 2
        lazy_client = cluster.get_client()
        assert lazy_client.submit(lambda x: x + 1, 1).result() == 2
        capsys.readouterr()
        cluster.print_log()
        printed = capsys.readouterr().out
        for runtime in group.runtimes:  # per host, each worker's own output
            assert f"=== {runtime.host}: {runtime.host}-" in printed, printed
        assert printed.count("Start worker at:") >= 2, printed
        lazy_client.close()
        cluster.cleanup()
    finally:
        group.cleanup()
    # group.cleanup() closed the SSH connections and removed the working dirs
    assert not any(os.path.exists(wd) for wd in working_dirs)
    assert ssh_connections(hosts) == Counter()
    assert wait_no_leftovers(hosts) == {}


# -- hosts-and-ssh.md: logins, keys, agent, host keys --------------------------------------------


def alias_home(hosts: TestHosts, home: Path, name: str, drop: tuple[str, ...] = (),
               extra: tuple[str, ...] = ()) -> Path:
    """A fresh ``home/.ssh/config`` with the test host's block, minus ``drop`` options."""
    body = [line for line in ssh_config_block(hosts, name)
            if line.split()[0].lower() not in drop]
    ssh = home / ".ssh"
    ssh.mkdir(parents=True, mode=0o700)
    (ssh / "config").write_text("\n".join([f"Host {name}", *body, *extra]) + "\n")
    return home


@pytest.fixture
def bare_home(hosts: TestHosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME with the first host's config entry but no key: no IdentityFile, no key files."""
    home = alias_home(hosts, tmp_path / "home", hosts.names[0],
                      drop=("identityfile", "identitiesonly"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Path]:
    """A real ssh-agent (its socket), stopped after the test."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_until(sock.exists, timeout=10)
        yield sock
    finally:
        proc.terminate()
        proc.wait()


def test_login_with_the_agent_or_a_default_key_file_never_prompting(
        hosts: TestHosts, bare_home: Path, agent: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hosts-keys-agent, quickstart-ssh-like: agent keys, default key files, no prompt."""
    name = hosts.names[0]
    with pytest.raises(InvalidRuntimeError, match="authentication failed"):
        Runtime(name)  # no key anywhere: an error, not a password prompt
    env = {**os.environ, "SSH_AUTH_SOCK": str(agent)}
    subprocess.run(["ssh-add", str(hosts.client_key)], env=env, check=True, capture_output=True)
    monkeypatch.setenv("SSH_AUTH_SOCK", str(agent))
    runtime = Runtime(name)  # the agent's key
    assert runtime.echo("ok") == "ok\n"
    runtime.cleanup()
    monkeypatch.delenv("SSH_AUTH_SOCK")
    shutil.copy(hosts.client_key, bare_home / ".ssh" / "id_ed25519")
    (bare_home / ".ssh" / "id_ed25519").chmod(0o600)
    runtime = Runtime(name)  # ~/.ssh/id_ed25519, found without being named
    assert runtime.echo("ok") == "ok\n"
    runtime.cleanup()


def test_an_encrypted_key_needs_passphrase_in_connect_options(hosts: TestHosts, bare_home: Path
                                                              ) -> None:
    """hosts-keys-agent: a passphrase is never asked for; ``passphrase=`` opens the key."""
    name = hosts.names[0]
    key = bare_home / ".ssh" / "id_ed25519"
    asyncssh.read_private_key(str(hosts.client_key)).write_private_key(
        str(key), format_name="pkcs8-pem", passphrase="lz-secret")
    key.chmod(0o600)
    with pytest.raises(InvalidRuntimeError, match="authentication failed"):
        Runtime(name)  # the encrypted key cannot be used, and nothing prompts
    runtime = Runtime(name, connect_options={"passphrase": "lz-secret"})
    assert runtime.echo("ok") == "ok\n"
    runtime.cleanup()


def test_strict_host_key_checking_no_does_not_accept_an_unknown_key(
        hosts: TestHosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hosts-known-hosts: StrictHostKeyChecking is ignored; an unknown key is an error."""
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    home = alias_home(hosts, tmp_path / "home", hosts.names[0],
                      drop=("userknownhostsfile", "stricthostkeychecking"),
                      extra=(f"    UserKnownHostsFile {empty}", "    StrictHostKeyChecking no"))
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(InvalidRuntimeError, match=f"{hosts.names[0]}.*host key not verified"):
        Runtime(hosts.names[0])
    assert empty.read_text() == ""  # nothing was learnt either


def test_a_failed_group_names_every_failing_host_and_keeps_no_connection(hosts: TestHosts) -> None:
    """hosts-group-fails-whole: the message lists each failure; no connection stays open."""
    before = len(live_cores())
    with pytest.raises(InvalidRuntimeError) as info:
        RuntimeGroup(hosts=[hosts.names[0], "lz-bad-one.invalid", hosts.names[1],
                            "lz-bad-two.invalid"])
    text = str(info.value)
    assert "lz-bad-one.invalid" in text and "lz-bad-two.invalid" in text, text
    assert "resolve" in text
    assert len(live_cores()) == before
    assert ssh_connections(hosts) == Counter()


def test_connect_timeout_defaults_to_ten_seconds(hosts: TestHosts) -> None:
    """hosts-connect-timeout: a server that never answers fails after the default 10 s."""
    with socket.socket() as silent:  # accepts TCP (the kernel does), never speaks SSH
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        with pytest.raises(InvalidRuntimeError, match=r"timed out after 10 s"):
            Runtime("127.0.0.1", connect_options={"port": port})
        with pytest.raises(InvalidRuntimeError, match=r"timed out after 2 s"):
            Runtime("127.0.0.1", connect_options={"port": port, "connect_timeout": 2})


def test_ssh_defaults_are_added_only_when_not_given(hosts: TestHosts) -> None:
    """hosts-ssh-defaults: AES-GCM first and 2 s x 3 keepalives, unless passed; connect_timeout
    is ours, not asyncssh's."""
    options = HostConnection("h", {"connect_timeout": 3})._ssh_options()
    assert options["encryption_algs"][:2] == ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
    assert len(options["encryption_algs"]) > 2  # then asyncssh's defaults
    assert (options["keepalive_interval"], options["keepalive_count_max"]) == (2, 3)
    assert "connect_timeout" not in options
    mine = {"encryption_algs": ["aes256-ctr"], "keepalive_interval": 30, "keepalive_count_max": 9}
    assert {k: HostConnection("h", mine)._ssh_options()[k] for k in mine} == mine
    runtime = Runtime(hosts.names[0])
    try:  # and the host really speaks the preferred cipher
        conn = runtime.core.state.ssh.conn
        assert conn._enc_alg_cs == b"aes128-gcm@openssh.com"  # noqa: SLF001 (asyncssh's)
    finally:
        runtime.cleanup()


def test_runtime_info_lists_the_documented_facts(hosts: TestHosts) -> None:
    """hosts-info: ``runtime.info`` has every documented key."""
    runtime = Runtime(hosts.names[0])
    try:
        info = runtime.info
        assert {"os", "hostname", "cpu_cores", "memory", "python_version", "python", "gpus",
                "distributed_version"} <= set(info), info
        assert info["python"] == runtime.python
        import distributed

        assert info["distributed_version"] == distributed.__version__
    finally:
        runtime.cleanup()


# -- hosts-and-ssh.md: remote Python, working dirs, env, nothing installed ------------------------


def test_python_found_on_the_host_when_not_given(hosts: TestHosts,
                                                 make_hosts: Callable[..., TestHosts]) -> None:
    """hosts-python-choice: the manager's path if the host has it, else python3 on the host's
    PATH; with none, the shell names what it tried."""
    moved = make_hosts(1, "lzc1py", specs={1: HostSpec().with_python_at("/opt/lzc1py")})
    plain = Runtime(moved.names[0])
    try:
        assert plain.python != sys.executable  # not there: python3 from the host's PATH
        assert os.path.basename(os.path.realpath(plain.python)).startswith("python3")
    finally:
        plain.cleanup()
    done = subprocess.run(["sh", "-c", python_command(["/no/py-a", "no-py-b"])],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 127
    assert "no python found (tried: /no/py-a no-py-b)" in done.stderr
    assert wait_no_leftovers(moved) == {}


def test_the_managers_python_is_used_when_the_host_has_it(hosts: TestHosts) -> None:
    """hosts-python-choice: the harness hosts share the manager's files, so its path wins."""
    runtime = Runtime(hosts.names[0])
    try:
        assert runtime.python == sys.executable
    finally:
        runtime.cleanup()


def test_an_explicit_working_dir_is_created_private_and_kept(hosts: TestHosts,
                                                            tmp_path: Path) -> None:
    """hosts-working-dir-explicit: made with mkdir -p -m 700 at construction, never removed."""
    wd = tmp_path / "data" / "lazy"
    runtime = Runtime(hosts.names[0], working_dir=str(wd))
    try:
        assert wd.is_dir() and stat.S_IMODE(wd.stat().st_mode) == 0o700
        assert runtime.working_dir == str(wd)
    finally:
        runtime.cleanup()
    assert wd.is_dir()


def test_cluster_env_is_added_on_top_of_the_runtimes(hosts: TestHosts, group: RuntimeGroup) -> None:
    """hosts-env: runtime env reaches later Dask processes; the cluster's env wins over it."""
    group.set_env_variables({"LZ_FROM_RUNTIME": "runtime", "LZ_BOTH": "runtime"})
    try:
        with DaskCluster(group, n_workers=1, env={"LZ_BOTH": "cluster"}) as cluster, \
                Client(cluster) as client:
            wait_workers(client, 1)
            seen = set(client.run(lambda: (os.environ.get("LZ_FROM_RUNTIME"),
                                           os.environ.get("LZ_BOTH"))).values())
            assert seen == {("runtime", "cluster")}
    finally:
        group.set_env_variables({})


@pytest.fixture
def python_without_our_package(tmp_path: Path) -> str:
    """An interpreter that has distributed but cannot import dask_lazycluster.

    The machine's Python with ``-S``: its site-packages on ``PYTHONPATH`` keeps distributed,
    but no ``.pth`` file runs, so the editable install of this package is not found.
    """
    site_packages = sysconfig.get_paths()["purelib"]
    wrapper = tmp_path / "python-without-dask-lazycluster"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site_packages} exec {sys.executable} -S "$@"\n')
    wrapper.chmod(0o755)
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = subprocess.run([str(wrapper), "-c", "import distributed, dask_lazycluster"],
                           capture_output=True, text=True, env=plain, cwd="/")
    assert "No module named 'dask_lazycluster'" in check.stderr, check.stderr
    return str(wrapper)


def test_hosts_need_no_dask_lazycluster_installed(hosts: TestHosts,
                                                  python_without_our_package: str) -> None:
    """hosts-nothing-installed: the remote code comes over stdin; only distributed is needed."""
    runtime = Runtime(hosts.names[0], python=python_without_our_package)
    group = RuntimeGroup(runtimes=[runtime])
    try:
        def importable() -> bool:
            import importlib.util

            return importlib.util.find_spec("dask_lazycluster") is not None

        task = runtime.execute_task(RuntimeTask("probe").run_function(importable),
                                    execute_async=False)
        assert list(task.function_returns) == [False]
        with DaskCluster(group, n_workers=1) as cluster, Client(cluster) as client:
            wait_workers(client, 1)
            assert set(client.run(importable).values()) == {False}
            assert client.submit(sum, [1, 2, 3]).result() == 6
    finally:
        group.cleanup()
    assert wait_no_leftovers(hosts) == {}


# -- configuration.md ----------------------------------------------------------------------------


def run_python(code: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (Dask reads its config at import) with this HOME."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("DASK_") and k != "PYTHONPATH"}
    environ.update({"HOME": str(home), "PYTHONPATH": str(REPO), **env})
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=120)


def test_environment_values_are_python_literals_or_yaml_words(tmp_path: Path) -> None:
    """configuration-env-values: literals, true/false/null and plain words, checked by key."""
    done = run_python(
        "import dask, dask_lazycluster\n"
        "from dask_lazycluster.config import setting\n"
        "for key in ('hosts', 'tunnel', 'port-range', 'scheduler-process', 'n-workers'):\n"
        "    print(key, repr(setting(key)))\n",
        tmp_path, DASK_LAZYCLUSTER__HOSTS='["node1", "node2"]', DASK_LAZYCLUSTER__TUNNEL="auto",
        DASK_LAZYCLUSTER__PORT_RANGE="[61000, 61999]",
        DASK_LAZYCLUSTER__SCHEDULER_PROCESS="true", DASK_LAZYCLUSTER__N_WORKERS="null")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "hosts ['node1', 'node2']", "tunnel 'auto'", "port-range [61000, 61999]",
        "scheduler-process True", "n-workers None"]
    # dask.config.set beats the environment; a later os.environ change needs refresh()
    done = run_python(
        "import os, dask, dask_lazycluster\n"
        "with dask.config.set({'lazycluster.n-workers': 1}):\n"
        "    print(dask.config.get('lazycluster.n-workers'))\n"
        "os.environ['DASK_LAZYCLUSTER__N_WORKERS'] = '3'\n"
        "print(dask.config.get('lazycluster.n-workers'))\n"
        "dask.config.refresh()\n"
        "print(dask.config.get('lazycluster.n-workers'))\n",
        tmp_path, DASK_LAZYCLUSTER__N_WORKERS="2")
    assert done.stdout.split() == ["1", "2", "3"], done.stderr
    shown = subprocess.run([sys.executable, "-m", "dask", "config", "get", "lazycluster.tunnel"],
                           env={**os.environ, "HOME": str(tmp_path),
                                "DASK_LAZYCLUSTER__TUNNEL": "auto", "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True, timeout=60)
    assert shown.stdout.strip() == "auto", shown.stderr
    bad = run_python("from dask_lazycluster.config import setting\nsetting('n-workers')\n",
                     tmp_path, DASK_LAZYCLUSTER__N_WORKERS="-2")
    last = bad.stderr.strip().splitlines()[-1]
    assert last == ("ValueError: config lazycluster.n-workers (from environment variable "
                    "DASK_LAZYCLUSTER__N_WORKERS) must be an int >= 0, got -2"), bad.stderr


def test_first_import_writes_the_defaults_commented_out(tmp_path: Path) -> None:
    """configuration-file-copied: ~/.config/dask/lazycluster.yaml, commented, never overwritten."""
    done = run_python("import dask_lazycluster", tmp_path)
    assert done.returncode == 0, done.stderr
    written = tmp_path / ".config" / "dask" / "lazycluster.yaml"
    text = written.read_text()
    assert "n-workers" in text and "port-range" in text
    assert all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())
    assert yaml.safe_load(text) is None  # all commented out: nothing changes
    written.write_text("lazycluster:\n  n-workers: 5\n")
    again = run_python("import dask_lazycluster, dask\nprint(dask.config.get("
                       "'lazycluster.n-workers'))", tmp_path)
    assert again.stdout.strip() == "5" and written.read_text() == "lazycluster:\n  n-workers: 5\n"


def test_an_explicit_argument_beats_dask_config_set(group: RuntimeGroup) -> None:
    """configuration-precedence: an argument wins over the config; None counts as not given."""
    with dask.config.set({"lazycluster.n-workers": 2,
                          "lazycluster.worker-class": "distributed.Worker"}):
        with DaskCluster(group, n_workers=1) as cluster:
            assert len(cluster.worker_spec) == 1
        with DaskCluster(group, n_workers=None) as cluster:
            assert len(cluster.worker_spec) == 2


def test_daskcluster_from_the_config_builds_its_group_with_the_config_keys(
        hosts: TestHosts, group: RuntimeGroup, tmp_path: Path) -> None:
    """configuration-hosts-key: lazycluster.hosts with working-dir, connect-options and python
    make the group DaskCluster() owns and closes; a group passed in stays open."""
    wd = tmp_path / "wd"
    with dask.config.set({"lazycluster.hosts": hosts.names[:1], "lazycluster.working-dir": str(wd),
                          "lazycluster.python": sys.executable, "lazycluster.n-workers": 1,
                          "lazycluster.worker-class": "distributed.Worker"}):
        with DaskCluster() as cluster:
            runtime = cluster.runtime_group.runtimes[0]
            assert runtime.working_dir == str(wd) and runtime.python == sys.executable
        assert runtime.core.closed
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        with dask.config.set({"lazycluster.connect-options": {"known_hosts": str(empty)}}), \
                pytest.raises(InvalidRuntimeError, match="host key"):
            DaskCluster()
    with DaskCluster(group, n_workers=0):
        pass
    assert all(r.is_alive for r in group.runtimes)


def test_port_range_ports_per_worker_and_when_it_runs_out(netns: TestHosts,
                                                          group: RuntimeGroup) -> None:
    """configuration-port-range: tunnel mode takes two ports per nanny and one per Worker from
    the range; direct mode none; a range too small fails when asked, before anything starts."""
    first = 35900 if os.environ.get("DASK_LAZYCLUSTER__PORT_RANGE") else free_port()
    ports = list(range(first, first + 6))
    master = free_port()  # outside the range: 8786 may be taken, by another session even
    with dask.config.set({"lazycluster.port-range": [first, first + 5],
                          "lazycluster.master-port": master}):
        with DaskCluster(group, n_workers=3, tunnel=True) as cluster:  # 3 nannies: all 6 ports
            used = sorted(p for ps in cluster.worker_ports_per_host().values() for p in ps)
            assert len(used) == 3 and set(used) <= set(ports)  # the workers' (nannies' too)
            with pytest.raises(NoPortsLeftError):
                cluster.scale(4)
            assert len(cluster.worker_spec) == 3
        with pytest.raises(NoPortsLeftError):
            DaskCluster(group, n_workers=4, tunnel=True)
        with DaskCluster(group, n_workers=6, tunnel=True,
                         worker_class="distributed.Worker") as cluster:
            assert sorted(p for ps in cluster.worker_ports_per_host().values()
                          for p in ps) == ports
        with DaskCluster(group, n_workers=9, tunnel=False,
                         worker_class="distributed.Worker") as cluster, Client(cluster) as client:
            wait_workers(client, 9)
            # nine workers on a range of six: direct workers take ports outside it
            assert not {p for ps in cluster.worker_ports_per_host().values() for p in ps} & set(ports)
    assert wait_no_leftovers(netns) == {}


def test_scheduler_takes_the_first_free_port_of_the_range_when_8786_is_busy(
        group: RuntimeGroup) -> None:
    """configuration-scheduler-port: 8786 if free everywhere, else the range's first free port."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind (TIME_WAIT)

    def hold() -> bool:
        try:
            holder.bind(("127.0.0.1", 8786))
        except OSError:
            return False  # another session's scheduler has it now: try again
        holder.listen(1)
        return True

    try:
        if not wait_until(hold, timeout=60, interval=0.2):
            pytest.skip("port 8786 stayed taken by another process for a minute")
        first = free_port()
        with dask.config.set({"lazycluster.port-range": [first, first + 20]}), \
                DaskCluster(group, n_workers=0) as cluster:
            assert first <= cluster.master_port <= first + 20
    finally:
        holder.close()


def test_prologue_runs_as_a_task_and_its_failure_names_everything(
        hosts: TestHosts, group: RuntimeGroup, capsys: pytest.CaptureFixture[str]) -> None:
    """configuration-prologue: sh, in the working dir, with the runtime's env, output in the
    execution log; a failure names host, command, exit status and output."""
    group.set_env_variables({"LZ_PROLOGUE": "from-env"})
    try:
        with DaskCluster(group, n_workers=0,
                         prologue='echo "prologue-$LZ_PROLOGUE in $(pwd)"') as cluster:
            capsys.readouterr()
            cluster.print_log()
            printed = capsys.readouterr().out
            for runtime in group.runtimes:
                assert f"prologue-from-env in {runtime.working_dir}" in printed, printed
        with pytest.raises(TaskExecutionError) as info:
            DaskCluster(group, n_workers=0, prologue="echo lz-oops-output; exit 4")
        text = str(info.value)
        assert info.value.host in hosts.names and info.value.host in text
        assert "exit status 4" in text and "lz-oops-output" in text
        assert "echo lz-oops-output; exit 4" in text
    finally:
        group.set_env_variables({})
    assert wait_no_leftovers(hosts) == {}


def test_what_the_cluster_puts_in_the_worker_options(hosts: TestHosts, group: RuntimeGroup) -> None:
    """configuration-worker-options: death_timeout from the config, local_directory, names
    ``<host>-<n>``; options that are not JSON are refused."""
    with dask.config.set({"lazycluster.death-timeout": "47s"}), \
            DaskCluster(group, n_workers=3, worker_class="distributed.Worker") as cluster, \
            Client(cluster) as client:
        wait_workers(client, 3)
        facts = client.run(lambda dask_worker: (str(dask_worker.name), dask_worker.death_timeout))
        names = sorted(name for name, _ in facts.values())
        assert {t for _, t in facts.values()} == {47}
        assert [n.rsplit("-", 1)[0] for n in names] == sorted(hosts.names)
        assert all(n.rsplit("-", 1)[1].isdigit() for n in names)
    with pytest.raises((TypeError, ValueError), match="JSON|serializ"):
        DaskCluster(group, n_workers=1, worker_options={"plugins": {object()}})
    assert wait_no_leftovers(hosts) == {}


# -- README.md / index.md: the repository's commands and docs ------------------------------------


def test_ci_runs_lint_types_docs_then_tests_and_stops_at_the_first_failure(tmp_path: Path) -> None:
    """readme-ci: .ci/run's order, and it stops at (and names) the first failing step."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "scripts").mkdir()
    log = tmp_path / "calls"
    fake = tmp_path / "fake-python"  # logs its arguments; fails for the tool named FAIL_TOOL
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n[ "$2" = "$FAIL_TOOL" ] && exit 3\nexit 0\n')
    fake.chmod(0o755)
    (tmp_path / "scripts" / "setup.sh").write_text(f"PYTHON={fake}\n")
    (tmp_path / "scripts" / "test.sh").write_text(f'echo "tests" >> {log}\n')
    steps = ["-m ruff check .", "-m mypy dask_lazycluster tests benchmarks",
             "-m mkdocs build --strict", "tests"]
    for failing, ran in [("none", steps), ("mypy", steps[:2])]:
        log.write_text("")
        done = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "FAIL_TOOL": failing})
        assert log.read_text().splitlines() == ran, (log.read_text(), done.stderr)
        if failing == "none":
            assert done.returncode == 0, done.stderr
        else:
            assert done.returncode == 3
            assert "CI FAILED at step 'types (mypy dask_lazycluster tests benchmarks)'" in done.stderr


def test_the_docs_site_has_the_api_cli_and_config_references(tmp_path: Path) -> None:
    """readme-docs-site: API reference from docstrings, CLI from click, keys from the YAML."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                           str(site)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    api = (site / "api" / "dask_lazycluster.runtimes" / "index.html").read_text()
    assert "Construction validates the host" in api or "InvalidRuntimeError" in api
    from dask_lazycluster.runtimes import Runtime as Documented

    first_line = (Documented.__doc__ or "").strip().splitlines()[0]
    assert first_line and first_line.split()[0] in api
    cli = (site / "api" / "dask_lazycluster.cli" / "index.html").read_text()
    assert all(c in cli for c in ["list-runtimes", "add-runtime", "delete-runtime", "--adapt"])
    config = (site / "configuration" / "index.html").read_text()
    assert "worker-start-timeout" in config and "Seconds a worker may take" in config


def test_the_demo_runs_a_cluster_over_test_hosts_and_tears_down(hosts: TestHosts) -> None:
    """readme-demo: `python -m dask_lazycluster.demo`: hosts, cluster, computation, teardown."""
    done = subprocess.run([sys.executable, "-m", "dask_lazycluster.demo", "--hosts", "2"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if "HostsInUseError" in done.stderr:
        pytest.skip("another session runs the demo's hosts right now")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "2 SSH test hosts up" in out
    assert f"sum of squares 0..999 computed on the cluster: {sum(x * x for x in range(1000))}" in out
    assert "processes left on the hosts after close(): none" in out
    assert "test hosts torn down" in out


def test_harness_cli_spec_gives_a_host_a_stand_in_gpu(hosts: TestHosts) -> None:
    """quickstart-harness-spec: ``up N --spec I:gpus=1`` gives host I one listed GPU."""
    if hosts.mode != "netns":
        pytest.skip("--spec needs netns mode (run as root)")
    from dask_lazycluster.testing.hosts import clear_stale

    cli = [sys.executable, "-m", "dask_lazycluster.testing"]
    clear_stale("lzc1spec")
    up = subprocess.run([*cli, "up", "2", "--prefix", "lzc1spec", "--spec", "2:gpus=1"],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert up.returncode == 0, up.stderr
        config = up.stdout.split("ssh -F ", 1)[1].split()[0]

        def gpus(name: str) -> list[str]:
            done = subprocess.run(["ssh", "-F", config, "-o", "BatchMode=yes", name,
                                   "nvidia-smi -L 2>/dev/null || true"],
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            return done.stdout.splitlines()

        assert gpus("lzc1spec1") == []
        listed = gpus("lzc1spec2")
        assert len(listed) == 1 and listed[0].startswith("GPU 0"), listed
    finally:
        down = subprocess.run([*cli, "down", "--prefix", "lzc1spec"], capture_output=True,
                              text=True, timeout=120)
    assert down.returncode == 0, down.stderr


def test_a_lost_connection_is_logged_its_calls_raise_and_it_comes_back(
        hosts: TestHosts, make_hosts: Callable[..., TestHosts],
        caplog: pytest.LogCaptureFixture) -> None:
    """hosts-lost-detected, hosts-lost-calls-raise, hosts-lost-processes-end,
    hosts-connection-listener: what a runtime does while its link is down, and after."""
    if hosts.mode != "netns":
        pytest.skip("cutting a host's link needs netns mode (run as root)")
    from dask_lazycluster import LazyclusterError

    lost = make_hosts(1, "lzc1lost")
    name = lost.names[0]
    runtime = Runtime(name)
    events: list[bool] = []
    runtime.add_connection_listener(lambda host, alive: events.append(alive))
    try:
        runtime.execute_task(RuntimeTask("sleeper").run_command("sleep 300"))
        assert wait_until(lambda: any("sleep 300" in c for c in lost.leftover_processes()[name]),
                          timeout=30)
        with caplog.at_level("WARNING", logger="dask_lazycluster"):
            lost.set_link(name, False)
            assert wait_until(lambda: not runtime.is_alive, timeout=60)
            assert f"SSH connection to {name} lost" in caplog.text and "reconnecting" in caplog.text
            assert events == [False]
            with pytest.raises(LazyclusterError, match=rf"'{name}' is not usable: it dropped; "
                                                       "reconnecting in the background"):
                runtime.has_free_port(1234)
            # the host ends what ran over the lost connection (its lifeline went with it)
            assert wait_until(lambda: not any("sleep 300" in c for c in
                                              lost.leftover_processes()[name]), timeout=60)
            lost.set_link(name, True)
            assert wait_until(lambda: runtime.is_alive, timeout=60)
            assert f"SSH connection to {name} is back" in caplog.text
        assert events == [False, True]
        assert runtime.echo("again") == "again\n"
    finally:
        lost.set_link(name, True)
        runtime.cleanup()
    assert wait_no_leftovers(lost) == {}


# -- configuration.md: keys of lazycluster.yaml (the page includes the file) -----------------------


def test_scheduler_options_reach_the_scheduler(group: RuntimeGroup) -> None:
    """configuration-key-scheduler-options: keyword arguments for distributed.Scheduler."""
    with dask.config.set({"lazycluster.scheduler-options": {"allowed_failures": 7}}), \
            DaskCluster(group, n_workers=0) as cluster, Client(cluster) as client:
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 7


def test_a_multiprocessing_method_in_env_wins_over_worker_start_method(group: RuntimeGroup) -> None:
    """configuration-key-worker-start-method: DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD
    in env beats the (default) fork."""
    env = {"DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "spawn"}
    with DaskCluster(group, n_workers=1, env=env) as cluster, Client(cluster) as client:
        wait_workers(client, 1)
        cmdlines = client.run(lambda: " ".join(psutil.Process().cmdline()))
        assert all("spawn_main" in c for c in cmdlines.values()), cmdlines


def test_worker_start_timeout_bounds_a_worker_start(hosts: TestHosts, group: RuntimeGroup) -> None:
    """configuration-key-worker-start-timeout: a worker not registered in time is named."""
    from dask_lazycluster import LazyclusterError

    slow = {name: {"setup": ["sleep 20"]} for name in hosts.names}
    with dask.config.set({"lazycluster.worker-start-timeout": 3}), \
            pytest.raises(LazyclusterError, match="lazycluster.worker-start-timeout"):
        with DaskCluster(group, n_workers=1, host_options=slow,
                         worker_class="distributed.Worker") as cluster:
            cluster.wait_for_workers(1, timeout=60)
    assert wait_no_leftovers(hosts) == {}


def test_discovery_gives_each_host_five_seconds(hosts: TestHosts, tmp_path: Path) -> None:
    """hosts-runtime-manager: RuntimeManager probes with a short connect timeout (5 s)."""
    from dask_lazycluster import RuntimeManager

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        config = tmp_path / "config"
        config.write_text(f"Include {hosts.home / '.ssh' / 'config'}\n"
                          f"Host lzsilent\n    HostName 127.0.0.1\n"
                          f"    Port {silent.getsockname()[1]}\n")
        manager = RuntimeManager(ssh_config=str(config))
        try:
            assert "timed out after 5 s" in manager.inactive_reasons["lzsilent"]
            assert set(hosts.names) <= set(manager.hosts)
        finally:
            manager.cleanup()


def test_setup_lines_run_again_after_a_host_reconnects(
        hosts: TestHosts, make_hosts: Callable[..., TestHosts]) -> None:
    """configuration-key-setup: setup lines reach workers started after a host came back."""
    if hosts.mode != "netns":
        pytest.skip("cutting a host's link needs netns mode (run as root)")
    host = make_hosts(1, "lzc1setup")
    name = host.names[0]
    group = RuntimeGroup(hosts=[name])
    try:
        with DaskCluster(group, n_workers=0, worker_class="distributed.Worker",
                         host_options={name: {"setup": ["export LZ_SETUP=on"]}}) as cluster, \
                Client(cluster) as client:
            cluster.scale(1)
            wait_workers(client, 1)
            assert set(client.run(lambda: os.environ.get("LZ_SETUP")).values()) == {"on"}
            host.set_link(name, False)
            assert wait_until(lambda: not group.get_runtime(name).is_alive, 60)
            host.set_link(name, True)
            assert wait_until(lambda: group.get_runtime(name).is_alive, 60)
            cluster.scale(0)
            wait_workers(client, 0)
            cluster.scale(1)
            wait_workers(client, 1)
            assert set(client.run(lambda: os.environ.get("LZ_SETUP")).values()) == {"on"}
    finally:
        host.set_link(name, True)
        group.cleanup()
    assert wait_no_leftovers(host) == {}
