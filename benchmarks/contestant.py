"""One benchmark contestant in a fresh Python process (started by ``benchmarks/run.py``).

Only the standard library is imported at module level, so a cold start measures the imports a
user pays for. The result is one line ``RESULT {json}`` on stdout; logs go to stderr.

Commands:
    cluster  cold start of one contestant (then optionally tasks, transfer, scale)
    forward  hold an asyncssh local forward (Runtime.expose_port_from_runtime) until stdin closes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

KINDS = ("local", "sshcluster", "dask-tunnel", "dask-direct", "dask-tunnel-sp")


def emit(result: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def inc(x: int) -> int:
    return x + 1


def make_bytes(n: int) -> bytes:
    return os.urandom(n)


def consume(b: bytes) -> int:
    return len(b)


def running_workers(dask_scheduler: Any) -> int:
    return sum(1 for ws in dask_scheduler.workers.values() if ws.status.name == "running")


def scheduler_workers(dask_scheduler: Any) -> int:
    return len(dask_scheduler.workers)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll predicate until true; return the monotonic time it became true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)


def ssh_connections(addresses: dict[str, str]) -> dict[str, int]:
    """Established TCP connections from this process to port 22 of each host."""
    import psutil

    by_ip = {ip: name for name, ip in addresses.items()}
    counts = dict.fromkeys(addresses, 0)
    for c in psutil.Process().net_connections(kind="tcp"):
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == 22:
            name = by_ip.get(c.raddr.ip)
            if name is not None:
                counts[name] += 1
    return counts


def sshcluster_scheduler_rss(since: float) -> int | None:
    """RSS of the SSHCluster scheduler process this run started on the manager (if found)."""
    import psutil

    for p in psutil.process_iter(["cmdline", "create_time", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "distributed.cli.dask_spec" in cmd and "distributed.Scheduler" in cmd:
            if p.info["create_time"] >= since - 1:
                return int(p.info["memory_info"].rss)
    return None


def cmd_cluster(args: argparse.Namespace) -> None:
    t0 = args.t0  # wall clock just before the parent started this process
    result: dict[str, Any] = {"kind": args.kind, "n": args.n}
    hosts = args.hosts.split(",") if args.hosts else []
    addresses = json.loads(args.addresses) if args.addresses else {}
    connect_options = json.loads(args.connect_options) if args.connect_options else {}
    figures = set(args.figures.split(",")) if args.figures else set()
    cluster: Any

    if args.kind == "local":
        from distributed import Client, LocalCluster

        t_import = time.time()
        cluster = LocalCluster(n_workers=args.n, processes=True)
    elif args.kind == "sshcluster":
        from distributed import Client, SSHCluster

        t_import = time.time()
        cluster = SSHCluster(
            [args.scheduler_ssh_host, *hosts],
            connect_options=connect_options,
            remote_python=sys.executable,
            # The manager's default address is unroutable from the hosts: bind the bridge address.
            scheduler_options={"host": args.scheduler_address, "port": 0},
            # Same reason for the workers (their namespaces have no default route).
            worker_options={"interface": "eth0"},
        )
    else:
        import dask
        from distributed import Client

        from dask_lazycluster import DaskCluster, RuntimeGroup

        t_import = time.time()
        group = RuntimeGroup(hosts=hosts, connect_options=connect_options)
        with dask.config.set({"lazycluster.scheduler-process": args.kind == "dask-tunnel-sp"}):
            cluster = DaskCluster(group, tunnel=args.kind != "dask-direct", n_workers=args.n)
    t_ctor = time.time()
    client = Client(cluster)
    wait_until(lambda: client.run_on_scheduler(running_workers) >= args.n, args.timeout,
               f"{args.n} workers registered")
    t_ready = time.time()
    cpu = os.times()
    result.update(import_s=t_import - t0, ctor_s=t_ctor - t0, start_s=t_ready - t0,
                  cpu_s=cpu.user + cpu.system, load1=os.getloadavg()[0])
    if args.kind.startswith("dask"):
        import dask_lazycluster

        result["package_file"] = dask_lazycluster.__file__

    import psutil

    result["rss"] = psutil.Process().memory_info().rss
    if args.kind == "sshcluster":
        result["scheduler_rss"] = sshcluster_scheduler_rss(t0)
    elif args.kind == "dask-tunnel-sp":
        result["scheduler_rss"] = psutil.Process(cluster.scheduler.pid).memory_info().rss
    result["ssh_conns"] = ssh_connections(addresses)

    if "tasks" in figures:
        from distributed import wait

        client.gather(client.map(inc, range(20), pure=False))  # warm the function cache
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            futures = client.map(inc, range(2000), pure=False)
            values = client.gather(futures)
            times.append(time.perf_counter() - t)
            assert sum(values) == sum(range(1, 2001))
            del futures
        result["tasks_s"] = sorted(times)[len(times) // 2]
        result["tasks_all"] = times

    if "transfer" in figures:
        import socket

        from distributed import wait

        names = client.run(socket.gethostname)
        by_host: dict[str, str] = {}
        for addr, hostname in sorted(names.items()):
            by_host.setdefault(hostname, addr)
        pair = list(by_host.values())[:2] if len(by_host) >= 2 else sorted(names)[:2]
        a, b = pair
        result["transfer_pair"] = [names[a], names[b]]
        times = []
        for _ in range(args.reps):
            fa = client.submit(make_bytes, args.transfer_bytes, workers=[a], pure=False,
                               allow_other_workers=False)
            wait(fa, timeout=args.timeout)
            t = time.perf_counter()
            fb = client.submit(consume, fa, workers=[b], pure=False, allow_other_workers=False)
            n = fb.result(timeout=args.timeout)
            times.append(time.perf_counter() - t)
            assert n == args.transfer_bytes
            del fa, fb
            wait_until(lambda: not client.run_on_scheduler(
                lambda dask_scheduler: len(dask_scheduler.tasks)), 30, "transfer data released")
        result["transfer_s"] = sorted(times)[len(times) // 2]
        result["transfer_all"] = times

    if "scale" in figures and args.kind != "sshcluster":
        t = time.monotonic()
        cluster.scale(2 * args.n)
        done = wait_until(lambda: client.run_on_scheduler(running_workers) >= 2 * args.n,
                          args.timeout, f"{2 * args.n} workers registered")
        result["scale_up_s"] = done - t
        result["ssh_conns_2n"] = ssh_connections(addresses)
        t = time.monotonic()
        cluster.scale(args.n)
        done = wait_until(lambda: client.run_on_scheduler(scheduler_workers) <= args.n,
                          args.timeout, f"back to {args.n} workers")
        result["scale_down_s"] = done - t

    t = time.monotonic()
    client.close()
    cluster.close(timeout=60)
    result["close_s"] = time.monotonic() - t
    if args.kind.startswith("dask"):
        group.cleanup()
    emit(result)


def cmd_forward(args: argparse.Namespace) -> None:
    from dask_lazycluster import Runtime

    runtime = Runtime(args.host, connect_options=json.loads(args.connect_options))
    port = runtime.expose_port_from_runtime(args.remote_port, args.local_port)
    conn = runtime._conn
    info = {"cipher": conn.get_extra_info("send_cipher") if conn else None,
            "compression": conn.get_extra_info("send_compression") if conn else None}
    print("READY " + json.dumps({"port": port, **info}), flush=True)
    sys.stdin.read()  # the parent closes stdin to end the forward
    runtime.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cluster")
    c.add_argument("--kind", choices=KINDS, required=True)
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--t0", type=float, required=True)
    c.add_argument("--hosts", default="")
    c.add_argument("--addresses", default="")
    c.add_argument("--connect-options", default="")
    c.add_argument("--scheduler-ssh-host", default="")
    c.add_argument("--scheduler-address", default="")
    c.add_argument("--figures", default="")
    c.add_argument("--reps", type=int, default=3)
    c.add_argument("--transfer-bytes", type=int, default=100_000_000)
    c.add_argument("--timeout", type=float, default=120)
    f = sub.add_parser("forward")
    f.add_argument("--host", required=True)
    f.add_argument("--remote-port", type=int, required=True)
    f.add_argument("--local-port", type=int, required=True)
    f.add_argument("--connect-options", required=True)
    args = parser.parse_args()
    {"cluster": cmd_cluster, "forward": cmd_forward}[args.command](args)


if __name__ == "__main__":
    main()
