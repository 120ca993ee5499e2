"""The base install (`pip install -e .`, what `make setup` and `make demo` use) holds everything jaxtune needs.

The rule, checked on the source of jaxtune/ (every `import`, module-level and function-local, parsed
with `ast`) against [project].dependencies of pyproject.toml:

1. Every third-party package jaxtune imports is a *direct* requirement. Being pulled in by another
   requirement is not enough: that dependency may drop it in its next release.
2. What jaxtune needs without importing it (jinja2: transformers renders chat templates with it, but
   declares it only in its `chat-template` extra) is in the closure of the declared requirements,
   their extras included. torch depends on jinja2, so a venv with the test extras hides its absence.
3. Every declared requirement is used (imported, or listed in NEEDED_WITHOUT_IMPORT).
4. A package outside the base install (torch, peft: the tests' reference packages) may be imported
   only inside a function, on an opt-in path listed in OPTIONAL_IMPORTS, in a `try` whose
   `except ImportError` turns the failure into a MissingPackageError naming the package. Never at
   module level: importing jaxtune must work, and stay fast, without them.

Import names map to distributions with importlib.metadata.packages_distributions(); requirements of
requirements come from the installed distributions' metadata (the test venv holds the base install).
"""

import ast
import dataclasses
import importlib.metadata
import pathlib
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "jaxtune"

# Needed at run time although jaxtune never imports it: distribution -> who needs it, for what.
NEEDED_WITHOUT_IMPORT = {
    "jinja2": "transformers' apply_chat_template renders every chat template with it",
}
# Opt-in paths that may import a package outside the base install: (package, file) -> the feature.
OPTIONAL_IMPORTS = {
    ("torch", "jaxtune/hf.py"): "reading pickled PyTorch .bin weights, only with model.allow_pickle=True",
    ("matplotlib", "jaxtune/compare/plots.py"): "the compare report's plots (the `plot` extra); without it the "
                                                "report says the plots were skipped",
    ("fastapi", "jaxtune/serve.py"): "the OpenAI-compatible server, python -m jaxtune.serve (the `serve` extra)",
    ("uvicorn", "jaxtune/serve.py"): "the OpenAI-compatible server, python -m jaxtune.serve (the `serve` extra)",
}


@dataclasses.dataclass(frozen=True)
class Import:
    package: str  # the top-level import name: `import orbax.checkpoint` -> "orbax"
    where: str  # "jaxtune/hf.py:205"
    in_function: bool
    guarded: bool  # inside a `try` with an `except ImportError` (or ModuleNotFoundError)


def normalise(name: str) -> str:
    """PEP 503 name: `ml_collections`, `ML-Collections` -> `ml-collections`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _catches_import_error(node: ast.Try) -> bool:
    names = {"ImportError", "ModuleNotFoundError"}
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(t, ast.Name) and t.id in names for t in types):
            return True
    return False


def third_party_imports(source: str, filename: str) -> list[Import]:
    """Every absolute import of a non-stdlib, non-jaxtune package in `source`, with where it sits."""
    found = []

    def visit(node: ast.AST, in_function: bool, guarded: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if node.level == 0 and node.module else []
            for module in modules:
                package = module.split(".")[0]
                if package not in sys.stdlib_module_names and package != "jaxtune":
                    found.append(Import(package, f"{filename}:{node.lineno}", in_function, guarded))
        in_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            child_guarded = guarded or (isinstance(node, ast.Try) and child in node.body
                                        and _catches_import_error(node))
            visit(child, in_function, child_guarded)

    visit(ast.parse(source, filename), False, False)
    return found


def jaxtune_imports() -> list[Import]:
    return [imp for path in sorted(PACKAGE_DIR.rglob("*.py"))
            for imp in third_party_imports(path.read_text(), str(path.relative_to(REPO_ROOT)))]


def declared_requirements() -> list[Requirement]:
    """[project].dependencies of pyproject.toml (the source, not possibly stale installed metadata)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def requirement_closure(requirements: list[Requirement]) -> set[str]:
    """Normalised names of the requirements and, recursively, of what they require (with the extras
    they are asked for), read from the installed distributions' metadata."""
    closure: set[str] = set()
    seen: set[tuple[str, frozenset]] = set()
    pending = [req for req in requirements if req.marker is None or req.marker.evaluate({"extra": ""})]
    while pending:
        req = pending.pop()
        name, extras = normalise(req.name), frozenset(normalise(e) for e in req.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        closure.add(name)
        try:
            requires = importlib.metadata.distribution(req.name).requires or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (required, through pyproject.toml, as {req}) is not installed in "
                        f"{sys.prefix}: `pip install -e .` (or `make setup-test`) brings the venv up to date",
                        pytrace=False)
        for text in requires:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in {"", *extras}):
                pending.append(child)
    return closure


def import_problems(imports: list[Import], declared: set[str], closure: set[str],
                    distributions: dict[str, list[str]]) -> list[str]:
    """Violations of rules 1 and 4 (see the module docstring), one line each."""
    problems = []
    for imp in imports:
        dists = {normalise(d) for d in distributions.get(imp.package, [])}
        file = imp.where.rsplit(":", 1)[0]
        if dists & declared:
            continue
        if dists & closure:
            problems.append(f"{imp.where}: imports {imp.package} (distribution {', '.join(sorted(dists))}), "
                            f"which only comes in through another requirement: declare it in pyproject.toml")
        elif (imp.package, file) not in OPTIONAL_IMPORTS:
            problems.append(f"{imp.where}: imports {imp.package}"
                            + (f" (distribution {', '.join(sorted(dists))})" if dists else " (not installed)")
                            + ", which the base install lacks: declare it in pyproject.toml, or import it in the "
                              "function of an opt-in feature listed in OPTIONAL_IMPORTS")
        elif not imp.in_function or not imp.guarded:
            problems.append(f"{imp.where}: {imp.package} is optional ({OPTIONAL_IMPORTS[imp.package, file]}): "
                            f"import it inside that function, in a try whose `except ImportError` raises "
                            f"jaxtune.MissingPackageError, never at module level")
    return problems


