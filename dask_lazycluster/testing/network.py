"""Network of netns-mode test hosts: the bridge, one namespace + veth per host, nftables rules.

Every host's namespace is joined by a veth pair to the bridge ``lzbr0`` (10.231.0.1/24, the
manager's address as the hosts see it); there is no default route. Optional firewalls:

- ``firewall``: inbound TCP only on port 22.
- bastion: a host behind a jump host accepts new inbound connections only from the jump host and
  the other hosts behind it (with ``firewall`` only on port 22), and opens none to the manager,
  like a private network whose only way in is SSH to a login node.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import psutil

from dask_lazycluster.testing.system import (
    SYSTEM_PATH,
    TestHost,
    find_bin,
    kill_all,
    locked_state,
    run_cmd,
)

BRIDGE = "lzbr0"
SUBNET = "10.231.0"
MANAGER_ADDRESS = f"{SUBNET}.1"
MAC = "02:1a:0a:e7:00"  # locally administered; last byte = last address octet


def _have_ip() -> bool:
    return shutil.which("ip", path=SYSTEM_PATH) is not None


def namespaces(prefix_re: str) -> list[str]:
    """Existing network namespaces named (regex) prefix_re + digits.

    Args:
        prefix_re: Regular expression for the name prefix.

    Returns:
        Matching namespace names (none when not root).
    """
    if os.geteuid() != 0 or not _have_ip():
        return []
    out = run_cmd("ip", "netns", "list", check=False).stdout.split()
    return [ns for ns in out if re.fullmatch(rf"{prefix_re}\d+", ns)]


def octets_in_use() -> set[int]:
    """Last octets of the subnet's addresses held in any network namespace on this machine.

    A namespace left by someone else (a debugging session, another tool) can hold a test
    host's address on the bridge; two holders of one address make connections land on
    either at random.

    Returns:
        The octets (none when not root).
    """
    if os.geteuid() != 0 or not _have_ip():
        return set()
    text = run_cmd("ip", "-o", "-4", "addr", "show", check=False).stdout
    text += run_cmd("ip", "-all", "netns", "exec", "ip", "-o", "-4", "addr", "show",
                    check=False).stdout
    pattern = rf"inet {re.escape(SUBNET)}\.(\d+)/"
    return {int(m) for m in re.findall(pattern, text)}


def kill_netns(ns: str) -> None:
    """Kill every process in namespace ns (repeatedly, until none is left) and delete it.

    Args:
        ns: Namespace name.
    """
    for _ in range(20):
        pids = [int(p) for p in run_cmd("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        kill_all(procs)
    run_cmd("ip", "link", "del", f"{ns}b", check=False)  # synchronous, unlike the netns' cleanup
    run_cmd("ip", "netns", "del", ns, check=False)


def drop_bridge_if_unused() -> None:
    """Delete the bridge when no veth is attached to it any more (under the state lock)."""
    if os.geteuid() != 0 or not _have_ip():
        return
    with locked_state():
        if run_cmd("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            if not run_cmd("ip", "-o", "link", "show", "master", BRIDGE,
                           check=False).stdout.strip():
                run_cmd("ip", "link", "del", BRIDGE, check=False)


def firewall_rules(ssh_only: bool, allowed_from: Sequence[str] | None = None) -> str:
    """An nftables ruleset for one host.

    Args:
        ssh_only: Accept new inbound TCP connections only on port 22.
        allowed_from: When given, accept new inbound connections only from these addresses and
            open none to the manager (a host behind a bastion).

    Returns:
        The ruleset text for ``nft -f -``.
    """
    inbound = "tcp dport 22 accept" if ssh_only else "accept"
    if allowed_from is not None:
        inbound = f"ip saddr {{ {', '.join(allowed_from)} }} {inbound}"
    output = "" if allowed_from is None else f"""
  chain output {{
    type filter hook output priority 0; policy accept;
    ct state established,related accept
    ip daddr {MANAGER_ADDRESS} drop
  }}"""
    policy = "drop" if ssh_only or allowed_from is not None else "accept"
    return f"""table inet lazycluster {{
  chain input {{
    type filter hook input priority 0; policy {policy};
    iif lo accept
    ct state established,related accept
    meta l4proto {{ icmp, ipv6-icmp }} accept
    {inbound}
  }}{output}
}}
"""


def make_network(hosts: Sequence[TestHost], rules: dict[str, str]) -> None:
    """Create the bridge (if needed), one namespace + veth per host, and their firewalls.

    Args:
        hosts: Hosts with ``netns`` set.
        rules: Host name -> nftables ruleset (hosts not listed get no firewall).
    """
    if run_cmd("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        # fixed MACs (bridge and hosts): addresses are reused by later sets, and a stale
        # neighbour entry for a random MAC would stall connections for many seconds
        run_cmd("ip", "link", "add", BRIDGE, "address", f"{MAC}:01", "type", "bridge")
        run_cmd("ip", "addr", "add", f"{MANAGER_ADDRESS}/24", "dev", BRIDGE)
        run_cmd("ip", "link", "set", BRIDGE, "up")
    run_cmd("ip", "link", "set", BRIDGE, "address", f"{MAC}:01")  # a no-op unless set elsewhere
    for f in Path("/proc/sys/net/bridge").glob("bridge-nf-call-*"):
        if f.read_text().strip() != "0":  # br_netfilter: keep host firewalls off the bridge
            f.write_text("0")
    for h in hosts:
        ns = str(h.netns)
        run_cmd("ip", "netns", "add", ns)
        mac = f"{MAC}:{int(h.address.rsplit('.', 1)[1]):02x}"
        run_cmd("ip", "link", "add", f"{ns}b", "type", "veth", "peer", "name", "eth0",
                "address", mac, "netns", ns)
        run_cmd("ip", "link", "set", f"{ns}b", "master", BRIDGE, "up")
        run_cmd("ip", "neigh", "flush", "to", h.address, "dev", BRIDGE, check=False)
        run_cmd("ip", "-n", ns, "addr", "add", f"{h.address}/24", "dev", "eth0")
        run_cmd("ip", "-n", ns, "link", "set", "eth0", "up")
        run_cmd("ip", "-n", ns, "link", "set", "lo", "up")
        if h.name in rules:
            run_cmd("ip", "netns", "exec", ns, find_bin("nft"), "-f", "-", stdin=rules[h.name])
