"""A study that combines suites and compares mechanisms across model families (mechgen.stats.families).

Fast tests: members built by running the single-suite mechanism analysis on the planted per-head
table of tests/crossmech_data.py, written as a member's stats directory would be; statistics
checked against hand computations, a hand-built statsmodels fit and planted effects. Slow test:
a combined study end to end in Snakemake over the toy-test run (conftest's ``toy_test_run``)
and a second GPT-NeoX toy member labelled as the gpt2 family.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
import yaml
from conftest import TOY_TEST_CONFIGFILES, TOY_TEST_SUITE, copy_run, logged_jobs, run_snakemake
from crossmech_data import EVAL_LENGTHS, HALF_LENGTH, planted_heads
from test_outputs import assert_documented

from mechgen import mechanisms
from mechgen.config import ConfigError, load_yaml, validate_config
from mechgen.mechanisms import NullContext
from mechgen.stats import crossmech, families
from mechgen.tables.outputs import read_csv, write_csv

REPO = Path(__file__).resolve().parent.parent
NAMES = ["previous_token", "induction"]
BOOT = {"n_resamples": 2000, "seed": 0, "confidence": 0.95, "method": "percentile"}


def write_member(stats_dir: Path, heads: pd.DataFrame) -> None:
    """A member's stats/<mechanism>/ tables, made by the single-suite analysis."""
    context = NullContext(
        eval_lengths={run: EVAL_LENGTHS for run in heads["run"].unique()},
        settings={"half_length": HALF_LENGTH},
    )
    results, _ = crossmech.analyze_mechanisms(
        heads, [mechanisms.get(n) for n in NAMES], context, tokens_per_step=8, n_permutations=49
    )
    for name, result in results.items():
        for table, frame in result.tables.items():
            write_csv(frame, stats_dir / name / f"{table}.csv")


def renamed(heads: pd.DataFrame, prefix: str) -> pd.DataFrame:
    out = heads.copy()
    for col in ("model", "run"):
        out[col] = out[col].str.replace("syn-", prefix, regex=False)
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[families.Member]:
    """Two members with the same planted runs (6 seeds x 2 sizes); the gpt2 member's steps hold
    10x the tokens, so every onset in tokens is exactly 10x (one decade) later."""
    root = tmp_path_factory.mktemp("study")
    heads = planted_heads(seeds=(1, 2, 3, 4, 5, 6))
    write_member(root / "a" / "stats", heads)
    write_member(root / "b" / "stats", renamed(heads, "gpt-"))
    return [
        families.Member("a", "gpt_neox", 8, root / "a" / "stats"),
        families.Member("b", "gpt2", 80, root / "b" / "stats"),
    ]


def test_tokens_seen_hand_worked() -> None:
    # Pythia: 1024 sequences x 2048 tokens per step; step 143000 is 299,892,736,000 tokens.
    assert families.tokens_seen(143000, 2_097_152).item() == 299_892_736_000
    # Int64 throughout: no float rounding at 1e11 tokens.
    assert families.tokens_seen(np.array([0, 1, 2500]), 768).tolist() == [0, 768, 1_920_000]


def test_onset_tokens_are_steps_times_the_member_tokens_per_step(study) -> None:
    tables = families.load_members(study, NAMES, {})
    seeds = tables.per_seed["previous_token"]
    a = read_csv(study[0].stats_dir / "previous_token" / "per_seed.csv")
    got = seeds[seeds["member"] == "a"].set_index("run")["onset_tokens"]
    np.testing.assert_allclose(got, a.set_index("run")["onset_step"] * 8)
    got_b = seeds[seeds["member"] == "b"]["onset_tokens"].to_numpy()
    np.testing.assert_allclose(got_b, a["onset_step"].to_numpy() * 80)
    traj = tables.trajectories["previous_token"]
    b_rows = traj[traj["member"] == "b"]
    assert (b_rows["tokens_seen"] == b_rows["step"] * 80).all()


