"""Pseudo-label selection and label-table construction on crafted score tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mer.config import LABELS, PseudoLabelConfig
from mer.labels.pseudolabel import build_label_table, select_pseudo_labels


def _scores(rows: list[tuple[str, str | None, float, float, str]]) -> pa.Table:
    return pa.table({
        "clip_id": [r[0] for r in rows], "pred_label": [r[1] for r in rows],
        "confidence": pa.array([r[2] for r in rows], pa.float32()),
        "fold_agreement": pa.array([r[3] for r in rows], pa.float32()),
        "status": [r[4] for r in rows],
    })


def test_thresholds_and_reasons() -> None:
    scores = _scores([
        ("a", "happy", 0.95, 1.0, "ok"),
        ("b", "happy", 0.60, 1.0, "ok"),
        ("c", "sad", 0.90, 0.5, "ok"),
        ("d", None, float("nan"), float("nan"), "no_features"),
        ("e", "sad", 0.85, 1.0, "ok"),
    ])
    sel = select_pseudo_labels(scores, PseudoLabelConfig(min_confidence=0.8, min_fold_agreement=0.8,
                                                         max_fraction_per_class=1.0))
    got = dict(zip(sel.column("clip_id").to_pylist(), sel.column("reason").to_pylist()))
    assert got == {"a": "selected", "b": "low confidence", "c": "folds disagree",
                   "d": "not scored (no_features)", "e": "selected"}
    assert sel.column("selected").to_pylist() == [True, False, False, False, True]


def test_per_class_cap_prevents_collapse() -> None:
    # 8 confident "happy" and 2 confident "sad": with a 40% cap at most ceil(0.4*10)=4 happy are taken,
    # the most confident first, and the minority class keeps all of its clips.
    rows = [(f"h{i}", "happy", 0.90 + i * 0.01, 1.0, "ok") for i in range(8)]
    rows += [("s0", "sad", 0.85, 1.0, "ok"), ("s1", "sad", 0.86, 1.0, "ok")]
    sel = select_pseudo_labels(_scores(rows), PseudoLabelConfig(min_confidence=0.8, max_fraction_per_class=0.4))
    picked = sel.filter(sel.column("selected"))
    labels = picked.column("pred_label").to_pylist()
    assert labels.count("happy") == 4 and labels.count("sad") == 2
    assert set(picked.column("clip_id").to_pylist()) >= {"h7", "h6", "h5", "h4"}
    capped = PseudoLabelConfig(min_confidence=0.8, max_fraction_per_class=1.0, max_per_class=1)
    assert select_pseudo_labels(_scores(rows), capped).column("selected").to_pylist().count(True) == 2


def test_label_table_adds_pseudo_rows_once() -> None:
    base = pa.table({"clip_id": ["t1", "t2"], "label": ["angry", "sad"]})
    sel = select_pseudo_labels(_scores([("u1", "happy", 0.9, 1.0, "ok"), ("t1", "happy", 0.99, 1.0, "ok"),
                                        ("u2", "sad", 0.5, 1.0, "ok")]),
                               PseudoLabelConfig(min_confidence=0.8, max_fraction_per_class=1.0))
    table = build_label_table(base, sel, weight=0.5)
    rows = {r["clip_id"]: r for r in table.to_pylist()}
    assert set(rows) == {"t1", "t2", "u1"}  # a labelled clip never gets a pseudo-label on top
    assert rows["t1"]["source"] == "original" and rows["t1"]["label"] == "angry"
    assert rows["u1"]["source"] == "pseudo" and rows["u1"]["label"] == "happy"
    assert np.isclose(rows["u1"]["weight"], 0.45)
    assert all(r["label"] in LABELS for r in rows.values())
