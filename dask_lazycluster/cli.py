"""Command line interface: ``dask lazycluster ...`` (Dask CLI plugin) and ``dask-lazycluster``.

Subcommands: ``list-runtimes`` (host discovery), ``check`` (is a host ready for Dask?), ``up``
(run a cluster until Ctrl-C, optionally by name), ``ls`` / ``down`` (list and stop named
clusters), ``add-runtime`` / ``delete-runtime`` (edit ``~/.ssh/config``).

Errors a user can act on (bad arguments, unusable hosts, lazycluster and OS errors) print
one line to stderr and exit with status 1, without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click
import dask.config
import distributed
from dask.utils import format_bytes
from distributed.core import Status
from distributed.utils import silence_logging_cmgr

from dask_lazycluster._loop import run_sync
from dask_lazycluster._ssh_config import add_host, delete_host
from dask_lazycluster.cluster.dask_cluster import DaskCluster
from dask_lazycluster.cluster.named import running_clusters, stop_cluster
from dask_lazycluster.config import setting
from dask_lazycluster.exceptions import InvalidRuntimeError, LazyclusterError
from dask_lazycluster.runtime_manager import RuntimeManager
from dask_lazycluster.runtimes import Runtime, connect_runtimes

F = TypeVar("F", bound=Callable[..., Any])



def _fail(message: str) -> NoReturn:
    """Print ``message`` as one line to stderr and exit with status 1."""
    click.echo(f"Error: {' '.join(str(message).split())}", err=True)
    raise click.exceptions.Exit(1)


class _Command(click.Command):
    """A command whose usage errors are one line on stderr and exit status 1."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            _fail(f"{ctx.command_path}: {exc.format_message()}")


class _Group(click.Group):
    """The ``lazycluster`` group, with the same error convention as its commands."""

    command_class = _Command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            _fail(f"{ctx.command_path}: {exc.format_message()}")


