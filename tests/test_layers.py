"""The layer contract (pyproject.toml [tool.importlinter], docs/architecture.md "Layers"): a module
imports only from the layers below it. Checked with import-linter's `lint-imports`, which sees every
import (module level or inside a function), on this checkout and on a copy with one upward import."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def lint_imports(repo: pathlib.Path) -> subprocess.CompletedProcess:
    """`lint-imports` run from `repo` (its pyproject.toml, its jaxtune package)."""
    executable = pathlib.Path(sys.executable).parent / "lint-imports"
    if not executable.exists():
        found = shutil.which("lint-imports")
        if found is None:
            pytest.fail("lint-imports not found: install the test extra (pip install -e '.[test]', import-linter)")
        executable = pathlib.Path(found)
    return subprocess.run([str(executable), "--no-cache"], cwd=repo, env={"PYTHONPATH": str(repo), "PATH": ""},
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, f"a module imports from a layer above it:\n{result.stdout}\n{result.stderr}"
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    shutil.copytree(ROOT / "jaxtune", repo / "jaxtune", ignore=shutil.ignore_patterns("__pycache__", "*.jsonl"))
    params = repo / "jaxtune" / "params.py"
    params.write_text(params.read_text() + "\n\ndef _upward():\n    from jaxtune import train  # noqa: F401\n")
    result = lint_imports(repo)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "jaxtune.params -> jaxtune.train" in result.stdout, result.stdout
