"""The import graph of genkit, parsed from the source (lazy imports inside functions included), holds the rules
of ../shared/DESIGN.md "Which way imports run": no cycles; the core imports no family, solver or network;
solvers see no family or network; the trainer imports no family; metrics import no data loader; the library
never imports the scripts or benchmark-only packages."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "genkit"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


MODULES = _modules()


def _imports(name: str, file: Path) -> list[tuple[str, int]]:
    """``(imported name, line)`` for every import statement in ``file``, anywhere (functions included);
    relative imports resolved; ``from P import x`` is ``P.x`` when that is a module, else ``P``."""
    is_pkg = file.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in MODULES else target, node.lineno))
    return out


IMPORTS = {name: _imports(name, file) for name, file in MODULES.items()}
GRAPH = {name: sorted({m for m, _ in imps if m in MODULES and m != name}) for name, imps in IMPORTS.items()}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in GRAPH[todo.pop()]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_parser_sees_lazy_and_relative_imports() -> None:
    # loading.py imports the family registry at module level, base.py's solve nothing above the solvers
    assert "genkit.models" in GRAPH["genkit.loading"]
    assert "genkit.checkpoint" in GRAPH["genkit.loading"]
    lazy = [m for m, _ in IMPORTS["genkit.interop"]]
    assert "genkit.models" in lazy and "diffusers" in lazy  # both imported inside functions


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles (lazy imports included): {cycles}"


CORE = ("genkit.errors", "genkit.checks", "genkit.registry", "genkit.paths", "genkit.fields", "genkit.analytic",
        "genkit.guidance", "genkit.gaussian_fit", "genkit.io", "genkit.checkpoint", "genkit.ema", "genkit.frozen",
        "genkit.objective")
FAMILIES = ("genkit.models", "genkit.distill", "genkit.finetune", "genkit.loading", "genkit.interop")
NETWORKS = ("genkit.nets",)
SOLVERS = ("genkit.solvers",)
TRAINER = ("genkit.train",)
DATA = ("genkit.data",)
SCRIPTS = ("train", "samplers", "eval", "notebooks", "tests")


def _bench_only() -> list[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = [req.split(">")[0].split("=")[0].split("[")[0].strip().lower() for req in extras.get("bench", [])]
    return [n.replace("-", "_") for n in names] + ["zuko", "torchgfn", "gfn"]


RULES = [  # (what, the modules it holds for, the modules they must not reach)
    ("the core imports no family, solver or network", CORE, FAMILIES + SOLVERS + NETWORKS + TRAINER + DATA),
    ("solvers see no family or network", SOLVERS,
     FAMILIES + NETWORKS + TRAINER + DATA + ("genkit.metrics", "genkit.teleport")),  # the shim imports solvers
    ("samplers see no family or network", ("genkit.sampling",), FAMILIES + NETWORKS + TRAINER + DATA),
    ("the trainer imports no family", TRAINER, FAMILIES + NETWORKS + SOLVERS + ("genkit.sampling",)),
    ("metrics import no data loader", ("genkit.metrics",), DATA + FAMILIES + TRAINER),
]


@pytest.mark.parametrize("what, holders, banned", RULES, ids=[r[0] for r in RULES])
def test_layering(what: str, holders: tuple[str, ...], banned: tuple[str, ...]) -> None:
    found = [m for m in MODULES if _in(m, *holders)]
    assert found, f"no module matches {holders}: the rule would hold vacuously"
    bad = {m: sorted(r for r in _reachable(m) if _in(r, *banned) and not _in(r, *holders)) for m in found}
    bad = {m: r for m, r in bad.items() if r}
    assert not bad, f"{what}: {bad}"


def test_library_never_imports_scripts_or_benchmark_only_packages() -> None:
    banned = SCRIPTS + tuple(_bench_only())
    bad = [(m, name, line) for m, imps in IMPORTS.items() for name, line in imps
           if not name.startswith("genkit") and _in(name, *banned)]
    assert not bad, f"genkit imports scripts or benchmark-only packages: {bad}"


def test_rules_catch_a_violation() -> None:
    # the checker itself can fail: a solver that reached a family would be reported
    saved = GRAPH["genkit.solvers.base"]
    GRAPH["genkit.solvers.base"] = saved + ["genkit.models"]
    try:
        with pytest.raises(AssertionError, match="solvers see no family"):
            test_layering(*next(r for r in RULES if r[0] == "solvers see no family or network"))
    finally:
        GRAPH["genkit.solvers.base"] = saved
