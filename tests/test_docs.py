"""Documentation checks (no SSH needed): docstrings, generated API pages, configuration page."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "scripts" / "gen_api_docs.py"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_docs", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_api_docs", module)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_a_docstring() -> None:
    gen = load_generator()
    pages = gen.collect(gen.import_modules())
    documented = {e.name for entries in pages.values() for e in entries}
    # the collection itself must see the main API, or the check below proves nothing
    assert {"DaskCluster", "Runtime", "RuntimeGroup", "RuntimeTask", "setting"} <= documented
    missing = gen.missing_docstrings(pages)
    assert not missing, "public names without a docstring:\n  " + "\n  ".join(missing)


def test_inherited_distributed_members_are_not_required() -> None:
    gen = load_generator()
    from dask_lazycluster import DaskCluster, LazyclusterError

    names = {m.name for m in gen.class_members(DaskCluster)}
    assert {"scale", "start", "start_master", "get_client", "runtime_group"} <= names
    assert not names & {"adapt", "close", "get_logs", "sync"}  # SpecCluster's own
    assert not {m.name for m in gen.class_members(LazyclusterError)}  # Exception's own


def test_api_docs_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _yaml_keys(node: object, prefix: str = "") -> list[str]:
    keys: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            keys.append(f"{prefix}{key}")
            if isinstance(value, dict) and value:
                keys += _yaml_keys(value, f"{prefix}{key}.")
    return keys


def test_every_config_key_is_documented() -> None:
    defaults = yaml.safe_load((ROOT / "dask_lazycluster" / "lazycluster.yaml").read_text())
    keys = _yaml_keys(defaults["lazycluster"])
    assert "n-workers" in keys
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in keys if f"`{k}`" not in page]
    assert not missing, f"keys of lazycluster.yaml missing from docs/configuration.md: {missing}"
    # and each with its environment variable form
    missing_env = [k for k in keys if "DASK_LAZYCLUSTER__" + re.sub(r"[-.]", "_", k).upper()
                   not in page]
    assert not missing_env, f"environment variable form missing for: {missing_env}"


def _anchors(text: str) -> set[str]:
    """Anchors of a markdown page: explicit ids and GitHub's heading slugs."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    found = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


def test_guide_links_point_to_existing_pages_and_anchors() -> None:
    docs = ROOT / "docs"
    broken = []
    for page in sorted(docs.rglob("*.md")):
        if page.name == "benchmarks.md":  # owned and checked elsewhere
            continue
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text()):
                broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert not broken, "broken relative links:\n  " + "\n  ".join(broken)
