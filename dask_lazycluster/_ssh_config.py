"""The user's SSH client config: which hosts it defines, and adding or removing one.

Reading follows ``Include`` as OpenSSH does; editing keeps a backup, writes atomically (mode
0600) and holds a lock on ``~/.ssh`` so two editors cannot interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator

DEFAULT_SSH_CONFIG = "~/.ssh/config"
# OpenSSH gives up on deeper Include nesting too.
_MAX_INCLUDE_DEPTH = 16
_KEYWORD = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)(?:\s*=\s*|\s+|$)(.*)")
_WILDCARD = re.compile(r"[*?!]")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")


def _split_line(line: str) -> tuple[str, list[str]] | None:
    """Return the lower-case keyword and the arguments of an ssh_config line, or None."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    match = _KEYWORD.match(stripped)
    if match is None:
        return None
    rest = match.group(2)
    try:
        args = shlex.split(rest, comments=True)
    except ValueError:  # unbalanced quotes: take the words as they are
        args = rest.split()
    return match.group(1).lower(), args


def _include_paths(argument: str) -> list[str]:
    """Files an ``Include`` argument names: ``~`` expanded, relative to ``~/.ssh``, globbed."""
    path = os.path.expanduser(argument)
    if not os.path.isabs(path):
        path = os.path.join(os.path.expanduser("~/.ssh"), path)
    return sorted(glob.glob(path))


def _collect_hosts(path: str, found: list[str], stack: tuple[str, ...]) -> None:
    real = os.path.realpath(path)
    if real in stack or len(stack) >= _MAX_INCLUDE_DEPTH:
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return
    for line in lines:
        parsed = _split_line(line)
        if parsed is None:
            continue
        keyword, args = parsed
        if keyword == "host":
            found.extend(a for a in args if not _WILDCARD.search(a) and a not in found)
        elif keyword == "include":
            for argument in args:
                for included in _include_paths(argument):
                    _collect_hosts(included, found, (*stack, real))


def ssh_config_hosts(ssh_config: str | None = None) -> list[str]:
    """Return the host names defined by ``Host`` entries of an SSH client config.

    ``Include`` directives are followed (relative paths are taken from ``~/.ssh``, globs are
    expanded, missing files are ignored, as OpenSSH does). Patterns holding ``*``, ``?`` or
    ``!`` describe no single host and are skipped; each name is listed once, in file order.

    Args:
        ssh_config: Path of the config; default ``~/.ssh/config`` (``~`` is expanded at call
            time, so a changed ``HOME`` applies).

    Returns:
        The host names.

    Raises:
        ValueError: If an explicitly given ``ssh_config`` does not exist.
    """
    path = os.path.expanduser(ssh_config or DEFAULT_SSH_CONFIG)
    if ssh_config is not None and not os.path.isfile(path):
        raise ValueError(f"ssh config {ssh_config!r} does not exist")
    found: list[str] = []
    _collect_hosts(path, found, ())
    return found



# -- editing -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked_ssh_config() -> Iterator[str]:
    """Yield the path of ``~/.ssh/config`` (``~/.ssh`` created 0700), holding a lock on ``~/.ssh``."""
    path = os.path.expanduser(DEFAULT_SSH_CONFIG)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)


