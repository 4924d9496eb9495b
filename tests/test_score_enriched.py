"""`mer score --manifest` for a run trained with LLM enrichment on, as a user runs it on a 2-CPU machine (a local
Ray mer starts itself): the LLM stage cannot share the two cores with the stream's pools, so it runs first as its
own stream and the command finishes; with the run's recorded enrichment cache nothing is generated again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.csv as pacsv
import pytest

from mer.config import LABELS
from mer.store.parts import read_parts
from test_cli_plain import mer

EAGER = ("--set", "enrich.enforce_eager=true")

# make check leaves the module out: an extraction with the LLM stage, a training run and two scorings, as commands
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def enriched_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("enriched")
    data, manifest = root / "data", root / "manifest.parquet"
    mer("data", "synth", "--out", str(data), "--n-train", "20", "--n-unlabeled", "4", "--n-test", "6")
    mer("data", "import-mer2025", "--root", str(data), "--out", str(manifest),
        "--test-labels", str(data / "test_labels.csv"))
    # Eager engines (no torch.compile of the LLM at their start; EAGER below for the scorings, since an engine
    # setting is not a feature setting the run records): on a fresh checkout the compile cache is empty, and
    # compiling the tiny LLM took longer than the rest of the extraction.
    extract = mer("extract", "--profile", "tiny", "--manifest", str(manifest), "--out", str(root / "features"),
                  "--set", "enrich.enabled=true", "--set", "enrich.enforce_eager=true")
    # Any trained run does for what the module checks (scoring with and without its enrichment cache): 2 folds of
    # 4 epochs, reports polled every 0.1 s, instead of the repo's 5 folds of up to 30 epochs at 0.5 s.
    mer("train", "--profile", "tiny", "--features", str(root / "features"), "--out", str(root / "run"),
        "--modalities", "text,audio", "--set", "train.folds=2", "--set", "train.max_epochs=4",
        "--set", "train.poll_interval_s=0.1")
    return {"root": root, "data": data, "manifest": manifest, "extract": extract}


def _candidates(data: Path) -> list[str]:
    names = pacsv.read_csv(data / "track_all_candidates.csv").column("name").to_pylist()
    return sorted(names)


def test_the_llm_stage_runs_first_and_the_store_records_its_cache(enriched_run: dict) -> None:
    err = enriched_run["extract"].stderr
    assert "LLM enrichment first, as its own stream" in err, err[-3000:]
    meta = json.loads((enriched_run["root"] / "features" / "_meta.json").read_text())
    assert meta["enrich_cache"] == str(enriched_run["root"] / "enrich_cache")
    model = json.loads((enriched_run["root"] / "run" / "models" / "model.json").read_text())
    assert model["features"]["enrich_cache"] == meta["enrich_cache"]


def test_scoring_new_videos_with_no_cache_generates_and_finishes(enriched_run: dict) -> None:
    root = enriched_run["root"]
    shutil.move(root / "enrich_cache", root / "enrich_cache.away")  # the run's cache is not available
    try:
        out = root / "scores_nocache"
        proc = mer("score", "--profile", "tiny", "--run", str(root / "run"), "--manifest",
                   str(enriched_run["manifest"]), "--splits", "unlabeled,test", "--out", str(out), *EAGER)
    finally:
        shutil.move(root / "enrich_cache.away", root / "enrich_cache")
    candidates = _candidates(enriched_run["data"])
    generated = [ln for ln in proc.stderr.splitlines() if "to the vllm engine" in ln]
    assert generated and not generated[0].rstrip().endswith(" 0 to the vllm engine"), proc.stderr[-3000:]
    assert (out / "enrich_cache").is_dir()  # generated beside the scoring store
    feats = read_parts(str(out / "features"), columns=["split", "enrich_status", "transcript_enriched"])
    assert sorted(feats.column("clip_id").to_pylist()) == candidates  # only the scored splits were extracted
    # every row went through the LLM stage (a random-weight tiny LLM often says nothing usable: empty_output)
    assert set(feats.column("enrich_status").to_pylist()) <= {"ok", "empty_text", "truncated", "empty_output"}
    sub = pacsv.read_csv(out / "submission.csv")
    assert sorted(sub.column("name").to_pylist()) == candidates
    assert set(sub.column("discrete").to_pylist()) <= set(LABELS)


def test_scoring_with_the_run_s_cache_generates_nothing(enriched_run: dict) -> None:
    root = enriched_run["root"]
    out = root / "scores_cached"
    proc = mer("score", "--profile", "tiny", "--run", str(root / "run"), "--manifest", str(enriched_run["manifest"]),
               "--splits", "unlabeled,test", "--out", str(out), *EAGER)
    assert f"enrichment cache: {root / 'enrich_cache'}" in proc.stderr, proc.stderr[-3000:]
    generated = [ln for ln in proc.stderr.splitlines() if "to the vllm engine" in ln]
    assert generated and generated[0].rstrip().endswith(" 0 to the vllm engine"), proc.stderr[-3000:]
    assert not (out / "enrich_cache").exists()
    assert sorted(pacsv.read_csv(out / "submission.csv").column("name").to_pylist()) == \
        _candidates(enriched_run["data"])
