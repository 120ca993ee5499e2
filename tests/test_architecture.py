"""docs/architecture.md's module table cannot drift: it lists exactly the modules in jaxtune/, each in
the layer pyproject.toml's import-linter contract puts it in."""

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (\d+) \| `jaxtune/([a-z_0-9]+)(?:\.py|/)` \|", re.MULTILINE)


def package_modules() -> set[str]:
    """Top-level modules and packages of jaxtune/ (what the layers are made of)."""
    package = ROOT / "jaxtune"
    files = {path.stem for path in package.glob("*.py") if path.name != "__init__.py"}
    folders = {path.name for path in package.iterdir() if (path / "__init__.py").is_file()}
    return files | folders


def contract_layers() -> dict[str, int]:
    """module -> layer number (1 = lowest) from the layers contract, optional layers counted."""
    [contract] = [c for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
                  if c["type"] == "layers"]
    layers = list(reversed(contract["layers"]))
    return {name.strip(" ()"): number for number, layer in enumerate(layers, start=1) for name in layer.split("|")}


def documented_layers() -> dict[str, int]:
    rows = ROW.findall((ROOT / "docs" / "architecture.md").read_text())
    modules = [module for _, module in rows]
    assert len(modules) == len(set(modules)), f"listed twice: {sorted(m for m in modules if modules.count(m) > 1)}"
    return {module: int(layer) for layer, module in rows}


def test_the_table_lists_exactly_the_modules():
    documented, present = set(documented_layers()), package_modules()
    assert documented == present, (f"docs/architecture.md lists {sorted(documented - present)} that do not exist "
                                   f"and misses {sorted(present - documented)}")


def test_every_module_is_in_the_contract_and_the_table_gives_its_layer():
    contract, documented = contract_layers(), documented_layers()
    assert package_modules() <= set(contract), f"not in any layer: {sorted(package_modules() - set(contract))}"
    wrong = {module: (layer, contract[module]) for module, layer in documented.items() if contract.get(module) != layer}
    assert not wrong, f"module: (layer in docs/architecture.md, layer in pyproject.toml) differ: {wrong}"
