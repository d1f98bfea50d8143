"""CLI: ``python -m dask_lazycluster.testing up N [--firewall] | down | status``.

``up`` starts N SSH test hosts that outlive the command (state in ``state.json``), ``down`` tears
down every recorded set (and stale namespaces of earlier runs), ``status`` shows what is up.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import psutil

from dask_lazycluster.testing.hosts import (
    MARK,
    HarnessError,
    TestHosts,
    _default_netns_prefix,
    _drop_bridge_if_unused,
    _kill_netns,
    _namespaces,
    read_state,
    state_dir,
)

_USER_CONFIG = Path("~/.ssh/config").expanduser()


def _install_include(config: Path) -> None:
    """Prepend ``Include <config>`` (with a marker line) to the real user's ``~/.ssh/config``."""
    _USER_CONFIG.parent.mkdir(mode=0o700, exist_ok=True)
    old = _USER_CONFIG.read_text() if _USER_CONFIG.exists() else ""
    _USER_CONFIG.write_text(f"# {MARK}\nInclude {config}\n{old}")
    _USER_CONFIG.chmod(0o600)


def _remove_include() -> None:
    """Remove the lines added by _install_include from ``~/.ssh/config``."""
    if _USER_CONFIG.exists():
        text = _USER_CONFIG.read_text()
        new = re.sub(rf"# {MARK}\nInclude [^\n]*\n", "", text)
        if new != text:
            _USER_CONFIG.write_text(new)


def _recorded_namespaces() -> set[str]:
    """Namespaces of every set in the state file."""
    return {h["netns"] for info in read_state().values() for h in info["hosts"] if h["netns"]}


def _up(args: argparse.Namespace) -> None:
    """Start hosts detached and print how to reach them."""
    hosts = TestHosts(args.n, firewall=args.firewall, mode=args.mode, prefix=args.prefix,
                      first_host=args.first_host).up(detached=True)
    fw = ", firewall: only port 22 open" if hosts.firewall else ""
    print(f"{len(hosts.hosts)} test hosts up ({hosts.mode} mode{fw}):")
    for h in hosts.hosts:
        where = f"  netns {h.netns}" if h.netns else ""
        print(f"  {h.name:10} {h.address}:{h.port}{where}")
    print(f"manager address (as seen from the hosts): {hosts.manager_address}")
    print(f"ssh config: {hosts.ssh_config}")
    print(f"try:        ssh -F {hosts.ssh_config} {hosts.names[0]} hostname")
    if args.install_ssh_config:
        _install_include(hosts.ssh_config)
        print(f"added `Include {hosts.ssh_config}` to {_USER_CONFIG} (removed by down)")
    print("tear down:  python -m dask_lazycluster.testing down")


def _down(args: argparse.Namespace) -> None:
    """Tear down recorded sets (all or one prefix) plus stale namespaces and the bridge."""
    prefixes = [args.prefix] if args.prefix else list(read_state())
    if args.prefix and args.prefix not in read_state():
        print(f"{args.prefix}: not recorded in {state_dir() / 'state.json'}")
    for prefix in prefixes:
        if prefix in read_state():
            TestHosts.from_state(prefix).down()
            print(f"{prefix}: down")
    pattern = re.escape(_default_netns_prefix(args.prefix)) if args.prefix else "lz[a-z]*"
    stale = [ns for ns in _namespaces(pattern) if ns not in _recorded_namespaces()]
    for ns in stale:
        _kill_netns(ns)
        print(f"removed stale namespace {ns}")
    _drop_bridge_if_unused()
    _remove_include()


def _status(args: argparse.Namespace) -> None:
    """Print every recorded set with its hosts and whether their sshd runs."""
    state = read_state()
    if not state:
        print(f"no test hosts recorded ({state_dir() / 'state.json'})")
    for prefix, info in state.items():
        fw = " firewall" if info["firewall"] else ""
        owner = f"process {info['owner_pid']}" if info["owner_pid"] else "the CLI"
        print(f"{prefix}: {info['mode']}{fw}, started by {owner}")
        print(f"  ssh config {info['ssh_config']}")
        for h in info["hosts"]:
            pid = info["sshd_pids"].get(h["name"])
            alive = "sshd running" if pid and psutil.pid_exists(pid) else "sshd NOT running"
            print(f"  {h['name']:10} {h['address']}:{h['port']}  netns {h['netns']}  {alive}")
    for ns in sorted(set(_namespaces("lz[a-z]*")) - _recorded_namespaces()):
        print(f"stale namespace (not recorded): {ns}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: Arguments (default: sys.argv[1:]).

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m dask_lazycluster.testing",
                                     description="Real SSH test hosts for dask_lazycluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start N hosts and leave them running")
    up.add_argument("n", type=int)
    up.add_argument("--firewall", action="store_true", help="allow only inbound TCP port 22")
    up.add_argument("--mode", choices=["auto", "netns", "local"], default="auto")
    up.add_argument("--prefix", default="lzhost")
    up.add_argument("--first-host", type=int, help="host i gets address octet FIRST_HOST + i "
                    "(default: lowest free multiple of 10)")
    up.add_argument("--install-ssh-config", action="store_true",
                    help="add an Include of the hosts' ssh config to ~/.ssh/config")
    down = sub.add_parser("down", help="tear down hosts started earlier")
    down.add_argument("--prefix", help="only this set (default: all)")
    sub.add_parser("status", help="show running hosts")
    args = parser.parse_args(argv)
    try:
        {"up": _up, "down": _down, "status": _status}[args.command](args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
