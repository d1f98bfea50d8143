"""Code that runs on the hosts, not on the manager.

The manager ships these modules to a host as one bundle over SSH stdin (see
``dask_lazycluster._bootstrap``), where they are installed as the package
``lazycluster_remote``; so they use relative imports only, and only the standard library at
module level: a host may lack everything else, dask-lazycluster included.

Modules:
    protocol: reading stdin without a buffered reader, events, process groups.
    actions: one-shot actions (probe, function, reachability test) and the entry point.
    supervisor: the per-host parent of every Dask process of a cluster.
    server: what a forked child of the supervisor runs (one Dask server).
"""
