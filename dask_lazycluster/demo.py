"""The main job, end to end: local test hosts, a Dask cluster over SSH, a computation, teardown.

Run ``python -m dask_lazycluster.demo [--hosts N] [--firewall] [--tunnel {true,false,auto}]``.
It starts N real sshd hosts with the project's harness (network namespaces as root), builds a
``DaskCluster`` over them exactly as a user would over their own machines, computes, scales,
and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import socket
import time
from collections import Counter

from distributed import Client

from dask_lazycluster import DaskCluster, RuntimeGroup
from dask_lazycluster.testing import TestHosts


def _tunnel(value: str) -> bool | str:
    modes: dict[str, bool | str] = {"true": True, "false": False, "auto": "auto"}
    return modes[value.lower()]


def main(argv: list[str] | None = None) -> None:
    """Run the demo.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3, help="number of test hosts (default 3)")
    parser.add_argument("--firewall", action="store_true", help="hosts open only port 22")
    parser.add_argument("--tunnel", type=_tunnel, default=True, help="true, false or auto")
    args = parser.parse_args(argv)

    started = time.monotonic()
    with TestHosts(args.hosts, firewall=args.firewall, prefix="lzdemo") as hosts:
        print(f"{len(hosts.names)} SSH test hosts up ({hosts.mode} mode): {', '.join(hosts.names)}")
        group = RuntimeGroup(hosts=hosts.names, connect_options=hosts.connect_options())
        try:
            t0 = time.monotonic()
            with DaskCluster(group, tunnel=args.tunnel) as cluster, Client(cluster) as client:
                print(f"cluster with {len(cluster.workers)} workers in "
                      f"{time.monotonic() - t0:.1f} s; dashboard: {cluster.dashboard_link}")
                print("workers (host, threads):", sorted(client.run(
                    lambda dask_worker: (socket.gethostname(), dask_worker.state.nthreads)).values()))
                total = sum(client.gather(client.map(lambda x: x * x, range(1000))))
                print("sum of squares 0..999 computed on the cluster:", total)
                assert total == sum(x * x for x in range(1000))
                import dask.array as da

                matrix = da.random.random((3000, 3000), chunks=(750, 750))
                print("mean of a 3000x3000 random matrix:", round(float(matrix.mean().compute()), 3))
                t1 = time.monotonic()
                cluster.scale(2 * len(hosts.names))  # each host's two workers share it
                cluster.sync(cluster.reconcile)  # new workers up, resized ones replaced
                client.wait_for_workers(2 * len(hosts.names))
                print(f"scaled to {2 * len(hosts.names)} workers in {time.monotonic() - t1:.1f} s:",
                      dict(Counter(client.run(socket.gethostname).values())))
        finally:
            group.cleanup()
        left = {h: p for h, p in hosts.leftover_processes().items()
                if any(not c.startswith("sshd") for c in p)}
        print("processes left on the hosts after close():", left or "none")
    print(f"demo finished in {time.monotonic() - started:.1f} s; test hosts torn down")


if __name__ == "__main__":
    main()
