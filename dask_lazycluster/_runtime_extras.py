"""lazycluster's smaller ``Runtime`` methods (:class:`LazyclusterExtras`).

Fact shortcuts, directories, ``echo``, requirement checks and lazycluster's *process keys*.
lazycluster ran each task and each port forward as a local process and named it by a key;
here both share the runtime's one SSH connection, but the keys stay as names for them:
``"<host>::-R::<runtime port>::<local port>"`` for a forward to the runtime,
``"<host>::-L::<local port>::<runtime port>"`` for one from it and ``"<host>::task::<name>"``
for a task. ``Runtime`` inherits these methods.
"""

from __future__ import annotations

import shlex

from dask_lazycluster._core import RuntimeCore
from dask_lazycluster._loop import on_loop, run_sync
from dask_lazycluster._requirements import Requirements
from dask_lazycluster._shell import run_shell
from dask_lazycluster._task import RuntimeTask, stop_task
from dask_lazycluster.exceptions import LazyclusterError, PathCreationError

#: Separator of the parts of a process key, and the kinds of process a key names.
KEY_SEPARATOR, TO_RUNTIME, FROM_RUNTIME, TASK = "::", "-R", "-L", "task"


def process_key(host: str, kind: str, *parts: object) -> str:
    """A process key in lazycluster's format: host, kind and the kind's parts.

    Args:
        host: The runtime's host.
        kind: :data:`TO_RUNTIME`, :data:`FROM_RUNTIME` or :data:`TASK`.
        *parts: The ports (listening one first) or the task name.

    Returns:
        The key.
    """
    return KEY_SEPARATOR.join([host, kind, *map(str, parts)])


