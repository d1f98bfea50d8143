"""Documentation checks (no SSH host needed).

The site itself is checked by ``mkdocs build --strict`` (CI runs it): broken links, missing
anchors, unresolved cross-references and docstring sections griffe cannot parse fail there.
These tests cover what the build cannot see: names without a docstring (mkdocstrings silently
leaves them out), and the configuration keys of ``lazycluster.yaml`` against the pages and the
``DaskCluster`` docstring that talk about them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import griffe
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG_YAML = ROOT / "dask_lazycluster" / "lazycluster.yaml"
CONFIG_PAGE = DOCS / "configuration.md"

# Keys of lazycluster.yaml that no DaskCluster argument stands for: the first two configure
# the group DaskCluster() builds from `hosts`, the others are tuning knobs kept out of the
# signature on purpose.
CONFIG_ONLY_KEYS = {
    "working-dir",
    "connect-options",
    "scheduler-process",
    "worker-start-method",
    "worker-start-timeout",
}
# Keys whose DaskCluster argument has another name than the key's.
ARGUMENT_OF_KEY = {"hosts": "runtime_group", "port-range": "ports"}


@pytest.fixture(scope="module")
def package() -> griffe.Module:
    """The package as mkdocstrings sees it (static analysis of this tree's sources)."""
    loaded = griffe.load("dask_lazycluster", search_paths=[str(ROOT)], docstring_parser="google")
    assert isinstance(loaded, griffe.Module)
    return loaded


@pytest.fixture(scope="module")
def config_keys() -> list[str]:
    keys = list(yaml.safe_load(CONFIG_YAML.read_text())["lazycluster"])
    assert "n-workers" in keys  # the file's shape is what the tests below assume
    return keys


def documented_paths() -> list[str]:
    """Object paths of the ``::: path`` directives of the API pages."""
    paths = []
    for page in sorted((DOCS / "api").glob("*.md")):
        paths += re.findall(r"^::: (dask_lazycluster[\w.]*)\s*$", page.read_text(), flags=re.M)
    return paths


def public_objects(obj: griffe.Object | griffe.Alias) -> Iterator[griffe.Object | griffe.Alias]:
    """``obj`` and its public members, recursively.

    Imported names are checked in their own module; plain attributes (constants, instance
    attributes) need no docstring, properties (attributes labelled so by griffe) do.
    """
    yield obj
    for name, member in obj.members.items():
        if name.startswith("_") or member.is_alias:
            continue
        if member.is_attribute and "property" not in member.labels:
            continue
        yield from public_objects(member)


def test_every_documented_public_name_has_a_docstring(package: griffe.Module) -> None:
    paths = documented_paths()
    assert {"dask_lazycluster.cluster.dask_cluster", "dask_lazycluster.runtimes.RuntimeTask"} <= set(paths)
    seen: dict[str, bool] = {}
    for path in paths:
        for obj in public_objects(package[path.removeprefix("dask_lazycluster.")] if "." in path
                                  else package):
            seen[obj.path] = bool(obj.docstring and obj.docstring.value.strip())
    names = {path.rsplit(".", 1)[-1] for path in seen}
    # the walk must see the main API, or the check below proves nothing
    assert {"DaskCluster", "Runtime", "RuntimeGroup", "RuntimeTask", "RuntimeManager", "setting",
            "start_master", "MasterStartError"} <= names
    missing = sorted(path for path, has_docstring in seen.items() if not has_docstring)
    assert not missing, "public names without a docstring:\n  " + "\n  ".join(missing)


def test_every_reexported_name_is_listed_on_the_package_page(package: griffe.Module) -> None:
    exported = {str(name) for name in package.exports or ()} - {"__version__"}
    assert "DaskCluster" in exported
    page = (DOCS / "api" / "dask_lazycluster.md").read_text()
    missing = sorted(name for name in exported if f"[`{name}`]" not in page)
    assert not missing, f"dask_lazycluster.__all__ names missing from its API page: {missing}"


def test_every_config_key_has_its_comment_in_the_yaml(config_keys: list[str]) -> None:
    lines = CONFIG_YAML.read_text().splitlines()
    undescribed = []
    for key in config_keys:
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
        if index == 0 or not lines[index - 1].strip().startswith("#"):
            undescribed.append(key)
    assert not undescribed, f"keys of lazycluster.yaml without a comment above them: {undescribed}"


def keys_mentioned(text: str) -> set[str]:
    """Config keys a page names: ``lazycluster.KEY``, ``DASK_LAZYCLUSTER__KEY``, YAML examples."""
    found = set(re.findall(r"(?<![\w/.-])lazycluster\.([a-z][\w-]*)", text)) - {"yaml"}
    found |= {env.lower().replace("_", "-")
              for env in re.findall(r"DASK_LAZYCLUSTER__([A-Z0-9]+(?:_[A-Z0-9]+)*)", text)}
    for block in re.findall(r"^ *```ya?ml\n(.*?)^ *```", text, flags=re.M | re.S):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and isinstance(data.get("lazycluster"), dict):
            found |= set(data["lazycluster"])
    return found


def test_configuration_page_names_only_existing_keys(config_keys: list[str]) -> None:
    text = CONFIG_PAGE.read_text()
    mentioned = keys_mentioned(text)
    # the page must talk about keys at all, or the check below proves nothing
    assert {"n-workers", "scheduler-process", "port-range"} <= mentioned
    unknown = sorted(mentioned - set(config_keys))
    assert not unknown, f"docs/configuration.md names keys that lazycluster.yaml lacks: {unknown}"
    # the keys are described once, in the YAML, which the page includes when the site is built
    assert '--8<-- "dask_lazycluster/lazycluster.yaml"' in text


def test_daskcluster_docstring_covers_the_config_keys_it_takes(
    package: griffe.Module, config_keys: list[str]
) -> None:
    cls = package["cluster.dask_cluster.DaskCluster"]
    signature = {p.name for p in cls["__init__"].parameters}
    documented: dict[str, str] = {}
    for obj in (cls, cls["__init__"]):
        for section in obj.docstring.parse("google") if obj.docstring else []:
            if section.kind is griffe.DocstringSectionKind.parameters:
                documented |= {p.name.lstrip("*"): p.description for p in section.value}
    assert "n_workers" in documented
    stale = sorted(CONFIG_ONLY_KEYS - set(config_keys))
    assert not stale, f"CONFIG_ONLY_KEYS names keys that lazycluster.yaml lacks: {stale}"
    problems = []
    for key in config_keys:
        argument = ARGUMENT_OF_KEY.get(key, key.replace("-", "_"))
        if key in CONFIG_ONLY_KEYS:
            if argument in signature:
                problems.append(f"{key}: listed as config-only but DaskCluster takes {argument}")
        elif argument not in signature:
            problems.append(f"{key}: DaskCluster has no argument {argument} (config-only? list it)")
        elif argument not in documented:
            problems.append(f"{key}: the docstring's Args lack {argument}")
        elif key in ARGUMENT_OF_KEY and f"lazycluster.{key}" not in documented[argument]:
            problems.append(f"{key}: the docstring of {argument} does not name lazycluster.{key}")
    assert not problems, "DaskCluster vs lazycluster.yaml:\n  " + "\n  ".join(problems)
