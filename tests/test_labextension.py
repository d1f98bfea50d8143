"""The JupyterLab Dask sidebar (dask-labextension) driving a DaskCluster, end to end.

A real Jupyter server runs as a subprocess with ``labextension.factory`` set to ``DaskCluster``
and ``lazycluster.hosts`` set to the test hosts in a Dask config file, and with HOME at the fake
home whose ``~/.ssh`` resolves them. The test then makes the REST calls the sidebar makes:
create a cluster, scale it, switch it to adaptive, open its dashboard through the extension's
proxy, delete it; and checks the workers really run, and that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import pytest
import yaml
from distributed import Client
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from dask_lazycluster.testing import TestHosts

from .conftest import wait_no_leftovers
from .helpers import free_port, wait_until

pytestmark = pytest.mark.usefixtures("leak_check")

REPO = Path(__file__).resolve().parents[1]
for _module in ("jupyter_server", "jupyter_server_proxy", "dask_labextension"):
    pytest.importorskip(_module, reason=f"{_module} is not installed: pip install "
                        "'dask-lazycluster[lab]' (the test extra has it too)")


@dataclass
class JupyterServer:
    """A running Jupyter server subprocess and how to call its REST API."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path

    def call(self, method: str, path: str, body: Any = None,
             timeout: float = 120) -> tuple[int, bytes]:
        """Make one authenticated request, as the sidebar's ServerConnection does.

        Args:
            method: HTTP method.
            path: Path below the server's base URL, e.g. ``dask/clusters``.
            body: A JSON-serialisable request body, or None.
            timeout: Seconds to wait for the reply.

        Returns:
            The status code and the raw reply body (error replies included).
        """
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/{path}", data=data, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def json(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        """Make a request that must answer ``status``; return its decoded JSON body."""
        code, raw = self.call(method, path, body)
        assert code == status, f"{method} {path} -> {code} {raw[:500]!r}\n{self.log_tail()}"
        return json.loads(raw) if raw else None

    def bokeh_handshake(self, path: str, page: bytes) -> str:
        """Open a Bokeh page's websocket as the browser does; return the server's first reply.

        Args:
            path: The websocket's path below the base URL (the page's path + ``/ws``).
            page: The page's HTML, which holds the session token the socket must present.

        Returns:
            The ``msgtype`` of the first message (Bokeh's server answers ``ACK``).
        """
        found = re.search(rb'"token":"([^"]+)"', page)
        assert found, page[-500:]
        request = HTTPRequest(f"ws{self.url.removeprefix('http')}/{path}",
                              headers={"Authorization": f"token {self.token}"})

        async def first_message() -> str:
            socket = await websocket_connect(request, subprotocols=["bokeh",
                                                                    found.group(1).decode()])
            try:
                message = await asyncio.wait_for(socket.read_message(), 30)
            finally:
                socket.close()
            assert isinstance(message, str), message
            return str(json.loads(message)["msgtype"])

        return asyncio.run(first_message())

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for assertion messages."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "server log:\n" + "\n".join(text.splitlines()[-lines:])


# Extra Dask config per networking mode. With tunnel=False the scheduler's dashboard listens on
# every interface and its link names the manager's address, which the extension's proxy refuses
# (it proxies only localhost): the documented fix is a dashboard link on 127.0.0.1.
MODES: dict[str, dict[str, Any]] = {
    "tunnel": {},
    "direct": {"lazycluster": {"tunnel": False},
               "distributed": {"dashboard": {"link": "{scheme}://127.0.0.1:{port}/status"}}},
}


def write_dask_config(directory: Path, hosts: list[str], extra: dict[str, Any]) -> None:
    """The user's recipe (docs/jupyterlab.md): the sidebar's factory and the hosts.

    Args:
        directory: The DASK_CONFIG directory to create.
        hosts: Host names for ``lazycluster.hosts``.
        extra: More config, merged over the recipe.
    """
    directory.mkdir()
    config: dict[str, Any] = {
        "labextension": {
            # n-workers shows that factory kwargs reach DaskCluster (dashes become underscores).
            "factory": {"module": "dask_lazycluster", "class": "DaskCluster", "args": [],
                        "kwargs": {"n-workers": 1}},
            "default": {"workers": None, "adapt": None},
        },
        "lazycluster": {"hosts": hosts},
    }
    (directory / "lazycluster.yaml").write_text(yaml.safe_dump(dask.config.merge(config, extra)))


@contextlib.contextmanager
def running_jupyter_server(hosts: TestHosts, tmp_path: Path, dask_config: Path,
                           env: dict[str, str] | None = None) -> Iterator[JupyterServer]:
    """A Jupyter server reading the Dask config dir ``dask_config``, on the test hosts' home.

    Args:
        hosts: The test hosts (their fake home is the server's HOME).
        tmp_path: Where its root dir, runtime dir and log go.
        dask_config: The server's DASK_CONFIG directory.
        env: More environment variables of the server.

    Yields:
        The answering server; stopped afterwards.
    """
    (tmp_path / "root").mkdir()
    port, token = free_port(), os.urandom(16).hex()
    server_env = {**os.environ, **(env or {})}
    server_env.update({
        "HOME": str(hosts.home),  # ~/.ssh/config, known_hosts and key of the test hosts
        "DASK_CONFIG": str(dask_config),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),  # keeps the fake home clean
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })
    log = tmp_path / "jupyter.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path / 'root'}"],
            env=server_env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    server = JupyterServer(f"http://127.0.0.1:{port}", token, process, log)
    try:
        def up() -> bool:
            assert process.poll() is None, f"jupyter server exited\n{server.log_tail()}"
            try:
                return server.call("GET", "api/status", timeout=2)[0] == 200
            except OSError:
                return False

        assert wait_until(up, 60), f"jupyter server did not answer\n{server.log_tail()}"
        yield server
    finally:
        if process.poll() is None:
            process.terminate()  # a failed test: its clusters' SSH lifelines end with it
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(params=list(MODES))
def jupyter(request: pytest.FixtureRequest, hosts: TestHosts,
            tmp_path: Path) -> Iterator[JupyterServer]:
    """A Jupyter server whose Dask sidebar makes DaskClusters on the test hosts."""
    write_dask_config(tmp_path / "dask", hosts.names, MODES[request.param])
    with running_jupyter_server(hosts, tmp_path, tmp_path / "dask") as server:
        yield server


def worker_hosts(client: Client) -> list[str]:
    """The host name of every worker the scheduler has."""
    return sorted(client.run(socket.gethostname).values())


def listening(address: str) -> bool:
    """Whether something accepts TCP connections at a ``tcp://host:port`` address."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


def wait_workers(client: Client, n: int, timeout: float = 90) -> None:
    """Wait until the scheduler has exactly ``n`` workers."""
    assert wait_until(lambda: len(client.scheduler_info()["workers"]) == n, timeout), (
        f"expected {n} workers, the scheduler has {len(client.scheduler_info()['workers'])}")


def test_sidebar_drives_a_dask_cluster(hosts: TestHosts, jupyter: JupyterServer) -> None:
    assert jupyter.json("GET", "dask/clusters") == []

    # The sidebar's "+ NEW" button: PUT without an id.
    model = jupyter.json("PUT", "dask/clusters")
    cluster_id = model["id"]
    assert model["name"] == "DaskCluster 1", model  # the factory made one of ours
    assert [m["id"] for m in jupyter.json("GET", "dask/clusters")] == [cluster_id]

    n = len(hosts.names) + 1
    with Client(model["scheduler_address"], timeout=30) as client:
        wait_workers(client, 1)  # the factory's n-workers

        # The scaling dialog: PATCH with the whole model, workers changed.
        scaled = jupyter.json("PATCH", f"dask/clusters/{cluster_id}", {**model, "workers": n})
        assert scaled["id"] == cluster_id and "adapt" not in scaled
        # Spread round robin. A host's first worker had the host to itself: a second one there
        # replaces it by two half-size workers (successors first), so n can be registered
        # before the last host's one is.
        assert wait_until(lambda: len(client.scheduler_info()["workers"]) == n
                          and set(worker_hosts(client)) == set(hosts.names), 90), \
            worker_hosts(client)
        assert client.submit(sum, range(10)).result(timeout=30) == 45
        assert wait_until(lambda: jupyter.json("GET", f"dask/clusters/{cluster_id}")["workers"]
                          == n, 30), jupyter.json("GET", f"dask/clusters/{cluster_id}")

        # The dialog's "Adapt" checkbox: PATCH with adapt bounds; idle workers go down to 1.
        adaptive = jupyter.json("PATCH", f"dask/clusters/{cluster_id}",
                                {**scaled, "adapt": {"minimum": 1, "maximum": 2}})
        assert adaptive["adapt"] == {"minimum": 1, "maximum": 2}
        wait_workers(client, 1)
        assert jupyter.json("GET", f"dask/clusters/{cluster_id}")["adapt"] == adaptive["adapt"]

        # The dashboard pane: the sidebar points it at dask/dashboard/<id> (a local link goes
        # through the extension's proxy), which first fetches individual-plots.json ...
        dashboard = f"dask/dashboard/{cluster_id}"
        plots = jupyter.json("GET", f"{dashboard}/individual-plots.json")
        assert "Individual Task Stream" in plots, plots
        # ... then loads a plot's page (and the status page, the dashboard's home) from there.
        for page in (plots["Individual Task Stream"].lstrip("/"), "status"):
            code, html = jupyter.call("GET", f"{dashboard}/{page}")
            assert code == 200, (page, code, html[:300])
            assert b"Bokeh" in html and re.search(rb"<title>[^<]*Dask", html), html[:300]
            # The page's plots then stream over a websocket, through the same proxy.
            assert jupyter.bokeh_handshake(f"{dashboard}/{page}/ws", html) == "ACK"
        # The same check the pane makes for a link typed in by hand.
        check = jupyter.json("GET", "dask/dashboard-check/" + urllib.parse.quote(
            model["dashboard_link"], safe=""))
        assert check["isActive"] is True, check

    # The cluster's "SHUTDOWN" button.
    assert jupyter.call("DELETE", f"dask/clusters/{cluster_id}")[0] == 204
    assert jupyter.json("GET", "dask/clusters") == []
    assert jupyter.call("GET", f"dask/clusters/{cluster_id}")[0] == 404
    assert wait_until(lambda: not listening(model["scheduler_address"]), 30)
    assert wait_no_leftovers(hosts) == {}, jupyter.log_tail()

    # The server outlived its cluster. Stopping it with a cluster still running takes that
    # cluster's remote processes along.
    second = jupyter.json("PUT", "dask/clusters")
    assert second["name"] == "DaskCluster 2"
    with Client(second["scheduler_address"], timeout=30) as client:
        wait_workers(client, 1)
    assert jupyter.call("POST", "api/shutdown")[0] == 200
    assert jupyter.process.wait(30) == 0, jupyter.log_tail()
    assert wait_no_leftovers(hosts) == {}, jupyter.log_tail()