def _reports_errors(func: F) -> F:
    """Turn the errors a user can act on into a one-line message and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (LazyclusterError, ValueError, OSError) as exc:
            _fail(str(exc) or type(exc).__name__)

    return wrapper  # type: ignore[return-value]


@click.group(cls=_Group, name="lazycluster", context_settings={"help_option_names": ["-h", "--help"]})
def lazycluster() -> None:
    """Dask clusters on any machines you can ssh into (dask-lazycluster)."""


# -- list-runtimes ---------------------------------------------------------------------------


@lazycluster.command("list-runtimes")
@click.option("-l", "--long", "long_format", is_flag=True,
              help="Show cores, memory, GPUs and python of each host.")
@click.option("--ssh-config", metavar="PATH", default=None,
              help="SSH config to read instead of ~/.ssh/config.")
@_reports_errors
def list_runtimes(long_format: bool, ssh_config: str | None) -> None:
    """List the hosts of the SSH config that can serve as runtimes, and those that cannot."""
    manager = RuntimeManager(ssh_config=ssh_config)
    try:
        click.echo(f"Active hosts ({len(manager.hosts)}):")
        if long_format:
            rows = [["HOST", "CORES", "MEMORY", "GPUS", "PYTHON", "DISTRIBUTED"]]
            for runtime in manager.runtimes:
                info = runtime.info
                rows.append([
                    runtime.host, str(runtime.cpu_cores), format_bytes(runtime.memory),
                    str(len(runtime.gpus)), f"{runtime.python} ({info.get('python_version')})",
                    str(info.get("distributed_version") or "-"),
                ])
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            for row in rows:
                click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        else:
            for host in manager.hosts:
                click.echo(f"  {host}")
        click.echo(f"Inactive hosts ({len(manager.inactive_hosts)}):")
        for host, reason in manager.inactive_reasons.items():
            click.echo(f"  {host}: {reason}" if long_format else f"  {host}")
    finally:
        manager.cleanup()


# -- check -----------------------------------------------------------------------------------

_DISTRIBUTED_VERSION = "import distributed; print(distributed.__version__)"


async def _check_runtime(runtime: Runtime, ports: list[int]) -> tuple[list[str], str | None]:
    """Report lines for one connected runtime, and why it is unusable (None: usable)."""
    ssh = runtime.core.state.ssh
    result = await asyncio.wait_for(ssh.gate.run(
        ssh.conn, shlex.join([runtime.python, "-c", _DISTRIBUTED_VERSION]),
        "the distributed version check"), 60)
    info = runtime.info
    lines = [f"python       {runtime.python} ({info.get('python_version')})"]
    problem = None
    if result.exit_status == 0:
        version = str(result.stdout).strip().splitlines()[-1]
        note = "" if version == distributed.__version__ else (
            f" (the manager has {distributed.__version__}: versions should match)")
        lines.append(f"distributed  {version}{note}")
    else:
        error = str(result.stderr).strip().splitlines()
        lines.append("distributed  not importable")
        problem = (f"{runtime.python} cannot import distributed"
                   f"{': ' + error[-1] if error else ''}")
    busy = await runtime.core.listening_ports()
    for port in ports:
        lines.append(f"port {port:<7} {'in use' if port in busy else 'free'}")
    return lines, problem


async def _check_hosts(
    hosts: list[str], python: str | None, options: dict[str, Any], ports: list[int]
) -> list[tuple[list[str], str | None]]:
    async def one(host: str) -> tuple[list[str], str | None]:
        try:
            (runtime,) = await connect_runtimes([host], None, options, python)
        except InvalidRuntimeError as exc:
            return [], exc.cause
        try:
            return await _check_runtime(runtime, ports)
        except Exception as exc:
            return [], f"check failed: {exc}"
        finally:
            await runtime.core.cleanup()

    return list(await asyncio.gather(*(one(h) for h in hosts)))


@lazycluster.command("check")
@click.argument("hosts", nargs=-1, required=True, metavar="HOST...")
@click.option("--python", default=None, metavar="PATH",
              help="Remote python to check (default: lazycluster.python, else found per host).")
@_reports_errors
def check(hosts: tuple[str, ...], python: str | None) -> None:
    """Check that each HOST can run Dask workers: SSH, python, distributed, default ports.

    Exits with status 1 if any host is unusable.
    """
    options = dict(setting("connect-options"))
    options.setdefault("connect_timeout", 10)
    scheduler_port = setting("master-port") or 8786
    ports = [scheduler_port, setting("port-range")[0]]
    names = list(dict.fromkeys(hosts))
    results = run_sync(_check_hosts(names, setting("python", python), options, ports))
    failed = 0
    for host, (lines, problem) in zip(names, results, strict=True):
        click.echo(f"{host}: {'ok' if problem is None else 'UNUSABLE'}")
        for line in lines:
            click.echo(f"  {line}")
        if problem is not None:
            failed += 1
            click.echo(f"Error: host {host!r}: {' '.join(problem.split())}", err=True)
    if failed:
        raise click.exceptions.Exit(1)


# -- up --------------------------------------------------------------------------------------


def _parse_adapt(ctx: click.Context, param: click.Parameter, value: str | None
                 ) -> tuple[int, int] | None:
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
    if not match or int(match.group(1)) > int(match.group(2)):
        raise click.BadParameter(f"expected MIN:MAX with 0 <= MIN <= MAX, got {value!r}")
    return int(match.group(1)), int(match.group(2))


class _Stop:
    """Turns SIGTERM into KeyboardInterrupt (like SIGINT) and remembers which signal came."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield
        finally:
            for number, handler in self._previous.items():
                signal.signal(number, handler)


