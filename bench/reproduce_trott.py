"""Print the published numbers of Trott (2025) next to mechgen's, computed from a table directory.

Usage (from the repository root):

    PYTHONPATH=. python bench/reproduce_trott.py DIRECTORY [--published tests/data/trott2025/published.json]
        [--markdown out.md]

DIRECTORY holds the study's tables (all 576 ``attention_summaries`` CSVs, or the test subset
``tests/data/trott2025``). Prints one row per published number (printed value, mechgen's value,
difference, tolerance = half a unit of the last printed digit unless stated, match), then the
mixed-model diagnostics (every face/optimiser/start tried and its log-likelihood) of the time
model, and exits non-zero if any number does not match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from mechgen.axes.developmental import trajectories
from mechgen.stats import analysis as stats
from mechgen.tables.heads import compare_trott2025, read_trott2025

DEFAULT_PUBLISHED = (
    Path(__file__).resolve().parent.parent / "tests" / "data" / "trott2025" / "published.json"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--published", type=Path, default=DEFAULT_PUBLISHED)
    parser.add_argument(
        "--markdown", type=Path, default=None, help="also write the comparison as a Markdown table"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    heads = read_trott2025(args.directory)
    read_seconds = time.perf_counter() - started
    traj = trajectories(heads, "one_back")
    results = stats.analyze(heads, traj)
    analyze_seconds = time.perf_counter() - started - read_seconds
    published = json.loads(args.published.read_text())["numbers"]
    comparison = compare_trott2025(results, published)

    with pd.option_context(
        "display.width", 200, "display.max_rows", 200, "display.max_colwidth", 60
    ):
        print(
            f"{len(heads)} head rows from {args.directory} (read {read_seconds:.1f} s, analyze {analyze_seconds:.1f} s)\n"
        )
        print(
            comparison[
                ["quantity", "printed", "mechgen", "difference", "tolerance", "match"]
            ].to_string(index=False)
        )
        print(f"\n{int(comparison['match'].sum())}/{len(comparison)} published numbers reproduced")
        regressions = results["regressions"]
        flags = regressions.drop_duplicates("analysis").set_index("analysis")["singular"]
        print("\nsingular flags:", {name: bool(flag) for name, flag in flags.items()})
        print("\ntime model: every fit tried (face = random factors kept; ols = all variances 0)")
        print(stats.time_model(traj).candidates.to_string(index=False))
    if args.markdown:
        table = comparison.assign(
            mechgen=comparison["mechgen"].map(lambda v: f"{v:.6g}"),
            difference=comparison["difference"].map(lambda v: f"{v:.2g}"),
        )
        args.markdown.write_text(
            table[["quantity", "printed", "mechgen", "difference", "match"]].to_markdown(
                index=False, disable_numparse=True
            )
            + "\n"
        )
    return 0 if comparison["match"].all() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
