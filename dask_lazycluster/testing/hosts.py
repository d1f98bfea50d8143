"""Real SSH test hosts: N OpenSSH ``sshd`` servers for tests, demos and benchmarks.

Mode ``netns`` (root): one network namespace per host, joined by veth pairs to the bridge
``lzbr0`` (10.231.0.1/24, the manager's address as the hosts see it), with its own hostname (a UTS
namespace per process tree), no default route and optionally an nftables firewall that lets in
only port 22. Mode ``local`` (unprivileged): sshd processes on 127.0.0.x with high ports, no own
hostnames, no firewall, no link control.

Only the standard library and psutil are used, so this module can be imported on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import psutil

BRIDGE = "lzbr0"
SUBNET = "10.231.0"
ENV = "LAZYCLUSTER_TESTHOST"  # set in every session: tracks local-mode processes
MAC = "02:1a:0a:e7:00"  # locally administered; last byte = last address octet
MARK = "dask-lazycluster-testhosts"
_PACKAGES = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
             "ip": "iproute2", "nft": "nftables", "unshare": "util-linux", "env": "coreutils"}
_FIREWALL = """table inet lazycluster {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
    meta l4proto { icmp, ipv6-icmp } accept
    tcp dport 22 accept
  }
}
"""


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
    """

    __test__ = False  # not a pytest test class
    name: str
    address: str
    port: int
    netns: str | None


def state_dir() -> Path:
    """Return the directory holding ``state.json`` (env ``LAZYCLUSTER_TESTHOSTS_DIR`` overrides).

    Returns:
        The state directory (not necessarily existing yet).
    """
    env = os.environ.get("LAZYCLUSTER_TESTHOSTS_DIR")
    suffix = "" if os.geteuid() == 0 else f"-{os.geteuid()}"
    return Path(env) if env else Path(f"/tmp/dask-lazycluster-testhosts{suffix}")


@contextlib.contextmanager
def _locked_state() -> Iterator[dict[str, Any]]:
    """Yield the state dict (prefix -> instance record) under a file lock; saved on clean exit."""
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
    with _locked_state() as data:
        return dict(data)


def _bin(name: str) -> str:
    """Return the full path of a required binary or raise HarnessError naming its package."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        pkg = _PACKAGES.get(name, name)
        raise HarnessError(f"`{name}` not found: install the Debian package {pkg} "
                           f"(apt-get install -y {pkg})")
    return path


def _cmd(*argv: str, check: bool = True, stdin: str | None = None) -> CompletedProcess[str]:
    """Run a harness command (argv[0] resolved with _bin) and return its result."""
    p = subprocess.run([_bin(argv[0]), *argv[1:]], capture_output=True, text=True, input=stdin,
                       timeout=60)
    if check and p.returncode:
        raise HarnessError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _secure(path: Path) -> bool:
    """Whether every component of path passes sshd's StrictModes ownership/mode checks."""
    for p in (path, *path.parents):
        st = p.stat()
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return False
    return True


def _namespaces(prefix_re: str) -> list[str]:
    """Existing network namespaces named (regex) prefix_re + digits."""
    if os.geteuid() != 0 or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
        return []
    out = _cmd("ip", "netns", "list", check=False).stdout.split()
    return [ns for ns in out if re.fullmatch(rf"{prefix_re}\d+", ns)]


