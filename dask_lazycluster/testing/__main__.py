"""CLI: ``python -m dask_lazycluster.testing up N [--firewall] [--bastion] [--spec ...] | down | status``.

``up`` starts N SSH test hosts that outlive the command (state in ``state.json``), ``down`` tears
down every recorded set (and stale namespaces of earlier runs), ``status`` shows what is up.
See docs/testing.md.
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
    HostSpec,
    TestHosts,
    default_netns_prefix,
    read_state,
    state_dir,
)
from dask_lazycluster.testing.network import drop_bridge_if_unused, kill_netns, namespaces

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


def _recordednamespaces() -> set[str]:
    """Namespaces of every set in the state file."""
    return {h["netns"] for info in read_state().values() for h in info["hosts"] if h["netns"]}


def parse_spec(text: str) -> tuple[int, HostSpec]:
    """Parse ``--spec`` text: ``I:key=value,...`` with keys cpus, memory, gpus, python, env.NAME.

    Args:
        text: E.g. ``2:cpus=1,memory=512M,gpus=2,python=/opt/lzenv,env.COLOR=blue``.

    Returns:
        Host number and its spec.

    Raises:
        argparse.ArgumentTypeError: Malformed text or an unknown key.
    """
    number, _, rest = text.partition(":")
    if not number.isdigit() or not rest:
        raise argparse.ArgumentTypeError(f"--spec {text!r}: expected I:key=value[,key=value]")
    fields: dict[str, object] = {}
    env: dict[str, str] = {}
    python = None
    for item in rest.split(","):
        key, _, value = item.partition("=")
        if key in ("cpus", "gpus") and value.isdigit():
            fields[key] = int(value)
        elif key == "memory" and value:
            fields[key] = int(value) if value.isdigit() else value
        elif key == "python" and value:
            python = value
        elif key.startswith("env.") and len(key) > 4:
            env[key[4:]] = value
        else:
            raise argparse.ArgumentTypeError(f"--spec {text!r}: bad item {item!r} (keys: cpus, "
                                             "memory, gpus, python, env.NAME)")
    spec = HostSpec(env=env, **fields)  # type: ignore[arg-type]
    return int(number), spec.with_python_at(python) if python else spec


def _up(args: argparse.Namespace) -> None:
    """Start hosts detached and print how to reach them."""
    try:
        hosts = TestHosts(args.n, firewall=args.firewall, mode=args.mode, prefix=args.prefix,
                          first_host=args.first_host, max_sessions=args.max_sessions,
                          max_startups=args.max_startups, bastion=args.bastion,
                          specs=dict(args.spec)).up(detached=True)
    except ValueError as exc:
        raise HarnessError(str(exc)) from exc
    fw = ", firewall: only port 22 open" if hosts.firewall else ""
    print(f"{len(hosts.hosts)} test hosts up ({hosts.mode} mode{fw}):")
    for h in hosts.hosts:
        where = f"  netns {h.netns}" if h.netns else ""
        via = f"  via {h.jump}" if h.jump else ""
        spec = hosts.specs.get(h.name)
        print(f"  {h.name:10} {h.address}:{h.port}{where}{via}" + (f"  {spec}" if spec else ""))
    print(f"manager address (as seen from the hosts): {hosts.manager_address}")
    print(f"ssh config: {hosts.ssh_config}")
    print(f"try:        ssh -F {hosts.ssh_config} {hosts.names[0]} hostname")
    print(_by_name_hint(hosts, args.install_ssh_config))
    print("tear down:  python -m dask_lazycluster.testing down")


def _by_name_hint(hosts: TestHosts, install: bool) -> str:
    """How to reach the hosts by name from Python (and from the docs' examples)."""
    names = ", ".join(repr(n) for n in hosts.names)
    if install:
        _install_include(hosts.ssh_config)
        lines = [f"added `Include {hosts.ssh_config}` to {_USER_CONFIG} (down removes it):",
                 f"  `ssh {hosts.names[0]}`, Runtime({hosts.names[0]!r}) and "
                 f"RuntimeGroup(hosts=[{names}]) find them by name"]
    else:
        lines = ["to use them by name (ssh NAME, Runtime(NAME), the docs' examples), start them "
                 "with --install-ssh-config,",
                 f"  or run Python with HOME={hosts.home} (its .ssh/config lists them)"]
    if not hosts.prefix.startswith("node"):
        lines.append("the docs' examples use node1, node2, ...: `up N --prefix node` gives "
                     "hosts those names")
    return "\n".join(lines)


def _down(args: argparse.Namespace) -> None:
    """Tear down recorded sets (all or one prefix) plus stale namespaces and the bridge."""
    prefixes = [args.prefix] if args.prefix else list(read_state())
    if args.prefix and args.prefix not in read_state():
        print(f"{args.prefix}: not recorded in {state_dir() / 'state.json'}")
    for prefix in prefixes:
        if prefix in read_state():
            TestHosts.from_state(prefix).down()
            print(f"{prefix}: down")
    pattern = re.escape(default_netns_prefix(args.prefix)) if args.prefix else "lz[a-z]*"
    stale = [ns for ns in namespaces(pattern) if ns not in _recordednamespaces()]
    for ns in stale:
        kill_netns(ns)
        print(f"removed stale namespace {ns}")
    drop_bridge_if_unused()
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
    for ns in sorted(set(namespaces("lz[a-z]*")) - _recordednamespaces()):
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
    up.add_argument("--prefix", default="lzhost",
                    help="host names are PREFIX1..N (e.g. --prefix node: node1, node2, ...)")
    up.add_argument("--first-host", type=int, help="host i gets address octet FIRST_HOST + i "
                    "(default: lowest free multiple of 10)")
    up.add_argument("--bastion", action="store_true",
                    help="host 1 is a jump host; the others are reachable only through it")
    up.add_argument("--max-sessions", type=int, help="sshd MaxSessions (default: OpenSSH's, 10)")
    up.add_argument("--max-startups", help="sshd MaxStartups (default: OpenSSH's, 10:30:100)")
    up.add_argument("--spec", type=parse_spec, action="append", default=[], metavar="I:K=V,...",
                    help="make host I differ: cpus=N, memory=512M, gpus=N, python=/opt/lzenv "
                    "(the manager's Python lives there only), env.NAME=VALUE; repeatable")
    up.add_argument("--install-ssh-config", action="store_true",
                    help="add an Include of the hosts' ssh config to ~/.ssh/config, so that "
                    "`ssh NAME` and Runtime(NAME) find them (down removes it)")
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
