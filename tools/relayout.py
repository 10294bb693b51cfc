"""Move mechgen's flat modules into the stage subpackages and rewrite every reference to them.

Throwaway tool of the package re-layout (issue 12, section 6), kept so the rewrite can be
re-applied after merging a branch that still edits or imports the modules at their old paths:

    .venv/bin/python tools/relayout.py          # repository root: git mv + rewrite, idempotent
    .venv/bin/python tools/relayout.py --check  # list what it would change (exit 1 if anything)

After ``git merge <branch>``: resolve the conflicts first (files with conflict markers are
skipped); a hunk the branch wrote against an old path can keep the old module names, this
rewrites them. A file the branch modified at an old path whose new one exists (git shows
modify/delete when it missed the rename) is reported as CONFLICT: port the branch's change
into the new file, ``git rm`` the old one. Then run it, then ``--check`` (says "nothing to
do") and ``pytest tests/test_package_layout.py``; commit the result.

What it does, each step a no-op when already done:

1. ``git mv mechgen/<old>.py mechgen/<package>/<new>.py`` for every entry of :data:`MOVES`
   whose old file exists (a merge that re-creates an old path with the new one present is
   reported, not overwritten: merge the two by hand, then re-run).
2. In every tracked text file (package, scripts, tests, bench, workflow, docs, README, ...):
   - ``from mechgen import a, b  # c`` is split into one import per target package, e.g.
     ``from mechgen.scoring import circuit`` / ``from mechgen.stats import analysis as stats``
     (a module renamed because its name is now its package's keeps its old name as an alias,
     so the code that uses it is unchanged);
   - ``from mechgen.<old> import x`` and every dotted ``mechgen.<old>[.attr]`` (imports,
     monkeypatch targets, ``:mod:`` roles, module lists in tests) become ``mechgen.<new>``;
   - every path ``mechgen/<old>.py`` becomes ``mechgen/<package>/<new>.py``.
   A reference already in the new form is left alone. The rewritten Python files get their
   imports sorted with ``ruff check --select I --fix`` (ruff of the running interpreter's
   venv). Caveat: a *bare* dotted
   ``mechgen.<package>`` of a package that replaced a module of the same name (scoring, stats,
   figures, tables, sources) is read as the old module; write such a package as a path
   (``mechgen/stats/``) in prose.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import textwrap
from pathlib import Path

MOVES: dict[str, str] = {
    # sources: where weights and evaluation text come from
    "sources": "sources.checkpoints",
    "hubcache": "sources.hubcache",
    "toy": "sources.toy",
    "evaltext": "sources.evaltext",
    # scoring: model side, torch, runs in the scoring job
    "scoring": "scoring.job",
    "metrics": "scoring.metrics",
    "circuit": "scoring.circuit",
    "relational": "scoring.relational",
    "configurational": "scoring.configurational",
    # tables: per-head tables and per-seed summaries
    "aggregate": "tables.aggregate",
    "summary": "tables.summary",
    "tables": "tables.heads",
    "outputs": "tables.outputs",
    "circuit_files": "tables.circuit_files",
    "baselines": "tables.baselines",
    # axes: one module per correspondence axis, and what they share
    "functional": "axes.functional",
    "positional": "axes.positional",
    "developmental": "axes.developmental",
    "convergence": "axes.convergence",
    "links": "axes.links",
    "circuit_tables": "axes.circuit_tables",
    "similarity": "axes.similarity",
    # stats: statistics and the cross-mechanism, cross-seed and cross-family analyses
    "stats": "stats.analysis",
    "regression": "stats.regression",
    "crossmech": "stats.crossmech",
    "seed_sources": "stats.seed_sources",
    "lineage": "stats.lineage",
    "families": "stats.families",
    # figures (the report's title stays beside them: mechgen/report.py)
    "figures": "figures.suite",
    "mechanism_figures": "figures.mechanism_figures",
    "family_figures": "figures.family_figures",
    "seed_figures": "figures.seed_figures",
}
"""Old module (under ``mechgen``) -> new dotted path under ``mechgen``."""

PACKAGES = sorted({new.split(".")[0] for new in MOVES.values()})
ROOT = Path(__file__).resolve().parent.parent
SUBMODULES: dict[str, set[str]] = {
    package: {new.split(".")[1] for new in MOVES.values() if new.startswith(package + ".")}
    | {path.stem for path in (ROOT / "mechgen" / package).glob("*.py")}
    | {path.parent.name for path in (ROOT / "mechgen" / package).glob("*/__init__.py")}
    for package in PACKAGES
}
"""Each new package's submodules: the moved ones and any module written there since."""