class LazyclusterExtras:
    """Facts, directories, checks and process keys of a runtime, as lazycluster offered them."""

    core: RuntimeCore

    # -- facts ----------------------------------------------------------------------------------

    @property
    def memory_in_mb(self) -> int:
        """Usable memory of the host in MiB (lazycluster's "mb")."""
        return int(self.core.state.info["memory"]) // 2**20

    @property
    def python_version(self) -> str:
        """Version of the remote python, e.g. ``"3.11.4"``."""
        return str(self.core.state.info["python_version"])

    @property
    def gpu_count(self) -> int:
        """Number of GPUs found on the host."""
        return len(self.core.state.info["gpus"])

    @property
    def class_name(self) -> str:
        """The name of this object's class."""
        return type(self).__name__

    def is_valid_runtime(self) -> bool:
        """Whether the host is usable: connected, and its python answered the probe.

        Returns:
            True while the SSH connection is up (construction raises for an invalid host).
        """
        return self.core.is_alive and bool(self.core.state.info.get("python_version"))

    def print_info(self) -> None:
        """Print the host facts (``info``) as a table."""
        print(f"Information of `{self.class_name}` {self.core.host}:")
        for key, value in self.core.state.info.items():
            if key == "tmp":
                continue
            if key == "memory":
                value = f"{self.memory_in_mb} mb"
            elif isinstance(value, list):
                value = ", ".join(map(str, value))
            print(f"{key:<20} {value}")

    def check_filter(
        self,
        gpu_required: bool = False,
        min_memory: int | str | None = None,
        min_cpu_cores: int | None = None,
        installed_executables: str | list[str] | None = None,
        filter_commands: str | list[str] | None = None,
    ) -> bool:
        """Whether the host meets every given requirement (as ``RuntimeManager.create_group``).

        Args:
            gpu_required: Require a GPU.
            min_memory: Least total memory: MiB as an int (lazycluster's unit), or a Dask
                size string such as ``"4GiB"``.
            min_cpu_cores: Least number of usable CPU cores.
            installed_executables: Executable name(s) that must be on the PATH.
            filter_commands: Shell command(s) that must succeed: exit with status 0 without
                printing ``false`` as their last line (so lazycluster's
                ``... && echo true || echo false`` style works as well). They run in the
                working directory with the runtime's environment variables.

        Returns:
            True if every requirement is met.

        Raises:
            TypeError: If an argument has the wrong type.
            ValueError: If ``min_memory`` is not a size.
        """
        wanted = Requirements.from_arguments(gpu_required, min_memory, min_cpu_cores,
                                             installed_executables, filter_commands)
        return not run_sync(on_loop(wanted.failures(self.core.state)))

    # -- shell and directories ----------------------------------------------------------------

    def echo(self, msg: str) -> str:
        """Echo a text through the host's shell (variables such as ``$WORKING_DIR`` expand).

        It runs in the working directory with the runtime's environment variables.

        Args:
            msg: The text, as it would be written after ``echo`` in a shell.

        Returns:
            The output, with its trailing newline.
        """
        return str(run_sync(on_loop(run_shell(self.core.state, f"echo {msg}", "echo"))).stdout)

    def _run(self, command: str, what: str) -> tuple[int, str, str]:
        state = self.core.state
        result = run_sync(on_loop(state.ssh.gate.run(state.ssh.conn, command, what)))
        return int(result.exit_status or 0), str(result.stdout or ""), str(result.stderr or "")

    def create_tempdir(self) -> str:
        """Create a new temporary directory on the host (not removed by ``cleanup``).

        Returns:
            Its path.

        Raises:
            LazyclusterError: If it cannot be created.
        """
        status, out, err = self._run("mktemp -d", "creating a temp dir")
        if status != 0 or not out.strip():
            raise LazyclusterError(f"cannot create a temp dir on {self.core.host!r}: {err.strip()}")
        return out.strip()

    def create_dir(self, path: str) -> None:
        """Create a directory and its parents on the host.

        Args:
            path: The path (relative ones start in the login directory).

        Raises:
            PathCreationError: If it cannot be created.
        """
        status, _, err = self._run(f"mkdir -p -- {shlex.quote(path)}", "creating a dir")
        if status != 0:
            raise PathCreationError(path, self.core.host, err.strip())

    def delete_dir(self, path: str) -> bool:
        """Delete a directory and everything in it on the host.

        Args:
            path: The path (relative ones start in the login directory).

        Returns:
            True if it was deleted (or did not exist).
        """
        status, _, _ = self._run(f"rm -rf -- {shlex.quote(path)}", "deleting a dir")
        return status == 0

    # -- process keys -------------------------------------------------------------------------

    @property
    def alive_process_count(self) -> int:
        """Running tasks, open port forwards and live Dask processes on this runtime.

        These are what lazycluster ran as local processes (one per task or tunnel); here
        they all share the runtime's one SSH connection.
        """
        tasks = sum(1 for task in self.core.tasks if task.is_running)
        servers = sum(1 for supervisor in self.core.servers.supervisors
                      for server in supervisor.servers.values() if not server.exited)
        return tasks + len(self.core.forwards.ports) + servers

    @classmethod
    def is_runtime_task_process(cls, process_key: str) -> bool:
        """Whether a process key names a task run by ``execute_task``.

        Args:
            process_key: A key from :meth:`task_process_key`.

        Returns:
            True for a task key.
        """
        parts = str(process_key).split(KEY_SEPARATOR)
        return len(parts) > 2 and parts[1] == TASK

    @classmethod
    def is_port_exposure_process(cls, process_key: str) -> bool:
        """Whether a process key names a port forward made by the expose methods.

        Args:
            process_key: A key as returned by ``expose_port_to_runtime`` or
                ``expose_port_from_runtime``.

        Returns:
            True for a port forward key.
        """
        parts = str(process_key).split(KEY_SEPARATOR)
        return len(parts) == 4 and parts[1] in (TO_RUNTIME, FROM_RUNTIME)

    def task_process_key(self, task: RuntimeTask) -> str:
        """The process key of a task run here (lazycluster's ``"<host>::task::<name>"``).

        Args:
            task: The task.

        Returns:
            The key, for :meth:`stop_process`.
        """
        return process_key(self.core.host, TASK, task.name)

    def stop_process(self, key: str) -> None:
        """Stop what a process key names: close a port forward, or stop a running task.

        A stopped task's remote command is killed on the host; ``task.join()`` then returns
        at once.

        Args:
            key: A key from the expose methods or :meth:`task_process_key`.

        Raises:
            ValueError: If the key names nothing of this runtime.
        """
        parts = str(key).split(KEY_SEPARATOR)
        if parts[0] != self.core.host or not (
            self.is_port_exposure_process(key) or self.is_runtime_task_process(key)
        ):
            raise ValueError(f"unknown process key {key!r} for runtime {self.core.host!r}")
        if parts[1] == TASK:
            name = KEY_SEPARATOR.join(parts[2:])
            for task in self.core.tasks:
                if task.name == name:
                    stop_task(task)
            return
        run_sync(on_loop(self.core.forwards.close(int(parts[2]))))
