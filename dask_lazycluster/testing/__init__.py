"""Real-SSH test hosts for dask_lazycluster's tests, demos and benchmarks.

``TestHosts(n).up()`` starts n OpenSSH servers (network namespaces with their own hostnames as
root, unprivileged sshd on 127.0.0.x otherwise); ``HostSpec`` makes hosts differ (cores, memory,
environment, paths, stand-in GPUs); ``python -m dask_lazycluster.testing`` is the CLI and
``dask_lazycluster.testing.pytest_plugin`` provides the pytest fixtures. See docs/testing.md.
"""

from dask_lazycluster.testing.hosts import (
    HarnessError,
    HostsInUseError,
    HostSpec,
    TestHost,
    TestHosts,
    clear_stale,
    read_state,
    running_sets,
)

__all__ = ["HarnessError", "HostSpec", "HostsInUseError", "TestHost", "TestHosts", "clear_stale",
           "read_state", "running_sets"]
