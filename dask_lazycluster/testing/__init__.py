"""Real-SSH test hosts for dask_lazycluster's tests, demos and benchmarks.

``TestHosts(n).up()`` starts n OpenSSH servers (network namespaces with their own hostnames as
root, unprivileged sshd on 127.0.0.x otherwise); ``python -m dask_lazycluster.testing`` is the CLI
and ``dask_lazycluster.testing.pytest_plugin`` provides the pytest fixtures.
"""

from dask_lazycluster.testing.hosts import HarnessError, HostsInUseError, TestHost, TestHosts

__all__ = ["HarnessError", "HostsInUseError", "TestHost", "TestHosts"]
