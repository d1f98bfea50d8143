"""Config the dask-jobqueue way, as a user has it: ~/.config/dask/lazycluster.yaml, then
DASK_LAZYCLUSTER__* variables, then explicit arguments. Each case runs in a fresh process
(Dask reads config files at import), with HOME holding the test hosts' ~/.ssh too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import dask
import pytest

from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers

pytestmark = pytest.mark.usefixtures("leak_check")

REPO = Path(__file__).resolve().parents[1]

COUNT_WORKERS = (
    "from dask_lazycluster import DaskCluster\n"
    "import sys\n"
    "kwargs = eval(sys.argv[1]) if len(sys.argv) > 1 else {}\n"
    "with DaskCluster(**kwargs) as cluster:\n"
    "    hosts = sorted(cluster.runtime_of(n).host for n in cluster.worker_spec)\n"
    "    print('workers', len(cluster.workers), hosts)\n"
)


def user_home(tmp_path: Path, hosts: TestHosts, config: str) -> Path:
    home = tmp_path / "home"
    (home / ".config" / "dask").mkdir(parents=True)
    (home / ".ssh").symlink_to(hosts.home / ".ssh")
    (home / ".config" / "dask" / "lazycluster.yaml").write_text(config)
    return home


def run(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "HOME": str(home), **(env or {})}
    environ["PYTHONPATH"] = str(REPO)
    environ.pop("DASK_CONFIG", None)
    return subprocess.run([sys.executable, "-c", COUNT_WORKERS, *args], env=environ,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def home(tmp_path: Path, hosts: TestHosts) -> Path:
    return user_home(tmp_path, hosts, (
        "lazycluster:\n"
        f"  hosts: [{hosts.names[0]}, {hosts.names[1]}]\n"
        "  n-workers: 1\n"
        "  worker-class: distributed.Worker\n"
    ))


def test_config_file_alone_builds_the_cluster(hosts: TestHosts, home: Path) -> None:
    done = run(home)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"workers 1 ['{hosts.names[0]}']" in done.stdout


def test_environment_beats_the_file_and_arguments_beat_both(hosts: TestHosts,
                                                            home: Path) -> None:
    done = run(home, env={"DASK_LAZYCLUSTER__N_WORKERS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"workers 2 ['{hosts.names[0]}', '{hosts.names[1]}']" in done.stdout
    done = run(home, "{'n_workers': 0}", env={"DASK_LAZYCLUSTER__N_WORKERS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "workers 0 []" in done.stdout
    assert wait_no_leftovers(hosts) == {}


def test_wrong_type_in_the_file_names_key_and_file(tmp_path: Path, hosts: TestHosts) -> None:
    home = user_home(tmp_path, hosts, (
        "lazycluster:\n"
        f"  hosts: [{hosts.names[0]}]\n"
        "  n-workers: three\n"
    ))
    done = run(home)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "TypeError" in last and "lazycluster.n-workers" in last
    assert str(home / ".config" / "dask" / "lazycluster.yaml") in last


def test_dask_lazycluster_up_from_config_only(hosts: TestHosts, home: Path) -> None:
    environ = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "dask_lazycluster.cli", "up"], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("Scheduler: "), first + (proc.stderr.read() if proc.stderr else "")
        from distributed import Client

        with Client(first.split()[1], timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            assert client.submit(lambda: 5).result() == 5
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0
    assert wait_no_leftovers(hosts) == {}


def test_every_default_key_has_a_rule_that_its_default_passes() -> None:
    import yaml

    from dask_lazycluster import config

    with open(config._DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)["lazycluster"]
    # Every rule is a key of the file, except max-workers, which only a host can set.
    assert set(defaults) == set(config.RULES) - {"max-workers"}
    for key in defaults:
        with dask.config.set({f"lazycluster.{key}": defaults[key]}):
            assert config.setting(key) == defaults[key]
    with pytest.raises(KeyError, match="lazycluster.no-such-key"):
        config.setting("no-such-key")


@pytest.mark.parametrize("key, bad, error", [
    ("python", 3, TypeError), ("working-dir", "", ValueError), ("master-port", 0, ValueError),
    ("port-range", [2, 1], ValueError), ("connect-options", [], TypeError),
])
def test_a_bad_value_fails_alike_as_argument_and_as_config(key: str, bad: object,
                                                           error: type[Exception]) -> None:
    from dask_lazycluster.config import setting

    with pytest.raises(error, match=key.replace("-", "_")):
        setting(key, bad)
    with dask.config.set({f"lazycluster.{key}": bad}), pytest.raises(
            error, match=f"config lazycluster.{key}"):
        setting(key)
