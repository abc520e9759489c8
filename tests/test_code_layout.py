"""The package's layout holds: imports run down the floors of the stack (the README's "Layout and
extension points" map), no package cycles, and modules and functions stay small."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffq"

# the floors, bottom first: a module imports only from its own floor or the ones below
FLOORS: list[tuple[str, set[str]]] = [
    ("base", {"errors", "registry", "settings", "files", "distributed", "cache", "rollback"}),
    ("numerics", {"formats", "layout", "observers", "quantizer", "timestep_groups", "tensor_quant", "bit_allocation",
                  "roles", "levels", "kernels"}),
    ("layers", {"spec", "layers", "weight_sources", "attention", "model_quant", "export"}),
    ("pipelines", {"models", "calib", "worlds"}),
    ("algorithms", {"eval", "methods", "finetune"}),
    ("stage", {"config", "preset_config", "quantize_stage", "saving", "deployment"}),
    ("front", {"api", "job", "job_evalset", "job_artifacts", "cli", "sweep", "diffq", "__main__", "testbed"}),
]
FLOOR = {unit: i for i, (_, units) in enumerate(FLOORS) for unit in units}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _unit(module: str) -> str:
    """The unit of a dotted module name: its package under diffq/ or its top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "diffq"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(p for p in rel.parts if p != "__init__")] = path
    return out


def _imports(path: Path) -> set[str]:
    """The diffq modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "diffq":
                found |= {f"diffq.{a.name}" for a in node.names}
            elif node.module.startswith("diffq."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("diffq.")}
    return found


def test_every_unit_has_a_floor():
    units = {_unit(m) for m in _modules()}
    assert units - set(FLOOR) == set(), "give the new module or package a floor in FLOORS and the README map"


def test_imports_never_run_up_the_stack():
    upward = []
    for module, path in _modules().items():
        here = _unit(module)
        for target in _imports(path):
            there = _unit(target)
            if there != here and FLOOR.get(there, -1) > FLOOR.get(here, -1):
                upward.append(f"{module} imports {target} ({FLOORS[FLOOR[here]][0]} -> {FLOORS[FLOOR[there]][0]})")
    assert not upward, "\n".join(upward)


def test_no_cycles_between_units():
    edges: dict[str, set[str]] = {}
    for module, path in _modules().items():
        edges.setdefault(_unit(module), set()).update(_unit(t) for t in _imports(path))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a != b and reaches(b, a, {b}))
    assert not cycles, cycles


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.name}: split it into modules with one job each"
    functions = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in functions
            if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_layout_test_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from diffq.api import quantize\n")
    assert _imports(bad) == {"diffq.api"} and FLOOR[_unit("diffq.api")] > FLOOR[_unit("diffq.errors")]
