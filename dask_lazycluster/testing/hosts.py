"""Real SSH test hosts: N OpenSSH ``sshd`` servers for tests, demos and benchmarks.

Mode ``netns`` (root): one network namespace per host on a bridge (see ``network``), with its
own hostname, optionally an nftables firewall (only port 22), a bastion (hosts reachable only
through a jump host) and per-host differences (``specs``: cores, memory, environment, paths,
stand-in GPUs). Mode ``local`` (unprivileged): sshd processes on 127.0.0.x with high ports, no own
hostnames, no firewall, no link control, no specs.

sshd keeps OpenSSH's own limits (``MaxSessions 10``, ``MaxStartups 10:30:100``) unless a set
asks for others. The names below stay importable from this module; the work is split over
``system`` (errors, state, binaries), ``network``, ``sshd``, ``specs`` and ``ops``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import psutil

from dask_lazycluster.testing import network, sshd
from dask_lazycluster.testing.network import BRIDGE, MANAGER_ADDRESS, SUBNET
from dask_lazycluster.testing.ops import HostOps
from dask_lazycluster.testing.specs import (
    HostSpec,
    create_cgroups,
    nvidia_smi_script,
    remove_cgroups,
    stale_cgroups,
)
from dask_lazycluster.testing.system import (
    ENV,
    MARK,
    HarnessError,
    HostsInUseError,
    TestHost,
    find_bin,
    is_secure,
    locked_state,
    read_state,
    remove_stale_pyenv_lock,
    state_dir,
)

__all__ = ["BRIDGE", "ENV", "MARK", "SUBNET", "HarnessError", "HostSpec", "HostsInUseError",
           "TestHost", "TestHosts", "clear_stale", "default_netns_prefix", "read_state",
           "running_sets", "state_dir"]

# keyed by host number or name (Mapping's key type is invariant, hence three spellings)
Specs = (Mapping[int, HostSpec] | Mapping[str, HostSpec] | Mapping[int | str, HostSpec]
         | Sequence[HostSpec | None])


_running: list[TestHosts] = []  # sets this process brought up and has not torn down


def running_sets() -> list[TestHosts]:
    """The sets this process started with ``up()`` and has not torn down yet, oldest first.

    Leak checks use it to look at every host of a test session without knowing its fixtures.

    Returns:
        The running sets.
    """
    return list(_running)


def default_netns_prefix(prefix: str) -> str:
    """Namespace prefix for a host prefix: ``lzh`` for ``lzhost``, else the prefix itself.

    Args:
        prefix: Host name prefix.

    Returns:
        The namespace name prefix.
    """
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
    with locked_state() as state:  # namespaces of live sets are always recorded under this lock
        if prefix in state:
            raise HostsInUseError(f"test hosts {prefix!r} were just started by another process")
        for ns in network.namespaces(re.escape(netns_prefix or default_netns_prefix(prefix))):
            network.kill_netns(ns)
        if os.geteuid() == 0:
            remove_cgroups(stale_cgroups(rf"{re.escape(prefix)}\d+"))
    network.drop_bridge_if_unused()


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


class TestHosts(HostOps):
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
        max_sessions: sshd's ``MaxSessions`` (sessions per connection); None keeps OpenSSH's
            default, 10.
        max_startups: sshd's ``MaxStartups`` (unauthenticated connections), e.g. ``"100"`` or
            ``"10:30:100"``; None keeps OpenSSH's default, ``10:30:100``.
        specs: How hosts differ (netns mode only): a mapping of host number (1..n) or host
            name to HostSpec, or a sequence whose item i describes host i + 1 (None: plain).
        bastion: Host 1 is a jump host; hosts 2..n accept connections only from it and each
            other, open none to the manager, and the ssh config reaches them with ``ProxyJump``
            (netns mode only; n >= 2).

    Raises:
        ValueError: Invalid arguments (a bad spec names its host and field).
        HarnessError: A netns-only feature requested outside netns mode.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, n: int = 3, firewall: bool = False, mode: str = "auto",
                 prefix: str = "lzhost", *, home: Path | None = None, first_host: int | None = None,
                 netns_prefix: str | None = None, max_sessions: int | None = None,
                 max_startups: str | None = None, specs: Specs | None = None,
                 bastion: bool = False) -> None:
        if mode == "auto":
            mode = "netns" if os.geteuid() == 0 else "local"
        if mode not in ("netns", "local"):
            raise ValueError(f"mode must be auto, netns or local, not {mode!r}")
        if not re.fullmatch(r"[a-z][a-z0-9]*[a-z]", prefix):
            raise ValueError(f"prefix: lowercase letters/digits ending in a letter, not {prefix!r}")
        if n < 1 or n > 244 or (first_host is not None and not 0 <= first_host <= 254 - n):
            raise ValueError("need n >= 1, first_host >= 0 and first_host + n <= 254")
        # 0 is sshd's "forwarding only": a host where no command can run.
        if max_sessions is not None and (not isinstance(max_sessions, int) or max_sessions < 0):
            raise ValueError(f"max_sessions must be an int >= 0, not {max_sessions!r}")
        if max_startups is not None and not re.fullmatch(r"\d+(:\d+:\d+)?", max_startups):
            raise ValueError(f"max_startups must look like '10' or '10:30:100', "
                             f"not {max_startups!r}")
        if bastion and n < 2:
            raise ValueError("bastion=True needs n >= 2 (host 1 is the jump host)")
        for feature, wanted in (("firewall=True", firewall), ("bastion=True", bastion),
                                ("specs", bool(specs))):
            if wanted and mode != "netns":
                raise HarnessError(f"{feature} needs netns mode (run as root): local-mode hosts "
                                   "share the manager's network, files and cgroups")
        self.n, self.firewall, self.mode, self.prefix = n, firewall, mode, prefix
        self.first_host, self.bastion = first_host, bastion
        self.max_sessions, self.max_startups = max_sessions, max_startups
        self.specs = self._named_specs(specs or {})
        self.netns_prefix = netns_prefix or default_netns_prefix(prefix)
        if len(self.netns_prefix) + len(str(n)) + 1 > 15:
            raise ValueError("netns_prefix too long for interface names")
        self.manager_address = MANAGER_ADDRESS if mode == "netns" else "127.0.0.1"
        self._owns_home = home is None
        self.home: Path = Path(home) if home is not None else Path()
        self.tmpdir: Path | None = None
        self.hosts: list[TestHost] = []
        self._cgroups: dict[str, list[str]] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pids: dict[str, int] = {}
        self._detached = False

    def _named_specs(self, specs: Specs) -> dict[str, HostSpec]:
        """Return specs keyed by host name, each validated."""
        items: list[tuple[int | str, HostSpec | None]]
        if isinstance(specs, Mapping):
            items = list(cast("Mapping[int | str, HostSpec]", specs).items())
        else:
            if len(specs) > self.n:
                raise ValueError(f"specs: {len(specs)} items for {self.n} hosts")
            items = [(i + 1, s) for i, s in enumerate(specs)]
        out: dict[str, HostSpec] = {}
        for key, spec in items:
            name = f"{self.prefix}{key}" if isinstance(key, int) else key
            if not re.fullmatch(rf"{re.escape(self.prefix)}([1-9]\d*)", name) or int(
                    name[len(self.prefix):]) > self.n:
                raise ValueError(f"specs key {key!r}: not a host number 1..{self.n} or a name "
                                 f"{self.prefix}1..{self.prefix}{self.n}")
            if spec is not None:
                if not isinstance(spec, HostSpec):
                    raise ValueError(f"specs[{key!r}]: a HostSpec, not {type(spec).__name__}")
                spec.check(name)
                out[name] = spec
        return out

    # -- paths -------------------------------------------------------------------------------
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

        Hosts behind the bastion are reached through it: asyncssh takes ``ProxyJump`` from the
        config file.

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
        return [find_bin("ssh"), "-F", str(self.ssh_config), "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=5", name, *command]

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self, *, detached: bool = False, timeout: float = 20) -> TestHosts:
        """Start every host and wait until each accepts a real SSH login.

        Args:
            detached: Started by the CLI: the hosts outlive this process.
            timeout: Seconds to wait for all logins (a login that hangs fails up() then).

        Returns:
            self.

        Raises:
            HarnessError: Missing binaries, a stale run, or a host that does not come up.
        """
        netns = ("ip", "unshare") if self.mode == "netns" else ()
        fw = ("nft",) if self.firewall or self.bastion else ()
        for tool in ("sshd", "ssh", "ssh-keygen", *netns, *fw, *(("mount",) if self.specs else ())):
            find_bin(tool)
        self._detached = detached
        try:
            with locked_state() as state:
                self._check_free(state)
                self._make_files()
                state[self.prefix] = self._record()  # recorded first: a crash gets cleaned up
                if self.mode == "netns":
                    network.make_network(self.hosts, self._firewall_rules())
                for name, spec in self.specs.items():
                    self._cgroups[name] = create_cgroups(name, spec)
                    state[self.prefix] = self._record()
            remove_stale_pyenv_lock()  # else every login would wait for it
            for h in self.hosts:
                self.start_sshd(h.name)
            self._wait_ready(timeout)
            with locked_state() as state:
                state[self.prefix] = self._record()
        except BaseException:
            self.down()
            raise
        _running.append(self)
        return self

    def _check_free(self, state: dict[str, Any]) -> None:
        """Refuse to start over a recorded or stale instance or overlapping addresses/names."""
        hint = "run `python -m dask_lazycluster.testing down` first"
        if self.prefix in state or network.namespaces(re.escape(self.netns_prefix)):
            raise HostsInUseError(f"test hosts {self.prefix!r} exist already (see `status`): {hint}"
                                  " or use another prefix")
        taken: set[int] = set()
        for other in state.values():
            if other["netns_prefix"] == self.netns_prefix and self.mode == "netns":
                raise HostsInUseError(f"{other['prefix']!r} uses namespaces {self.netns_prefix}*")
            if other["mode"] == self.mode:
                taken |= {int(h["address"].rsplit(".", 1)[1]) for h in other["hosts"]}
        if self.mode == "netns":
            taken |= network.octets_in_use() - {1}  # .1 is the bridge, the manager's side
        bases = range(10, 255 - self.n, 10) if self.first_host is None else [self.first_host]
        for base in bases:
            if not taken & set(range(base + 1, base + self.n + 1)):
                self.first_host = base
                return
        raise HostsInUseError(f"addresses for {self.prefix!r} are taken by other sets: {hint}")

    def _make_files(self) -> None:
        """Create temp dir, keys, sshd configs, stand-ins, and the fake home's ssh files."""
        parent = state_dir()
        if os.geteuid() == 0 and not is_secure(parent):
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
            jump = f"{self.prefix}1" if self.bastion and i else None
            self.hosts.append(TestHost(name, f"127.0.0.{last}" if local else f"{SUBNET}.{last}",
                                       port, None if local else f"{self.netns_prefix}{i + 1}",
                                       jump))
            (tmp / name).mkdir(mode=0o700)
            (tmp / name / "tmp").mkdir(mode=0o700)  # the host's TMPDIR (see host_tmpdir)
            keygen.append(tmp / name / "ssh_host_ed25519_key")
        sshd.generate_keys(keygen)
        authorized = tmp / "authorized_keys"
        authorized.write_text(self.client_key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        strict, config, known = is_secure(tmp), [], []
        user = "root" if not local else psutil.Process().username()
        for h in self.hosts:
            d, spec = tmp / h.name, self.specs.get(h.name, HostSpec())
            if spec.gpus:
                (d / "nvidia-smi").write_text(nvidia_smi_script(h.name, spec.gpus))
                (d / "nvidia-smi").chmod(0o755)
            (d / "sshd_config").write_text(sshd.sshd_config(
                h, d, authorized, strict=strict,
                env={ENV: str(d), "TMPDIR": str(self.host_tmpdir(h.name)), **spec.env},
                max_sessions=self.max_sessions, max_startups=self.max_startups))
            config.append(sshd.client_entry(h, user, self.client_key, self.known_hosts))
            known.append(sshd.known_hosts_line(h, d / "ssh_host_ed25519_key.pub"))
        sshd.append_block(self.ssh_config, self.prefix, "".join(config))
        sshd.append_block(self.known_hosts, self.prefix, "".join(known))

    def _firewall_rules(self) -> dict[str, str]:
        """Host name -> nftables ruleset, for hosts that get a firewall."""
        behind = [h.address for h in self.hosts if h.jump]
        allowed = [self.hosts[0].address, *behind]
        return {h.name: network.firewall_rules(self.firewall, allowed if h.jump else None)
                for h in self.hosts if self.firewall or h.jump}

    def _record(self) -> dict[str, Any]:
        """This instance as a JSON-able state record."""
        return {"prefix": self.prefix, "mode": self.mode, "firewall": self.firewall,
                "bastion": self.bastion, "netns_prefix": self.netns_prefix,
                "first_host": self.first_host, "max_sessions": self.max_sessions,
                "max_startups": self.max_startups,
                "tmpdir": str(self.tmpdir), "home": str(self.home), "owns_home": self._owns_home,
                "owner_pid": None if self._detached else os.getpid(),
                "ssh_config": str(self.ssh_config),
                # "jump" only when set: older harness code reads the records of every set
                "hosts": [{k: v for k, v in asdict(h).items() if k != "jump" or v}
                          for h in self.hosts],
                "specs": {k: asdict(v) for k, v in self.specs.items()},
                "cgroups": self._cgroups, "sshd_pids": self._pids}

    def _wait_ready(self, timeout: float) -> None:
        """Wait until every host accepts a real login (see ``sshd.wait_for_logins``)."""

        def dead(name: str) -> str | None:
            if self._procs[name].poll() is None:
                return None
            log = (self._dir(name) / "sshd.log").read_text(errors="replace")[-2000:]
            return f"sshd of {name} exited ({self._procs[name].returncode}): {log}"

        sshd.wait_for_logins(self.names, self.ssh_argv, timeout, self.max_sessions == 0, dead)

    def down(self) -> None:
        """Kill every process of every host; delete namespaces, veths, bridge, cgroups, files.

        Also removes pyenv's rehash lock if a killed login shell left it behind. Idempotent;
        also works on an instance re-attached with from_state().
        """
        if self in _running:
            _running.remove(self)
        for h in self.hosts:
            if h.netns is not None:
                network.kill_netns(h.netns)
            else:
                self._kill_local(h.name)
        for p in self._procs.values():
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(5)
        self._procs.clear()
        remove_cgroups([p for paths in self._cgroups.values() for p in paths])
        self._cgroups.clear()
        if self.mode == "netns":
            network.drop_bridge_if_unused()
        remove_stale_pyenv_lock()
        if not self._owns_home and self.tmpdir is not None:  # only entries this set wrote
            for path in (self.ssh_config, self.known_hosts):
                sshd.remove_block(path, self.prefix)
        if self.tmpdir is None:
            return
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        with locked_state() as state:
            if state.get(self.prefix, {}).get("tmpdir") == str(self.tmpdir):
                del state[self.prefix]

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
                   netns_prefix=info["netns_prefix"], max_sessions=info.get("max_sessions"),
                   max_startups=info.get("max_startups"), bastion=info.get("bastion", False)
                   and len(info["hosts"]) > 1)
        self.specs = {k: HostSpec(**v) for k, v in info.get("specs", {}).items()}
        self._owns_home, self._detached = info["owns_home"], info["owner_pid"] is None
        self.tmpdir = Path(info["tmpdir"])
        self.hosts = [TestHost(**h) for h in info["hosts"]]
        self._cgroups = {k: list(v) for k, v in info.get("cgroups", {}).items()}
        self._pids = {k: int(v) for k, v in info["sshd_pids"].items()}
        return self
