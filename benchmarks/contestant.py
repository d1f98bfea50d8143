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

KINDS = ("local", "sshcluster", "dask-tunnel", "dask-direct", "dask-tunnel-sp", "dask-remote",
         "dask-remote-tunnel")
# DaskCluster's tunnel argument per contestant; dask-remote* put the scheduler on the first host.
TUNNEL: dict[str, bool | str] = {
    "dask-tunnel": True, "dask-direct": False, "dask-tunnel-sp": True, "dask-remote": "auto",
    "dask-remote-tunnel": True}


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


def process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


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


def sshcluster_scheduler(since: float) -> Any:
    """The SSHCluster scheduler process this run started on the manager (a psutil.Process or None)."""
    import psutil

    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "distributed.cli.dask_spec" in cmd and "distributed.Scheduler" in cmd:
            if p.info["create_time"] >= since - 1:
                return p
    return None


def sshcluster_scheduler_rss(since: float) -> int | None:
    """RSS of the SSHCluster scheduler process this run started on the manager (if found)."""
    p = sshcluster_scheduler(since)
    return int(p.memory_info().rss) if p is not None else None


def process_cpu(p: Any) -> float:
    """User+system CPU seconds of a psutil.Process (0 when it is gone)."""
    import psutil

    try:
        t = p.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def host_processes(netns: str) -> dict[str, Any]:
    """Memory and SSH sessions of the processes inside a test host's network namespace.

    Every process except sshd's own (listener, per-connection and per-session sshd processes):
    the supervisor, nannies, workers and any shell. RSS counts pages shared after fork once per
    process; PSS shares them out. Sessions: processes whose parent is an sshd process (each SSH
    session's command).
    """
    import subprocess

    import psutil

    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                         timeout=10).stdout
    rss = pss = count = sessions = 0
    for pid in (int(x) for x in out.split()):
        try:
            p = psutil.Process(pid)
            if p.name() == "sshd":
                continue
            mem = p.memory_full_info()
            parent = p.parent()
            if parent is not None and parent.name() == "sshd":
                sessions += 1
        except psutil.Error:
            continue
        rss += mem.rss
        pss += mem.pss
        count += 1
    return {"rss": rss, "pss": pss, "procs": count, "sessions": sessions}


def local_children_memory() -> dict[str, Any]:
    """The same figures for this process's children (LocalCluster's worker processes)."""
    import psutil

    rss = pss = count = 0
    for p in psutil.Process().children(recursive=True):
        try:
            mem = p.memory_full_info()
        except psutil.Error:
            continue
        rss += mem.rss
        pss += mem.pss
        count += 1
    return {"rss": rss, "pss": pss, "procs": count, "sessions": 0}


