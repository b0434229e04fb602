"""The package's structure: layers import only downwards, no import cycles, small modules.

Read from the source with ``ast`` (every import, also those inside functions), so a test run
needs no Ray and catches a new upward import the moment it is written.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ray_galaxy"

# Each group may import itself and the groups listed for it (and, through them, nothing else).
GROUPS = {
    "base": ("config", "console", "storage", "images", "morphology", "parallel", "plots", "runtime", "tracking"),
    "data": ("data", "prepare", "imageset", "builtin", "shards", "streaming", "labels"),
    "model": ("model", "checkpoint", "critic"),
    "generation": ("generation",),
    "figures": ("figures",),
    "training": ("training",),
    "tuning": ("tuning",),
    "serve": ("serve",),
    "evaluation": ("evaluation",),
    "catalogue": ("catalogue",),
}
ALLOWED = {
    "base": {"base"},
    "data": {"base", "data"},
    "model": {"base", "model"},
    "generation": {"base", "data", "model", "generation"},
    "figures": {"base", "data", "model", "generation", "figures"},
    "training": {"base", "data", "model", "generation", "figures", "training"},
    "serve": {"base", "data", "model", "generation", "figures", "serve"},
    "evaluation": {"base", "data", "model", "generation", "figures", "evaluation"},
    "catalogue": {"base", "data", "model", "generation", "figures", "catalogue"},
    "tuning": {"base", "data", "model", "generation", "figures", "training", "evaluation", "tuning"},
}
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ray_galaxy modules ``name`` imports (a package import counts as its __init__)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def _group(module: str) -> str:
    first = module.split(".")[1] if "." in module else ""
    for group, members in GROUPS.items():
        if first in members:
            return group
    raise AssertionError(f"{module} belongs to no layer: add it to GROUPS in tests/test_layout.py")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_import_goes_down_the_layers(graph):
    bad = [f"{m} ({_group(m)}) imports {t} ({_group(t)})"
           for m, targets in graph.items() if m != "ray_galaxy"
           for t in sorted(targets) if t != "ray_galaxy" and _group(t) not in ALLOWED[_group(m)]]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_modules_stay_small():
    big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The checker itself: an import from a higher layer is found, also inside a function."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from ray_galaxy.evaluation import report\n")
    known = {"ray_galaxy.evaluation", "ray_galaxy.evaluation.report"}
    assert _imports("ray_galaxy.generation.x", src, known) == known
