"""Reliability-weighted multi-source refinement on crafted tables (no training)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from mer.config import LABELS, LabelsConfig, RelabelConfig
from mer.labels.evidence import class_prior, evidence, fit_reliability, one_hot, posterior
from mer.labels.relabel import fit_sources, refine_labels, refine_labels_per_fold, reliability_uri, rule_counts
from mer.labels.sources import SourceVotes, parse_sources, read_source, table_votes

K = len(LABELS)
LC = LabelsConfig(min_labelled_votes=5)


def _probs(labels: list[int], conf: float) -> np.ndarray:
    p = np.full((len(labels), K), (1 - conf) / (K - 1))
    p[np.arange(len(labels)), labels] = conf
    return p


def _original(y: list[int]) -> pa.Table:
    return pa.table({"clip_id": [f"c{i:03d}" for i in range(len(y))], "label": [LABELS[k] for k in y]})


def _world(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True labels, the noisy originals (15 % flipped) and which rows were flipped."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, K, n)
    flip = rng.random(n) < 0.15
    orig = np.where(flip, (truth + rng.integers(1, K, n)) % K, truth)
    return truth, orig, flip


def _source(name: str, ids: list[str], truth: np.ndarray, acc: float, conf: float, seed: int) -> SourceVotes:
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(truth)) > acc
    vote = np.where(wrong, (truth + rng.integers(1, K, len(truth))) % K, truth)
    return SourceVotes(name, "probs", ids, _probs(vote.tolist(), conf))


def test_reliability_weights_a_good_source_over_a_chance_one() -> None:
    truth, orig, _ = _world()
    prior = class_prior(orig)
    good = fit_reliability("good", "probs", _probs(truth.tolist(), 0.8), orig, prior)
    rng = np.random.default_rng(1)
    chance = fit_reliability("chance", "probs", _probs(rng.integers(0, K, len(truth)).tolist(), 0.8), orig, prior)
    assert good.weight.mean() > 0.5 > 0.1 > chance.weight.mean()
    assert good.accuracy == pytest.approx(float((truth == orig).mean()))
    labels = fit_reliability("llm", "label", one_hot([LABELS[k] for k in truth]), orig, prior)
    # a label source's weight is its per-class precision against the (noisy) labels: about 0.85 here
    assert 0.7 < float(labels.weight.mean()) < 0.95
    few = fit_reliability("few", "label", one_hot([LABELS[0]] * 3 + [None] * (len(truth) - 3)), orig, prior,
                          min_votes=10)
    assert "no weight" in few.note and not few.usable
    assert not evidence(few, one_hot([LABELS[0]]), prior).any()


def test_evidence_is_zero_without_a_vote_and_posterior_follows_agreement() -> None:
    prior = np.full(K, 1 / K)
    rel = fit_reliability("s", "label", one_hot(["happy"] * 20 + ["sad"] * 20),
                          np.array([2] * 18 + [0] * 2 + [3] * 20), prior, min_votes=5)
    votes = one_hot(["happy", None])
    ev = evidence(rel, votes, prior)
    assert np.all(ev[1] == 0) and ev[0, 2] > 0 > ev[0, 0]
    post = posterior([ev, ev], prior)
    assert post[0].argmax() == 2 and post[0, 2] > posterior([ev], prior)[0, 2]  # two agreeing votes: surer
    assert np.allclose(post[1], prior)


def test_multi_source_refinement_finds_flipped_labels() -> None:
    truth, orig, flip = _world(n=300)
    ids = [f"c{i:03d}" for i in range(len(truth))]
    sources = [_source("fused", ids, truth, 0.85, 0.8, 1), _source("audio", ids, truth, 0.6, 0.6, 2),
               _source("text", ids, truth, 0.6, 0.6, 3),
               SourceVotes("llm", "label", ids, one_hot([LABELS[k] if i % 3 else None
                                                         for i, k in enumerate(truth)]))]
    out, rel = refine_labels(_original(orig.tolist()), sources, RelabelConfig(mode="relabel"), LC)
    assert out.num_rows == len(truth) and set(rel) == {"fused", "audio", "text", "llm"}
    rows = out.to_pylist()
    flagged = np.array([r["rule"] in ("relabel", "downweight") for r in rows])
    precision = (flagged & flip).sum() / flagged.sum()
    recall = (flagged & flip).sum() / flip.sum()
    assert precision >= 0.8 and recall >= 0.6, (precision, recall)
    fixed = [r for r in rows if r["rule"] == "relabel"]
    assert fixed and np.mean([r["label"] == LABELS[truth[int(r["clip_id"][1:])]] for r in fixed]) >= 0.9
    label_acc = np.mean([r["label"] == LABELS[t] for r, t in zip(rows, truth)])
    assert label_acc > (orig == truth).mean()
    # provenance: votes and posteriors per row, weights in (0, 1]
    r0 = rows[0]
    assert set(json.loads(r0["votes"])) <= {"fused", "audio", "text", "llm"}
    assert all(0 < r["weight"] <= 1 for r in rows)
    assert all(r["source"] == ("refined" if r["rule"] == "relabel" else "original") for r in rows)

    # The default mode changes no label: the same doubted clips are down-weighted instead, so less of the
    # training weight sits on wrong labels than before refinement.
    kept, _ = refine_labels(_original(orig.tolist()), sources, RelabelConfig(), LC)
    kept_rows = kept.to_pylist()
    assert [r["label"] for r in kept_rows] == [LABELS[k] for k in orig]
    assert [r["rule"] == "downweight" for r in kept_rows] == flagged.tolist()
    assert all(k["weight"] < 0.5 for k, r in zip(kept_rows, rows) if r["rule"] == "relabel")
    w = np.array([r["weight"] for r in kept_rows])
    assert (w * flip).sum() / w.sum() < flip.mean()


def test_one_confident_source_cannot_relabel_alone() -> None:
    ids = [f"c{i:03d}" for i in range(60)]
    truth = np.arange(60) % K
    orig = truth.copy()
    orig[0] = (truth[0] + 1) % K  # one flipped label
    fused = SourceVotes("fused", "probs", ids, _probs(truth.tolist(), 0.95))
    out, _ = refine_labels(_original(orig.tolist()), [fused], RelabelConfig(mode="relabel", min_agree=2), LC)
    row = out.to_pylist()[0]
    assert row["rule"] == "downweight" and row["label"] == LABELS[orig[0]] and row["weight"] < 0.5
    out1, _ = refine_labels(_original(orig.tolist()), [fused], RelabelConfig(mode="relabel", min_agree=1), LC)
    assert out1.to_pylist()[0]["rule"] == "relabel" and out1.to_pylist()[0]["label"] == LABELS[truth[0]]
    assert rule_counts(out1)["agree"] == 59


def test_rows_without_votes_and_unknown_labels() -> None:
    ids = ["a", "b"]
    src = SourceVotes("llm", "label", ["a"], one_hot(["happy"]))
    original = _original([2, 3]).set_column(0, "clip_id", pa.array(ids))
    out, _ = refine_labels(original, [src], RelabelConfig(), LabelsConfig(min_labelled_votes=1))
    assert [r["rule"] for r in out.to_pylist()] == ["agree", "no_votes"]
    # a source with too few labelled votes to measure has no say at all
    out, rel = refine_labels(original, [src], RelabelConfig(), LabelsConfig(min_labelled_votes=2))
    assert [r["rule"] for r in out.to_pylist()] == ["no_votes", "no_votes"] and not rel["llm"].usable
    with pytest.raises(ValueError, match=r"'llm'.*'a'.*'bored'"):
        table_votes("llm", pa.table({"clip_id": ["a"], "label": ["bored"]}))
    with pytest.raises(ValueError, match=r"clip 'x' has unknown label 'bored'"):
        refine_labels(pa.table({"clip_id": ["x"], "label": ["bored"]}), [src], RelabelConfig(), LC)


def test_vote_tables_csv_and_parquet(tmp_path) -> None:
    import pyarrow.parquet as pq

    (tmp_path / "v.csv").write_text("name,discrete\nx,Happy\ny,\n")
    v = read_source("ext", str(tmp_path / "v.csv"))
    assert v.kind == "label" and v.ids == ["x", "y"] and v.probs[0].argmax() == 2 and np.isnan(v.probs[1]).all()
    probs = {f"prob_{lab}": [1.0 if lab == "sad" else 0.0] for lab in LABELS}
    pq.write_table(pa.table({"clip_id": ["z"], **probs}), tmp_path / "p.parquet")
    p = read_source("model", str(tmp_path / "p.parquet"))
    assert p.kind == "probs" and p.rows(["z", "missing"])[0].argmax() == 3 and np.isnan(p.rows(["missing"])).all()
    assert parse_sources(["llm=s3://b/v.parquet"]) == {"llm": "s3://b/v.parquet"}
    with pytest.raises(ValueError, match="expected name=uri"):
        parse_sources(["nope"])
    with pytest.raises(ValueError, match="reserved"):
        parse_sources(["original=x"])
    assert reliability_uri("s3://b/labels.parquet") == "s3://b/labels.reliability.json"


def test_the_loop_s_refinement_takes_fold_k_s_votes_for_fold_k() -> None:
    """Per fold: fold k's rows take slice k of a per-fold source (fold k's model), fold-free tables as they
    are, the reliabilities given (measured out of fold), not measured again on these votes."""
    truth, orig, _ = _world(n=200)
    ids = [f"c{i:03d}" for i in range(len(truth))]
    oof = _source("fused", ids, truth, 0.85, 0.8, 1)
    # fold 0's model votes like the out-of-fold source; fold 1's model sides with the annotation everywhere
    per_fold = SourceVotes("fused", "probs", ids, np.stack([oof.probs, _probs(orig.tolist(), 0.9)], axis=1))
    llm = SourceVotes("llm", "label", ids, one_hot([LABELS[k] for k in truth]))
    y = np.asarray(orig)
    rel = fit_sources([oof, llm], ids, y, class_prior(y), LC)
    rc = RelabelConfig(mode="relabel", min_agree=2)
    table = refine_labels_per_fold(_original(orig.tolist()), [per_fold, llm], rel, rc, LC, folds=2)
    assert table.num_rows == 2 * len(ids) and sorted(set(table.column("fold").to_pylist())) == [0, 1]
    rows = table.to_pylist()
    by_fold = [[r for r in rows if r["fold"] == k] for k in (0, 1)]
    alone, _ = refine_labels(_original(orig.tolist()), [oof, llm], rc, LC, rel=rel)
    assert [r["label"] for r in by_fold[0]] == alone.column("label").to_pylist()
    # two agreeing sources are needed to relabel: fold 1's model never agrees with the LLM against the label
    assert sum(r["rule"] == "relabel" for r in by_fold[0]) > 10
    assert not any(r["rule"] == "relabel" for r in by_fold[1])
    # rule counts are per fold
    counts = rule_counts(table)
    assert counts["relabel"] == round(sum(r["rule"] == "relabel" for r in rows) / 2)


def test_a_per_fold_refinement_that_only_doubts_validation_rows_changes_no_training(tmp_path) -> None:
    """The loop does not retrain a refinement whose every change is a weight on a fold's own validation rows:
    fold k's training would be the labelled-only run's (validation weights are 1 anyway); a weight on a training
    row, or any label change, does change it."""
    from mer.labels.loop import changes_training
    from mer.store import storage

    run = tmp_path / "run"
    storage.write_table(str(run / "oof.parquet"), pa.table({"clip_id": ["a", "b"], "fold": pa.array([0, 1], pa.int32())}))

    def table(rows: list[tuple[str, int, str, float]]) -> pa.Table:
        return pa.table({"clip_id": [r[0] for r in rows], "fold": pa.array([r[1] for r in rows], pa.int32()),
                         "label": [r[2] for r in rows], "original_label": ["happy"] * len(rows),
                         "weight": pa.array([r[3] for r in rows], pa.float32())})

    same = [("a", 0, "happy", 1.0), ("b", 0, "happy", 1.0), ("a", 1, "happy", 1.0), ("b", 1, "happy", 1.0)]
    assert not changes_training(table(same), str(run))
    doubted_in_validation = [("a", 0, "happy", 0.4), ("b", 0, "happy", 1.0), ("a", 1, "happy", 1.0), ("b", 1, "happy", 0.3)]
    assert not changes_training(table(doubted_in_validation), str(run))
    assert changes_training(table([("a", 1, "happy", 0.4)]), str(run))  # a's weight in fold 1's training
    assert changes_training(table([("a", 0, "sad", 0.9)]), str(run))  # a validation label: early stopping reads it
