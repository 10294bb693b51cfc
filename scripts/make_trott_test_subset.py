"""Make the small copy of the reference study's tables that tests/test_reproduce_trott.py reads.

Usage (from the repository root; the source is the study's 576 ``attention_summaries`` CSVs):

    PYTHONPATH=. python scripts/make_trott_test_subset.py SOURCE_DIR [tests/data/trott2025]

What is copied, in the study's own CSV format (same columns, values written unchanged):

- the 36 final-step tables (step 143000, every size x seed) whole: the prop_layer model needs
  every head at the final step;
- for the other 540 tables, only the row holding the largest ``mean_1back`` of the table (the
  first such row in file order, i.e. the lowest (Layer, Head), which is also the argmax
  mechgen's trajectory picks), all in one file ``trajectory_max_heads.csv``: the trajectory is
  the max over heads, so it is unchanged.

The script then checks, reading both directories with :func:`mechgen.tables.heads.read_trott2025`,
that the ``one_back`` trajectories (values and argmax layer/head) of the subset equal those of
the full tables exactly, and refuses to write otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

from mechgen.axes.developmental import trajectories
from mechgen.tables.heads import read_trott2025, read_trott2025_table

FINAL_REVISION = "step143000"
MAX_ROWS_FILE = "trajectory_max_heads.csv"


def make_subset(source: Path, destination: Path) -> None:
    """Write the test subset of the tables in ``source`` to ``destination`` (see module docstring)."""
    paths = sorted(source.glob("*.csv"))
    if len(paths) != 576:
        raise SystemExit(f"expected the study's 576 tables in {source}, found {len(paths)}")
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        max_rows = []
        for path in paths:
            table = read_trott2025_table(path)
            revisions = table["revision"].unique()
            if len(revisions) != 1:
                raise SystemExit(f"{path}: more than one revision in one table: {revisions}")
            if revisions[0] == FINAL_REVISION:
                shutil.copyfile(path, staging / path.name)
            else:
                # idxmax: the first maximum in file order (files are sorted by Layer, Head).
                max_rows.append(table.loc[[table["mean_1back"].idxmax()]])
        combined = pd.concat(max_rows, ignore_index=True)
        # float_format=None and the default repr keep every digit pandas read (round-trip exact).
        combined.to_csv(staging / MAX_ROWS_FILE, index=False)

        full = trajectories(read_trott2025(source))
        subset = trajectories(read_trott2025(staging))
        columns = ["run", "step", "value", "argmax_layer", "argmax_head"]
        pd.testing.assert_frame_equal(full[columns], subset[columns], check_exact=True)
        n_final = len(list(staging.glob("*step143000*")))
        print(
            f"{n_final} final-step tables + {len(combined)} max-head rows; trajectories identical ({len(full)} rows)"
        )

        destination.mkdir(parents=True, exist_ok=True)
        for stale in destination.glob("*.csv"):
            stale.unlink()
        for path in staging.glob("*.csv"):
            shutil.copyfile(path, destination / path.name)
    size = sum(p.stat().st_size for p in destination.glob("*.csv"))
    print(f"wrote {destination} ({size / 1e6:.2f} MB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", type=Path, help="directory of the study's 576 attention_summaries CSVs"
    )
    parser.add_argument("destination", type=Path, nargs="?", default=Path("tests/data/trott2025"))
    args = parser.parse_args(argv)
    make_subset(args.source, args.destination)


if __name__ == "__main__":
    main(sys.argv[1:])