TEXT_SUFFIXES = {".py", ".md", ".smk", ".rst", ".toml", ".yaml", ".yml", ".sh", ".txt", ".cfg"}
TEXT_NAMES = {"Snakefile", "run"}
SKIP_PREFIXES = ("results/", "tools/relayout.py")

_IDENT = r"[A-Za-z_]\w*"
# `from mechgen import a, b as c` (one line, or parenthesised over several), with its indent and
# an optional trailing comment.
_FROM_PACKAGE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<lead>(?:[^\n]*?; )?)from mechgen import "
    r"(?P<names>\([^)]*\)|[\w ,]*\w)(?P<comment>[ \t]*#[^\n]*)?(?P<end>$)?",
    re.MULTILINE,
)
# `from mechgen.<pkg> import names` (the one form where a bare package is a new-style reference)
_FROM_MODULE = re.compile(
    rf"\bfrom mechgen\.(?P<first>{_IDENT})(?P<rest>(?:\.{_IDENT})*) import (?P<names>\([^)]*\)|[\w ,]*\w)"
)
_DOTTED = re.compile(rf"(?<![\w.])mechgen\.(?P<first>{_IDENT})(?P<rest>(?:\.{_IDENT})*)")
_PATH = re.compile(rf"(?<![\w/])mechgen/(?P<first>{_IDENT})\.py\b")


def _names(text: str) -> list[tuple[str, str | None]]:
    """``a, b as c`` (or its parenthesised form) -> [("a", None), ("b", "c")]."""
    text = text.strip().removeprefix("(").removesuffix(")")
    text = re.sub(r"#[^\n]*", "", text)
    out = []
    for part in text.replace("\n", " ").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, alias = part.partition(" as ")
        out.append((name.strip(), alias.strip() or None))
    return out


def _is_new(first: str, rest: str) -> bool:
    """Whether ``mechgen.<first><rest>`` already names the new layout."""
    if first not in MOVES:
        return True
    if first not in SUBMODULES:
        return False
    second = rest.split(".")[1] if rest else None
    return second in SUBMODULES[first]


def _new_dotted(first: str, rest: str) -> str:
    return f"mechgen.{first}{rest}" if _is_new(first, rest) else f"mechgen.{MOVES[first]}{rest}"


def _rewrite_from_package(match: re.Match[str]) -> str:
    indent, comment = match["indent"], match["comment"] or ""
    # one statement per line, unless the import sits inside a one-line string of statements
    separator = "\n" + indent if match["end"] is not None and not match["lead"] else "; "
    names = _names(match["names"])
    if not any(name in MOVES for name, _ in names):
        return match[0]
    groups: dict[str, list[str]] = {}
    for name, alias in names:
        if name in MOVES:
            package, module = MOVES[name].rsplit(".", 1)
            bound = alias or name
            entry = module if bound == module else f"{module} as {bound}"
            groups.setdefault(f"mechgen.{package}", []).append(entry)
        else:
            groups.setdefault("mechgen", []).append(name if alias is None else f"{name} as {alias}")
    statements = [
        f"from {module} import {', '.join(sorted(entries))}" for module, entries in sorted(groups.items())
    ]
    if separator != "; ":
        statements = [statement + comment for statement in statements]
        comment = ""
    return indent + match["lead"] + separator.join(statements) + comment


def _rewrite_from_module(match: re.Match[str]) -> str:
    first, rest = match["first"], match["rest"]
    if first not in MOVES:
        return match[0]
    if not rest and first in SUBMODULES:
        # `from mechgen.stats import ...`: new style iff every name is one of its submodules
        names = [name for name, _ in _names(match["names"])]
        if names and all(name in SUBMODULES[first] for name in names):
            return match[0]
        return match[0].replace(f"mechgen.{first} import", f"mechgen.{MOVES[first]} import", 1)
    return match[0].replace(f"mechgen.{first}{rest} import", f"{_new_dotted(first, rest)} import", 1)