def cmd_cluster(args: argparse.Namespace) -> None:
    t0 = args.t0  # wall clock just before the parent started this process
    result: dict[str, Any] = {"kind": args.kind, "n": args.n}
    hosts = args.hosts.split(",") if args.hosts else []
    addresses = json.loads(args.addresses) if args.addresses else {}
    connect_options = json.loads(args.connect_options) if args.connect_options else {}
    figures = set(args.figures.split(",")) if args.figures else set()
    n0 = args.start_n if args.start_n is not None else args.n  # workers of the cold start
    result["start_n"] = n0
    cluster: Any

    if args.kind == "local":
        from distributed import Client, LocalCluster

        t_import = time.time()
        cluster = LocalCluster(n_workers=n0, processes=True)
    elif args.kind == "sshcluster":
        from distributed import Client, SSHCluster

        t_import = time.time()
        cluster = SSHCluster(
            [args.scheduler_ssh_host, *hosts],
            connect_options=connect_options,
            remote_python=sys.executable,
            # The manager's default address is unroutable from the hosts: bind the bridge address.
            scheduler_options={"host": args.scheduler_address, "port": 0},
            # Same reason for the workers (their namespaces have no default route). More workers
            # than hosts: SSHCluster's own way, n_workers per host over the host's one connection.
            worker_options={"interface": "eth0",
                            **({"n_workers": n0 // len(hosts)} if n0 > len(hosts) else {})},
        )
    else:
        import dask
        from distributed import Client

        from dask_lazycluster import DaskCluster, RuntimeGroup

        t_import = time.time()
        group = RuntimeGroup(hosts=hosts, connect_options=connect_options)
        scheduler_host = hosts[0] if args.kind.startswith("dask-remote") else None
        kwargs: dict[str, Any] = {"scheduler_host": scheduler_host} if scheduler_host else {}
        with dask.config.set({"lazycluster.scheduler-process": args.kind == "dask-tunnel-sp"}):
            cluster = DaskCluster(group, tunnel=TUNNEL[args.kind], n_workers=n0, **kwargs)
    t_ctor = time.time()
    client = Client(cluster)
    wait_until(lambda: client.run_on_scheduler(running_workers) >= n0, args.timeout,
               f"{n0} workers registered")
    t_ready = time.time()
    cpu = os.times()
    result.update(import_s=t_import - t0, ctor_s=t_ctor - t0, start_s=t_ready - t0,
                  cpu_s=cpu.user + cpu.system, load1=os.getloadavg()[0])
    if n0 == args.n:
        result["start_all_s"] = t_ready - t0
    if args.kind.startswith("dask"):
        import dask_lazycluster

        result["package_file"] = dask_lazycluster.__file__

    import psutil

    me = psutil.Process()
    result["rss"] = me.memory_info().rss
    if args.kind == "sshcluster":
        result["scheduler_rss"] = sshcluster_scheduler_rss(t0)
    elif args.kind == "dask-tunnel-sp":
        result["scheduler_rss"] = psutil.Process(cluster.scheduler.pid).memory_info().rss
    elif args.kind.startswith("dask-remote"):  # on host 1
        result["scheduler_rss"] = client.run_on_scheduler(process_rss)
    result["ssh_conns"] = ssh_connections(addresses)
    netns = json.loads(args.host_netns) if args.host_netns else {}

    if "tasks" in figures:
        from distributed import wait

        client.gather(client.map(inc, range(20), pure=False))  # warm the function cache
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            futures = client.map(inc, range(args.tasks), pure=False)
            values = client.gather(futures)
            times.append(time.perf_counter() - t)
            assert sum(values) == sum(range(1, args.tasks + 1))
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

    if "idle" in figures:
        # CPU of the manager while the cluster is up and idle; SSHCluster's scheduler has a
        # process of its own on the manager, counted with it (the others run it in-process).
        time.sleep(2.0)  # let the tasks' aftermath settle
        sched = sshcluster_scheduler(t0) if args.kind == "sshcluster" else None
        c0 = process_cpu(me) + (process_cpu(sched) if sched is not None else 0.0)
        t = time.monotonic()
        time.sleep(args.idle)
        c1 = process_cpu(me) + (process_cpu(sched) if sched is not None else 0.0)
        result["idle_cpu_pct"] = 100.0 * (c1 - c0) / (time.monotonic() - t)
        result["idle_cpu_pct_per_host"] = result["idle_cpu_pct"] / max(1, len(hosts) or args.n)

    if "scaleto" in figures:
        # scale from the n0 workers of the cold start to n, on the same hosts
        t = time.monotonic()
        cluster.scale(args.n)
        done = wait_until(lambda: client.run_on_scheduler(running_workers) >= args.n,
                          args.timeout, f"{args.n} workers registered")
        result["scaleto_s"] = done - t
        result["start_all_s"] = time.time() - t0 - (time.monotonic() - done)  # spawn to all n ready
        result["scaleto_per_worker_s"] = (done - t) / (args.n - n0)
        result["ssh_conns_scaled"] = ssh_connections(addresses)

    if "hostmem" in figures:
        time.sleep(args.idle)  # idle: warm-up work and spares done
        mems = ([local_children_memory()] if args.kind == "local"
                else [host_processes(ns) for ns in netns.values()])
        result["host_rss"] = sum(m["rss"] for m in mems)
        result["host_pss"] = sum(m["pss"] for m in mems)
        result["host_procs"] = sum(m["procs"] for m in mems)
        result["host_sessions"] = max(m["sessions"] for m in mems)
        workers = client.run_on_scheduler(scheduler_workers)
        result["workers_idle"] = workers
        result["host_rss_per_worker"] = result["host_rss"] / workers
        result["host_pss_per_worker"] = result["host_pss"] / workers

    if "sessions" in figures and netns:  # SSH sessions per host (max) with the cluster up
        result["host_sessions"] = max(host_processes(ns)["sessions"] for ns in netns.values())

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
    conn = runtime.core.state.ssh.conn
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
    c.add_argument("--start-n", type=int, default=None,
                   help="workers of the cold start (default --n; figure scaleto scales to --n)")
    c.add_argument("--tasks", type=int, default=2000, help="trivial tasks of figure tasks")
    c.add_argument("--idle", type=float, default=10.0,
                   help="idle seconds of figures idle and hostmem")
    c.add_argument("--host-netns", default="",
                   help="JSON {host: network namespace} for figures hostmem and sessions")
    f = sub.add_parser("forward")
    f.add_argument("--host", required=True)
    f.add_argument("--remote-port", type=int, required=True)
    f.add_argument("--local-port", type=int, required=True)
    f.add_argument("--connect-options", required=True)
    args = parser.parse_args()
    {"cluster": cmd_cluster, "forward": cmd_forward}[args.command](args)


if __name__ == "__main__":
    main()
