"""The package's layers: every import points down the layer order, and no module imports
itself back through others. Parsed from the source (function-level imports count too)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "scratchllm"

# Lowest first. A unit (a top-level module or a subpackage) may import units of lower layers
# only; modules inside one unit may import each other (without cycles).
LAYERS = [
    {"errors", "__init__"},
    {"fileio", "runtime"},  # runtime needs only torch: the model's fast paths ask it too
    {"tokenizer", "model"},
    {"data", "generate"},  # the decoding algorithms need only a model
    {"checkpoint", "config"},
    {"distributed"},  # layouts applied from outside the model; the loop uses them
    {"train"},  # may call generate for its eval samples
    {"finetune", "evaluate", "serve"},  # the later stages
    {"cli"},
    {"__main__"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The scratchllm modules that `path` imports (a `from pkg import mod` names pkg.mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "scratchllm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "scratchllm":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in modules()}
    assert units <= set(LAYER_OF), f"give these a layer: {sorted(units - set(LAYER_OF))}"


def test_imports_point_down_the_layers():
    wrong = []
    for importer, imported in graph().items():
        for target in imported:
            a, b = unit_of(importer), unit_of(target)
            if a != b and LAYER_OF[b] >= LAYER_OF[a] and b != "__init__":
                wrong.append(f"{importer} -> {target}")
    assert not wrong, "imports against the layer order: " + ", ".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    # A package's __init__ re-exporting its own submodules is not a cycle unless a submodule
    # imports the package face back.
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_checker_sees_a_violation(tmp_path):
    """The parser resolves `from pkg import module` and function-level imports."""
    known = {"scratchllm.train.loop": Path("x"), "scratchllm.model": Path("y")}
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from scratchllm.train import loop\nimport scratchllm.model\n")
    assert imports_of(source, known) == {"scratchllm.train.loop", "scratchllm.model"}