def test_families_table_recovers_the_planted_decade(study) -> None:
    tables, out = families.analyze_study(study, NAMES, {}, BOOT, n_permutations=99)
    table = out["families"]
    assert list(table.columns) == families.FAMILIES_COLUMNS
    seeds = tables.per_seed["previous_token"]
    for name in NAMES:
        rows = table[(table["mechanism"] == name)].set_index(["kind", "family", "axis"])
        diff = rows.loc[("difference", "gpt2", "log10_onset_tokens")]
        # Same steps, 10x the tokens per step: exactly one decade.
        assert diff["estimate"] == pytest.approx(1.0, abs=1e-9)
        assert diff["ci_low"] < 1.0 < diff["ci_high"]
        assert diff["n"] == diff["n_reference"] == 12
        # The scale-free axes do not move.
        for axis in ("peak", "relative_depth", "fraction_qualifying", "onset_cv"):
            assert rows.loc[("difference", "gpt2", axis), "estimate"] == pytest.approx(0, abs=1e-9)
    # A profile value against a hand computation: mean log10 onset tokens over formed runs.
    formed = seeds[(seeds["family"] == "gpt_neox") & seeds["formed"].astype(bool)]
    expected = float(np.mean(np.log10(formed["onset_tokens"])))
    got = table[
        (table["mechanism"] == "previous_token")
        & (table["kind"] == "profile")
        & (table["family"] == "gpt_neox")
        & (table["axis"] == "log10_onset_tokens")
    ]["estimate"].iloc[0]
    assert got == pytest.approx(expected)
    # The profile rows are crossmech.profile's over the family's runs.
    profile = out["profiles"]
    assert set(profile["family"]) == {"gpt_neox", "gpt2"}
    own = profile[(profile["family"] == "gpt2") & (profile["size"] == "all")]
    assert own["n_runs"].tolist() == [12, 12]
    # Every column is documented (docs/outputs.md, as tests/test_outputs.py checks the others).
    assert_documented("stats/families.csv", table.columns)
    assert_documented("stats/families_models.csv", out["models"].columns)
    assert_documented("stats/families_profile.csv", profile.columns)


