"""How the manager starts Python on a host: one fixed command line, the code over stdin.

Every remote interpreter runs ``python -c BOOTSTRAP``. The bootstrap reads a length line and
then exactly that many bytes from stdin with ``os.read`` (no buffered reader: what follows must
stay readable by the remote code, see :mod:`dask_lazycluster.remote.protocol`) and runs them.
Those bytes are :func:`bundle`: the modules of :mod:`dask_lazycluster.remote`, installed as
the package ``lazycluster_remote``, then its entry point. So hosts need no dask-lazycluster, and
always run the manager's own version of the remote code.
"""

from __future__ import annotations

import functools
import shlex
from pathlib import Path

#: The remote command line's program (no secrets: those come over stdin).
BOOTSTRAP = (
    "import os\n"
    "def r(n):\n"
    " d=b''\n"
    " while len(d)<n:\n"
    "  c=os.read(0,n-len(d))\n"
    "  if not c:raise SystemExit(3)\n"
    "  d+=c\n"
    " return d\n"
    "h=b''\n"
    "while not h.endswith(b'\\n'):h+=r(1)\n"
    "exec(r(int(h)))\n"
)

REMOTE_PACKAGE = "lazycluster_remote"
# Install order: a module's relative imports must already be installed.
_MODULES = ["__init__", "protocol", "server", "supervisor", "actions"]
_LOADER = """import linecache, sys, types
def _install(name, source):
    module = types.ModuleType(name)
    module.__package__ = {package!r}
    if name == {package!r}:
        module.__path__ = []
    filename = "<lazycluster " + name + ">"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
"""
#: Exit status of the shell when a setup line fails; its stderr names the line.
SETUP_FAILED_STATUS = 97
SETUP_FAILED_MARK = "LAZYCLUSTER-SETUP-FAILED"


@functools.lru_cache(maxsize=1)
def bundle() -> bytes:
    """The bytes to write first to a bootstrapped python: length line, then the program.

    Returns:
        The length-prefixed program that installs the remote package and runs its entry point.
    """
    directory = Path(__file__).parent / "remote"
    parts = [_LOADER.format(package=REMOTE_PACKAGE)]
    for module in _MODULES:
        name = REMOTE_PACKAGE if module == "__init__" else f"{REMOTE_PACKAGE}.{module}"
        source = (directory / f"{module}.py").read_text()
        parts.append(f"_install({name!r}, {source!r})\n")
    parts.append(f"sys.modules['{REMOTE_PACKAGE}.actions'].main()\n")
    program = "".join(parts).encode()
    return str(len(program)).encode() + b"\n" + program


def setup_script(lines: list[str]) -> str:
    """Shell text running ``lines`` in the current shell, stopping at the first that fails.

    Their output goes to stderr (stdout carries the protocol). Whatever ends the shell during
    a line (a failing status, or an ``exit`` in it) prints ``SETUP_FAILED_MARK <n>`` (n counts
    from 1) through an ``EXIT`` trap, which is removed once all lines ran.

    Args:
        lines: Shell lines such as ``source /opt/conda/bin/activate ml``.

    Returns:
        The shell text (empty for no lines).
    """
    if not lines:
        return ""
    body = "".join(f"lz_n={n}; {{ {line}\n}} >&2 || exit {SETUP_FAILED_STATUS}\n"
                   for n, line in enumerate(lines, 1))
    return f"trap 'echo \"{SETUP_FAILED_MARK} $lz_n\" >&2' EXIT\n{body}trap - EXIT\n"


def python_command(candidates: list[str], setup: list[str] | None = None) -> str:
    """The remote command: setup lines, then exec the first existing interpreter.

    Args:
        candidates: Interpreters to try in order (one: exactly it).
        setup: Shell lines to run first, in the same shell (see :func:`setup_script`).

    Returns:
        A shell command for ``create_process``.
    """
    boot = shlex.quote(BOOTSTRAP)
    prefix = setup_script(setup or [])
    if len(candidates) == 1:
        return f"{prefix}exec {shlex.quote(candidates[0])} -c {boot}"
    quoted = " ".join(shlex.quote(c) for c in candidates)
    return (
        f'{prefix}for p in {quoted}; do if command -v "$p" >/dev/null 2>&1; then '
        f'exec "$p" -c {boot}; fi; done; '
        f'echo "no python found (tried: {" ".join(candidates)})" >&2; exit 127'
    )
