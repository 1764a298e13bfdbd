"""Imports follow the layer order of ``docs/architecture.md``: no module imports a higher layer, at module
level or inside a function (every ``import`` statement of every module, read from its syntax tree)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "lightning_reg"
# lowest first; a unit (a subpackage or a top-level module) may import its own layer and the layers below
LAYERS = [
    ("errors",),
    ("io", "distributed"),
    ("models", "diffusion"),
    ("data", "oracle", "guidance"),
    ("metrics", "module"),
    ("sources",),
    ("sampling", "callbacks", "experiments"),
    ("cli",),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str | None:
    """``lightning_reg.a.b`` -> ``a``; ``None`` for anything outside the package (or the package itself)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "lightning_reg" and len(parts) > 1 else None


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:-node.level] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if not node.module else base) for alias in node.names]
    return found


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert units == set(RANK), f"give {sorted(units ^ set(RANK))} a layer here and in docs/architecture.md"


def test_no_import_climbs_a_layer():
    climbs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if unit is None:
            continue
        for line, module in imports(path):
            target = unit_of(module)
            if target is not None and target != unit and RANK[target] > RANK[unit]:
                climbs.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({unit}) imports {module} ({target})")
    assert not climbs, "\n".join(climbs)


def test_the_checker_reads_imports_inside_functions_and_relative_ones():
    found = imports(PACKAGE / "cli.py")
    line = next(i for i, text in enumerate((PACKAGE / "cli.py").read_text().splitlines(), 1)
                if text.strip() == "from lightning_reg.metrics.classifier import ClassifierTraining")
    assert (line, "lightning_reg.metrics.classifier") in found  # inside classifier_main
    assert all(module.startswith(("lightning_reg", "lightning", "logging", "warnings", "argparse", "__future__"))
               for _, module in found)
