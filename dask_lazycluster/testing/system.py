"""Shared ground of the SSH test-host harness: errors, the host record, binaries, state, killing.

Only the standard library and psutil are used, so the harness can be imported on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import psutil

MARK = "dask-lazycluster-testhosts"
ENV = "LAZYCLUSTER_TESTHOST"  # set in every session: tracks local-mode processes
PACKAGES = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
            "ip": "iproute2", "nft": "nftables", "unshare": "util-linux", "env": "coreutils",
            "mount": "mount"}
SYSTEM_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"


class HarnessError(RuntimeError):
    """Raised when test hosts cannot be started, reached or torn down."""


class HostsInUseError(HarnessError):
    """Raised when the prefix, namespaces or addresses are taken by another (live) set."""


@dataclass
class TestHost:
    """One SSH test host.

    Attributes:
        name: SSH alias, e.g. ``lzhost1``; also the host's own hostname in netns mode.
        address: IP address sshd listens on, e.g. ``10.231.0.11``.
        port: TCP port sshd listens on (22 in netns mode).
        netns: Network namespace name in netns mode, else None.
        jump: Alias of the bastion this host is reachable through (``ProxyJump``), else None.
    """

    __test__ = False  # not a pytest test class
    name: str
    address: str
    port: int
    netns: str | None
    jump: str | None = None


def state_dir() -> Path:
    """Return the directory holding ``state.json`` (env ``LAZYCLUSTER_TESTHOSTS_DIR`` overrides).

    Returns:
        The state directory (not necessarily existing yet).
    """
    env = os.environ.get("LAZYCLUSTER_TESTHOSTS_DIR")
    suffix = "" if os.geteuid() == 0 else f"-{os.geteuid()}"
    return Path(env) if env else Path(f"/tmp/dask-lazycluster-testhosts{suffix}")


@contextlib.contextmanager
def locked_state() -> Iterator[dict[str, Any]]:
    """Yield the state dict (prefix -> instance record) under a file lock; saved on clean exit.

    Yields:
        The mutable state mapping.
    """
    d = state_dir()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(d / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = d / "state.json"
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        yield data
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)


def read_state() -> dict[str, Any]:
    """Read the state file.

    Returns:
        Mapping of instance prefix to its record (mode, hosts, sshd pids, temp dir, ...).
    """
    with locked_state() as data:
        return dict(data)


def find_bin(name: str) -> str:
    """Return the full path of a required binary.

    Args:
        name: Binary name, e.g. ``sshd``.

    Returns:
        Its absolute path.

    Raises:
        HarnessError: Not installed; the message names the Debian package to install.
    """
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":" + SYSTEM_PATH)
    if path is None:
        pkg = PACKAGES.get(name, name)
        raise HarnessError(f"`{name}` not found: install the Debian package {pkg} "
                           f"(apt-get install -y {pkg})")
    return path


def run_cmd(*argv: str, check: bool = True, stdin: str | None = None) -> CompletedProcess[str]:
    """Run a harness command (argv[0] resolved with find_bin).

    Args:
        *argv: Command and arguments.
        check: Raise on a non-zero exit status.
        stdin: Text fed to the command's stdin.

    Returns:
        The completed process (text output captured).

    Raises:
        HarnessError: The command failed and check is set.
    """
    p = subprocess.run([find_bin(argv[0]), *argv[1:]], capture_output=True, text=True,
                       input=stdin, timeout=60)
    if check and p.returncode:
        raise HarnessError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def is_secure(path: Path) -> bool:
    """Whether every component of path passes sshd's StrictModes ownership/mode checks.

    Args:
        path: An existing path.

    Returns:
        True when no component is group/other writable or owned by another user.
    """
    for p in (path, *path.parents):
        st = p.stat()
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return False
    return True


def kill_all(procs: list[psutil.Process], timeout: float = 5) -> None:
    """SIGKILL procs and wait until each is gone or a zombie (PID 1 may reap late).

    Args:
        procs: Processes to kill.
        timeout: Seconds to wait for all of them.
    """
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                with contextlib.suppress(psutil.TimeoutExpired):
                    proc.wait(0.02)


def login_pyenv_root() -> Path:
    """The pyenv root a login on the test hosts uses: ``~/.pyenv`` of the real user's home.

    ``HOME`` may point at the fake home (the ``ssh_home`` fixture), so the password database
    decides, as it does for sshd.

    Returns:
        The path (it may not exist).
    """
    return Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".pyenv"


def pyenv_lock(root: Path | None = None) -> Path:
    """The lock file ``pyenv rehash`` holds while it runs.

    Args:
        root: pyenv root (default: login_pyenv_root()).

    Returns:
        ``<root>/shims/.pyenv-shim``.
    """
    return (root or login_pyenv_root()) / "shims" / ".pyenv-shim"


STALE_LOCK_AGE = 30.0  # seconds; a rehash takes well under one here


def _started_at(pid: int) -> float:
    """Wall-clock start time of a process, to ~10 ms (psutil's rounds boot time to 1 s)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _possible_holders(root: Path, written: float) -> list[int]:
    """Pids of ``pyenv-rehash`` runs for root that started before the lock was written.

    A run that started later is waiting for the lock, so cannot be the one holding it.
    """
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, OSError, IndexError, ValueError):
            if any("pyenv-rehash" in word for word in proc.info["cmdline"] or ()):
                env_root = proc.environ().get("PYENV_ROOT")
                if (env_root is None or Path(env_root) == root) and (
                        _started_at(proc.pid) <= written + 0.1):
                    pids.append(proc.pid)
    return pids


def remove_stale_pyenv_lock(root: Path | None = None) -> bool:
    """Remove pyenv's rehash lock when no rehash holds it (a login shell was killed mid-rehash).

    Root's ``~/.bashrc`` runs ``pyenv init``, whose ``pyenv rehash`` takes this lock; left behind
    by a killed shell, it makes every later login wait ``PYENV_REHASH_TIMEOUT`` (60 s). The lock
    is stale when no rehash of this root that started before the lock was written still runs
    (later ones only wait for it), or when it is older than any rehash takes (STALE_LOCK_AGE).

    Args:
        root: pyenv root (default: login_pyenv_root()).

    Returns:
        True when a stale lock was removed.
    """
    root = root or login_pyenv_root()
    lock = pyenv_lock(root)
    try:
        before = lock.stat()
    except FileNotFoundError:
        return False
    if time.time() - before.st_mtime < STALE_LOCK_AGE and _possible_holders(root,
                                                                             before.st_mtime):
        return False
    with contextlib.suppress(FileNotFoundError):
        now = lock.stat()
        # the same file as before the process scan: no rehash took the lock in between
        if (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns):
            lock.unlink()
            return True
    return False
