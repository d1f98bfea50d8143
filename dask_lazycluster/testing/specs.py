"""Hosts that differ: per-host cores, memory, environment, file-system view and stand-in GPUs.

A netns-mode host with a :class:`HostSpec` runs its sshd (and so every session) inside

- cgroup v1 ``cpuset`` / ``memory`` groups of its own (``cpus``, ``memory``), created below the
  harness process's own groups, with a cgroup namespace rooted there and the controllers mounted
  at ``/sys/fs/cgroup/<controller>``, as in a container: a process on the host reads its limit in
  ``/sys/fs/cgroup/memory/memory.limit_in_bytes`` and its cores in ``os.sched_getaffinity(0)``;
- a mount namespace of its own (propagation ``slave``: the machine's mounts still reach it, its
  own never leave it) with the spec's bind mounts, then tmpfs mounts hiding paths. A bind target
  that does not exist is created in an overlay over its nearest existing ancestor, so nothing is
  written to the machine's file system.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from dask_lazycluster.testing.system import HarnessError, kill_all, login_pyenv_root

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "dask-lazycluster-"
NVIDIA_SMI = "/usr/local/bin/nvidia-smi"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MEMORY = re.compile(r"[1-9][0-9]*[KMGT]?")


@dataclass
class HostSpec:
    """How one test host differs from the machine (netns mode only).

    Attributes:
        cpus: Usable cores: a count (the first that many of the manager's cores) or the core
            numbers; enforced by a cpuset cgroup, seen by ``nproc``/``os.sched_getaffinity``.
        memory: Memory limit of everything on the host, bytes or ``"512M"``-style (K/M/G/T,
            base 1024); a cgroup v1 memory limit, seen in
            ``/sys/fs/cgroup/memory/memory.limit_in_bytes`` on the host.
        env: Extra environment variables of every SSH session (sshd ``SetEnv``; a login shell's
            rc files may still change variables such as ``PATH``).
        binds: Target path on the host -> source path on the machine (a bind mount).
        hide: Directories that look empty on the host (tmpfs mounted over them, after binds).
        gpus: Number of stand-in GPUs: ``nvidia-smi`` at ``/usr/local/bin/nvidia-smi`` lists
            that many (``-L``, ``--query-gpu=... --format=csv``); 0 means no ``nvidia-smi``.
    """

    cpus: int | Sequence[int] | None = None
    memory: int | str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    binds: Mapping[str, str] = field(default_factory=dict)
    hide: Sequence[str] = ()
    gpus: int = 0

    def with_python_at(self, target: str = "/opt/lzenv", prefix: str | None = None) -> HostSpec:
        """This spec plus "Python lives at another path on this host".

        The interpreter install ``prefix`` is reachable on the host only as ``target`` (so
        ``<target>/bin/python3`` runs it) and its usual path is hidden, so the manager's
        ``sys.executable`` does not exist there. Under pyenv the host gets its own (empty,
        refilled by the login's ``pyenv rehash``) shims directory, so its rehash does not drop
        the machine's shims of the hidden version; ``LD_LIBRARY_PATH`` points at
        ``<target>/lib`` when the interpreter links a shared libpython by absolute path.

        Args:
            target: Where the install appears on the host.
            prefix: The install to move (default: ``sys.prefix``; a virtualenv cannot move).

        Returns:
            A new HostSpec.

        Raises:
            ValueError: prefix defaults to a virtualenv, or is not an install.
        """
        if prefix is None and sys.prefix != sys.base_prefix:
            raise ValueError("prefix: sys.prefix is a virtualenv, which only works at its own "
                             "path; pass the base install explicitly")
        source = Path(prefix or sys.prefix)
        if not (source / "bin").is_dir():
            raise ValueError(f"prefix: {source} has no bin/ directory")
        hide = [*self.hide, str(source)]
        pyenv = login_pyenv_root()
        if source.is_relative_to(pyenv) and (pyenv / "shims").is_dir():
            hide.append(str(pyenv / "shims"))
        env = dict(self.env)
        if list((source / "lib").glob("libpython*.so*")):
            env["LD_LIBRARY_PATH"] = f"{target}/lib"
        return replace(self, binds={**self.binds, target: str(source)}, hide=hide, env=env)

    def core_list(self) -> list[int]:
        """The cores this host may use (all of the manager's when cpus is None).

        Returns:
            Sorted core numbers.
        """
        have = sorted(os.sched_getaffinity(0))
        if self.cpus is None:
            return have
        if isinstance(self.cpus, int):
            return have[:self.cpus]
        return sorted(set(self.cpus))

    def check(self, host: str) -> None:
        """Validate the spec for host.

        Args:
            host: Host name, for messages.

        Raises:
            ValueError: A field is invalid; the message names host and field.
        """
        def bad(what: str) -> ValueError:
            return ValueError(f"spec of {host}: {what}")

        have = sorted(os.sched_getaffinity(0))
        if isinstance(self.cpus, int) and not 1 <= self.cpus <= len(have):
            raise bad(f"cpus must be 1..{len(have)} (the manager's cores), not {self.cpus}")
        if self.cpus is not None and not isinstance(self.cpus, int) and (
                not self.cpus or not set(self.cpus) <= set(have)):
            raise bad(f"cpus {list(self.cpus)} not a non-empty subset of cores {have}")
        if self.memory is not None and not _MEMORY.fullmatch(str(self.memory)):
            raise bad(f"memory must be bytes or like '512M', not {self.memory!r}")
        for k, v in self.env.items():
            if not _ENV_NAME.fullmatch(k) or re.search(r'["\\\n]', v):
                raise bad(f"env {k}={v!r}: need a plain name and a value without \", \\, newline")
        for target, source in self.binds.items():
            for p in (target, source):
                if not os.path.isabs(p) or re.search(r"[,:\s]", p):
                    raise bad(f"binds {target!r}: {source!r}: absolute paths without , : or "
                              "spaces needed")
            if not os.path.exists(source):
                raise bad(f"binds source {source} does not exist")
            if _existing_ancestor(Path(target)) == Path("/"):
                raise bad(f"binds target {target}: its parent must exist (not only /)")
        for p in self.hide:
            if not os.path.isdir(p):
                raise bad(f"hide {p!r}: not an existing directory")
        if not isinstance(self.gpus, int) or self.gpus < 0:
            raise bad(f"gpus must be an int >= 0, not {self.gpus!r}")

    @property
    def controllers(self) -> list[str]:
        """The cgroup v1 controllers this spec needs (``cpuset``, ``memory``)."""
        return [c for c, v in (("cpuset", self.cpus), ("memory", self.memory)) if v is not None]


def _existing_ancestor(path: Path) -> Path:
    """The nearest existing directory at or above path."""
    while not path.is_dir():
        path = path.parent
    return path


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path (relative, leading /) in a v1 controller's hierarchy."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    raise HarnessError(f"cgroup v1 controller {controller!r} is not mounted "
                       f"under {CGROUP_ROOT} (needed by a host spec)")


def create_cgroups(host: str, spec: HostSpec) -> list[str]:
    """Create the host's cgroups (below this process's own) and set their limits.

    Args:
        host: Host name (part of the group name).
        spec: The host's spec.

    Returns:
        The cgroup directories created.

    Raises:
        HarnessError: A controller is missing or refuses the settings.
    """
    made: list[str] = []
    try:
        for controller in spec.controllers:
            parent = CGROUP_ROOT / controller / _own_cgroup(controller).lstrip("/")
            d = parent / f"{CGROUP_PREFIX}{host}"
            d.mkdir()
            made.append(str(d))
            if controller == "cpuset":
                (d / "cpuset.mems").write_text((parent / "cpuset.mems").read_text())
                (d / "cpuset.cpus").write_text(",".join(map(str, spec.core_list())))
            else:
                (d / "memory.limit_in_bytes").write_text(str(spec.memory))
    except OSError as exc:
        remove_cgroups(made)
        raise HarnessError(f"cannot create the cgroups of {host}: {exc}") from exc
    return made


def remove_cgroups(paths: Sequence[str], timeout: float = 10) -> None:
    """Kill what still runs in the cgroups and remove them.

    Args:
        paths: cgroup directories (missing ones are skipped).
        timeout: Seconds to keep trying (dying processes leave late).
    """
    deadline = time.monotonic() + timeout
    for p in paths:
        d = Path(p)
        while d.exists():
            procs = []
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(psutil.Error):
                        procs.append(psutil.Process(int(pid)))
            kill_all(procs)
            try:
                d.rmdir()
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)


def stale_cgroups(pattern: str) -> list[str]:
    """The cgroup directories of the harness whose host name fully matches the regex pattern.

    Args:
        pattern: Regular expression for host names.

    Returns:
        Paths found in the memory and cpuset hierarchies (searched three levels deep).
    """
    found: list[str] = []
    for controller in ("memory", "cpuset"):
        root = CGROUP_ROOT / controller
        for dirpath, dirnames, _ in os.walk(root):
            if len(Path(dirpath).relative_to(root).parts) >= 3:
                dirnames.clear()
            for d in dirnames:
                if d.startswith(CGROUP_PREFIX) and re.fullmatch(pattern, d[len(CGROUP_PREFIX):]):
                    found.append(os.path.join(dirpath, d))
    return found


def nvidia_smi_script(host: str, n: int) -> str:
    """The stand-in ``nvidia-smi`` of a host with n GPUs (POSIX sh).

    Supports ``-L``/``--list-gpus``, ``--query-gpu=FIELDS --format=csv[,noheader][,nounits]``
    (fields: index, name, uuid, count, driver_version, memory.total/used/free,
    utilization.gpu), no arguments (a short table) and ``-h``; anything else exits 2.

    Args:
        host: Host name (GPU UUIDs derive from it, stable across runs).
        n: Number of GPUs.

    Returns:
        The script text.
    """
    uuids = [f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{host}.gpu{i}.lazycluster')}"
             for i in range(n)]
    return f"""#!/bin/sh
# Stand-in nvidia-smi of the dask-lazycluster test host {host}: {n} GPU(s), none real.
N={n}
UUIDS="{' '.join(uuids)}"
uuid() {{ set -- $1 $UUIDS; shift "$(( $1 + 1 ))"; echo "$1"; }}
value() {{  # field index units
  case "$1" in
    index) echo "$2" ;;
    name) echo "NVIDIA Stand-in" ;;
    uuid) uuid "$2" ;;
    count) echo "$N" ;;
    driver_version) echo "550.00.00" ;;
    memory.total) echo "16384$3" ;;
    memory.used) echo "0$3" ;;
    memory.free) echo "16384$3" ;;
    utilization.gpu) [ -n "$3" ] && echo "0 %" || echo 0 ;;
    *) echo "Field \\"$1\\" is not a valid field to query." >&2; exit 2 ;;
  esac
}}
query() {{  # fields format
  fmt="${{2#--format=}}"
  case "$2" in --format=csv*) ;; *) echo "--format=csv is required" >&2; exit 2 ;; esac
  units=" MiB"; case ",$fmt," in *,nounits,*) units="" ;; esac
  fields=$(echo "$1" | tr ',' ' ')
  case ",$fmt," in *,noheader,*) ;; *)
    line=""; for f in $fields; do
      h="$f"; case "$f" in memory.*) [ -n "$units" ] && h="$f [MiB]" ;; esac
      case "$f" in utilization.*) [ -n "$units" ] && h="$f [%]" ;; esac
      line="${{line:+$line, }}$h"; done; echo "$line" ;;
  esac
  i=0; while [ "$i" -lt "$N" ]; do
    line=""; for f in $fields; do
      u="$units"; case "$f" in utilization.*) u="${{units:+ %}}" ;; esac
      v=$(value "$f" "$i" "$u") || exit 2; line="${{line:+$line, }}$v"; done
    echo "$line"; i=$((i + 1)); done
}}
case "$1" in
  -L|--list-gpus) i=0; while [ "$i" -lt "$N" ]; do
      echo "GPU $i: NVIDIA Stand-in (UUID: $(uuid "$i"))"; i=$((i + 1)); done ;;
  --query-gpu=*) query "${{1#--query-gpu=}}" "$2" ;;
  -h|--help) echo "Stand-in NVIDIA System Management Interface (dask-lazycluster test host)"
      echo "  -L | --list-gpus   list GPUs"
      echo "  --query-gpu=FIELDS --format=csv[,noheader][,nounits]" ;;
  "") echo "Stand-in NVIDIA-SMI 550.00.00 on {host}"
      i=0; while [ "$i" -lt "$N" ]; do
        echo "| $i  NVIDIA Stand-in  0MiB / 16384MiB  0% |"; i=$((i + 1)); done ;;
  *) echo "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help." >&2
     exit 2 ;;
