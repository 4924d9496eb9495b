"""Issue 32: scenario stores with per-modality cue strength, ECMF's learned reliability, stacking without leaks,
scoring a stacked run, and the selection record of what ships.

Models are fitted in-process (:mod:`mer.train.local`: the training runs' models and loss, no Ray), so all but the
scoring test run in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mer.config import LABELS
from mer.store import storage
from mer.store.parts import PartStore, read_parts
from mer.synth.feature_store import make_feature_store, small_config
from mer.train.features import label_index, table_inputs
from mer.train.local import fit_local, write_run
from mer.train.meta import fit_stack
from mer.train.run import fold_assignment

DIMS = {"global_visual": 16, "face": 16, "audio": 16, "text": 16}


def _class_separation(x: np.ndarray, y: np.ndarray) -> float:
    """Between-class share of the variance, summed over dimensions (0: the classes look alike)."""
    total = x.var(axis=0).sum()
    means = np.stack([x[y == k].mean(axis=0) for k in range(len(LABELS))])
    counts = np.bincount(y, minlength=len(LABELS))
    between = (counts[:, None] * (means - x.mean(axis=0)) ** 2).sum() / len(y)
    return float(between / total)


def _store(tmp_path: Path, name: str, **kw) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    uri = str(tmp_path / name)
    make_feature_store(uri, dims=kw.pop("dims", DIMS), **kw)
    t = read_parts(uri)
    dims = {m: len(next(v for v in t.column(m).to_pylist() if v is not None)) for m in DIMS}
    x, mask = table_inputs(t, list(DIMS), dims)
    return uri, x, mask, label_index(t.column("label").to_pylist()), np.array(t.column("split").to_pylist())


def test_scenario_store_has_the_asked_strengths_and_missing_rates(tmp_path: Path) -> None:
    _, x, mask, y, _ = _store(tmp_path, "s", n=1200, seed=1, test_frac=0.0, missing={"face": 0.3},
                              strength={"global_visual": 0.0, "audio": 0.5})
    sep = {}
    for j, m in enumerate(DIMS):
        rows = mask[:, j]
        sep[m] = _class_separation(x[rows, 16 * j:16 * (j + 1)], y[rows])
    # Strength 0 carries no label (what is left is sampling noise of six class means), 0.5 much less than 1.
    assert sep["global_visual"] < 0.01, sep
    assert sep["text"] > 0.3 and sep["face"] > 0.3, sep
    assert 0.05 < sep["audio"] < 0.5 * sep["text"], sep
    missing = 1.0 - mask.mean(axis=0)
    assert abs(missing[1] - 0.3) < 0.04, missing  # face: its own rate
    assert all(abs(missing[j] - 0.1) < 0.03 for j in (0, 2, 3)), missing  # the others: the default


def test_default_arguments_write_the_same_store_as_strength_one(tmp_path: Path) -> None:
    a = str(tmp_path / "a")
    b = str(tmp_path / "b")
    make_feature_store(a, n=100, seed=4)
    make_feature_store(b, n=100, seed=4, strength={"text": 1.0}, missing={m: 0.1 for m in
                                                                          ("global_visual", "face", "audio", "text")})
    pa_, pb = sorted(Path(a).glob("part-*.parquet")), sorted(Path(b).glob("part-*.parquet"))
    assert [p.read_bytes() for p in pa_] == [p.read_bytes() for p in pb]
    assert "strength" not in storage.read_json(str(Path(a) / "_meta.json"))


def test_noise_modality_gets_a_lower_mean_weight_than_the_informative_one(tmp_path: Path) -> None:
    """After training, ECMF (with its unimodal heads and confidence-aware gate) weighs the informative modality
    above every noise one (issue 32: the demo's weights were near-uniform)."""
    import torch

    torch.set_num_threads(1)
    _, x, mask, y, split = _store(tmp_path, "noise", n=400, seed=2, test_frac=0.0,
                                  strength={"global_visual": 0.0, "face": 0.0, "audio": 0.0})
    tc = small_config(None, **{"train.folds": 2, "train.max_epochs": 12, "train.patience": 12}).train
    fit = fit_local(tc, "ecmf", DIMS, x, mask, y, fold_assignment(y, 2, 0))
    w = np.array([fit.oof_weights[mask[:, j], j].mean() for j in range(4)])
    assert w[3] > 0.4, w  # text, the one informative modality (uniform would be 0.25)
    assert all(w[3] > w[j] + 0.15 for j in range(3)), w
    assert fit.waf(y) > 0.5  # and it still learns the label


def _member_probs(rng: np.random.Generator, y: np.ndarray, strengths: list[float]) -> list[np.ndarray]:
    out = []
    for s in strengths:
        logits = rng.normal(size=(len(y), len(LABELS))) + s * np.eye(len(LABELS))[y] * 3
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        out.append(e / e.sum(axis=1, keepdims=True))
    return out


def test_stacking_meta_learner_never_sees_a_rows_own_fold() -> None:
    """Fold k's meta-learner (which predicts fold k's rows and scores as fold k) is chosen and fitted without
    fold k: changing fold 0's labels and member probabilities changes every other fold's meta-learner, and
    leaves fold 0's, and its predictions of fold 0's rows, exactly as they were."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(LABELS), 300)
    fold_of = fold_assignment(y, 3, 0)
    probs = _member_probs(rng, y, [1.0, 0.3, 0.0])
    a = fit_stack(probs, y, fold_of)
    y2 = y.copy()
    f0 = fold_of == 0
    y2[f0] = (y[f0] + 1) % len(LABELS)
    probs2 = [p.copy() for p in probs]
    for p in probs2:
        p[f0] = p[f0][:, ::-1]
    b = fit_stack(probs2, y2, fold_of)
    assert a.metas[0] == b.metas[0]
    assert a.metas[1] != b.metas[1] and a.metas[2] != b.metas[2]
    # Fold 1 and 2's rows: their members' probabilities and labels did not change, but their meta-learners (fitted
    # on fold 0 among others) did; fold 0's rows are predicted by the unchanged meta-learner 0.
    assert not np.allclose(a.oof_probs[fold_of == 1], b.oof_probs[fold_of == 1])


def test_stacking_oof_uses_the_strong_member_and_beats_the_mean() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, len(LABELS), 600)
    fold_of = fold_assignment(y, 3, 0)
    probs = _member_probs(rng, y, [1.0, 0.0, 0.0, 0.0])
    fit = fit_stack(probs, y, fold_of)
    from mer.evaluation.metrics import weighted_f1

    mean = np.mean(probs, axis=0).argmax(axis=1)
    assert fit.waf(y) >= weighted_f1(y, probs[0].argmax(axis=1)) - 0.02
    assert fit.waf(y) > weighted_f1(y, mean) + 0.05


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str], Path]:
    """A store where text carries the label and audio is weaker, and in-process runs on it as run directories:
    fused ECMF and one run per modality (same folds), like ``mer ablation`` lays them out."""
    import torch

    from mer.runs.provenance import store_record

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fusion_runs")
    dims = {"audio": 16, "text": 16}
    uri = str(root / "features")
    make_feature_store(uri, n=300, dims=dims, seed=3, test_frac=0.3, strength={"audio": 0.4})
    t = read_parts(uri)
    x, mask = table_inputs(t, list(dims), dims)
    y = label_index(t.column("label").to_pylist())
    tr = np.array([s == "train" for s in t.column("split").to_pylist()])
    ids = [c for c, k in zip(t.column("clip_id").to_pylist(), tr) if k]
    fold_of = fold_assignment(y[tr], 2, 0)
    tc = small_config(list(dims), **{"train.folds": 2, "train.max_epochs": 8}).train
    record = store_record(PartStore(uri))
    runs: dict[str, str] = {}
    for name, ms in {"audio": ["audio"], "text": ["text"], "fused": ["audio", "text"]}.items():
        cols = np.concatenate([np.arange(16) + 16 * list(dims).index(m) for m in ms])
        j = [list(dims).index(m) for m in ms]
        fit = fit_local(tc, "ecmf", {m: dims[m] for m in ms}, x[tr][:, cols], mask[tr][:, j], y[tr], fold_of)
        runs[name] = str(root / "ablation" / name)
        write_run(runs[name], fit, ids, y[tr], features_uri=uri, features_record=record)
    return uri, runs, root


def test_selection_record_names_the_candidate_and_its_oof_waf(local_runs) -> None:
    from mer.runs.layout import SELECTION_FILE, best_run
    from mer.train.ablation import oof_waf, select_shipped

    _, runs, root = local_runs
    rec = select_shipped(runs, {"audio": runs["audio"], "text": runs["text"]}, str(root / "ablation" / "stacked"))
    storage.write_json(str(root / "ablation" / SELECTION_FILE), rec)
    figures = {c["name"]: c["oof_waf"] for c in rec["candidates"]}
    assert set(figures) == {"fused", "stacked", "text"}  # the best single by OOF: text (audio is weaker)
    assert rec["candidate"] in figures and rec["oof_waf"] == max(figures.values())
    assert rec["oof_waf"] == pytest.approx(figures[rec["candidate"]])
    if rec["candidate"] != "stacked":
        assert rec["oof_waf"] == pytest.approx(oof_waf(rec["run"]))
    assert rec["candidate"] in rec["why"] or f"{rec['oof_waf']:.4f}" in rec["why"]
    assert "test" in rec["why"]  # says the test split was not used
    # `mer score --run <ablation dir>` scores what was selected.
    assert best_run(str(root / "ablation"))[0] == rec["run"]


def test_stacked_run_loads_and_matches_its_test_predictions(local_runs, tmp_path: Path) -> None:
    from mer.train.ensemble import load_ensemble
    from mer.train.stack import build_stacked_run

    uri, runs, _ = local_runs
    out = str(tmp_path / "stacked")
    metrics = build_stacked_run([runs["fused"], runs["audio"], runs["text"]], out)
    assert metrics["test"] is not None and metrics["test"]["n"] == 90
    ens = load_ensemble(out)
    t = read_parts(uri)
    t = t.filter(np.array([s == "test" for s in t.column("split").to_pylist()]))
    probs = ens.predict_proba(t)
    assert probs.shape == (90, 2, len(LABELS)) and np.allclose(probs.sum(axis=2), 1.0, atol=1e-5)
    tp = storage.read_table(storage.join(out, "test_predictions.parquet")).sort_by("clip_id")
    order = np.argsort(np.asarray(t.column("clip_id").to_pylist(), dtype=object))
    mine = probs.mean(axis=1)[order]
    theirs = np.stack([tp.column(f"prob_{lab}").to_numpy() for lab in LABELS], axis=1)
    assert np.allclose(mine, theirs, atol=1e-5)


@pytest.mark.slow
def test_mer_score_accepts_a_stacked_run(ray_local, local_runs, tmp_path: Path) -> None:
    from mer.predict.score import score
    from mer.train.stack import build_stacked_run

    uri, runs, _ = local_runs
    out = str(tmp_path / "stacked")
    build_stacked_run([runs["fused"], runs["audio"], runs["text"]], out)
    cfg = small_config(["audio", "text"])
    res = score(cfg, out, str(tmp_path / "scores"), features_uri=uri)
    preds = read_parts(storage.join(str(tmp_path / "scores"), "predictions"))
    assert preds.num_rows == 300 and res["score"]["total"] == 300
    assert set(preds.column("pred_label").to_pylist()) <= set(LABELS)
    tp = storage.read_table(storage.join(out, "test_predictions.parquet"))
    test_pred = dict(zip(tp.column("clip_id").to_pylist(), tp.column("pred_label").to_pylist()))
    scored = dict(zip(preds.column("clip_id").to_pylist(), preds.column("pred_label").to_pylist()))
    assert all(scored[c] == p for c, p in test_pred.items())