def _start_workers(cluster: DaskCluster, target: int, show_progress: bool) -> None:
    """Scale to ``target`` workers and wait until they run, showing progress on a terminal."""
    cluster.scale(target)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            cluster.sync(cluster.reconcile)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    waiter = threading.Thread(target=wait, name="lazycluster-up-wait", daemon=True)
    waiter.start()
    shown = -1
    while waiter.is_alive():
        ready = len(cluster.scheduler_info.get("workers", {}))
        if show_progress and ready != shown:
            click.echo(f"\rWorkers ready: {ready}/{target}", nl=False)
            shown = ready
        waiter.join(0.2)
    if show_progress:
        click.echo(f"\rWorkers ready: {len(cluster.scheduler_info.get('workers', {}))}/{target}")
    if errors:
        raise errors[0]


@lazycluster.command("up")
@click.option("--hosts", "host_lists", multiple=True, metavar="H1,H2,...",
              help="Hosts to use (comma-separated, repeatable); default: lazycluster.hosts.")
@click.option("--n-workers", type=click.IntRange(min=0), default=None,
              help="Workers to start; default: lazycluster.n-workers, else one per host.")
@click.option("--adapt", callback=_parse_adapt, metavar="MIN:MAX", default=None,
              help="Scale adaptively between MIN and MAX workers.")
@click.option("--tunnel", type=click.Choice(["true", "false", "auto"], case_sensitive=False),
              default=None, help="Networking mode; default: lazycluster.tunnel.")
@click.option("--name", default=None, metavar="NAME",
              help="Register the cluster as NAME: other processes of yours on this machine can "
                   "list, drive and stop it (ls, down, DaskCluster.from_name).")
@click.option("--scheduler-host", default=None, metavar="HOST",
              help="Run the scheduler on this host of the cluster instead of here; default: "
                   "lazycluster.scheduler-host.")
@click.pass_context
@_reports_errors
def up(ctx: click.Context, host_lists: tuple[str, ...], n_workers: int | None,
       adapt: tuple[int, int] | None, tunnel: str | None, name: str | None,
       scheduler_host: str | None) -> None:
    """Start a Dask cluster on SSH hosts and keep it running until Ctrl-C or SIGTERM.

    The scheduler runs here (or on --scheduler-host, reached through a local forward); the
    scheduler address and dashboard link are printed once it is up. With --name,
    `dask lazycluster down NAME` stops it too. Every other setting comes from the
    lazycluster.* Dask config.
    """
    hosts = [h.strip() for value in host_lists for h in value.split(",") if h.strip()]
    overrides: dict[str, Any] = {"lazycluster.hosts": hosts} if hosts else {}
    modes: dict[str, bool | str] = {"true": True, "false": False, "auto": "auto"}
    tunnel_mode = modes.get((tunnel or "").lower())
    stop = _Stop()
    # Dask's INFO lines stay quiet for the whole run, shutdown included: closing comms
    # report themselves with tracebacks after the cluster has restored the log level.
    with dask.config.set(overrides), stop.installed(), silence_logging_cmgr(logging.WARNING):
        if not setting("hosts"):
            _fail("no hosts given: pass --hosts or set lazycluster.hosts in the Dask config")
        cluster: DaskCluster | None = None
        ready = False
        try:
            named: dict[str, Any] = {} if name is None else {"name": name}
            cluster = DaskCluster(n_workers=0, tunnel=tunnel_mode,
                                  scheduler_host=scheduler_host, **named)
            if name is not None:
                click.echo(f"Name: {name} (dask lazycluster down {name} stops it)")
            click.echo(f"Scheduler: {cluster.scheduler_address}")
            click.echo(f"Dashboard: {cluster.dashboard_link or 'not available (install bokeh)'}")
            if n_workers is not None:
                target = n_workers
            elif adapt is not None:
                target = adapt[0]
            else:
                configured = setting("n-workers")
                target = cluster.runtime_group.runtime_count if configured is None else configured
            _start_workers(cluster, target, sys.stdout.isatty())
            if adapt is not None:
                cluster.adapt(minimum=adapt[0], maximum=adapt[1])
            ready = True
            hosts_used = ", ".join(cluster.runtime_group.hosts)
            click.echo(f"Ready: {len(cluster.workers)} worker(s) on {hosts_used}"
                       + (f", adapting between {adapt[0]} and {adapt[1]}" if adapt else ""))
            click.echo("Press Ctrl-C to stop.")
            while cluster.status == Status.running or (
                    cluster.status == Status.closing and not cluster.closed_on_request):
                time.sleep(0.5)
            if not cluster.closed_on_request:
                _fail("the cluster stopped by itself")
            click.echo(f"Stopped by another process ({cluster.name}).")
        except KeyboardInterrupt:
            # A second signal while closing ends the process at once (remote processes still
            # die with their SSH channels).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            name = signal.Signals(stop.signum or signal.SIGINT).name
            click.echo(f"\n{name} received: closing the cluster (again to force) ...")
        finally:
            if cluster is not None:
                cluster.close()
                click.echo("Closed.")
        if not ready:
            ctx.exit(128 + (stop.signum or signal.SIGINT))


