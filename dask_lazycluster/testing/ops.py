"""Per-host operations of a running set: run commands inside a host, inspect it, inject faults."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
from collections.abc import Collection
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import psutil

from dask_lazycluster.testing.specs import NVIDIA_SMI, HostSpec, mount_script
from dask_lazycluster.testing.system import (
    ENV,
    HarnessError,
    TestHost,
    find_bin,
    kill_all,
    locked_state,
    run_cmd,
)


class HostOps:
    """Operations on the hosts of a set; mixed into TestHosts, which fills these attributes."""

    __test__ = False  # not a pytest test class
    prefix: str
    tmpdir: Path | None
    hosts: list[TestHost]
    specs: dict[str, HostSpec]
    _cgroups: dict[str, list[str]]
    _procs: dict[str, subprocess.Popen[bytes]]
    _pids: dict[str, int]

    @property
    def names(self) -> list[str]:
        """Host aliases, in order."""
        return [h.name for h in self.hosts]

    def _host(self, name: str) -> TestHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise HarnessError(f"unknown test host {name!r} (have {self.names})")

    def _dir(self, name: str) -> Path:
        return Path(str(self.tmpdir)) / name

    def host_tmpdir(self, name: str) -> Path:
        """The temp dir of host name: ``TMPDIR`` of its SSH sessions and of run()/popen().

        Python's ``tempfile`` on the host uses it, so whatever a test leaves in a host's temp
        dir is found here, apart from other sets and other test sessions.

        Args:
            name: Host alias.

        Returns:
            The directory (it exists while the set is up).
        """
        self._host(name)
        return self._dir(name) / "tmp"

    def temp_entries(self, name: str) -> list[str]:
        """What is in the temp dir of host name (leak checks).

        Args:
            name: Host alias.

        Returns:
            Sorted paths of its entries (empty when the set is down).
        """
        try:
            return sorted(str(p) for p in self.host_tmpdir(name).iterdir())
        except FileNotFoundError:
            return []

    def sshd_log(self, name: str) -> str:
        """The log of host name's sshd (``LogLevel INFO``: logins, disconnects, with ports).

        Args:
            name: Host alias.

        Returns:
            Its text so far ('' before sshd wrote any).
        """
        self._host(name)
        try:
            return (self._dir(name) / "sshd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _wrap(self, name: str, argv: list[str]) -> list[str]:
        """Wrap argv to run inside host name: its netns, hostname, cgroups, mounts, TMPDIR."""
        h = self._host(name)
        # the variables every session gets from sshd's SetEnv, so run() sees the same host
        argv = [find_bin("env"), f"{ENV}={self._dir(name)}", f"TMPDIR={self.host_tmpdir(name)}",
                *argv]
        if h.netns is None:
            return argv
        spec = self.specs.get(name)
        if spec is None:
            return [find_bin("ip"), "netns", "exec", h.netns, find_bin("unshare"), "--uts", "sh",
                    "-c", 'hostname "$0" && exec "$@"', h.name, *argv]
        binds = {NVIDIA_SMI: str(self._dir(name) / "nvidia-smi")} if spec.gpus else {}
        # join the host's cgroups first, so the cgroup namespace is rooted at them
        join = "".join(f"echo $$ > {shlex.quote(p + '/cgroup.procs')} && "
                       for p in self._cgroups.get(name, []))
        cgroupns = ["--cgroup"] if spec.controllers else []
        return ["sh", "-c", join + 'exec "$@"', "lzjoin", find_bin("ip"), "netns", "exec",
                h.netns, find_bin("unshare"), "--uts", "--mount", "--propagation", "slave",
                *cgroupns, "sh", "-c", mount_script(spec, self._dir(name), binds), h.name, *argv]

    def _listener(self, name: str) -> psutil.Process | None:
        """The host's sshd listener process, if alive and really ours."""
        pid = self._pids.get(name)
        with contextlib.suppress(psutil.Error):
            if pid is not None:
                proc = psutil.Process(pid)
                if str(self.tmpdir) in " ".join(proc.cmdline()) and proc.status() != "zombie":
                    return proc
        return None

    def run(self, name: str, argv: list[str], timeout: float = 30) -> CompletedProcess[str]:
        """Run a command inside host name (its namespace, hostname, cgroups and mounts).

        Args:
            name: Host alias.
            argv: Command and arguments.
            timeout: Seconds before subprocess.TimeoutExpired.

        Returns:
            The completed process (text stdout/stderr captured; not checked).
        """
        return subprocess.run(self._wrap(name, argv), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def popen(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside host name without waiting (kwargs go to subprocess.Popen).

        Args:
            name: Host alias.
            argv: Command and arguments.
            **kwargs: Passed to subprocess.Popen.

        Returns:
            The Popen handle (the caller must terminate and wait for it).
        """
        return subprocess.Popen(self._wrap(name, argv), **kwargs)

    def _kill_local(self, name: str) -> None:
        """Kill a local-mode host's sshd and every process of its sessions."""
        listener = self._listener(name)
        kill_all(([listener] if listener else []) + self._local_procs(name))

    def _local_procs(self, name: str) -> list[psutil.Process]:
        """Local mode: descendants of the sshd plus processes carrying the host's session env."""
        listener, mark = self._listener(name), str(self._dir(name))
        procs = {p.pid: p for p in (listener.children(recursive=True) if listener else [])}
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.pid not in procs and p.environ().get(ENV) == mark:
                    procs[p.pid] = p
        return list(procs.values())

    def pids(self, name: str) -> list[int]:
        """Pids of processes living in host name, except its sshd listener.

        Netns mode: every process in the namespace. Local mode: descendants of the sshd and
        processes started by its sessions or by run()/popen() (found by an environment variable).

        Args:
            name: Host alias.

        Returns:
            Sorted pids.
        """
        h, listener = self._host(name), self._pids.get(name)
        if h.netns is None:
            pids = [p.pid for p in self._local_procs(name)]
        else:
            out = run_cmd("ip", "netns", "pids", h.netns, check=False).stdout
            pids = [int(p) for p in out.split()]
        return sorted(p for p in pids if p != listener)

    def leftover_processes(self, ignore_pids: Collection[int] = ()) -> dict[str, list[str]]:
        """Command lines of every process in each host other than its sshd listener.

        Args:
            ignore_pids: Processes to leave out (e.g. ones known to end by themselves).

        Returns:
            Host name -> list of command lines (empty lists when clean).
        """
        out: dict[str, list[str]] = {}
        for name in self.names:
            out[name] = []
            for pid in self.pids(name):
                if pid in ignore_pids:
                    continue
                with contextlib.suppress(psutil.Error):
                    out[name].append(" ".join(psutil.Process(pid).cmdline()) or f"[pid {pid}]")
        return out

    def listening_ports(self, name: str) -> set[int]:
        """TCP ports listening inside host name (IPv4 and IPv6).

        Args:
            name: Host alias.

        Returns:
            Set of port numbers (local mode: those of the sshd and the pids() processes).
        """
        h = self._host(name)
        if h.netns is None:
            listener, ports = self._listener(name), set()
            for p in ([listener] if listener else []) + self._local_procs(name):
                with contextlib.suppress(psutil.Error):
                    ports |= {c.laddr.port for c in p.net_connections("tcp")
                              if c.status == psutil.CONN_LISTEN}
            return ports
        text = run_cmd("ip", "netns", "exec", h.netns, "cat", "/proc/net/tcp",
                       "/proc/net/tcp6").stdout
        rows = [line.split() for line in text.splitlines()]
        return {int(f[1].rsplit(":", 1)[1], 16) for f in rows if len(f) > 3 and f[3] == "0A"}

    def set_link(self, name: str, up: bool) -> None:
        """Bring the host's network link (bridge side of its veth) down or up.

        Args:
            name: Host alias.
            up: True for up, False for down.

        Raises:
            HarnessError: In local mode (no links to cut).
        """
        h = self._host(name)
        if h.netns is None:
            raise HarnessError("set_link needs netns mode")
        run_cmd("ip", "link", "set", f"{h.netns}b", "up" if up else "down")

    def kill_sshd(self, name: str) -> None:
        """SIGKILL the host's sshd listener (open SSH sessions survive, like a crashed daemon).

        Args:
            name: Host alias.
        """
        proc = self._listener(name)
        if proc is not None:
            proc.kill()
            with contextlib.suppress(psutil.Error):
                proc.wait(5)
        if name in self._procs:
            self._procs.pop(name).wait(5)

    def start_sshd(self, name: str) -> None:
        """Start the host's sshd (same host key and config) detached from this process.

        Args:
            name: Host alias.

        Raises:
            HarnessError: sshd is already running.
        """
        if self._listener(name) is not None:
            raise HarnessError(f"sshd of {name} is already running")
        d = self._dir(name)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(d / "sshd.out", "ab") as out:
            p = subprocess.Popen(self._wrap(name, [find_bin("sshd"), "-D", "-E",
                                                   str(d / "sshd.log"), "-f",
                                                   str(d / "sshd_config")]),
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self._procs[name], self._pids[name] = p, p.pid
        with locked_state() as state:  # keep `down` from another process working after restarts
            if state.get(self.prefix, {}).get("tmpdir") == str(self.tmpdir):
                state[self.prefix]["sshd_pids"] = self._pids
