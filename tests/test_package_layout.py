"""The installed package ships no test fixtures: the fake hub and the offline hub-cache builder are
test support code (tests/support/), used by the tests and the benchmarks only."""

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
    "mechgen.baselines": ("torch", "transformers", "statsmodels", "scipy"),
    "mechgen.mechanisms": ("torch", "transformers", "statsmodels", "scipy"),
    "mechgen.figures": ("torch", "transformers", "statsmodels"),
    "mechgen.mechanism_figures": ("torch", "transformers", "statsmodels"),
    "mechgen.circuit_files": ("torch", "transformers", "statsmodels", "scipy"),
    "mechgen.similarity": ("torch", "transformers", "statsmodels"),
    "mechgen.circuit_tables": ("torch", "transformers"),
    "mechgen.links": ("torch", "transformers"),
}
"""Modules that start many light processes (every Snakemake start parses the catalog; one figure
job per mechanism; the `relational` and `mechanisms` jobs read the circuit files) and the heavy
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
