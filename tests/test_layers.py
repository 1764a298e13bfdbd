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


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from pkg import name`` counts ``pkg.name`` when that is a
    module, else ``pkg``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_no_import_cycle_between_modules():
    graph, state, cycles = module_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_cycle_checker_sees_a_cycle(tmp_path, monkeypatch):
    graph = module_graph()
    assert "lightning_reg.guidance.reg" in graph["lightning_reg.guidance.guided"]
    assert "lightning_reg.diffusion.conditions" in graph["lightning_reg.guidance.branches"]  # from pkg import module