def rewrite(text: str) -> str:
    text = _FROM_PACKAGE.sub(_rewrite_from_package, text)
    # protect the `from mechgen.x import` statements from the generic dotted rule below
    pieces, last = [], 0
    for match in _FROM_MODULE.finditer(text):
        pieces.append(_rewrite_dotted(text[last : match.start()]))
        pieces.append(_rewrite_from_module(match))
        last = match.end()
    pieces.append(_rewrite_dotted(text[last:]))
    return "".join(pieces)


def _rewrite_dotted(text: str) -> str:
    text = _DOTTED.sub(lambda m: _new_dotted(m["first"], m["rest"]), text)
    return _PATH.sub(
        lambda m: f"mechgen/{MOVES[m['first']].replace('.', '/')}.py"
        if m["first"] in MOVES
        else m[0],
        text,
    )


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def move_files(check: bool) -> list[str]:
    changes = []
    for old, new in MOVES.items():
        src = ROOT / "mechgen" / f"{old}.py"
        dest = ROOT / "mechgen" / (new.replace(".", "/") + ".py")
        if not src.exists():
            continue
        if dest.exists():
            print(f"CONFLICT: both {src.relative_to(ROOT)} and {dest.relative_to(ROOT)} exist; "
                  "merge them by hand, delete the old one, re-run", file=sys.stderr)
            continue
        changes.append(f"git mv {src.relative_to(ROOT)} {dest.relative_to(ROOT)}")
        if not check:
            dest.parent.mkdir(exist_ok=True)
            _git("mv", str(src), str(dest))
    for package in PACKAGES:
        init = ROOT / "mechgen" / package / "__init__.py"
        if (ROOT / "mechgen" / package).is_dir() and not init.exists():
            changes.append(f"create {init.relative_to(ROOT)}")
            if not check:
                doc = textwrap.fill(PACKAGE_DOCS[package], width=97)
                init.write_text(f'"""{doc}"""\n')
                _git("add", str(init))
    return changes


PACKAGE_DOCS = {
    "sources": "Where the weights and the evaluation text come from: the hub and its cache, local "
    "checkpoint directories, the embedded toy suite, the evaluation sentences.",
    "scoring": "Model side: the scoring job and the per-checkpoint scores it computes under torch "
    "(attention metrics, relational and configurational passes).",
    "tables": "Table side: the per-head tables, their schema checks and files, and the per-seed "
    "summaries (pandas, no torch).",
    "axes": "Table side: one module per correspondence axis (functional, positional, "
    "developmental and convergence, relational links, configurational similarity).",
    "stats": "Table side: the statistics of the axes and the analyses across mechanisms, seeds and "
    "model families.",
    "figures": "Table side: the figures of a suite, of the mechanisms, of the seeds and of a "
    "combined study (matplotlib).",
}


def rewrite_files(check: bool) -> list[str]:
    changes = []
    for rel in sorted(set(_git("ls-files").splitlines())):  # unmerged files are listed per stage
        path = ROOT / rel
        if rel.startswith(SKIP_PREFIXES) or not path.is_file():
            continue
        if path.suffix not in TEXT_SUFFIXES and path.name not in TEXT_NAMES:
            continue
        try:
            old = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if re.search(r"^<<<<<<< ", old, re.MULTILINE):
            print(f"SKIPPED {rel}: it has merge-conflict markers; resolve them, then re-run",
                  file=sys.stderr)
            continue
        new = rewrite(old)
        if new != old:
            changes.append(f"rewrite {rel}")
            if not check:
                path.write_text(new, encoding="utf-8")
    return changes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing, list the changes")
    args = parser.parse_args()
    changes = move_files(args.check)
    rewritten = rewrite_files(args.check)
    changes += rewritten
    python = [c.removeprefix("rewrite ") for c in rewritten if c.endswith(".py")]
    if python and not args.check:
        # the split imports land where the old ones were; let ruff's isort put them in order
        ruff = Path(sys.executable).with_name("ruff")
        command = [str(ruff) if ruff.exists() else "ruff", "check", "--select", "I", "--fix", "-q"]
        try:
            subprocess.run([*command, *python], cwd=ROOT, check=False)
        except FileNotFoundError:
            print("ruff not found: sort the imports of the rewritten files by hand", file=sys.stderr)
    print("\n".join(changes) or "nothing to do")
    return 1 if args.check and changes else 0


if __name__ == "__main__":
    sys.exit(main())
