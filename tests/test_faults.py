"""Fault tolerance of the scoring sweep: hub errors, bad files, non-finite heads, kill -9.

Hub faults come from tests/support/fakehub.py (a fake hub on 127.0.0.1 that huggingface_hub reaches
through its endpoint: patched constants in this process, ``HF_ENDPOINT`` in Snakemake's). The
waits of every retry are observed by replacing ``time.sleep`` (huggingface_hub's and ours both
call it), so the tests see who retried what, without waiting.

The Snakemake tests run the real DAG in tmp dirs (``--directory``), under timeouts:
an ``hf`` suite against the fake hub (a missing revision, a duplicate, retried errors, a corrupt
download, a non-finite head, a malicious pickle), and kill -9 trials on a ``local`` suite
(bench/faults.py has the trial logic and the 10-trial benchmark).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import; the fake hub switches it off

import pandas as pd
import pytest
import torch
import yaml
from conftest import logged_jobs
from support.fakehub import (
    FakeHub,
    Fault,
    save_random_checkpoint,
    tiny_gpt_neox_config,
    train_tiny_tokenizer,
)

from mechgen.axes import developmental
from mechgen.config import Run
from mechgen.scoring.job import score_checkpoint
from mechgen.sources.checkpoints import HubSettings, HubUnavailable, fetch_checkpoint, retry_wait_s
from mechgen.sources.hubcache import DownloadSlots, file_sha256

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_SLEEP = time.sleep
REPO = "EleutherAI/pythia-14m-seed1"
N_LAYERS, N_HEADS = 2, 4
EVAL_TEXT = (
    "the cat sat on the mat\na dog ran far away from the cat\nthe small bird sang in the old tree\n"
)
NO_WAIT = HubSettings(backoff_base_s=0.5, backoff_max_s=8.0, backoff_jitter=0.0)
"""Deterministic waits (no jitter): 0.5, 1, 2, 4, 8, 8, ... s."""


def _hf_run(step_repo: str = REPO) -> Run:
    return Run("fakehf", "pythia-14m-seed1", "pythia-14m", "14m", 1, "hf", step_repo)


def poison_head(step_dir: Path, layer: int, head: int, value: float) -> None:
    """Set the query weights and bias of one head to ``value`` (inf or NaN) in model.safetensors.

    GPT-NeoX's fused ``query_key_value`` is laid out per head: rows ``[h*3*d, h*3*d + d)`` are
    head h's query (d = head dim; transformers' GPTNeoXAttention views it as (heads, 3*d)).
    """
    from safetensors.torch import load_file, save_file

    path = step_dir / "model.safetensors"
    state = load_file(str(path))
    config = json.loads((step_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rows = slice(head * 3 * head_dim, head * 3 * head_dim + head_dim)
    prefix = f"gpt_neox.layers.{layer}.attention.query_key_value"
    state[f"{prefix}.weight"][rows] = value
    state[f"{prefix}.bias"][rows] = value
    save_file(state, str(path), metadata={"format": "pt"})


class _WritesMarker:
    """A pickle payload that would run code: its __reduce__ calls open(marker, "w")."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """step0, step3: random; step4: step3 with layer 1 head 1's queries = inf (last layer, so
    no other head sees a non-finite input); a tokenizer."""
    root = tmp_path_factory.mktemp("fault-checkpoints")
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    config = tiny_gpt_neox_config()
    run_dir = root / "run"
    save_random_checkpoint(run_dir / "step0", config, seed=1, tokenizer_dir=tokenizer)
    save_random_checkpoint(run_dir / "step3", config, seed=3, tokenizer_dir=tokenizer)
    save_random_checkpoint(run_dir / "step4", config, seed=3, tokenizer_dir=tokenizer)
    poison_head(run_dir / "step4", layer=1, head=1, value=float("inf"))
    return {"root": root, "run_dir": run_dir, "tokenizer": tokenizer}


@pytest.fixture
def hub(checkpoints, tmp_path, monkeypatch):
    """The fake hub serving REPO step0/step3/step4, this process's huggingface_hub pointed at it
    (cache in tmp); ``time.sleep`` replaced by a recorder (``hub.sleeps``)."""
    import huggingface_hub.constants as hf_constants

    run_dir = checkpoints["run_dir"]
    fake = FakeHub(max_seconds=120)
    fake.built = fake.add_checkpoints(
        tmp_path / "server",
        REPO,
        {f"step{s}": run_dir / f"step{s}" for s in (0, 3, 4)},
        tokenizer_dir=checkpoints["tokenizer"],
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "client"))
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    fake.sleeps = []
    with fake, fake.patched_huggingface_hub():
        monkeypatch.setattr(time, "sleep", fake.sleeps.append)
        yield fake


def _commit(hub: FakeHub, step: int) -> str:
    return hub.built["revisions"][f"step{step}"]["commit"]


def _true_sha(checkpoints, step: int) -> str:
    return file_sha256(checkpoints["run_dir"] / f"step{step}" / "model.safetensors")


# --------------------------------------------------------------------------- retry policy


def test_retry_wait_formula():
    settings = HubSettings(backoff_base_s=0.25, backoff_max_s=3.0, backoff_jitter=0.4)
    for retry in range(1, 9):
        exponential = 0.25
        for _ in range(retry - 1):  # brute force: double, then cap
            exponential = min(3.0, exponential * 2)
        assert retry_wait_s(retry, settings, uniform=0.0) == pytest.approx(exponential)
        assert retry_wait_s(retry, settings, uniform=1.0) == pytest.approx(0.6 * exponential)
        for _ in range(20):
            assert 0.6 * exponential - 1e-12 <= retry_wait_s(retry, settings) <= exponential + 1e-12
    assert retry_wait_s(200, settings) <= 3.0
    with pytest.raises(ValueError, match="from 1"):
        retry_wait_s(0, settings)


@pytest.mark.parametrize(
    ("hub_config", "message"),
    [
        ({"max_retry": 3}, "hub.max_retry' is unknown"),
        ({"max_concurrent_downloads": 0}, "hub.max_concurrent_downloads"),
        ({"backoff_jitter": 1.5}, "hub.backoff_jitter"),
        ({"backoff_base_s": 10, "backoff_max_s": 1}, "hub.backoff_max_s"),
        ({"max_retries": -1}, "hub.max_retries"),
    ],
)
def test_hub_settings_name_the_bad_key(hub_config, message):
    with pytest.raises(ValueError, match=message):
        HubSettings.from_config(hub_config)
    assert (
        HubSettings.from_config({"max_concurrent_downloads": None}).max_concurrent_downloads is None
    )


# --------------------------------------------------------------------------- hub faults, in process


def test_429_and_500_are_retried_then_succeed(hub, checkpoints):
    commit = _commit(hub, 0)
    hub.inject(
        Fault(
            "status",
            method="HEAD",
            revision=commit,
            filename="model.safetensors",
            status=429,
            times=2,
        )
    )
    hub.inject(
        Fault(
            "status",
            method="GET",
            revision=commit,
            filename="model.safetensors",
            status=500,
            times=2,
        )
    )
    files = fetch_checkpoint(_hf_run(), 0, hub=NO_WAIT)
    assert files.sha256 == _true_sha(checkpoints, 0)
    # Our HEAD: 2 x 429, then 200. huggingface_hub does not retry a 5xx on the GET: we do, twice.
    assert hub.count("HEAD", "model.safetensors", status=429) == 2
    assert hub.count("GET", "model.safetensors", status=500) == 2
    assert hub.count("GET", "model.safetensors", status=200) == 1
    # Exactly our four waits, exponential from 0.5 s per failing call; nothing from the library.
    assert hub.sleeps == [0.5, 1.0, 0.5, 1.0]


def test_429_on_the_download_is_left_to_huggingface_hub(hub, checkpoints):
    """huggingface_hub retries a 429 on the GET itself (Retry-After + 1 s): no second round."""
    hub.inject(
        Fault(
            "status", method="GET", filename="model.safetensors", status=429, retry_after=0, times=1
        )
    )
    files = fetch_checkpoint(_hf_run(), 0, hub=NO_WAIT)
    assert files.sha256 == _true_sha(checkpoints, 0)
    assert hub.count("GET", "model.safetensors") == 2
    assert hub.sleeps == [1.0]  # the library's one wait (Retry-After 0 + 1 s); none of ours


def test_failure_inside_hf_hub_download_is_not_retried_twice(hub):
    """Our HEAD passes, then hf_hub_download's own HEAD keeps failing: huggingface_hub retries
    it (5 times, 1-8 s) and gives up; we report that, without a second round of retries."""
    hub.inject(
        Fault(
            "status", method="HEAD", filename="model.safetensors", status=500, after=1, times=None
        )
    )
    with pytest.raises(
        HubUnavailable, match=r"@step0/model.safetensors: hub unreachable and file not cached"
    ):
        fetch_checkpoint(_hf_run(), 0, hub=NO_WAIT)
    assert hub.count("HEAD", "model.safetensors") == 1 + 1 + 6  # ours, the library's, its 5 retries
    assert hub.sleeps == [1, 2, 4, 8, 8]  # the library's waits; none of ours
    assert hub.count("GET", "model.safetensors") == 0


def test_persistent_failure_gives_up_after_max_retries(hub):
    hub.inject(Fault("status", method="HEAD", filename="model.safetensors", status=503, times=None))
    settings = HubSettings(max_retries=3, backoff_base_s=0.5, backoff_jitter=0.0)
    with pytest.raises(HubUnavailable) as info:
        fetch_checkpoint(_hf_run(), 0, hub=settings)
    message = str(info.value)
    assert (
        "\n" not in message
        and "@step0/model.safetensors" in message
        and "after 4 attempts" in message
    )
    assert hub.count("HEAD", "model.safetensors") == 4  # 1 + max_retries, not more
    assert hub.sleeps == [0.5, 1.0, 2.0]
    assert hub.count("GET", "model.safetensors") == 0


def test_retry_after_beyond_the_limit_fails_at_once(hub):
    hub.inject(
        Fault(
            "status",
            method="HEAD",
            filename="model.safetensors",
            status=429,
            retry_after=3600,
            times=None,
        )
    )
    with pytest.raises(HubUnavailable, match=r"asks to wait 3600 s .*retry_after_max_s"):
        fetch_checkpoint(_hf_run(), 0, hub=HubSettings(retry_after_max_s=60))
    assert hub.count("HEAD", "model.safetensors") == 1 and hub.sleeps == []


def test_truncated_downloads_are_detected_and_fetched_again(hub, checkpoints):
    expected = _true_sha(checkpoints, 0)
    # (1) the connection drops mid-body: huggingface_hub itself downloads again (resuming with
    # a Range request from what it had written; below its 10 MB chunk size, from 0).
    hub.inject(Fault("truncate", method="GET", filename="model.safetensors", times=1))
    files = fetch_checkpoint(_hf_run(), 0, hub=NO_WAIT)
    assert files.sha256 == expected
    gets = [r for r in hub.requests if r.method == "GET" and r.filename == "model.safetensors"]
    size = files.size_bytes
    assert len(gets) == 2 and gets[0].bytes_sent < size and gets[0].fault == "truncate"
    assert gets[1].bytes_sent + (gets[1].status == 206) * gets[0].bytes_sent == size
    assert hub.sleeps == [1]  # the library's pause before resuming; no retry of ours

    # (2) the weight blob in the cache is truncated on disk: hash mismatch, deleted, re-fetched.
    blob = files.weight_file.resolve()
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    gets_before = hub.count("GET", "model.safetensors")
    files = fetch_checkpoint(_hf_run(), 0, hub=NO_WAIT)
    assert files.sha256 == expected and file_sha256(files.weight_file) == expected
    assert hub.count("GET", "model.safetensors") == gets_before + 1

    # (3) the server sends a short body under a short Content-Length: huggingface_hub's size
    # check fails, which it does not retry; we do.
    hub.inject(
        Fault(
            "short", method="GET", revision=_commit(hub, 3), filename="model.safetensors", times=1
        )
    )
    files = fetch_checkpoint(_hf_run(), 3, hub=NO_WAIT)
    assert files.sha256 == _true_sha(checkpoints, 3)
    assert hub.count("GET", "model.safetensors", revision=_commit(hub, 3)) == 2
    assert hub.sleeps[-1] == 0.5  # our one retry


def test_download_slots_hold_across_processes(tmp_path):
    """4 processes, 2 slots: never more than 2 holders at once, and 2 do overlap."""
    code = (
        "import sys, time; from mechgen.sources.hubcache import DownloadSlots\n"
        "slots = DownloadSlots(sys.argv[1], 2, poll_s=0.01, max_poll_s=0.02)\n"
        "with slots.acquire('test'):\n"
        "    start = time.time(); time.sleep(0.4); end = time.time()\n"
        "print(start, end)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "slots")],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    intervals = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        intervals.append(tuple(map(float, out.split())))
    # Brute force: the number of intervals covering each start instant.
    overlap = max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)
    assert overlap == 2
    # A slot freed by a killed holder is free again at once (the kernel drops its flock).
    holder = subprocess.Popen(
        [sys.executable, "-c", code.replace("0.4", "60"), str(tmp_path / "one")],
        stdout=subprocess.PIPE,
        env=env,
    )
    time.sleep(1.0)
    holder.kill()
    holder.wait(timeout=10)
    slots = DownloadSlots(tmp_path / "one", 1, timeout_s=5)
    with slots.acquire("after the kill") as index:
        assert index is not None


def test_download_limit_against_the_fake_hub(hub, checkpoints, monkeypatch):
    """Three jobs at once, limit 1: the hub never sees two weight downloads in flight."""
    import threading

    monkeypatch.setattr(time, "sleep", REAL_SLEEP)  # waiting for a slot really waits

    hub.bytes_per_s = 600_000  # each ~150 kB download lasts ~0.25 s
    for limit, allowed in ((1, 1), (3, 3)):
        hub.requests.clear()
        settings = HubSettings(max_concurrent_downloads=limit, backoff_jitter=0.0)
        errors: list[BaseException] = []

        def job(step: int, settings: HubSettings = settings, errors: list = errors) -> None:
            try:
                files = fetch_checkpoint(_hf_run(), step, hub=settings)
                assert files.sha256 == file_sha256(files.weight_file)
                from mechgen.sources.checkpoints import release

                release(files)
            except BaseException as err:  # noqa: BLE001 - surfaced by the assert below
                errors.append(err)

        threads = [threading.Thread(target=job, args=(step,)) for step in (0, 3, 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert hub.count("GET", "model.safetensors") == 3
        peak = hub.max_concurrency("GET", "model.safetensors")
        assert peak <= allowed
        if limit == 1:
            assert peak == 1
        else:
            assert peak >= 2  # the measurement does see overlap when it is allowed


# --------------------------------------------------------------------------- non-finite heads


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_nonfinite_head_is_flagged_and_excluded_from_statistics(checkpoints, tmp_path, value):
    run_dir = tmp_path / "tiny-a-seed1"
    for step in (0, 3):
        (run_dir / f"step{step}").mkdir(parents=True)
        for path in (checkpoints["run_dir"] / f"step{step}").iterdir():
            (run_dir / f"step{step}" / path.name).write_bytes(path.read_bytes())
    poison_head(run_dir / "step3", layer=1, head=2, value=value)
    run = Run("mine", run_dir.name, "tiny-a", "a", 1, "local", str(run_dir))
    token_ids = [[5, 17, 99, 3, 250, 7, 8], [11, 12, 13], [200, 201, 202, 203, 1, 2]]
    tables = []
    for step in (0, 3):
        table, sidecar = score_checkpoint(run, step, token_ids, tokens_per_step=10)
        tables.append(table)
        flagged = set(map(tuple, table.loc[table["nonfinite"], ["layer", "head"]].to_numpy()))
        assert flagged == ({(1, 2)} if step == 3 else set())
        assert sidecar["nonfinite_heads"] == len(flagged)
        assert table.loc[~table["nonfinite"], "one_back"].notna().all()
        assert table.loc[table["nonfinite"], "one_back"].isna().all()  # never a silent average
    heads = pd.concat(tables, ignore_index=True)

    with pytest.warns(UserWarning, match=r"1 head row\(s\) with non-finite attention .* excluded"):
        trajectory = developmental.trajectories(heads, "one_back")
    # Brute force: the max over the unflagged heads of each step.
    for step in (0, 3):
        rows = heads[(heads["step"] == step) & ~heads["nonfinite"]]
        got = trajectory.loc[trajectory["step"] == step].iloc[0]
        assert got["value"] == rows["one_back"].max()
        assert (got["argmax_layer"], got["argmax_head"]) != (1, 2) or step == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        developmental.trajectories(heads[~heads["nonfinite"]], "one_back")  # clean: no warning


# --------------------------------------------------------------------------- Snakemake runs


def _snakemake(
    workdir: Path,
    configfiles: list[Path],
    *targets: str,
    env: dict[str, str],
    timeout_s: float = 300,
    extra=(),
):
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO_ROOT / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(REPO_ROOT / "config.yaml"), *map(str, configfiles),
        "--cores", "2", *extra, *targets,
    ]  # fmt: skip
    return subprocess.run(
        cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout_s
    )


def _overlay(path: Path, schedule: list[int], corpus: Path) -> Path:
    overlay = {
        "suite": "fakehf",
        "hub": {"backoff_base_s": 0.05, "backoff_max_s": 0.2, "max_concurrent_downloads": 1},
        "suites": {
            "fakehf": {
                "source": "hf",
                "model_prefix": "pythia-",
                "repo_template": "EleutherAI/pythia-{size}-seed{seed}",
                "sizes": ["14m"],
                "seeds": [1],
                "schedule": schedule,
                "tokens_per_step": 1000,
                "tokenizer_revision": "step4",
                "eval": {"kind": "file", "path": str(corpus)},
            }
        },
    }
    path.write_text(yaml.safe_dump(overlay))
    return path


def test_hf_sweep_survives_hub_faults(checkpoints, tmp_path):
    """The real DAG on an hf suite: step2 absent, step1 = step0's weights, step4 with an inf head
    behind a 429, a 500 and a corrupt download (one checkpoint, one scoring job, for both
    faults); and, asked for in the same Snakemake run (``--keep-going``), the score table of a
    step5 whose pickle runs code: its job fails, the others complete."""
    run_dir = checkpoints["run_dir"]
    fake = FakeHub(max_seconds=900)  # a watchdog only: the sweep may share the cores
    built = fake.add_checkpoints(
        tmp_path / "server",
        REPO,
        {
            "step0": run_dir / "step0",
            "step1": run_dir / "step0",
            "step4": run_dir / "step4",
        },
        tokenizer_dir=checkpoints["tokenizer"],
    )
    commits = {name: info["commit"] for name, info in built["revisions"].items()}
    fake.inject(
        Fault(
            "status",
            method="HEAD",
            revision=commits["step4"],
            filename="model.safetensors",
            status=429,
        )
    )
    fake.inject(
        Fault(
            "status",
            method="GET",
            revision=commits["step4"],
            filename="model.safetensors",
            status=500,
        )
    )
    fake.inject(
        Fault("corrupt", method="GET", revision=commits["step4"], filename="model.safetensors")
    )
    # A pickle that would execute code, served as step5's pytorch_model.bin.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil" / "step5"
    evil.mkdir(parents=True)
    (evil / "config.json").write_bytes((run_dir / "step0" / "config.json").read_bytes())
    state = {"gpt_neox.embed_in.weight": torch.zeros(2, 2), "payload": _WritesMarker(marker)}
    torch.save(state, evil / "pytorch_model.bin")
    fake.add_checkpoints(tmp_path / "server", REPO, {"step5": evil}, weight_format="pytorch")
    corpus = tmp_path / "eval.txt"
    corpus.write_text(EVAL_TEXT)
    workdir = tmp_path / "work"
    hf_home = tmp_path / "hf_home"
    res = workdir / "results" / "fakehf"
    with fake:
        env = fake.client_env(hf_home)
        overlay = _overlay(tmp_path / "overlay.yaml", [0, 1, 2, 4], corpus)
        # heads.parquet (schedule 0, 1, 2, 4) and step5's table (outside the schedule, so that
        # heads.parquet does not wait for it) in one run; --keep-going: step5's failure does not
        # stop the rest, and the run exits non-zero for it.
        result = _snakemake(
            workdir,
            [overlay],
            "results/fakehf/heads.parquet",
            "results/fakehf/scores/pythia-14m-seed1/step5.parquet",
            env=env,
            extra=("--keep-going",),
            timeout_s=600,  # the work of two runs, which had 300 s each
        )
        failed = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error in rule")
        ]
        assert result.returncode != 0 and failed == ["Error in rule score:"], result.stderr[-4000:]
        assert "wildcards: run=pythia-14m-seed1, step=5" in result.stderr, result.stderr[-4000:]

        heads = pd.read_parquet(res / "heads.parquet")
        assert sorted(heads["step"].unique()) == [0, 1, 4]
        assert len(heads) == 3 * N_LAYERS * N_HEADS
        assert not heads.duplicated(["run", "step", "layer", "head"]).any()
        missing = pd.read_csv(res / "missing.csv")
        assert (
            missing["revision"].tolist() == ["step2"]
            and "revision does not exist" in missing["reason"][0]
        )
        # The duplicate (whichever of step0/step1 ran second): no download, same rows as the
        # other, named in its sidecar.
        sidecars = {
            s: json.loads((res / "scores" / "pythia-14m-seed1" / f"step{s}.json").read_text())
            for s in (0, 1)
        }
        assert all(sidecars[s]["status"] == "ok" for s in (0, 1))
        assert sorted(sidecars[s].get("duplicate_of", "") for s in (0, 1)) in (
            ["", "step0"],
            ["", "step1"],
        )
        duplicate = next(s for s in (0, 1) if sidecars[s].get("duplicate_of"))
        assert sidecars[duplicate]["duplicate_of"] == f"step{1 - duplicate}"
        metrics_cols = [c for c in heads.columns if c not in ("step", "tokens_seen")]
        pd.testing.assert_frame_equal(
            heads[heads["step"] == 1][metrics_cols].reset_index(drop=True),
            heads[heads["step"] == 0][metrics_cols].reset_index(drop=True),
        )
        assert fake.count("GET", "model.safetensors", revision=commits[f"step{duplicate}"]) == 0
        assert fake.count("GET", "model.safetensors", revision=commits[f"step{1 - duplicate}"]) == 1
        # step4: 429 (HEAD) and 500 (GET) retried, the corrupt download caught by its hash and
        # fetched again; its scores come from the true weights.
        assert [
            r.status
            for r in fake.requests
            if r.method == "GET"
            and r.revision == commits["step4"]
            and r.filename == "model.safetensors"
        ] == [500, 200, 200]
        sidecar4 = json.loads((res / "scores" / "pythia-14m-seed1" / "step4.json").read_text())
        assert sidecar4["sha256"] == _true_sha(checkpoints, 4)
        log4 = (res / "logs" / "score" / "pythia-14m-seed1" / "step4.log").read_text()
        assert "HTTP 429 on HEAD; retry 1/5" in log4 and "HTTP 500 on GET; retry 1/5" in log4
        assert "does not match the hub's etag" in log4
        # step4's inf head: flagged in the table, counted in the sidecar.
        flagged = heads[heads["nonfinite"]]
        assert flagged[["step", "layer", "head"]].values.tolist() == [[4, 1, 1]]
        assert sidecar4["nonfinite_heads"] == 1
        # Streamed: no weight file is left in the client's cache.
        assert [p for p in hf_home.rglob("*") if p.is_file() and p.stat().st_size > 50_000] == []

    # The pickle that would execute code: refused, the job fails with one clear line.
    lines = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.startswith("mechgen: corrupt checkpoint:")
    ]
    assert len(lines) >= 1
    assert (
        "EleutherAI/pythia-14m-seed1@step5/pytorch_model.bin: refused, the pickle holds more than tensors"
        in lines[0]
    )
    assert (
        "Traceback" not in (res / "logs" / "score" / "pythia-14m-seed1" / "step5.log").read_text()
    )
    assert not marker.exists()
    assert not (res / "scores" / "pythia-14m-seed1" / "step5.parquet").exists()


def _bench_faults():
    spec = importlib.util.spec_from_file_location("bench_faults", REPO_ROOT / "bench" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_kill9_then_resume_redoes_only_unfinished_jobs(tmp_path):
    """kill -9 of the whole sweep while a scoring job runs and another has finished (the group
    is stopped first and killed only in such a state); the resume redoes exactly the unfinished
    jobs, keeps the finished ones and gives the uninterrupted run's table.

    Two checkpoints, and the killed sweep runs on one core: the second scoring job starts when
    the first ends, so the sweep is in that state for the whole of the second job (on 2 cores
    the two jobs would run side by side and end within moments of each other). The killed
    sweep starts from the reference's evaluation text and token ids (a copy of its work
    directory without the scores and the table): the kill comes after a scoring job, so those
    two jobs would always be finished at the kill anyway."""
    bench = _bench_faults()
    steps = [0, 10]
    overlay = bench.build_local_suite(tmp_path / "suite", n_runs=1, steps=steps)
    reference, outputs, _ = bench.reference_run(tmp_path, overlay)
    assert len(reference) == len(steps) * N_LAYERS * N_HEADS
    scores = f"results/{bench.SUITE}/scores/tiny-a-seed1"

    # The trial's work directory: the reference's (Snakemake's metadata too, mtimes kept) with
    # only the outputs of eval_sentences and eval_tokens, and their logs.
    trial_dir = shutil.copytree(tmp_path / "reference", tmp_path / "trial", symlinks=True)
    results = trial_dir / "results" / bench.SUITE
    for path in [*results.iterdir(), *(results / "logs").iterdir()]:
        if path.name not in ("eval", "logs", "eval_sentences.log", "eval_tokens"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    evaluation = {p: (trial_dir / p).stat().st_mtime_ns for p in bench.job_outputs(trial_dir)}
    assert sorted(map(str, evaluation)) == [
        f"results/{bench.SUITE}/eval/sentences.json",
        f"results/{bench.SUITE}/eval/tokens/tiny-a-seed1.json",
    ]

    def score_steps(paths) -> set[int]:
        return {int(p.name[4:].split(".")[0]) for p in paths if str(p.parent) == scores}

    def done_steps(state) -> set[int]:
        # A scoring job is done when its table is finished and none of its outputs (table,
        # sidecar, circuit file) is still marked incomplete: Snakemake drops the markers one
        # output at a time as the job ends, and reruns a job with any marker left.
        return {
            s
            for s in steps
            if Path(f"{scores}/step{s}.parquet") in state.finished
            and s not in score_steps(state.incomplete)
        }

    def mid_run(state) -> bool:
        finished = done_steps(state)
        return bool(finished) and bool(score_steps(state.incomplete) - finished)

    trial = bench.kill_trial(
        trial_dir,
        overlay,
        reference,
        outputs,
        kill_when=lambda workdir: bench._sidecars(workdir) >= 1,
        kill_in=mid_run,
        timeout_s=300,
        cores=1,
    )
    assert trial.message != "finished before the kill", "no kill landed mid-run"
    assert trial.at_kill is not None and mid_run(trial.at_kill)
    # The killed sweep ran scoring jobs only: the evaluation files are the reference's.
    assert {p: trial.at_kill.finished.get(p) for p in evaluation} == evaluation
    assert trial.survivors == [], "processes of the killed group survived"
    assert trial.rerun_ok, trial.message
    # The resume started exactly the score jobs whose table was not finished, and the table.
    done = done_steps(trial.at_kill)
    assert 1 <= len(done) < len(steps)
    resumed = logged_jobs((tmp_path / "trial" / "resume.log").read_text())
    assert resumed == sorted(
        ["aggregate"] + [f"score[run=tiny-a-seed1,step={s}]" for s in steps if s not in done]
    )
    assert trial.finished_redone == [], "finished jobs were rerun"
    assert trial.unfinished_not_made == []
    assert trial.identical, trial.message