def _kill_all(procs: list[psutil.Process], timeout: float = 5) -> None:
    """SIGKILL procs and wait until each is gone or a zombie (PID 1 may reap late)."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                with contextlib.suppress(psutil.TimeoutExpired):
                    proc.wait(0.02)


def _kill_netns(ns: str) -> None:
    """Kill every process in namespace ns (repeatedly, until none is left) and delete it."""
    for _ in range(20):
        pids = [int(p) for p in _cmd("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        _kill_all(procs)
    _cmd("ip", "link", "del", f"{ns}b", check=False)  # synchronous, unlike the netns' cleanup
    _cmd("ip", "netns", "del", ns, check=False)


def _drop_bridge_if_unused() -> None:
    """Delete the bridge when no veth is attached to it any more (under the state lock)."""
    if os.geteuid() != 0 or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
        return
    with _locked_state():
        if _cmd("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            if not _cmd("ip", "-o", "link", "show", "master", BRIDGE, check=False).stdout.strip():
                _cmd("ip", "link", "del", BRIDGE, check=False)


def _default_netns_prefix(prefix: str) -> str:
    """Namespace prefix for a host prefix: ``lzh`` for ``lzhost``, else the prefix itself."""
    return "lzh" if prefix == "lzhost" else prefix


def _is_live(info: dict[str, Any]) -> bool:
    """Whether a recorded instance is in use: its owner lives, or (CLI-started) an sshd lives."""
    owner = info.get("owner_pid")
    if owner is not None:
        return bool(psutil.pid_exists(owner))
    for pid in info.get("sshd_pids", {}).values():
        with contextlib.suppress(psutil.Error):
            if info["tmpdir"] in " ".join(psutil.Process(pid).cmdline()):
                return True
    return False


def clear_stale(prefix: str, netns_prefix: str | None = None) -> None:
    """Tear down leftovers of an earlier run with this prefix (crashed test session, killed CLI).

    Args:
        prefix: Host name prefix of the instance, e.g. ``lzhost``.
        netns_prefix: Namespace prefix (default: ``lzh`` for ``lzhost``, else prefix).

    Raises:
        HostsInUseError: The instance is still in use (its owner or its sshd processes live).
    """
    info = read_state().get(prefix)
    if info is not None:
        if _is_live(info):
            raise HostsInUseError(f"test hosts {prefix!r} are in use (state in {state_dir()}); run "
                               "`python -m dask_lazycluster.testing down` first")
        TestHosts.from_state(prefix).down()
    with _locked_state() as state:  # namespaces of live sets are always recorded under this lock
        if prefix in state:
            raise HostsInUseError(f"test hosts {prefix!r} were just started by another process")
        for ns in _namespaces(re.escape(netns_prefix or _default_netns_prefix(prefix))):
            _kill_netns(ns)
    _drop_bridge_if_unused()


class TestHosts:
    """A set of N real SSH hosts; use as a context manager or call up()/down().

    Args:
        n: Number of hosts.
        firewall: Allow only inbound TCP port 22 on each host (nftables; netns mode only).
        mode: ``netns`` (needs root), ``local`` or ``auto`` (netns when root).
        prefix: Host name prefix; hosts are named prefix + 1..n.
        home: Existing fake home to add this set's entries to (shared with another set);
            by default a new one is created in the temp dir.
        first_host: Host i (from 1) gets address octet first_host + i (10 -> 10.231.0.11);
            None picks the lowest free multiple of 10 (from 10) when up() runs.
        netns_prefix: Namespace name prefix (default: ``lzh`` for ``lzhost``, else prefix).
        max_sessions: sshd's ``MaxSessions`` (sessions per connection). High by default so
            tests never meet it; OpenSSH's own default is 10.

    Raises:
        ValueError: Invalid arguments.
        HarnessError: firewall requested outside netns mode.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, n: int = 3, firewall: bool = False, mode: str = "auto",
                 prefix: str = "lzhost", *, home: Path | None = None, first_host: int | None = None,
                 netns_prefix: str | None = None, max_sessions: int = 1000) -> None:
        if mode == "auto":
            mode = "netns" if os.geteuid() == 0 else "local"
        if mode not in ("netns", "local"):
            raise ValueError(f"mode must be auto, netns or local, not {mode!r}")
        if not re.fullmatch(r"[a-z][a-z0-9]*[a-z]", prefix):
            raise ValueError(f"prefix: lowercase letters/digits ending in a letter, not {prefix!r}")
        if n < 1 or n > 244 or (first_host is not None and not 0 <= first_host <= 254 - n):
            raise ValueError("need n >= 1, first_host >= 0 and first_host + n <= 254")
        if firewall and mode != "netns":
            raise HarnessError("firewall=True needs netns mode (run as root)")
        self.n, self.firewall, self.mode, self.prefix = n, firewall, mode, prefix
        self.first_host = first_host
        self.max_sessions = max_sessions
        self.netns_prefix = netns_prefix or _default_netns_prefix(prefix)
        if len(self.netns_prefix) + len(str(n)) + 1 > 15:
            raise ValueError("netns_prefix too long for interface names")
        self.manager_address = f"{SUBNET}.1" if mode == "netns" else "127.0.0.1"
        self._owns_home = home is None
        self.home: Path = Path(home) if home is not None else Path()
        self.tmpdir: Path | None = None
        self.hosts: list[TestHost] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pids: dict[str, int] = {}
        self._detached = False

    # -- paths -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Host aliases, in order."""
        return [h.name for h in self.hosts]

    @property
    def ssh_config(self) -> Path:
        """The fake home's ``.ssh/config`` (Host entries for every host)."""
        return self.home / ".ssh" / "config"

    @property
    def known_hosts(self) -> Path:
        """The fake home's ``.ssh/known_hosts`` (real host keys of every host)."""
        return self.home / ".ssh" / "known_hosts"

    @property
    def client_key(self) -> Path:
        """The client private key (ed25519, no passphrase)."""
        return self.home / ".ssh" / "id_ed25519"

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncssh.connect`` that reach these hosts by name.

        Returns:
            ``{"config": [...], "known_hosts": ..., "client_keys": [...]}``.
        """
        return {"config": [str(self.ssh_config)], "known_hosts": str(self.known_hosts),
                "client_keys": [str(self.client_key)]}

    def ssh_argv(self, name: str, *command: str) -> list[str]:
        """Return an ``ssh`` command line running command on host name (batch mode).

        Args:
            name: Host alias.
            *command: Remote command words.

        Returns:
            The argv list.
        """
        return [_bin("ssh"), "-F", str(self.ssh_config), "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=5", name, *command]

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self, *, detached: bool = False, timeout: float = 20) -> TestHosts:
        """Start every host and wait until each accepts a real SSH login.

        Args:
            detached: Started by the CLI: the hosts outlive this process.
            timeout: Seconds to wait for all logins.

        Returns:
            self.

        Raises:
            HarnessError: Missing binaries, a stale run, or a host that does not come up.
        """
        netns = ("ip", "unshare") if self.mode == "netns" else ()
        for tool in ("sshd", "ssh", "ssh-keygen", *netns, *(("nft",) if self.firewall else ())):
            _bin(tool)
        self._detached = detached
        try:
            with _locked_state() as state:
                self._check_free(state)
                self._make_files()
                if self.mode == "netns":
                    self._make_network()
                state[self.prefix] = self._record()
            for h in self.hosts:
                self.start_sshd(h.name)
            self._wait_ready(timeout)
            with _locked_state() as state:
                state[self.prefix] = self._record()
        except BaseException:
            self.down()
            raise
        return self

    def _check_free(self, state: dict[str, Any]) -> None:
        """Refuse to start over a recorded or stale instance or overlapping addresses/names."""
        hint = "run `python -m dask_lazycluster.testing down` first"
        if self.prefix in state or _namespaces(re.escape(self.netns_prefix)):
            raise HostsInUseError(f"test hosts {self.prefix!r} exist already (see `status`): {hint}"
                                  " or use another prefix")
        taken: set[int] = set()
        for other in state.values():
            if other["netns_prefix"] == self.netns_prefix and self.mode == "netns":
                raise HostsInUseError(f"{other['prefix']!r} uses namespaces {self.netns_prefix}*")
            if other["mode"] == self.mode:
                taken |= {int(h["address"].rsplit(".", 1)[1]) for h in other["hosts"]}
        bases = range(10, 255 - self.n, 10) if self.first_host is None else [self.first_host]
        for base in bases:
            if not taken & set(range(base + 1, base + self.n + 1)):
                self.first_host = base
                return
        raise HostsInUseError(f"addresses for {self.prefix!r} are taken by other sets: {hint}")

    def _make_files(self) -> None:
        """Create temp dir, keys, sshd configs, and the fake home's ssh config/known_hosts."""
        parent = state_dir()
        if os.geteuid() == 0 and not _secure(parent):
            parent = Path("/run/dask-lazycluster-testhosts")  # /tmp fails sshd's StrictModes
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmpdir = tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir=parent))
        if self._owns_home:
            self.home = tmp / "home"
            self.home.mkdir(mode=0o700)
        (self.home / ".ssh").mkdir(mode=0o700, parents=True, exist_ok=True)
        local = self.mode == "local"
        keygen = [] if self.client_key.exists() else [self.client_key]
        for i in range(self.n):
            name, last = f"{self.prefix}{i + 1}", (self.first_host or 0) + i + 1
            port = _free_port(f"127.0.0.{last}") if local else 22
            self.hosts.append(TestHost(name, f"127.0.0.{last}" if local else f"{SUBNET}.{last}",
                                       port, None if local else f"{self.netns_prefix}{i + 1}"))
            (tmp / name).mkdir(mode=0o700)
            keygen.append(tmp / name / "ssh_host_ed25519_key")
        procs = [subprocess.Popen([_bin("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", MARK,
                                   "-f", str(k)], stdout=subprocess.DEVNULL) for k in keygen]
        if any(p.wait() for p in procs):
            raise HarnessError("ssh-keygen failed")
        (tmp / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        (tmp / "authorized_keys").chmod(0o600)
        strict = "yes" if _secure(tmp) else "no"
        config, known = [], []
        for h in self.hosts:
            d = tmp / h.name
            (d / "sshd_config").write_text(
                f"Port {h.port}\nListenAddress {h.address}\nHostKey {d}/ssh_host_ed25519_key\n"
                f"PidFile {d}/sshd.pid\nAuthorizedKeysFile {tmp}/authorized_keys\n"
                f"StrictModes {strict}\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                "PubkeyAuthentication yes\nAllowTcpForwarding yes\n"
                f"MaxSessions {self.max_sessions}\n"
                "MaxStartups 200\nClientAliveInterval 5\nClientAliveCountMax 3\nLogLevel INFO\n"
                f"PrintMotd no\nSubsystem sftp internal-sftp\nSetEnv {ENV}={d}\n")
            user = "root" if not local else psutil.Process().username()
            config.append(f"Host {h.name}\n    HostName {h.address}\n    Port {h.port}\n"
                          f"    User {user}\n    IdentityFile {self.client_key}\n"
                          f"    UserKnownHostsFile {self.known_hosts}\n    IdentitiesOnly yes\n"
                          "    StrictHostKeyChecking yes\n")
            key = " ".join((d / "ssh_host_ed25519_key.pub").read_text().split()[:2])
            names = f"{h.name},{h.address}"
            if h.port != 22:
                names = f"[{h.name}]:{h.port},[{h.address}]:{h.port}"
            known.append(f"{names} {key}\n")
        for path, lines in ((self.ssh_config, config), (self.known_hosts, known)):
            with open(path, "a") as f:
                f.write(f"# BEGIN {MARK} {self.prefix}\n{''.join(lines)}")
                f.write(f"# END {MARK} {self.prefix}\n")
            path.chmod(0o600)

    def _make_network(self) -> None:
        """Create the bridge (if needed), one namespace + veth per host, and the firewall."""
        if _cmd("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            # fixed MACs (bridge and hosts): addresses are reused by later sets, and a stale
            # neighbour entry for a random MAC would stall connections for many seconds
            _cmd("ip", "link", "add", BRIDGE, "address", f"{MAC}:01", "type", "bridge")
            _cmd("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
            _cmd("ip", "link", "set", BRIDGE, "up")
        _cmd("ip", "link", "set", BRIDGE, "address", f"{MAC}:01")  # a no-op unless set elsewhere
        for f in Path("/proc/sys/net/bridge").glob("bridge-nf-call-*"):
            if f.read_text().strip() != "0":  # br_netfilter: keep host firewalls off the bridge
                f.write_text("0")
        for h in self.hosts:
            ns = str(h.netns)
            _cmd("ip", "netns", "add", ns)
            mac = f"{MAC}:{int(h.address.rsplit('.', 1)[1]):02x}"
            _cmd("ip", "link", "add", f"{ns}b", "type", "veth", "peer", "name", "eth0",
                 "address", mac, "netns", ns)
            _cmd("ip", "link", "set", f"{ns}b", "master", BRIDGE, "up")
            _cmd("ip", "neigh", "flush", "to", h.address, "dev", BRIDGE, check=False)
            _cmd("ip", "-n", ns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _cmd("ip", "-n", ns, "link", "set", "eth0", "up")
            _cmd("ip", "-n", ns, "link", "set", "lo", "up")
            if self.firewall:
                _cmd("ip", "netns", "exec", ns, _bin("nft"), "-f", "-", stdin=_FIREWALL)

    def _record(self) -> dict[str, Any]:
        """This instance as a JSON-able state record."""
        return {"prefix": self.prefix, "mode": self.mode, "firewall": self.firewall,
                "netns_prefix": self.netns_prefix, "first_host": self.first_host,
                "tmpdir": str(self.tmpdir), "home": str(self.home), "owns_home": self._owns_home,
                "owner_pid": None if self._detached else os.getpid(),
                "ssh_config": str(self.ssh_config), "hosts": [asdict(h) for h in self.hosts],
                "sshd_pids": self._pids}

    def _wait_ready(self, timeout: float) -> None:
        """Poll ``ssh NAME true`` for all hosts in parallel until each login succeeds."""
        deadline, pending, errors = time.monotonic() + timeout, set(self.names), {}
        while pending:
            probes = {n: subprocess.Popen(self.ssh_argv(n, "true"), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                      for n in pending}
            for n, p in probes.items():
                _, err = p.communicate()
                errors[n] = err.decode(errors="replace").strip()
                if p.returncode == 0:
                    pending.discard(n)
                elif self._procs[n].poll() is not None:
                    log = (self._dir(n) / "sshd.log").read_text(errors="replace")[-2000:]
                    raise HarnessError(f"sshd of {n} exited ({self._procs[n].returncode}): {log}")
            if pending and time.monotonic() > deadline:
                raise HarnessError(f"no SSH login within {timeout}s: "
                                   + "; ".join(f"{n}: {errors[n]}" for n in sorted(pending)))
            if pending:
                time.sleep(0.05)

    def down(self) -> None:
        """Kill every process of every host, delete namespaces/veths/bridge, remove files.

        Idempotent; also works on an instance re-attached with from_state().
        """
        for h in self.hosts:
            if h.netns is not None:
                _kill_netns(h.netns)
            else:
                self._kill_local(h.name)
        for p in self._procs.values():
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(5)
        self._procs.clear()
        if self.mode == "netns":
            _drop_bridge_if_unused()
        if not self._owns_home and self.tmpdir is not None:  # only entries this set wrote
            for path in (self.ssh_config, self.known_hosts):
                with contextlib.suppress(FileNotFoundError):
                    text = re.sub(rf"# BEGIN {MARK} {self.prefix}\n.*?# END {MARK} {self.prefix}\n",
                                  "", path.read_text(), flags=re.S)
                    path.write_text(text)
        if self.tmpdir is None:
            return
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        with _locked_state() as state:
            if state.get(self.prefix, {}).get("tmpdir") == str(self.tmpdir):
                del state[self.prefix]

    def _kill_local(self, name: str) -> None:
        """Kill a local-mode host's sshd and every process of its sessions."""
        listener = self._listener(name)
        _kill_all(([listener] if listener else []) + self._local_procs(name))

    def _local_procs(self, name: str) -> list[psutil.Process]:
        """Local mode: descendants of the sshd plus processes carrying the host's session env."""
        listener, mark = self._listener(name), str(self._dir(name))
        procs = {p.pid: p for p in (listener.children(recursive=True) if listener else [])}
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.pid not in procs and p.environ().get(ENV) == mark:
                    procs[p.pid] = p
        return list(procs.values())

    def __enter__(self) -> TestHosts:
        """Start the hosts (unless already up) and return self."""
        return self if self._pids else self.up()

    def __exit__(self, *exc: object) -> None:
        """Tear everything down."""
        self.down()

    @classmethod
    def from_state(cls, prefix: str = "lzhost") -> TestHosts:
        """Re-attach to hosts started by another process (e.g. the CLI's ``up``).

        Args:
            prefix: Prefix of the recorded instance.

        Returns:
            A TestHosts whose down()/run()/pids() act on the running hosts.

        Raises:
            HarnessError: No such instance in the state file.
        """
        info = read_state().get(prefix)
        if info is None:
            raise HarnessError(f"no test hosts {prefix!r} recorded in {state_dir() / 'state.json'}")
        self = cls(len(info["hosts"]) or 1, info["firewall"], info["mode"], prefix,
                   home=Path(info["home"]), first_host=info["first_host"],
                   netns_prefix=info["netns_prefix"])
        self._owns_home, self._detached = info["owns_home"], info["owner_pid"] is None
        self.tmpdir = Path(info["tmpdir"])
        self.hosts = [TestHost(**h) for h in info["hosts"]]
        self._pids = {k: int(v) for k, v in info["sshd_pids"].items()}
        return self

    # -- per-host operations ------------------------------------------------------------------
    def _host(self, name: str) -> TestHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise HarnessError(f"unknown test host {name!r} (have {self.names})")

    def _dir(self, name: str) -> Path:
        return Path(str(self.tmpdir)) / name

    def _wrap(self, name: str, argv: list[str]) -> list[str]:
        """Wrap argv to run inside host name: its netns and a fresh UTS ns with its hostname."""
        h = self._host(name)
        if h.netns is None:
            return [_bin("env"), f"{ENV}={self._dir(name)}", *argv]
        return [_bin("ip"), "netns", "exec", h.netns, _bin("unshare"), "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', h.name, *argv]

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
        """Run a command inside host name (its namespace and hostname in netns mode).

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
            out = _cmd("ip", "netns", "pids", h.netns, check=False).stdout
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
        text = _cmd("ip", "netns", "exec", h.netns, "cat", "/proc/net/tcp", "/proc/net/tcp6").stdout
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
        _cmd("ip", "link", "set", f"{h.netns}b", "up" if up else "down")

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
            p = subprocess.Popen(self._wrap(name, [_bin("sshd"), "-D", "-E", str(d / "sshd.log"),
                                                   "-f", str(d / "sshd_config")]),
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self._procs[name], self._pids[name] = p, p.pid
        with _locked_state() as state:  # keep `down` from another process working after restarts
            if state.get(self.prefix, {}).get("tmpdir") == str(self.tmpdir):
                state[self.prefix]["sshd_pids"] = self._pids


def _free_port(address: str, start: int = 22200) -> int:
    """First TCP port >= start that can be bound on address."""
    for port in range(start, start + 2000):
        with socket.socket() as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
            return port
    raise HarnessError(f"no free port on {address}")