def _write_ssh_config(path: str, text: str) -> str | None:
    """Back the config up, then replace it atomically (mode 0600); return the backup's path."""
    target = os.path.realpath(path)
    backup = None
    if os.path.exists(target):
        backup = f"{path}.bak"
        shutil.copy2(target, backup)
        os.chmod(backup, 0o600)
    fd, tmp = tempfile.mkstemp(prefix=".config.", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return backup


def _read(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _parse_target(target: str) -> tuple[str | None, str, int | None]:
    """Split ``[user@]host[:port]`` (IPv6 in brackets when a port follows)."""
    user, _, rest = target.rpartition("@")
    port: int | None = None
    host = rest
    if rest.startswith("[") and "]" in rest:
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise ValueError(f"cannot parse {target!r} as user@host[:port]")
            port = _port(tail[1:], target)
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
        port = _port(port_text, target)
    if (user and not _USER.fullmatch(user)) or "@" in target and not user:
        raise ValueError(f"invalid user name in {target!r}")
    if not host or not _HOST.fullmatch(host):
        raise ValueError(f"invalid host in {target!r} (expected user@host[:port])")
    return user or None, host, port


def _port(text: str, target: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port in {target!r}: {text!r}")
    return int(text)


def _quote(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value


def _block_ranges(lines: list[str], name: str) -> tuple[list[tuple[int, int]], list[str]]:
    """Line ranges of the ``Host name`` blocks, and other Host lines that also name it."""
    starts = []
    for index, line in enumerate(lines):
        parsed = _split_line(line)
        if parsed and parsed[0] in ("host", "match"):
            starts.append((index, parsed))
    ranges, shared = [], []
    for i, (start, (keyword, args)) in enumerate(starts):
        if keyword != "host" or name not in args:
            continue
        if args != [name]:
            shared.append(lines[start].strip())
            continue
        end = starts[i + 1][0] if i + 1 < len(starts) else len(lines)
        # Unindented comments and blank lines at the end belong to what follows.
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
            end -= 1
        ranges.append((start, end))
    return ranges, shared


def add_host(name: str, target: str, id_file: str | None = None) -> tuple[str, str | None]:
    """Add a ``Host name`` entry for ``[user@]host[:port]`` to ``~/.ssh/config``.

    The entry goes before the first wildcard Host (or Match) block, so that defaults set there
    do not override it.

    Args:
        name: The new alias.
        target: ``[user@]host[:port]`` (IPv6 in brackets when a port follows).
        id_file: A private key for this host.

    Returns:
        The config's path and the backup's path (None if there was no config yet).

    Raises:
        ValueError: If the name, target or key is invalid, or the name exists already.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid runtime name {name!r}: use letters, digits, '.', '_', '-'")
    user, host, port = _parse_target(target)
    lines = [f"Host {name}", f"    HostName {host}"]
    if user:
        lines.append(f"    User {user}")
    if port is not None:
        lines.append(f"    Port {port}")
    if id_file is not None:
        key = os.path.abspath(os.path.expanduser(id_file))
        if not os.path.isfile(key):
            raise ValueError(f"--id-file {id_file!r} does not exist")
        lines.append(f"    IdentityFile {_quote(key)}")
    with _locked_ssh_config() as path:
        if os.path.exists(path) and name in ssh_config_hosts(path):
            raise ValueError(f"a Host entry {name!r} already exists in {path} (or a file it includes)")
        existing = _read(path)
        at = len(existing)
        for index, line in enumerate(existing):
            parsed = _split_line(line)
            if parsed and (parsed[0] == "match" or (
                    parsed[0] == "host" and any(_WILDCARD.search(p) for p in parsed[1]))):
                at = index
                break
        before, after = existing[:at], existing[at:]
        if before and before[-1].strip():
            before.append("")
        block = lines + ([""] if after else [])
        backup = _write_ssh_config(path, "\n".join(before + block + after) + "\n")
    return path, backup


def delete_host(name: str) -> tuple[str, str | None]:
    """Remove the ``Host name`` entry from ``~/.ssh/config``.

    Args:
        name: The alias.

    Returns:
        The config's path and the backup's path.

    Raises:
        ValueError: If there is no such entry, or it shares its Host line with other hosts.
    """
    with _locked_ssh_config() as path:
        lines = _read(path)
        ranges, shared = _block_ranges(lines, name)
        if shared:
            raise ValueError(f"{name!r} shares a Host line with other hosts in {path} "
                             f"({shared[0]!r}): edit it by hand")
        if not ranges:
            raise ValueError(f"no Host entry {name!r} in {path}")
        for start, end in reversed(ranges):
            del lines[start:end]
            # Do not leave two blank lines (or a trailing one) where the block was.
            if start < len(lines) and not lines[start].strip() and (
                    start == 0 or not lines[start - 1].strip()):
                del lines[start]
            elif start == len(lines) and start > 0 and not lines[start - 1].strip():
                del lines[start - 1]
        backup = _write_ssh_config(path, "\n".join(lines) + ("\n" if lines else ""))
    return path, backup