@pytest.fixture(scope="module")
def declared():
    return {normalise(req.name) for req in declared_requirements()}


@pytest.fixture(scope="module")
def closure():
    return requirement_closure(declared_requirements())


@pytest.fixture(scope="module")
def distributions():
    return importlib.metadata.packages_distributions()


def test_every_import_of_jaxtune_is_declared_or_an_optional_guarded_import(declared, closure, distributions):
    imports = jaxtune_imports()
    assert {"jax", "transformers", "torch"} <= {imp.package for imp in imports}  # the scan sees them
    assert import_problems(imports, declared, closure, distributions) == []


def test_packages_needed_without_import_come_with_the_base_install(closure):
    missing = {name: why for name, why in NEEDED_WITHOUT_IMPORT.items() if name not in closure}
    assert not missing, f"pyproject.toml's dependencies do not bring {missing}: declare them"


def test_every_declared_requirement_is_used(declared, distributions):
    imported = {normalise(d) for imp in jaxtune_imports() for d in distributions.get(imp.package, [])}
    unused = declared - imported - set(NEEDED_WITHOUT_IMPORT)
    assert not unused, f"declared in pyproject.toml but never imported by jaxtune: {sorted(unused)}"


def test_the_test_extras_stay_out_of_the_base_install(closure):
    """torch and peft are the tests' references; the base install must not pull them (or a CUDA build)."""
    assert not {"torch", "peft", "accelerate"} & closure


def test_the_check_catches_what_it_is_for(declared, closure, distributions):
    """The rules fail on the mistakes they exist for; the guarded opt-in import passes."""
    source = ("import torch\n"  # a test-only package at module level
              "import jinja2\n"  # in the closure (transformers[chat-template]) but not declared
              "from peft import PeftModel\n"
              "import surely_not_a_package_xyz\n"
              "def f():\n"
              "    import peft\n"  # function-local, but no opt-in path lists it
              "    try:\n"
              "        import torch\n"  # listed, guarded, local: fine in jaxtune/hf.py
              "    except ImportError:\n"
              "        raise\n")
    imports = third_party_imports(source, "jaxtune/hf.py")
    problems = import_problems(imports, declared, closure, distributions)
    assert [p.split(":")[1] for p in problems] == ["1", "2", "3", "4", "6"], problems
    assert "never at module level" in problems[0] and "declare it in pyproject.toml" in problems[1]
    assert "not installed" in problems[3]
    unguarded = third_party_imports("def f():\n    import torch\n", "jaxtune/hf.py")
    assert "never at module level" in import_problems(unguarded, declared, closure, distributions)[0]
    elsewhere = third_party_imports("def f():\n    try:\n        import torch\n    except ImportError:\n"
                                    "        pass\n", "jaxtune/train.py")
    assert "lacks" in import_problems(elsewhere, declared, closure, distributions)[0]


def test_without_the_chat_template_extra_jinja2_is_missing():
    """What went wrong before: transformers alone does not bring jinja2 (only torch did, in the test venv)."""
    without_extra = [Requirement("transformers>=5.0") if normalise(req.name) == "transformers" else req
                     for req in declared_requirements()]
    assert "jinja2" not in requirement_closure(without_extra)


def test_the_optional_torch_path_names_the_missing_package(tmp_path, monkeypatch):
    """OPTIONAL_IMPORTS' torch: without it, allow_pickle says torch is missing and optional."""
    import jaxtune
    from jaxtune import hf

    (tmp_path / "pytorch_model.bin").write_bytes(b"not read: torch is missing first")
    monkeypatch.setitem(sys.modules, "torch", None)  # as in the base install
    with pytest.raises(jaxtune.MissingPackageError) as info:
        list(hf.read_hf_tensors(tmp_path, allow_pickle=True))
    assert info.value.name == "torch" and "model.allow_pickle" in str(info.value)
    assert "optional" in str(info.value) and "pip install torch" in str(info.value)


# ---------------------------------------------------------------------------------------------
# The tests' reference packages (torch, peft): skipped without them locally, never in CI
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_ci, outcome", [(False, pytest.skip.Exception), (True, pytest.fail.Exception)])
def test_a_missing_reference_skips_locally_and_fails_in_ci(monkeypatch, in_ci, outcome):
    import conftest

    monkeypatch.setattr(conftest, "IN_CI", in_ci)
    with pytest.raises(outcome, match="'surely_not_a_package_xyz' is not installed"):
        conftest.require_reference("surely_not_a_package_xyz")
    assert conftest.require_reference("numpy").__name__ == "numpy"


def test_tests_give_up_on_a_missing_package_only_through_conftest():
    """pytest.importorskip would skip in CI too: require_reference is the one way."""
    test_files = [path for path in sorted((REPO_ROOT / "tests").glob("test_*.py"))
                  if path.name != pathlib.Path(__file__).name]
    offenders = [f"{path.name}:{number}" for path in test_files
                 for number, line in enumerate(path.read_text().splitlines(), 1) if "importorskip(" in line]
    assert not offenders, f"use conftest.require_reference instead of pytest.importorskip: {offenders}"
