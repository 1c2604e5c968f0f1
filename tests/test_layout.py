"""The repository's root must not shadow installed packages (docs/DESIGN.md §2).

`python -m pytest` and `python -m mcncl_fast ...` put the working directory first on `sys.path`, so a
top-level package in a clone's root wins over an installed distribution of the same name. transformers 5.x
imports the PyPI distribution `kernels`; a top-level `kernels/__init__.py` here broke every extraction.
Each check runs in a fresh interpreter started from the root, as a user's command would be.
"""
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# opensmile and audmath ship a stray top-level `tests` package that nothing imports at run time;
# the repository's own tests/ is the one `python -m pytest` must find.
OWN_NAMES = {"mcncl_fast", "tests"}


def _resolve_from_root(name: str) -> dict:
    """Where `import name` goes from the repository's root, in a fresh interpreter (-c puts '' first)."""
    code = ("import importlib.util, json, sys\n"
            f"spec = importlib.util.find_spec({name!r})\n"
            "places = [] if spec is None else ([spec.origin] if spec.origin else [])"
            " + list(spec.submodule_search_locations or [])\n"
            "print(json.dumps({'found': spec is not None, 'places': [p for p in places if p]}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _inside_repo(places) -> list:
    return [p for p in places if Path(p).resolve().is_relative_to(ROOT)]


def test_no_top_level_kernels_in_the_repository():
    """Whatever is installed, `import kernels` from the root never finds the repository's Triton kernels."""
    where = _resolve_from_root("kernels")
    assert not _inside_repo(where["places"]), f"`import kernels` from the root resolves into the repo: {where}"


def test_installed_kernels_distribution_wins_from_the_root():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI distribution `kernels` is not installed (transformers 5.x pulls it in)")
    where = _resolve_from_root("kernels")
    assert where["found"] and not _inside_repo(where["places"]), where


def test_no_installed_top_level_name_is_shadowed_by_the_root():
    """Every top-level import name of an installed distribution resolves outside the repo from its root."""
    names = set(importlib.metadata.packages_distributions()) - OWN_NAMES
    shadowed = sorted(n for n in names if (ROOT / n / "__init__.py").exists() or (ROOT / f"{n}.py").exists())
    assert not shadowed, f"top-level names in the repository root shadow installed packages: {shadowed}"


def test_transformers_bert_imports_from_the_root():
    """What extraction does first: import transformers' BERT from a clone's root."""
    pytest.importorskip("transformers", reason="transformers (the [extract] extra) is not installed")
    out = subprocess.run([sys.executable, "-c", "from transformers import BertConfig, BertModel; print('ok')"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_kernels_ship_inside_the_package():
    import mcncl_fast.kernels as kernels

    assert Path(kernels.__file__).resolve().parent == ROOT / "mcncl_fast" / "kernels"
    assert not (ROOT / "kernels").exists(), "the Triton kernels live in mcncl_fast/kernels/ (docs/DESIGN.md §2)"
