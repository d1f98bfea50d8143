"""sshd side and client side of the test hosts: keys, ``sshd_config``, ssh config, known_hosts.

sshd runs with OpenSSH's own limits (``MaxSessions 10``, ``MaxStartups 10:30:100``) unless a
set asks for others, so code under test meets the limits of the servers users really have.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from dask_lazycluster.testing.system import MARK, HarnessError, TestHost, find_bin, pyenv_lock


def generate_keys(paths: Sequence[Path]) -> None:
    """Create ed25519 key pairs (no passphrase) at paths, in parallel.

    Args:
        paths: Private key paths (``.pub`` files are written next to them).

    Raises:
        HarnessError: ssh-keygen failed.
    """
    procs = [subprocess.Popen([find_bin("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C",
                               MARK, "-f", str(k)], stdout=subprocess.DEVNULL) for k in paths]
    if any(p.wait() for p in procs):
        raise HarnessError("ssh-keygen failed")


def set_env_line(env: Mapping[str, str]) -> str:
    """One ``SetEnv`` line for env (sshd honours only the first SetEnv line).

    Args:
        env: Variables for every session.

    Returns:
        The config line, newline-terminated.
    """
    return "SetEnv " + " ".join(f'{k}="{v}"' for k, v in env.items()) + "\n"


def sshd_config(host: TestHost, hostdir: Path, authorized_keys: Path, *, strict: bool,
                env: Mapping[str, str], max_sessions: int | None = None,
                max_startups: str | None = None) -> str:
    """The ``sshd_config`` text of one host.

    Args:
        host: The host.
        hostdir: Its directory (host key, pid file).
        authorized_keys: The client's authorized_keys file.
        strict: sshd's ``StrictModes`` (off when the directories fail its checks).
        env: Variables every session sees (``SetEnv``).
        max_sessions: ``MaxSessions``; None keeps OpenSSH's default (10).
        max_startups: ``MaxStartups``; None keeps OpenSSH's default (``10:30:100``).

    Returns:
        The config text.
    """
    limits = "" if max_sessions is None else f"MaxSessions {max_sessions}\n"
    limits += "" if max_startups is None else f"MaxStartups {max_startups}\n"
    return (f"Port {host.port}\nListenAddress {host.address}\n"
            f"HostKey {hostdir}/ssh_host_ed25519_key\nPidFile {hostdir}/sshd.pid\n"
            f"AuthorizedKeysFile {authorized_keys}\nStrictModes {'yes' if strict else 'no'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nPubkeyAuthentication yes\n"
            f"AllowTcpForwarding yes\n{limits}ClientAliveInterval 5\nClientAliveCountMax 3\n"
            "LogLevel INFO\nPrintMotd no\nSubsystem sftp internal-sftp\n" + set_env_line(env))


def client_entry(host: TestHost, user: str, client_key: Path, known_hosts: Path) -> str:
    """The ``Host`` block of one host in the fake home's ssh config.

    Args:
        host: The host (``jump`` set: reached with ``ProxyJump``).
        user: Login user.
        client_key: Private key to log in with.
        known_hosts: The known_hosts file listing the host's key.

    Returns:
        The config block.
    """
    jump = f"    ProxyJump {host.jump}\n" if host.jump else ""
    return (f"Host {host.name}\n    HostName {host.address}\n    Port {host.port}\n"
            f"    User {user}\n    IdentityFile {client_key}\n"
            f"    UserKnownHostsFile {known_hosts}\n    IdentitiesOnly yes\n"
            f"    StrictHostKeyChecking yes\n{jump}")


def known_hosts_line(host: TestHost, public_key: Path) -> str:
    """The known_hosts line of one host (by alias and address).

    Args:
        host: The host.
        public_key: Its ``.pub`` host key file.

    Returns:
        The line, newline-terminated.
    """
    key = " ".join(public_key.read_text().split()[:2])
    names = f"{host.name},{host.address}"
    if host.port != 22:
        names = f"[{host.name}]:{host.port},[{host.address}]:{host.port}"
    return f"{names} {key}\n"


def append_block(path: Path, prefix: str, text: str) -> None:
    """Append text between marker lines naming prefix (so remove_block can take it out).

    Args:
        path: File to append to (created with mode 0600).
        prefix: The set's prefix.
        text: Lines to add.
    """
    with open(path, "a") as f:
        f.write(f"# BEGIN {MARK} {prefix}\n{text}# END {MARK} {prefix}\n")
    path.chmod(0o600)


def remove_block(path: Path, prefix: str) -> None:
    """Remove the block append_block wrote for prefix (no error when absent).

    Args:
        path: The file.
        prefix: The set's prefix.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    path.write_text(re.sub(rf"# BEGIN {MARK} {prefix}\n.*?# END {MARK} {prefix}\n", "", text,
                           flags=re.S))


def wait_for_logins(
    names: Sequence[str],
    ssh_argv: Callable[..., list[str]],
    timeout: float,
    no_sessions: bool,
    dead: Callable[[str], str | None],
) -> None:
    """Poll ``ssh NAME true`` for all hosts in parallel until each login succeeds.

    With ``no_sessions`` (``MaxSessions 0``) no command can run: a login that authenticates
    and then waits (``ssh -N``) for a second counts as ready.

    Args:
        names: The hosts.
        ssh_argv: Builds the ssh command line for a host and a remote command.
        timeout: Seconds for all logins.
        no_sessions: Whether the hosts allow no session.
        dead: Why a host's sshd is dead (its exit and log), or None while it runs.

    Raises:
        HarnessError: If an sshd died, or a login did not succeed in time.
    """
    deadline, pending, errors = time.monotonic() + timeout, set(names), {}
    while pending:
        probes = {n: subprocess.Popen(
            [*ssh_argv(n)[:-1], "-N", n] if no_sessions else ssh_argv(n, "true"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for n in pending}
        for n, p in probes.items():
            wait = 1.0 if no_sessions else max(0.1, deadline - time.monotonic())
            try:
                _, err = p.communicate(timeout=wait)
                errors[n] = err.decode(errors="replace").strip()
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                if no_sessions:  # authenticated and holding on: as far as it can go
                    pending.discard(n)
                    continue
                errors[n] = f"the login hangs (`ssh {n} true` still running after {timeout}s)"
            if p.returncode == 0:
                pending.discard(n)
            elif (why := dead(n)) is not None:
                raise HarnessError(why)
        if pending and time.monotonic() > deadline:
            hint = ""
            if pyenv_lock().exists():
                hint = (f" ({pyenv_lock()} exists: while it does, a login running `pyenv "
                        "init` waits for it; it is removed when no `pyenv rehash` runs)")
            raise HarnessError(f"no SSH login within {timeout}s{hint}: "
                               + "; ".join(f"{n}: {errors[n]}" for n in sorted(pending)))
        if pending:
            time.sleep(0.05)
