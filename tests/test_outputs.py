"""Every column of every output table is documented in docs/outputs.md, under its own file, and
CSVs carry 6 significant digits.

The fast tests take the columns from the library functions that build each table, run on small
synthetic inputs; the slow test reads every CSV and Parquet file a real pipeline run wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TOY_TEST_SUITE
from test_figures import synthetic_heads

from mechgen import mechanisms, schema
from mechgen.axes import circuit_tables, convergence, functional, positional
from mechgen.axes.circuit_tables import RUN_TABLE_COLUMNS, relation_fraction_by_size
from mechgen.axes.developmental import trajectories
from mechgen.stats import analysis as stats
from mechgen.tables.aggregate import read_sidecars
from mechgen.tables.outputs import read_csv, write_csv

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "outputs.md"


def documented_columns() -> dict[str, set[str]]:
    """{file pattern: columns} from docs/outputs.md: a ``## `<path>` `` heading starts a file's
    section; each table row ``| `column` | unit | definition |`` below it lists a column."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"^## `([^`]+)`\s*$", line)
        if heading:
            current = sections.setdefault(heading.group(1), set())
        elif line.startswith("## "):
            current = None
        elif current is not None:
            row = re.match(r"^\| `([^`]+)` \|([^|]+)\|([^|]+)\|\s*$", line)
            if row:
                assert row.group(2).strip() and row.group(3).strip(), f"{line!r}: unit, definition"
                current.add(row.group(1))
    return sections


def section_for(relative: str, sections: dict[str, set[str]]) -> str:
    """The docs section whose path (with ``<run>``, ``<N>``, ``<key>`` placeholders) matches
    ``relative``."""
    for pattern in sections:
        regex = re.escape(pattern).replace(re.escape("<run>"), r"[^/]+")
        regex = regex.replace(re.escape("<N>"), r"\d+")
        regex = regex.replace(re.escape("<key>"), r"[0-9a-f]+")
        regex = regex.replace(re.escape("<mechanism>"), r"\w+")
        if re.fullmatch(regex, relative):
            return pattern
    raise AssertionError(f"{relative}: no section in docs/outputs.md")


def assert_documented(relative: str, columns) -> None:
    sections = documented_columns()
    section = section_for(relative, sections)
    missing = sorted(set(columns) - sections[section])
    assert not missing, f"{relative}: columns not documented in docs/outputs.md: {missing}"


def declared(list_name: str) -> list[str]:
    text = (REPO / "workflow" / "rules" / "common.smk").read_text()
    block = re.search(rf"^{list_name} = \[(.*?)\]", text, re.DOTALL | re.MULTILINE)
    assert block, f"common.smk has no {list_name} list"
    return re.findall(r'"(\w+)"', block.group(1))


def test_every_declared_stats_table_has_a_section() -> None:
    sections = documented_columns()
    for name in declared("STATS") + declared("RELATIONAL_STATS") + declared("CROSS_STATS"):
        assert f"stats/{name}.csv" in sections, name
    for name in declared("MECHANISM_TABLES"):
        assert f"stats/<mechanism>/{name}.csv" in sections, name
    # A section per file, each with at least one column.
    assert all(sections.values())


