"""The claims index (``docs/claims.md``) against the pages and the test suite (no SSH host needed).

Every behaviour the README and the user guide promise carries a marker ``<!-- claim: ID -->``
right after the sentence that makes the promise, and ``docs/claims.md`` has one row per marker:
``| ID | the claim in a few words | tests |``, the tests given as ``tests/test_x.py::test_name``
(or ``::Class::test_name``). These checks fail when a marker has no row, a row has no marker,
a row names no test, or a named test does not exist or is marked to be skipped or expected to
fail: an unproven claim is either proven by a new test or taken out of the docs.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INDEX = ROOT / "docs" / "claims.md"
MARKER = re.compile(r"<!--\s*claim:\s*([a-z0-9][a-z0-9-]*)\s*-->")
ROW = re.compile(r"^\|\s*`?([a-z0-9][a-z0-9-]*)`?\s*\|(.*)\|(.*)\|\s*$")
TEST_REF = re.compile(r"tests/test_\w+\.py::[\w:]+")


def pages() -> list[Path]:
    """The README and every docs page except the index itself."""
    return [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md") if p != INDEX)


def markers() -> dict[str, list[str]]:
    """Claim id -> the pages (relative paths) whose text carries its marker."""
    found: dict[str, list[str]] = {}
    for page in pages():
        for claim in MARKER.findall(page.read_text()):
            found.setdefault(claim, []).append(str(page.relative_to(ROOT)))
    return found


def rows() -> dict[str, list[str]]:
    """Claim id -> the test references of its row in the index."""
    table: dict[str, list[str]] = {}
    for line in INDEX.read_text().splitlines():
        match = ROW.match(line)
        if match is None or match.group(1) in ("id",):
            continue
        claim = match.group(1)
        assert claim not in table, f"docs/claims.md lists {claim!r} twice"
        table[claim] = TEST_REF.findall(match.group(3))
    return table


@cache
def functions_of(module: str) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """``name`` and ``Class::name`` -> the test function of ``tests/<module>``."""
    tree = ast.parse((ROOT / module).read_text())
    found: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}::{item.name}"] = item
    return found


def unproving_marks(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Marks that make a test prove nothing: unconditional skip, any xfail."""
    bad = []
    for decorator in function.decorator_list:
        text = ast.unparse(decorator)
        if "xfail" in text or re.fullmatch(r"pytest\.mark\.skip(\(.*\))?", text):
            bad.append(text)
    return bad


def test_every_marker_has_a_row() -> None:
    missing = sorted(set(markers()) - set(rows()))
    assert not missing, f"claims marked in the docs but absent from docs/claims.md: {missing}"


def test_every_row_has_a_marker() -> None:
    orphans = sorted(set(rows()) - set(markers()))
    assert not orphans, f"rows of docs/claims.md whose claim no page makes any more: {orphans}"


def test_each_marker_is_used_once() -> None:
    repeated = {claim: where for claim, where in markers().items() if len(where) > 1}
    assert not repeated, f"claim ids used more than once: {repeated}"


def test_every_claim_names_a_test() -> None:
    untested = sorted(claim for claim, refs in rows().items() if not refs)
    assert not untested, f"claims of docs/claims.md with no test: {untested}"


def test_named_tests_exist_and_can_fail() -> None:
    problems = []
    for claim, refs in rows().items():
        for ref in refs:
            module, _, name = ref.partition("::")
            if not (ROOT / module).is_file():
                problems.append(f"{claim}: {module} does not exist")
                continue
            function = functions_of(module).get(name)
            if function is None:
                problems.append(f"{claim}: no test {name} in {module}")
            elif marks := unproving_marks(function):
                problems.append(f"{claim}: {ref} is marked {marks}")
    assert not problems, "\n".join(problems)


def test_the_index_covers_the_user_guide() -> None:
    """Each user-guide page and the README make at least one indexed claim."""
    where = {page for pages_ in markers().values() for page in pages_}
    guide = ["README.md"] + [
        f"docs/{name}"
        for name in re.findall(r":\s+([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
        if name not in ("claims.md", "benchmarks.md", "index.md")
    ]
    bare = [page for page in guide if page not in where]
    assert not bare, f"pages with no claim marker: {bare}"


@pytest.mark.parametrize("text", ["| a-b | x | y |", "| `a-b` | x | tests/test_q.py::t |"])
def test_the_row_pattern_reads_index_rows(text: str) -> None:
    assert ROW.match(text) is not None
