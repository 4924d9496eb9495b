"""The whole label loop on seed 0 of ``mer bench labels`` (a generated store where the bench shows a gain):
every stage must hold its ground — no slack — and a stage made harmful on purpose must be rejected, with
``mer score`` then scoring the earlier run.

Store: 200 labelled train clips (15 % of the labels flipped), a pool 2.5x larger, 200 labelled test clips the
loop never sees; fused ECMF plus four single-modality source runs, refinement, two pseudo-label rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mer import storage
from mer.config import LABELS, load_config
from mer.labels.bench import BENCH_OVERRIDES, bench_seed
from mer.labels.loop import LOOP_FILE, best_run, label_loop


@pytest.fixture(scope="module")
def bench(ray_local, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bench_labels")
    cfg = load_config(overrides=BENCH_OVERRIDES)
    result = bench_seed(cfg, str(root), 0, n_train=200, pool_ratio=2.5, n_test=200, noise=2.0, label_noise=0.15)
    return {"root": root, "cfg": cfg, "result": result,
            "loop": storage.read_json(str(root / "loop" / LOOP_FILE))}


def test_every_stage_is_recorded_with_its_gate(bench: dict) -> None:
    loop = bench["loop"]
    assert [s["stage"] for s in loop["stages"]] == ["labelled_only", "refined", "round_1", "round_2"]
    for s in loop["stages"]:
        assert s["gate"]["n"] == 200 and 0 < s["gate"]["waf"] <= 1 and s["decision"]
    # the best stage is the accepted one with the highest gate WAF, and loop.json says why
    accepted = [s for s in loop["stages"] if s["accepted"]]
    assert loop["best"]["stage"] == max(accepted, key=lambda s: s["gate"]["waf"])["stage"]
    assert "gate WAF" in loop["best"]["why"]
    rel = storage.read_json(str(bench["root"] / "loop" / "sources" / "reliability.json"))
    assert {r["source"] for r in rel["sources"]} == {"fused", "global_visual", "face", "audio", "text"}
    assert all(set(r["alpha"]) == set(LABELS) for r in rel["sources"])


def test_the_loop_raises_test_waf_over_labelled_only(bench: dict) -> None:
    r = bench["result"]
    before, after = r["test_waf"]["labelled_only"], r["final_test_waf"]
    # the bench's own seed: the best accepted stage must not be below labelled-only training, no slack
    assert after >= before, (before, after)
    assert r["best"] != "labelled_only"


def test_refinement_finds_flipped_labels_and_pseudo_labels_are_right(bench: dict) -> None:
    ref = bench["result"]["refinement"]
    assert ref["flipped"] == 30
    assert ref["flip_precision"] >= 0.8 and ref["flip_recall"] >= 0.6, ref
    assert ref["label_accuracy_after"] > ref["label_accuracy_before"]
    for name, precision in bench["result"]["pseudo_precision"].items():
        assert precision is not None and precision >= 0.9, (name, precision)
    r2 = next(s for s in bench["loop"]["stages"] if s["stage"] == "round_2")
    r1 = next(s for s in bench["loop"]["stages"] if s["stage"] == "round_1")
    assert r2["pseudo"]["selected"] > r1["pseudo"]["selected"] > 0  # rounds grow k


def test_pseudo_labels_are_per_fold_and_never_labelled_clips(bench: dict) -> None:
    stage = next(s for s in bench["loop"]["stages"] if s["stage"] == "round_1")
    table = storage.read_table(stage["labels"])
    pseudo = table.filter(pa.compute.equal(table.column("source"), "pseudo")).to_pylist()
    base = table.filter(pa.compute.not_equal(table.column("source"), "pseudo")).to_pylist()
    assert len(base) == 200 and all(r["fold"] is None for r in base)
    assert pseudo and all(r["fold"] in (0, 1, 2) and 0 < r["weight"] <= 1 for r in pseudo)
    assert not {r["clip_id"] for r in pseudo} & {r["clip_id"] for r in base}
    sel = storage.read_table(stage["selection"])
    assert sel.num_rows == 3 * 500  # every pool clip, once per fold


def test_rerun_resumes_without_training(bench: dict) -> None:
    metrics = Path(bench["loop"]["stages"][-1]["run"]) / "metrics.json"
    mtime = metrics.stat().st_mtime
    again = label_loop(bench["cfg"], str(bench["root"] / "features"), str(bench["root"] / "loop"))
    assert [s["gate"] for s in again["stages"]] == [s["gate"] for s in bench["loop"]["stages"]]
    assert metrics.stat().st_mtime == mtime


def _trap_votes(root: Path) -> str:
    """A vote table that agrees with the annotations on 55 % of the labelled clips and names the next label
    on the rest: reliable-looking enough to get a say, wrong enough to damage what it relabels."""
    from mer.parts import read_parts

    t = read_parts(str(root / "features"), columns=["split", "label"]).to_pylist()
    rng = np.random.default_rng(7)
    rows = []
    for r in t:
        if r["split"] != "train":
            continue
        k = LABELS.index(r["label"])
        rows.append((r["clip_id"], LABELS[k] if rng.random() < 0.55 else LABELS[(k + 1) % len(LABELS)]))
    uri = str(root / "trap.parquet")
    storage.write_table(uri, pa.table({"clip_id": [c for c, _ in rows], "label": [lab for _, lab in rows]}))
    return uri


def test_a_harmful_stage_is_rejected_and_scoring_uses_the_earlier_run(bench: dict, tmp_path: Path) -> None:
    from mer.parts import read_parts
    from mer.score import score

    root = bench["root"]
    # Refinement told to distrust the annotators and to follow a single vote: it relabels by the trap.
    cfg = load_config(overrides=[*BENCH_OVERRIDES, "labels.source_modalities=[]", "relabel.annotation_accuracy=0.2",
                                 "relabel.min_agree=1", "relabel.min_posterior=0.3", "pseudolabel.rounds=1"])
    out = str(tmp_path / "harmful")
    loop = label_loop(cfg, str(root / "features"), out, tables={"trap": _trap_votes(root)},
                      base_run=str(root / "loop" / "sources" / "fused"))
    stages = {s["stage"]: s for s in loop["stages"]}
    refined = stages["refined"]
    assert refined["rules"].get("relabel", 0) >= 40, refined["rules"]
    # harmful indeed: the test split (never seen by the loop) agrees
    assert refined["test"]["waf"] < stages["labelled_only"]["test"]["waf"]
    assert not refined["accepted"] and "<" in refined["decision"]
    assert stages["round_1"]["built_on"] == "labelled_only"
    assert loop["best"]["stage"] != "refined"
    on_disk = json.loads((Path(out) / LOOP_FILE).read_text())
    assert [s["accepted"] for s in on_disk["stages"]] == [s["accepted"] for s in loop["stages"]]

    run, chosen = best_run(out)
    assert run == loop["best"]["run"] and chosen["stage"] == loop["best"]["stage"]
    scored = score(cfg, out, str(tmp_path / "scores"), features_uri=str(root / "features"), splits=["test"])
    preds = read_parts(scored["predictions"])
    assert preds.num_rows == 200
    assert scored["run"] == loop["best"]["run"]
    assert set(preds.column("run_id").to_pylist()) == {loop["best"]["stage"]}
    with pytest.raises(FileNotFoundError, match="not a training run"):
        best_run(str(tmp_path))