def test_library_tables_are_documented(tmp_path: Path) -> None:
    heads = synthetic_heads()
    traj = trajectories(heads, "one_back")
    results = stats.analyze(heads, traj, tokens_per_step=64, bootstrap_cfg={"n_resamples": 50})
    tables = {f"stats/{name}.csv": table for name, table in results.items()}
    tables.update(
        {
            f"stats/{name}.csv": table
            for name, table in functional.functional_tables(heads, 0.125, "token_lengths").items()
        }
    )
    tables.update(
        {
            f"stats/{name}.csv": table
            for name, table in positional.positional_tables(heads, traj, n_permutations=19).items()
        }
    )
    for name in declared("STATS"):
        assert f"stats/{name}.csv" in tables, f"{name}: no library table checked"
        assert_documented(f"stats/{name}.csv", tables[f"stats/{name}.csv"].columns)
    for path in ("trajectories.parquet", "trajectories.csv", "relational_trajectories.parquet"):
        assert_documented(path, traj.columns)
    head_columns = schema.HEAD_COLUMNS + schema.CIRCUIT_COLUMNS + schema.WEIGHT_COLUMNS
    assert_documented("heads.parquet", head_columns)
    layer_scores = [m.score_column for m in mechanisms.catalog().values() if m.unit == "layer"]
    assert layer_scores  # the catalog's layer-unit mechanisms write layers.parquet
    assert_documented("layers.parquet", schema.LAYER_COLUMNS + layer_scores)
    assert_documented("scores/toy-tiny-seed1/step300.parquet", head_columns)
    assert_documented("stats/mds.csv", convergence.MDS_COLUMNS)
    assert_documented(
        "stats/relational.csv", RUN_TABLE_COLUMNS + circuit_tables.RELATIONAL_EXTRA_COLUMNS
    )
    assert_documented("stats/relational_regressions.csv", stats.REGRESSION_COLUMNS)
    assert_documented("stats/configurational.csv", circuit_tables.CONFIGURATIONAL_COLUMNS)
    assert_documented("stats/configurational_stability.csv", circuit_tables.STABILITY_COLUMNS)
    runs = pd.DataFrame(
        {
            "model": ["m", "m"],
            "size": ["s", "s"],
            "n_params": [10, 10],
            "one_back_earlier_layer": [True, False],
        }
    )
    assert_documented("stats/relational_sizes.csv", relation_fraction_by_size(runs).columns)
    sidecar = tmp_path / "step0.json"
    sidecar.write_text(json.dumps({"run": "r", "step": 0, "status": "ok"}))
    jobs = read_sidecars([sidecar])
    assert_documented("checkpoints.csv", jobs.columns)
    assert_documented("missing.csv", ["run", "step", "repo_id", "revision", "reason"])


def test_csv_has_six_significant_digits(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "x": [1 / 3, 123456.789, 2.0e-7 / 3],
            "n": pd.array([2_999_975_936, None, 7], dtype="Int64"),
            "label": ["a", "b", "c"],
        }
    )
    path = tmp_path / "t.csv"
    write_csv(table, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "x,n,label"
    # Floats to 6 significant digits, integers exact (a nullable Int64 column too).
    assert lines[1:] == ["0.333333,2999975936,a", "123457,,b", "6.66667e-08,7,c"]
    back = read_csv(path)
    np.testing.assert_allclose(back["x"], table["x"], rtol=5e-6)
    empty = tmp_path / "empty.csv"
    write_csv(pd.DataFrame(columns=convergence.MDS_COLUMNS), empty)
    assert list(read_csv(empty).columns) == convergence.MDS_COLUMNS


@pytest.mark.slow
def test_every_pipeline_output_is_documented(toy_test_run: Path) -> None:
    results = toy_test_run / "results" / TOY_TEST_SUITE
    seen = set()
    for path in sorted(results.rglob("*")):
        if path.suffix not in {".csv", ".parquet"} or "hub" in path.relative_to(results).parts:
            continue
        relative = path.relative_to(results).as_posix()
        table = pd.read_parquet(path) if path.suffix == ".parquet" else read_csv(path)
        assert_documented(relative, table.columns)
        seen.add(section_for(relative, documented_columns()))
        if path.suffix == ".csv":
            # At most 6 significant digits in every float cell of a CSV.
            text = path.read_text()
            digits = [
                len(m.group(1).replace(".", "").lstrip("0"))
                for m in re.finditer(r"(?<![\w.])(\d+\.\d+)(?:e[-+]\d+)?(?![\w.])", text)
            ]
            assert max(digits, default=0) <= 6, relative
    for name in declared("STATS") + declared("RELATIONAL_STATS") + declared("CROSS_STATS"):
        assert f"stats/{name}.csv" in seen, f"the pipeline did not write stats/{name}.csv"
    for name in declared("MECHANISM_TABLES"):
        assert f"stats/<mechanism>/{name}.csv" in seen, name


def test_mechanism_tables_are_documented() -> None:
    from crossmech_data import EVAL_LENGTHS, HALF_LENGTH, planted_heads

    from mechgen import mechanisms
    from mechgen.mechanisms import NullContext
    from mechgen.stats import crossmech

    heads = planted_heads(never=("syn-big-seed3",))
    context = NullContext(
        eval_lengths={r: EVAL_LENGTHS for r in heads["run"].unique()},
        settings={"half_length": HALF_LENGTH},
    )
    results, cross = crossmech.analyze_mechanisms(
        heads, list(mechanisms.catalog().values()), context, tokens_per_step=8, n_permutations=9
    )
    assert list(crossmech.MECHANISM_TABLES) == declared("MECHANISM_TABLES")
    for name, result in results.items():
        for table, frame in result.tables.items():
            assert_documented(f"stats/{name}/{table}.csv", frame.columns)
    for name, frame in cross.items():
        assert_documented(f"stats/{name}.csv", frame.columns)