# -- ls / down ---------------------------------------------------------------------------------


@lazycluster.command("ls")
@_reports_errors
def ls() -> None:
    """List the named clusters of yours running on this machine.

    Records left by killed clusters are removed on the way.
    """
    clusters = running_clusters()
    if not clusters:
        click.echo("No named clusters are running.")
        return
    rows = [["NAME", "WORKERS", "HOSTS", "ADDRESS", "STARTED", "PID"]]
    for c in clusters:
        workers = {"starting": "starting", "not answering": "?"}.get(c.status, str(c.workers))
        if c.status == "running" and c.requested != c.workers:
            workers = f"{c.workers}/{c.requested}"
        rows.append([c.name, workers, ",".join(c.hosts) or "-", c.scheduler_address or "-",
                     datetime.fromtimestamp(c.started).strftime("%Y-%m-%d %H:%M:%S"), str(c.pid)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@lazycluster.command("down")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@_reports_errors
def down(names: tuple[str, ...]) -> None:
    """Stop the named clusters NAME...: their processes close them, nothing is left on the hosts.

    Exits with status 1 if any NAME is not running (the others are still stopped).
    """
    failed = False
    for name in dict.fromkeys(names):
        try:
            stop_cluster(name)
        except (LazyclusterError, ValueError) as exc:
            failed = True
            click.echo(f"Error: {' '.join(str(exc).split())}", err=True)
        else:
            click.echo(f"Stopped {name}.")
    if failed:
        raise click.exceptions.Exit(1)


# -- add-runtime / delete-runtime --------------------------------------------------------------


@lazycluster.command("add-runtime")
@click.argument("name")
@click.argument("target", metavar="USER@HOST[:PORT]")
@click.option("--id-file", default=None, metavar="PATH", help="Private key for this host.")
@_reports_errors
def add_runtime(name: str, target: str, id_file: str | None) -> None:
    """Add a Host entry NAME for USER@HOST[:PORT] to ~/.ssh/config (a backup is kept).

    The entry goes before the first wildcard Host (or Match) block, so that defaults set
    there do not override it.
    """
    path, backup = add_host(name, target, id_file)
    click.echo(f"Added Host {name} ({target}) to {path}"
               + (f" (backup: {backup})" if backup else ""))
    click.echo(f"Its host key must be in ~/.ssh/known_hosts: connect once with `ssh {name}`.")


@lazycluster.command("delete-runtime")
@click.argument("name")
@_reports_errors
def delete_runtime(name: str) -> None:
    """Remove the Host entry NAME from ~/.ssh/config (a backup is kept)."""
    path, backup = delete_host(name)
    click.echo(f"Removed Host {name} from {path} (backup: {backup})")


def main() -> None:
    """Run the ``dask-lazycluster`` console script."""
    lazycluster.main(prog_name="dask-lazycluster")


if __name__ == "__main__":
    main()