esac
"""


def mount_script(spec: HostSpec, hostdir: Path, extra_binds: Mapping[str, str]) -> str:
    """Shell commands building the host's view inside its fresh mount (and cgroup) namespace.

    Run as ``sh -c SCRIPT HOSTNAME ARGV...``: sets the hostname, mounts, then execs ARGV.

    Args:
        spec: The host's spec.
        hostdir: The host's directory (a private tmpfs is mounted on ``hostdir/scratch``).
        extra_binds: More target -> source binds (e.g. the nvidia-smi stand-in).

    Returns:
        The script.
    """
    q = shlex.quote
    lines = ['hostname "$0"']
    if spec.controllers:
        lines.append(f"mount -t tmpfs -o mode=755 lzcgroup {CGROUP_ROOT}")
        for c in spec.controllers:
            lines.append(f"mkdir {CGROUP_ROOT}/{c} && mount -t cgroup -o {c} lzcgroup "
                         f"{CGROUP_ROOT}/{c}")
    binds = {**spec.binds, **extra_binds}
    scratch = hostdir / "scratch"
    overlays: dict[Path, int] = {}
    for target, source in binds.items():
        if not os.path.lexists(target):
            base = _existing_ancestor(Path(target))
            if base not in overlays:
                k = overlays[base] = len(overlays)
                if k == 0:
                    lines.append(f"mkdir -p {q(str(scratch))} && "
                                 f"mount -t tmpfs -o mode=700 lzscratch {q(str(scratch))}")
                up, work = scratch / f"u{k}", scratch / f"w{k}"
                lines.append(f"mkdir {q(str(up))} {q(str(work))} && mount -t overlay lzoverlay "
                             f"-o lowerdir={base},upperdir={up},workdir={work} {q(str(base))}")
            if os.path.isdir(source):
                lines.append(f"mkdir -p {q(target)}")
            else:
                lines.append(f"mkdir -p {q(os.path.dirname(target))} && : > {q(target)}")
        lines.append(f"mount --bind {q(source)} {q(target)}")
    for p in spec.hide:
        lines.append(f"mount -t tmpfs -o mode=755 lzhidden {q(p)}")
    return " && ".join(lines) + ' && exec "$@"'
