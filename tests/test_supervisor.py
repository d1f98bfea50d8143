"""The per-host supervisor run as a real local process (no SSH needed): its lifeline rules."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import psutil

from dask_lazycluster._bootstrap import BOOTSTRAP, bundle


def start_supervisor(silence: float, workdir: Path) -> subprocess.Popen[bytes]:
    """A supervisor whose private temp working dir (removed when the manager is gone) is
    ``workdir``, where its servers keep their scratch space too."""
    proc = subprocess.Popen([sys.executable, "-c", BOOTSTRAP], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    send(proc, bundle(), {"action": "supervise", "silence": silence, "cwd": str(workdir),
                          "cleanup_dir": str(workdir),
                          "env": {"DASK_TEMPORARY_DIRECTORY": str(workdir)}})
    assert event(proc)["event"] == "ready"
    return proc


def send(proc: subprocess.Popen[bytes], prefix: bytes = b"", line: dict[str, Any] | None = None
         ) -> None:
    stdin: IO[bytes] | None = proc.stdin
    assert stdin is not None
    stdin.write(prefix + (json.dumps(line).encode() + b"\n" if line else b""))
    stdin.flush()


def event(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        message = json.loads(proc.stdout.readline())
        if message.get("event") != "log":
            return dict(message)


def start_scheduler(proc: subprocess.Popen[bytes]) -> int:
    send(proc, line={"op": "start", "id": "s", "cls": "distributed.Scheduler", "scheduler": None,
                     "options": {"port": 0, "dashboard": False}, "env": {}, "tls": None})
    started = event(proc)
    assert started["event"] == "started", started
    return int(started["pid"])


def test_a_silent_manager_is_taken_for_gone_and_everything_stops(tmp_path: Path) -> None:
    workdir = tmp_path / "lazycluster-work"
    proc = start_supervisor(silence=1.5, workdir=workdir)
    try:
        child = start_scheduler(proc)
        # The channel stays open (as sshd keeps it for a client that lost its network), but
        # nothing arrives: the supervisor kills its children and exits by itself.
        assert proc.wait(20) == 0
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
        assert not workdir.exists()  # the manager is gone: nobody else would remove it
    finally:
        proc.kill()


def test_pings_keep_the_supervisor_and_its_children(tmp_path: Path) -> None:
    workdir = tmp_path / "lazycluster-work"
    proc = start_supervisor(silence=1.5, workdir=workdir)
    try:
        child = start_scheduler(proc)
        for _ in range(8):  # 4 s of pings, well past the silence limit
            send(proc, line={"op": "ping"})
            time.sleep(0.5)
        assert proc.poll() is None and psutil.pid_exists(child)
        send(proc, line={"op": "shutdown", "remove_dir": str(workdir)})
        assert event(proc)["event"] in ("exited", "bye")
        assert proc.wait(20) == 0
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
        assert not workdir.exists()  # removed once every child exited
    finally:
        proc.kill()
