"""Agreement-based, class-balanced, per-fold pseudo-label selection on crafted tables (no training)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mer.config import LABELS, PseudoLabelConfig
from mer.labels.evidence import Reliability, class_prior
from mer.labels.pseudolabel import build_label_table, round_quota, select_pseudo_labels, selection_summary
from mer.labels.sources import SourceVotes

K = len(LABELS)
HAPPY, SAD, ANGRY = LABELS.index("happy"), LABELS.index("sad"), LABELS.index("angry")


def _p(label: int, conf: float) -> np.ndarray:
    row = np.full(K, (1 - conf) / (K - 1))
    row[label] = conf
    return row


def _rel(name: str, alpha: float = 1.0) -> Reliability:
    return Reliability(name, "probs", np.full(K, alpha), n_votes=100)


def _fused(rows: list[list[tuple[int, float] | None]]) -> SourceVotes:
    """rows[i][k] = (label, confidence) of fold k's fused model on pool clip i (None: no features)."""
    probs = np.full((len(rows), len(rows[0]), K), np.nan)
    for i, row in enumerate(rows):
        for k, v in enumerate(row):
            if v is not None:
                probs[i, k] = _p(*v)
    return SourceVotes("fused", "probs", [f"u{i}" for i in range(len(rows))], probs)


def _other(name: str, votes: list[tuple[int, float] | None], folds: int = 1) -> SourceVotes:
    probs = np.full((len(votes), folds, K), np.nan)
    for i, v in enumerate(votes):
        if v is not None:
            probs[i, :] = _p(*v)
    return SourceVotes(name, "probs", [f"u{i}" for i in range(len(votes))], probs)


UNIFORM = np.full(K, 1 / K)
LOOSE = PseudoLabelConfig(min_agree=1, min_posterior=0.5, k_fraction=1.0)


def _reasons(sel: pa.Table, fold: int = 0) -> dict[str, str]:
    rows = [r for r in sel.to_pylist() if r["fold"] == fold]
    return {r["clip_id"]: r["reason"] for r in rows}


def test_a_clip_needs_the_fused_model_and_an_independent_source_to_agree() -> None:
    fused = _fused([[(HAPPY, 0.9)], [(HAPPY, 0.9)], [(SAD, 0.9)], [None], [(SAD, 0.4)], [(HAPPY, 0.5)]])
    audio = _other("audio", [(HAPPY, 0.8), None, (ANGRY, 0.99), (HAPPY, 0.9), (SAD, 0.9), (HAPPY, 0.3)])
    rel = {"fused": _rel("fused"), "audio": _rel("audio", 2.0)}
    quota = np.full(K, 10)
    sel = select_pseudo_labels(fused.ids, fused, [audio], rel, UNIFORM, quota, LOOSE)
    got = _reasons(sel)
    assert got["u0"] == "selected"                       # fused and audio agree
    assert got["u1"] == "too few sources agree"           # the fused model alone
    assert got["u2"] == "posterior prefers angry"         # a very sure, reliable audio outweighs the fused model
    assert got["u3"] == "no fused vote (no features)"
    assert got["u4"] == "selected"                        # an unsure fused model backed by a sure audio
    assert got["u5"] == "selected"
    strict = PseudoLabelConfig(min_agree=1, min_posterior=0.9, min_confidence=0.45, k_fraction=1.0)
    got = _reasons(select_pseudo_labels(fused.ids, fused, [audio], rel, UNIFORM, quota, strict))
    assert got["u4"] == "low fused confidence" and got["u5"] == "low posterior" and got["u0"] == "selected"
    picked = sel.filter(sel.column("selected")).to_pylist()
    assert [r["clip_id"] for r in picked] == ["u0", "u4", "u5"]
    assert all(0 < r["weight"] <= 1 and r["weight"] == pytest.approx(r["posterior"]) for r in picked)
    assert all(r["n_agree"] == 1 for r in picked)


def test_each_fold_is_chosen_by_its_own_models() -> None:
    # fold 0's fused model says happy, fold 1's says sad; the audio source agrees with both in turn
    fused = _fused([[(HAPPY, 0.9), (SAD, 0.9)]])
    audio = SourceVotes("audio", "probs", ["u0"], np.stack([_p(HAPPY, 0.8), _p(SAD, 0.8)])[None])
    rel = {"fused": _rel("fused"), "audio": _rel("audio")}
    sel = select_pseudo_labels(["u0"], fused, [audio], rel, UNIFORM, np.full(K, 5), LOOSE).to_pylist()
    assert [(r["fold"], r["pred_label"], r["selected"]) for r in sel] == [(0, "happy", True), (1, "sad", True)]
    table = build_label_table(pa.table({"clip_id": ["t1"], "label": ["angry"]}),
                              select_pseudo_labels(["u0"], fused, [audio], rel, UNIFORM, np.full(K, 5), LOOSE))
    rows = table.to_pylist()
    assert rows[0] == {"clip_id": "t1", "label": "angry", "weight": 1.0, "source": "original", "fold": None}
    assert [(r["label"], r["fold"], r["source"]) for r in rows[1:]] == [("happy", 0, "pseudo"), ("sad", 1, "pseudo")]


def test_class_quotas_follow_the_labelled_prior_and_rounds_grow_k() -> None:
    prior = class_prior(np.array([HAPPY] * 30 + [SAD] * 10))
    q1 = round_quota(LOOSE, 1, 40, prior)
    q2 = round_quota(LOOSE, 2, 40, prior)
    assert q1[HAPPY] > 2 * q1[SAD] and (q2 >= 2 * q1 - 1).all() and q2.sum() > q1.sum()
    # 12 confident happy and 12 confident sad candidates with a quota of 3 happy / 1 sad: most probable first
    rows = [[(HAPPY, 0.80 + 0.01 * i)] for i in range(12)] + [[(SAD, 0.80 + 0.01 * i)] for i in range(12)]
    fused = _fused(rows)
    text = _other("text", [(HAPPY, 0.7)] * 12 + [(SAD, 0.7)] * 12)
    quota = np.zeros(K, dtype=np.int64)
    quota[HAPPY], quota[SAD] = 3, 1
    sel = select_pseudo_labels(fused.ids, fused, [text], {"fused": _rel("fused"), "text": _rel("text")},
                               UNIFORM, quota, LOOSE)
    summary = selection_summary(sel)
    assert summary["per_class"]["happy"] == 3 and summary["per_class"]["sad"] == 1
    picked = {r["clip_id"] for r in sel.to_pylist() if r["selected"]}
    assert picked == {"u11", "u10", "u9", "u23"}
    assert summary["reasons"]["class quota"] == 20


def test_labelled_clips_never_get_a_pseudo_label() -> None:
    fused = SourceVotes("fused", "probs", ["t1", "u1"], np.stack([_p(HAPPY, 0.9), _p(SAD, 0.9)])[:, None])
    text = _other("text", [(HAPPY, 0.9), (SAD, 0.9)])
    text = SourceVotes("text", "probs", ["t1", "u1"], text.probs)
    sel = select_pseudo_labels(["t1", "u1"], fused, [text], {"fused": _rel("fused"), "text": _rel("text")},
                               UNIFORM, np.full(K, 5), LOOSE)
    table = build_label_table(pa.table({"clip_id": ["t1"], "label": ["angry"], "weight": [0.5],
                                        "source": ["refined"]}), sel)
    assert {r["clip_id"]: (r["label"], r["source"]) for r in table.to_pylist()} == {
        "t1": ("angry", "refined"), "u1": ("sad", "pseudo")}
