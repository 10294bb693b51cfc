"""The package's layout (README, "Package layout").

- The installed package ships no test fixtures: the fake hub and the offline hub-cache builder
  are test support code (tests/support/), used by the tests and the benchmarks only.
- The light modules import no heavy stack (checked in a fresh interpreter), and the table side
  (tables/, axes/, stats/, figures/) imports neither torch nor transformers at module level
  (checked statically, through every mechgen module it imports).
- mechgen's module-level imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mechgen"
SUPPORT_NAMES = {
    "FakeHub",
    "Fault",
    "build_offline_cache",
    "run_revisions",
    "save_random_checkpoint",
}
"""Names defined by tests/support/ that a module of the package must neither define nor import."""


def test_no_test_support_in_the_package() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            defined = (
                {node.name}
                if isinstance(node, ast.FunctionDef | ast.ClassDef)
                else {alias.asname or alias.name for alias in node.names}
                if isinstance(node, ast.ImportFrom)
                else set()
            )
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("support"):
                offenders.append(f"{path.name}: imports {node.module}")
            offenders += [f"{path.name}: {name}" for name in sorted(defined & SUPPORT_NAMES)]
            if isinstance(node, ast.ImportFrom | ast.Import):
                modules = (
                    [node.module]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                )
                offenders += [f"{path.name}: imports {m}" for m in modules if m == "http.server"]
    assert offenders == []
    assert (PACKAGE.parent / "tests" / "support" / "fakehub.py").is_file()


LIGHT_MODULES = {
    "mechgen.sources.toy_tokenizer": ("torch", "transformers", "statsmodels", "scipy"),
    "mechgen.tables.baselines": ("torch", "transformers", "statsmodels", "scipy"),
    "mechgen.mechanisms": ("torch", "transformers", "statsmodels", "scipy"),
    "mechgen.tables.circuit_files": ("torch", "transformers", "statsmodels", "scipy"),
    # Every scoring job imports it (QKFactors): scipy.stats alone is ~0.7 CPU-s per job.
    "mechgen.axes.similarity": ("torch", "transformers", "statsmodels", "scipy"),
    "mechgen.figures.suite": ("torch", "transformers", "statsmodels"),
    "mechgen.figures.mechanism_figures": ("torch", "transformers", "statsmodels"),
    "mechgen.axes.circuit_tables": ("torch", "transformers"),
    "mechgen.axes.links": ("torch", "transformers"),
}
"""Modules that start many light processes (every Snakemake start parses the catalog; one figure
job per mechanism; the `relational` and `mechanisms` jobs read the circuit files; every toy suite trains its
tokenizer in a job of its own) and the heavy
libraries (seconds of imports each) they must not pull in, in import order: each module is
checked after it and the ones above it are imported."""


def test_light_modules_do_not_import_the_heavy_stacks() -> None:
    import subprocess
    import sys

    # One fresh interpreter imports the modules in order and reports what is loaded after each.
    code = (
        "import importlib, sys\n"
        f"for module, heavy in {LIGHT_MODULES!r}.items():\n"
        "    importlib.import_module(module)\n"
        "    top = {name.split('.')[0] for name in sys.modules}\n"
        "    print(module, sorted(set(heavy) & top))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False, capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"{module} []" for module in LIGHT_MODULES], result.stdout


# --- the layout: stages, sides, no cycles ----------------------------------------------------

TABLE_SIDE = ("tables", "axes", "stats", "figures")
"""Subpackages of mechgen on the table side (pandas; run in light jobs, never under torch)."""
MODEL_STACK = ("torch", "transformers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path, modules: set[str]) -> set[str]:
    """What importing the module at ``path`` imports at once: the modules named by its
    ``import``/``from`` statements outside function bodies and ``if TYPE_CHECKING:`` blocks
    (a ``from package import name`` that names a submodule counts as that submodule)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue  # runs only when called
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # never runs
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                found.add(base)
                found.update(
                    f"{base}.{alias.name}"
                    for alias in child.names
                    if f"{base}.{alias.name}" in modules
                )
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _import_graph() -> dict[str, set[str]]:
    """Every mechgen module -> everything it imports at module level (mechgen or not)."""
    paths = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    return {name: _module_level_imports(path, set(paths)) for name, path in paths.items()}


def test_table_side_does_not_import_the_model_stack_at_module_level() -> None:
    """No module of tables/, axes/, stats/ or figures/ imports torch or transformers when it is
    imported, directly or through another mechgen module it imports at module level (the
    analyses run in light jobs; torch stays in the scoring job)."""
    graph = _import_graph()

    def chain_to_model_stack(start: str) -> list[str] | None:
        seen, todo = {start}, [[start]]
        while todo:
            chain = todo.pop()
            for target in sorted(graph.get(chain[-1], ())):
                if target.split(".")[0] in MODEL_STACK:
                    return [*chain, target]
                if target in graph and target not in seen:
                    seen.add(target)
                    todo.append([*chain, target])
        return None

    table_side = [m for m in graph if m.split(".")[1:2] and m.split(".")[1] in TABLE_SIDE]
    assert len(table_side) > 20, table_side  # the walk found the subpackages
    offenders = [" -> ".join(c) for m in table_side if (c := chain_to_model_stack(m)) is not None]
    assert offenders == []


def test_no_import_cycles_between_mechgen_modules() -> None:
    """The module-level import graph of mechgen is acyclic. Function-local imports are not
    counted; the only ones of mechgen's own modules left (mechgen.sources.checkpoints.load_model
    importing the adapters) defer torch, not a cycle."""
    graph = {m: {t for t in ts if t.split(".")[0] == "mechgen"} for m, ts in _import_graph().items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == module or target not in graph:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