def test_bootstrap_difference_ci_against_a_numpy_bootstrap() -> None:
    """scipy's two-sample percentile bootstrap against resampling by hand (Monte Carlo: the
    two differ by resampling noise only)."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.7, 0.1, size=15)
    y = rng.normal(0.5, 0.1, size=12)
    cfg = dict(BOOT, n_resamples=4000)
    low, high = families.bootstrap_ci([x, y], lambda a, b: np.mean(a) - np.mean(b), cfg)
    hand = np.random.default_rng(7)
    draws = [hand.choice(x, x.size).mean() - hand.choice(y, y.size).mean() for _ in range(20000)]
    ref_low, ref_high = np.percentile(draws, [2.5, 97.5])
    assert low == pytest.approx(ref_low, abs=0.01)
    assert high == pytest.approx(ref_high, abs=0.01)
    assert families.bootstrap_ci([x[:1], y], lambda a, b: 0.0, cfg) == (
        pytest.approx(np.nan, nan_ok=True),
        pytest.approx(np.nan, nan_ok=True),
    )


def planted_runs(effect: float, n_seeds: int = 12, seed: int = 0) -> pd.DataFrame:
    """Per-run rows of two families x two sizes x n_seeds with log10(onset_tokens) = 6 +
    effect x gpt2 + 0.5 log10(n_params / 1e6) + u_seed + e (u ~ N(0, 0.2), e ~ N(0, 0.1))."""
    rng = np.random.default_rng(seed)
    u = rng.normal(0, 0.2, n_seeds)
    rows = []
    for family in ("gpt_neox", "gpt2"):
        for n_params in (1e6, 1e7):
            for s in range(n_seeds):
                log_onset = (
                    6
                    + effect * (family == "gpt2")
                    + 0.5 * np.log10(n_params / 1e6)
                    + u[s]
                    + rng.normal(0, 0.1)
                )
                rows.append(
                    {
                        "family": family,
                        "seed": s,
                        "n_params": n_params,
                        "formed": True,
                        "onset_tokens": 10**log_onset,
                        "peak": 0.6 - 0.1 * (family == "gpt2") + 0.3 * u[s] + rng.normal(0, 0.02),
                    }
                )
    return pd.DataFrame(rows)


def test_mixed_model_recovers_the_planted_family_effect_and_matches_statsmodels() -> None:
    data = planted_runs(effect=0.4)
    onset, peak = families.family_models(data, ["gpt_neox", "gpt2"])
    term = "family[gpt2 - gpt_neox]"
    assert onset.formula == "log10(onset_tokens) ~ family + log10(n_params) + (1|seed)"
    assert onset.fe_params[term] == pytest.approx(0.4, abs=3 * onset.bse[term])
    assert peak.fe_params[term] == pytest.approx(-0.1, abs=3 * peak.bse[term])
    assert onset.variances["seed"] > 0
    # A hand-built statsmodels fit of the same model (REML, random intercept for seed).
    hand = data.assign(
        y=np.log10(data["onset_tokens"]),
        gpt2=(data["family"] == "gpt2").astype(float),
        logn=np.log10(data["n_params"]),
    )
    ref = smf.mixedlm("y ~ gpt2 + logn", hand, groups=hand["seed"]).fit(reml=True)
    assert onset.fe_params[term] == pytest.approx(ref.fe_params["gpt2"], abs=1e-4)
    assert onset.bse[term] == pytest.approx(ref.bse_fe["gpt2"], rel=1e-3)
    assert onset.variances["seed"] == pytest.approx(float(ref.cov_re.iloc[0, 0]), rel=1e-3)


def test_mixed_model_drops_size_when_each_family_has_one() -> None:
    data = planted_runs(effect=0.4)
    one_size = data[
        ((data["family"] == "gpt_neox") & (data["n_params"] == 1e6))
        | ((data["family"] == "gpt2") & (data["n_params"] == 1e7))
    ]
    onset, _ = families.family_models(one_size, ["gpt_neox", "gpt2"])
    assert onset.formula == "log10(onset_tokens) ~ family + (1|seed)"
    assert not onset.skipped
    # Family and size are confounded here: the term carries the planted 0.4 plus 0.5 x 1 decade.
    assert onset.fe_params["family[gpt2 - gpt_neox]"] == pytest.approx(0.9, abs=0.15)


# ---- configuration ---------------------------------------------------------------------------


def base_config() -> dict:
    config = load_yaml(Path(__file__).resolve().parent.parent / "config.yaml")
    config["suites"]["toyb"] = dict(
        config["suites"]["toy"], model_prefix="toyb-", architecture="gpt2"
    )
    config["studies"] = {"toy-families": {"combine": ["toy", "toyb"]}}
    config["suite"] = "toy-families"
    return config


def test_study_config_is_valid_and_members_keep_their_family() -> None:
    config = validate_config(base_config(), check_files=False)
    assert config["suites"]["toy"]["architecture"] == "gpt_neox"  # the schema's default
    assert config["suites"]["toyb"]["architecture"] == "gpt2"
    # A study reads its members' tables, not their checkpoints: a member's inputs may be gone.
    gone = base_config()
    gone["suites"]["toyb"].update(
        source="local",
        path="/nonexistent/runs",
        schedule=[0, 100],
        eval={"kind": "file", "path": "/nonexistent/a.txt"},
    )
    assert validate_config(gone)["suites"]["toyb"]["architecture"] == "gpt2"
    gone["suite"] = "toyb"  # run on its own, the member needs them
    with pytest.raises(ConfigError, match="config key .suites.toyb.path."):
        validate_config(gone)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["studies"]["toy-families"].update(combine=["toy", "nosuch"]),
            "config key 'studies.toy-families.combine': unknown suite 'nosuch'",
        ),
        (
            lambda c: c["suites"]["toyb"].update(model_prefix="toy-"),
            "config key 'studies.toy-families.combine': suites 'toy' and 'toyb' both have model",
        ),
        (
            lambda c: c["studies"].update({"toy": {"combine": ["toy", "toyb"]}}),
            "config key 'studies.toy': a study cannot have the name of a suite",
        ),
        (
            lambda c: c["suites"]["toyb"].update(architecture="llama"),
            "config key 'suites.toyb.architecture': 'llama' is not allowed; allowed: gpt_neox, gpt2",
        ),
        (
            lambda c: c["studies"]["toy-families"].update(combine=["toy"]),
            "config key 'studies.toy-families.combine'",
        ),
        (lambda c: c.update(suite="nosuch"), "config key 'suite': unknown suite 'nosuch'"),
    ],
)
def test_bad_study_fails_naming_the_key(change, message) -> None:
    config = base_config()
    change(config)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(config, check_files=False)


# ---- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_combined_study_end_to_end(toy_test_run: Path, tmp_path: Path) -> None:
    """The toy-test run (GPT-NeoX) and a second member labelled gpt2, with 2x the tokens per
    step: the study runs only its own rule (no member job), and families.csv and the mixed model
    agree with a computation from the members' per_seed tables."""
    work = copy_run(toy_test_run, tmp_path / "work")
    results = work / "results"
    # The second member: the same runs, under model names of their own, as a member suite of
    # the gpt2 family would have written them (its own pipeline is not run by the study).
    b_stats = results / "toyb" / "stats"
    for src in (results / TOY_TEST_SUITE / "stats").rglob("*.csv"):
        dest = b_stats / src.relative_to(results / TOY_TEST_SUITE / "stats")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(src.read_text().replace("toy-tiny", "toyb-tiny"))
    overlay = yaml.safe_load((work / TOY_TEST_CONFIGFILES[1]).read_text())
    spec = dict(overlay["suites"][TOY_TEST_SUITE])
    tokens_a = int(spec["tokens_per_step"])
    spec.update(model_prefix="toyb-", architecture="gpt2", tokens_per_step=2 * tokens_a)
    study = {
        "suite": "toy-families",
        "suites": {"toyb": spec},
        "studies": {"toy-families": {"combine": [TOY_TEST_SUITE, "toyb"]}},
    }
    (work / "study.yaml").write_text(yaml.safe_dump(study))
    args = ("--cores", "1", "--configfile", *TOY_TEST_CONFIGFILES, "study.yaml")
    result = run_snakemake(work, *args)
    assert logged_jobs(result.stdout + result.stderr) == ["all", "families"]
    out = results / "toy-families"
    table = read_csv(out / "stats" / "families.csv")
    assert set(table["family"]) == {"gpt_neox", "gpt2"}
    seeds = read_csv(results / TOY_TEST_SUITE / "stats" / "previous_token" / "per_seed.csv")
    formed = seeds[seeds["formed"].astype(bool)]
    diff = table[
        (table["mechanism"] == "previous_token")
        & (table["kind"] == "difference")
        & (table["axis"] == "log10_onset_tokens")
    ]
    models = read_csv(out / "stats" / "families_models.csv")
    onset_fit = models[
        (models["mechanism"] == "previous_token") & (models["analysis"] == "family_onset")
    ]
    if len(formed):
        # The same onsets in steps, 2x the tokens per step: log10(2) later in tokens.
        assert diff["estimate"].iloc[0] == pytest.approx(np.log10(2), abs=1e-5)
    else:
        # The toy-test runs are short: where no run formed, there is no onset to compare.
        assert np.isnan(diff["estimate"].iloc[0])
        assert onset_fit["note"].tolist() == ["skipped: no observations"]
    n_mechanisms = table["mechanism"].nunique()
    assert len(table) == n_mechanisms * len(families.AXES) * 3  # 2 profile rows + 1 difference
    peak = table[
        (table["mechanism"] == "previous_token")
        & (table["kind"] == "profile")
        & (table["axis"] == "peak")
    ].set_index("family")["estimate"]
    assert peak["gpt2"] == pytest.approx(seeds["peak"].mean(), rel=1e-5)
    assert peak["gpt_neox"] == pytest.approx(seeds["peak"].mean(), rel=1e-5)
    assert set(models["analysis"]) == {"family_onset", "family_peak"}
    assert (out / "summary.rst").read_text().startswith("Across model families")
    for figure in ("families_trajectories.png", "families_profile.png"):
        assert (out / "figures" / figure).stat().st_size > 10_000
    # A missing member fails at start, naming the member and the command that makes it.
    shutil.rmtree(b_stats)
    failed = run_snakemake(work, *args, "-n", "--forceall", check=False)
    assert failed.returncode != 0
    assert "./mechgen.sh run --config suite=toyb" in failed.stdout + failed.stderr


