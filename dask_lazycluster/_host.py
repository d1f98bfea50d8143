"""What every part of a runtime shares about its host (:class:`HostState`).

The connection, the facts read once by the probe, the environment for remote work, the
working directory, the interpreter choice and the parked probe interpreter.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
import uuid
from typing import Any

import asyncssh

from dask_lazycluster._bootstrap import bundle, python_command
from dask_lazycluster._connection import HostConnection
from dask_lazycluster.exceptions import (
    InvalidRuntimeError,
    PathCreationError,
    SessionRefusedError,
)
from dask_lazycluster.utils import parse_listening_ports

# Runs a shell script read from stdin (its byte count is $1); a watcher on the rest of stdin
# kills the whole process group when the SSH channel closes (cleanup, timeout, manager gone).
# Background jobs get /dev/null as stdin unless redirected explicitly, hence fd 3. $2 is the
# private temp working dir, removed when the manager vanished ('' otherwise).
_LIFELINE_WRAPPER = (
    's=$(head -c "$1"); exec 3<&0; (cat <&3 >/dev/null; [ -n "$2" ] && rm -rf "$2"; kill -KILL 0) & '
    'w=$!; (eval "$s") </dev/null 3<&-; rc=$?; kill $w 2>/dev/null; exit $rc'
)

#: How long a probe's interpreter waits to become the host's supervisor, and how much sooner
#: than that the manager stops counting on it (the two clocks race).
PROBE_PARK_SECONDS = 30.0
PARK_MARGIN = 5.0


class HostState:
    """Shared state of one runtime's host.

    Args:
        host: The SSH host name or alias.
        working_dir: Remote working directory; None for a private temp dir (removed at cleanup).
        connect_options: ``asyncssh.connect`` keyword arguments.
        python: The remote python asked for, or None to probe for one.
    """

    def __init__(
        self,
        host: str,
        working_dir: str | None,
        connect_options: dict[str, Any],
        python: str | None,
    ) -> None:
        self.host = host
        self.ssh = HostConnection(host, connect_options)
        self.requested_python = python
        self.info: dict[str, Any] = {}
        self.env: dict[str, str] = {}
        self.wd = working_dir
        self.wd_is_temp = working_dir is None
        self.wd_ready = False
        self.probed_ports: tuple[float, set[int]] = (float("-inf"), set())
        self.parked: tuple[float, asyncssh.SSHClientProcess[bytes]] | None = None
        self.parked_pid = 0

    # -- interpreter and requests ------------------------------------------------------------

    @property
    def python(self) -> str:
        """The remote python: exactly the one asked for, else the path the probe found."""
        return str(self.requested_python or self.info.get("python") or "python")

    def python_candidates(self, python: str | None = None) -> list[str]:
        """Interpreters to try, in order: ``python``, the probed one, or the usual names."""
        chosen = python or self.requested_python or self.info.get("python")
        if chosen:
            return [str(chosen)]
        return [sys.executable, "python3", "python"]

    def request_line(self, action: str, env: dict[str, str] | None = None, **fields: Any) -> bytes:
        """One request for the remote entry point, as a JSON line.

        Args:
            action: ``probe``, ``function``, ``reach`` or ``supervise``.
            env: Extra environment variables (over the runtime's own).
            **fields: The action's fields.

        Returns:
            The line.
        """
        header = {"action": action, "env": {**self.env, **(env or {})},
                  "cleanup_dir": self.wd if self.wd_is_temp else None, **fields}
        return json.dumps(header).encode() + b"\n"

    def request(self, action: str, env: dict[str, str] | None = None, **fields: Any) -> bytes:
        """What to write to a freshly bootstrapped python: the bundle, then the request line.

        Args:
            action: See :meth:`request_line`.
            env: See :meth:`request_line`.
            **fields: See :meth:`request_line`.

        Returns:
            The bytes.
        """
        return bundle() + self.request_line(action, env, **fields)

    async def start_python(
        self, what: str, python: str | None = None, setup: list[str] | None = None
    ) -> asyncssh.SSHClientProcess[bytes]:
        """Start a bootstrapped remote python in a session of its own (bundle not sent yet).

        Args:
            what: What it is for, for errors.
            python: The interpreter; default the runtime's.
            setup: Shell lines to run before it, in the same shell.

        Returns:
            The process.
        """
        command = python_command(self.python_candidates(python), setup)
        process: asyncssh.SSHClientProcess[bytes] = await self.ssh.gate.create_process(
            self.ssh.conn, command, what, encoding=None)
        return process

    async def start_script(self, script: str, what: str) -> asyncssh.SSHClientProcess[str]:
        """Run a shell script behind a lifeline: closing the channel kills all it started.

        The script goes over stdin, so values in it (e.g. environment) never show in ``ps``.

        Args:
            script: The shell script.
            what: What it is for, for errors.

        Returns:
            The process (text mode); its stdin stays open as the lifeline.
        """
        wd = self.wd if self.wd_is_temp and self.wd else ""
        process: asyncssh.SSHClientProcess[str] = await self.ssh.gate.create_process(
            self.ssh.conn,
            f"sh -c {shlex.quote(_LIFELINE_WRAPPER)} lazycluster {len(script.encode())} "
            f"{shlex.quote(wd)}",
            what,
        )
        process.stdin.write(script)
        return process

    # -- the probe ---------------------------------------------------------------------------

    async def connect_and_probe(self) -> None:
        """Connect and read the host's facts, within the connect timeout.

        Raises:
            InvalidRuntimeError: If the host cannot be used (cause in words).
        """
        await self.ssh.connect()
        timeout = self.ssh.timeout
        try:
            await asyncio.wait_for(self._probe(), timeout)
        except BaseException as exc:
            await self.ssh.close()  # a failed probe is no lost connection: no reconnecting
            if isinstance(exc, InvalidRuntimeError):
                raise
            if isinstance(exc, SessionRefusedError):
                raise InvalidRuntimeError(self.host, f"it refused an SSH session for the probe "
                                          f"({exc.reason}): is MaxSessions 0 in its sshd_config?"
                                          ) from exc
            if isinstance(exc, asyncio.TimeoutError | TimeoutError):
                raise InvalidRuntimeError(self.host, f"probe timed out after {timeout:g} s") from exc
            if isinstance(exc, asyncssh.Error | OSError):
                raise InvalidRuntimeError(self.host, f"probe failed: {exc}") from exc
            raise

    async def _probe(self) -> None:
        process = await self.start_python("the host probe", self.requested_python)
        process.stdin.write(self.request("probe", park=PROBE_PARK_SECONDS))
        line = b""
        while not line.startswith(b"{"):  # skip anything a login script printed
            line = await process.stdout.readline()
            if not line:
                break
        if not line:
            result = await process.wait()
            stderr = result.stderr if isinstance(result.stderr, bytes) else b""
            what = self.requested_python or "python"
            raise InvalidRuntimeError(
                self.host,
                f"cannot run {what!r} (exit {result.exit_status}): "
                f"{stderr.decode(errors='replace').strip()[-500:]}",
            )
        self.info = json.loads(line)
        # The probe's interpreter waits a while: the host's supervisor can be this one.
        self.parked = (time.monotonic(), process)
        self.parked_pid = int(self.info.pop("pid"))
        self.probed_ports = (time.monotonic(), parse_listening_ports(self.info.pop("proc_net_tcp")))
        if self.wd is None:
            self.wd = f"{self.info['tmp']}/lazycluster-{uuid.uuid4().hex[:12]}"
        else:
            await self.ensure_working_dir()

    def take_parked(self, python: str | None) -> asyncssh.SSHClientProcess[bytes] | None:
        """The parked probe interpreter, if it runs ``python`` and surely waits still.

        Args:
            python: The interpreter wanted (None: the runtime's).

        Returns:
            The process, now the caller's; None if there is none to take.
        """
        if self.parked is None:
            return None
        since, process = self.parked
        self.parked = None
        fresh = time.monotonic() - since < PROBE_PARK_SECONDS - PARK_MARGIN
        if fresh and not process.is_closing() and python in (None, self.python, self.info.get("python")):
            return process
        self.release_parked(process)
        return None

    @staticmethod
    def release_parked(process: asyncssh.SSHClientProcess[bytes]) -> None:
        """Let a parked interpreter go: a ``bye`` ends it without touching the working dir.

        Args:
            process: The parked probe's process.
        """
        try:
            process.stdin.write(b"bye\n")
            process.stdin.write_eof()
        except (OSError, asyncssh.Error):
            pass
        process.close()

    # -- working dir and ports ---------------------------------------------------------------

    @property
    def working_dir_path(self) -> str:
        """The working directory's path (it may not exist yet)."""
        assert self.wd is not None
        return self.wd

    async def ensure_working_dir(self, force: bool = False) -> str:
        """Create the working directory (mode 0700) unless known to exist.

        Args:
            force: Create it even if it was created before (it may have been removed).

        Returns:
            Its path.

        Raises:
            InvalidRuntimeError: If it cannot be created.
        """
        wd = self.working_dir_path
        if force or not self.wd_ready:
            result = await self.ssh.gate.run(self.ssh.conn, f"mkdir -p -m 700 {shlex.quote(wd)}",
                                             "creating the working dir")
            if result.exit_status != 0:
                raise PathCreationError(wd, self.host,
                                        f"it is the working dir: {str(result.stderr).strip()}")
            self.wd_ready = True
        return wd

    async def listening_ports(self, max_age: float = 0.0) -> set[int]:
        """Listening TCP ports on the host; the probe's reading if younger than ``max_age`` s.

        Args:
            max_age: Seconds a reading may be old.

        Returns:
            The ports.
        """
        taken_at, ports = self.probed_ports
        if max_age and time.monotonic() - taken_at <= max_age:
            return set(ports)
        result = await self.ssh.gate.run(self.ssh.conn, "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null",
                                         "reading its listening ports")
        return parse_listening_ports(str(result.stdout))
