"""Each host's options for its Dask processes (:class:`HostPlan`).

Cluster-wide values are merged with per-host ones: a host's value wins over the cluster-wide
one; ``env`` and ``worker-options`` are merged (the host's keys win); ``setup`` and
``upload`` add the host's entries after the cluster-wide ones. Per-host values come from
mapping entries of ``lazycluster.hosts`` and from ``DaskCluster(host_options=...)``, the
latter winning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class HostPlan:
    """The options of one host's Dask processes.

    Attributes:
        host: The host name.
        python: Its interpreter (None: the runtime's).
        env: Environment variables for its Dask processes.
        setup: Shell lines run before python, in the same shell.
        upload: Local paths copied to its working directory before its first worker.
        worker_class: Import path of its workers' class.
        worker_options: Keyword arguments for that class.
        max_workers: Most workers it may run (None: no limit).
    """

    host: str
    python: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    upload: list[str] = field(default_factory=list)
    worker_class: str = "distributed.Nanny"
    worker_options: dict[str, Any] = field(default_factory=dict)
    max_workers: int | None = None


def host_plans(
    hosts: list[str],
    cluster_wide: HostPlan,
    from_config: dict[str, dict[str, Any]],
    from_argument: dict[str, dict[str, Any]],
) -> dict[str, HostPlan]:
    """Every host's plan: the cluster-wide values overridden by its own.

    Args:
        hosts: The group's hosts.
        cluster_wide: The cluster-wide values (its ``host`` is ignored).
        from_config: Per-host options of ``lazycluster.hosts`` (checked, canonical keys);
            entries for hosts outside the group are ignored.
        from_argument: ``host_options`` (checked, canonical keys); they win over the config.

    Returns:
        Host name to its plan.

    Raises:
        ValueError: If ``host_options`` names a host outside the group, or an upload path
            does not exist on the manager.
    """
    unknown = [h for h in from_argument if h not in hosts]
    if unknown:
        raise ValueError(f"host_options names {', '.join(map(repr, unknown))}, not in the "
                         f"group ({', '.join(hosts)})")
    plans = {}
    for host in hosts:
        own = {**from_config.get(host, {}), **from_argument.get(host, {})}
        plan = HostPlan(
            host=host,
            python=own.get("python", cluster_wide.python),
            env={**cluster_wide.env, **own.get("env", {})},
            setup=[*cluster_wide.setup, *own.get("setup", [])],
            upload=[*cluster_wide.upload, *own.get("upload", [])],
            worker_class=own.get("worker-class", cluster_wide.worker_class),
            worker_options={**cluster_wide.worker_options, **own.get("worker-options", {})},
            max_workers=own.get("max-workers", cluster_wide.max_workers),
        )
        missing = [p for p in plan.upload if not os.path.exists(p)]
        if missing:
            raise ValueError(f"upload path {missing[0]!r} (for host {host!r}) does not exist")
        plans[host] = plan
    return plans


def is_nanny(worker_class: str) -> bool:
    """Whether a worker class path names a nanny (it needs a second port and a worker process).

    Args:
        worker_class: Import path such as ``"distributed.Nanny"``.

    Returns:
        True for a nanny class.
    """
    return worker_class.rsplit(".", 1)[-1] == "Nanny"
