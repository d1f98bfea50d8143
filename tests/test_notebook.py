"""Real notebooks executed by a Jupyter kernel (nbclient), the way users run lazycluster."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

from dask_lazycluster.testing import TestHosts
from dask_lazycluster.testing.system import ENV

from .conftest import wait_no_leftovers

WIDGET = "application/vnd.jupyter.widget-view+json"


def run_notebook(cells: list[str], timeout: int = 240) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    # The kernel inherits HOME, so ~/.ssh/config resolves the test hosts like a user's.
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": os.getcwd()}})
    return client.execute()


def outputs(notebook: nbformat.NotebookNode, index: int) -> str:
    return "".join(o.get("text", "") for o in notebook.cells[index].outputs
                   if o.get("name") == "stdout")


def test_runtime_group_in_a_notebook(hosts: TestHosts) -> None:
    notebook = run_notebook([
        "from dask_lazycluster import RuntimeGroup, RuntimeTask\n"
        f"group = RuntimeGroup(hosts={hosts.names!r})",
        "import os\n"
        # each test host's sessions carry its own marker variable (in both harness modes)
        f"where = lambda: os.path.basename(os.environ[{ENV!r}])\n"
        "tasks = group.execute_task(RuntimeTask('hello').run_function(where),\n"
        "                           broadcast=True, execute_async=False)\n"
        "print([next(t.function_returns) for t in tasks])",
        "group.cleanup()",
    ])
    assert outputs(notebook, 1).strip() == repr(hosts.names)
    assert wait_no_leftovers(hosts) == {}


def test_adaptive_cluster_in_a_notebook(netns: TestHosts) -> None:
    notebook = run_notebook([
        "from dask_lazycluster import DaskCluster, RuntimeGroup\n"
        "from distributed import Client\n"
        f"cluster = DaskCluster(RuntimeGroup(hosts={netns.names!r}), n_workers=0)\n"
        "cluster.adapt(minimum=0, maximum=12, interval='200ms', wait_count=2,\n"
        "              target_duration='1s')\n"
        "client = Client(cluster)\n"
        "cluster",  # shown the way a user sees it: the cell's last value
        "import time\n"
        "def slow(x):\n"
        "    time.sleep(0.3)\n"
        "    return x\n"
        "futures = client.map(slow, range(100))\n"
        "peak = 0\n"
        "while not all(f.done() for f in futures):\n"
        "    peak = max(peak, len(client.scheduler_info()['workers']))\n"
        "    time.sleep(0.1)\n"
        "print('peak', peak, 'sum', sum(client.gather(futures)))",
        "del futures\n"
        "deadline = time.time() + 60\n"
        "while client.scheduler_info()['workers'] and time.time() < deadline:\n"
        "    time.sleep(0.2)\n"
        "print('after idle', len(client.scheduler_info()['workers']))",
        "client.close()\ncluster.close()\ncluster.runtime_group.cleanup()",
    ])
    # Dask's cluster displays itself (display_data) rather than being returned
    shown = [o for o in notebook.cells[0].outputs if "data" in o]
    assert len(shown) == 1, notebook.cells[0].outputs
    # Dask's interactive widget (ipywidgets, from the `notebook` extra) over our HTML repr
    assert WIDGET in shown[0]["data"], shown[0]["data"].keys()
    assert "DaskCluster" in shown[0]["data"]["text/plain"]
    peak_line = outputs(notebook, 1).split()
    assert int(peak_line[1]) >= 3 and peak_line[3] == str(sum(range(100)))
    assert outputs(notebook, 2).strip() == "after idle 0"
    assert wait_no_leftovers(netns) == {}
