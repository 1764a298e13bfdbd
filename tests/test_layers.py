"""Imports follow the layer order of ``docs/architecture.md``: no module imports a higher layer, at module
level or inside a function (every ``import`` statement of every module, read from its syntax tree)."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "lightning_reg"
ARCHITECTURE = Path(__file__).parents[1] / "docs" / "architecture.md"


def documented_layers() -> list[tuple[str, ...]]:
    """The layer diagram of ``docs/architecture.md`` (the code block after "checks it against this order"), lowest
    first: each line names its units (lower-case words) before a description."""
    text = ARCHITECTURE.read_text()
    block = text[text.index("checks it against this order"):].split("```")[1]
    layers = []
    for line in block.strip("\n").splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        layers.append(tuple(c for c in cells if re.fullmatch(r"[a-z_]+", c)))
    return layers[::-1]


LAYERS = documented_layers()  # lowest first; a unit may import its own layer and the layers below
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
    assert units == set(RANK), f"give {sorted(units ^ set(RANK))} a layer in docs/architecture.md's diagram"


def test_the_layer_table_is_read_from_the_doc():
    assert LAYERS[0] == ("errors",) and LAYERS[-1] == ("cli",)
    assert ("data", "oracle", "guidance") in LAYERS and ("io", "distributed") in LAYERS
    assert all(LAYERS) and len(RANK) == sum(map(len, LAYERS))  # every line names a unit, each unit once


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


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk of ``graph`` closes, as ``a -> b -> a``."""
    state, cycles = {}, []

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
    return cycles


def test_no_import_cycle_between_modules():
    cycles = find_cycles(module_graph())
    assert not cycles, "\n".join(cycles)


def test_the_cycle_checker_sees_a_cycle_and_reads_imports_of_modules_from_packages():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a -> b -> c -> a"]
    graph = module_graph()
    assert "lightning_reg.guidance.reg" in graph["lightning_reg.guidance.guided"]
    assert "lightning_reg.diffusion.conditions" in graph["lightning_reg.guidance.branches"]  # from pkg import module
