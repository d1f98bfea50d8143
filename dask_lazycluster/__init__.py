"""dask-lazycluster: a Dask cluster on any machines you can ``ssh`` into, with one line.

Public names are re-exported here; module paths mirror lazycluster's, so migrating is a change
of import prefix (``lazycluster.`` -> ``dask_lazycluster.``).
"""

from dask_lazycluster import config as _config  # noqa: F401  (registers lazycluster.* defaults)
from dask_lazycluster.cluster.dask_cluster import (
    DaskCluster,
    LocalMasterLauncher,
    RemoteMasterLauncher,
    RemoteWorker,
    RoundRobinLauncher,
)
from dask_lazycluster.cluster.exceptions import MasterStartError
from dask_lazycluster.cluster.named import DaskClusterProxy
from dask_lazycluster.cluster.runtime_cluster import (
    MasterLauncher,
    MasterWorkerCluster,
    WorkerLauncher,
)
from dask_lazycluster.exceptions import (
    ClusterNameInUseError,
    ConnectionLostError,
    ForwardRefusedError,
    InvalidRuntimeError,
    LazyclusterError,
    NoPortsLeftError,
    NoRuntimesDetectedError,
    PathCreationError,
    PortInUseError,
    SessionRefusedError,
    SetupError,
    StaleClusterError,
    TaskExecutionError,
    UnknownClusterError,
    WorkerStartError,
    WorkerStartTimeoutError,
    WorkersUnavailableError,
)
from dask_lazycluster.runtime_manager import RuntimeManager
from dask_lazycluster.runtime_mgmt import RuntimeGroup
from dask_lazycluster.runtimes import Runtime, RuntimeTask
from dask_lazycluster.utils import Environment

__version__ = "0.1.0"

__all__ = [
    "ClusterNameInUseError",
    "ConnectionLostError",
    "DaskCluster",
    "DaskClusterProxy",
    "Environment",
    "ForwardRefusedError",
    "InvalidRuntimeError",
    "LazyclusterError",
    "LocalMasterLauncher",
    "MasterLauncher",
    "MasterStartError",
    "MasterWorkerCluster",
    "NoPortsLeftError",
    "NoRuntimesDetectedError",
    "PathCreationError",
    "PortInUseError",
    "RemoteMasterLauncher",
    "RemoteWorker",
    "RoundRobinLauncher",
    "Runtime",
    "RuntimeGroup",
    "RuntimeManager",
    "RuntimeTask",
    "SessionRefusedError",
    "SetupError",
    "StaleClusterError",
    "TaskExecutionError",
    "UnknownClusterError",
    "WorkerLauncher",
    "WorkerStartError",
    "WorkerStartTimeoutError",
    "WorkersUnavailableError",
    "__version__",
]