def test_rule_script_outputs_and_report_render(study, tmp_path: Path, monkeypatch) -> None:
    """scripts/families.py as Snakemake runs it (after its preamble), then the report pieces it
    feeds: the captions and the workflow description with the study's summary.rst, rendered
    as Snakemake's report does (a docutils warning fails)."""
    from types import SimpleNamespace

    from snakemake.iocontainers import Namedlist
    from test_figures import load_script, render_caption

    source = (REPO / "scripts" / "families.py").read_text()
    compile("import sys\nsnakemake = None\n" + source, "families.py", "exec")
    res = tmp_path / "out" / "syn-families"
    outputs = {
        "families": res / "stats" / "families.csv",
        "models": res / "stats" / "families_models.csv",
        "profiles": res / "stats" / "families_profile.csv",
        "trajectories": res / "figures" / "families_trajectories.png",
        "heatmap": res / "figures" / "families_profile.png",
        "summary": res / "summary.rst",
    }
    members = [
        {
            "suite": m.suite,
            "family": m.family,
            "tokens_per_step": m.tokens_per_step,
            "stats_dir": str(m.stats_dir),
            "relational": False,
        }
        for m in study
    ]
    load_script("families").main(
        SimpleNamespace(
            input=Namedlist(),
            output=Namedlist(fromdict={k: str(v) for k, v in outputs.items()}),
            params=SimpleNamespace(
                study="syn-families",
                members=members,
                mechanisms=NAMES,
                bootstrap=dict(BOOT, n_resamples=200),
                n_permutations=49,
            ),
            log=[str(res / "logs" / "families.log")],
            rule="families",
        )
    )
    table = read_csv(outputs["families"])
    assert len(table) == len(NAMES) * len(families.AXES) * 3  # 2 profile rows + 1 difference
    assert set(read_csv(outputs["models"])["mechanism"]) == set(NAMES)
    config = {
        "suite": "syn-families",
        "results_dir": "out",
        "studies": {"syn-families": {"combine": ["a", "b"]}},
    }
    monkeypatch.chdir(tmp_path)
    html = render_caption(REPO / "workflow" / "report" / "workflow.rst", config, {}, "html_body")
    assert "Across model families" in html and "gpt2 - gpt_neox" in html
    assert "The generalizability profile" not in html  # the single-suite section
    for name in ("families_trajectories", "families_profile"):
        assert "syn-families" in render_caption(
            REPO / "workflow" / "report" / f"{name}.rst", config, {}
        )


def test_a_mechanism_one_family_does_not_score(study, tmp_path: Path) -> None:
    """A member whose mechanism is not scored (header-only tables, as the single-suite analysis
    writes them, e.g. a mechanism that does not apply to an architecture): that family's row is
    not scored, its differences are NaN, and the mixed model says why it was skipped."""
    b = tmp_path / "b"
    shutil.copytree(study[1].stats_dir, b)
    for table in families.MEMBER_TABLES:
        path = b / "induction" / f"{table}.csv"
        write_csv(read_csv(path).iloc[0:0], path)
    members = [study[0], families.Member("b", "gpt2", 80, b)]
    _, out = families.analyze_study(members, NAMES, {}, BOOT, n_permutations=19)
    rows = out["families"][out["families"]["mechanism"] == "induction"]
    gpt2 = rows[(rows["kind"] == "profile") & (rows["family"] == "gpt2")]
    assert gpt2["estimate"].isna().all()
    assert rows[rows["kind"] == "difference"]["estimate"].isna().all()
    profile = out["profiles"]
    note = profile[(profile["family"] == "gpt2") & (profile["mechanism"] == "induction")]["note"]
    assert note.tolist() == ["not scored: no runs of this family scored it"]
    models = out["models"][out["models"]["mechanism"] == "induction"]
    assert (
        models["note"].str.startswith("skipped: the fixed-effects design is rank deficient").all()
    )
    # previous_token is untouched.
    prev = out["families"][out["families"]["mechanism"] == "previous_token"]
    assert prev["estimate"].notna().any()
