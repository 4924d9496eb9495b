"""Multi-source label refinement rules on crafted tables."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from mer.config import RelabelConfig
from mer.labels.relabel import refine_labels, rule_counts

ORIGINAL = pa.table({"clip_id": ["a", "b", "c", "d", "e"],
                     "label": ["happy", "sad", "angry", "neutral", "worried"]})


def _probs(rows: dict[str, tuple[str, float]]) -> pa.Table:
    from mer.config import LABELS

    cols: dict[str, list] = {"clip_id": list(rows)}
    for lab in LABELS:
        cols[f"prob_{lab}"] = []
    for _, (lab, conf) in rows.items():
        rest = (1 - conf) / (len(LABELS) - 1)
        for other in LABELS:
            cols[f"prob_{other}"].append(conf if other == lab else rest)
    return pa.table(cols)


def test_rules_fire_as_documented() -> None:
    oof = _probs({"a": ("happy", 0.9), "b": ("angry", 0.95), "c": ("sad", 0.5), "d": ("happy", 0.9)})
    llm = pa.table({"clip_id": ["a", "b", "c", "d"], "label": ["happy", "angry", "sad", "neutral"],
                    "confidence": [0.8, 0.9, 0.9, 0.7]})
    out = refine_labels(ORIGINAL, {"oof": oof, "llm": llm}, RelabelConfig(min_agree=2, min_confidence=0.7,
                                                                           downweight=0.25))
    rows = {r["clip_id"]: r for r in out.to_pylist()}
    assert rows["a"]["rule"] == "agree" and rows["a"]["label"] == "happy" and rows["a"]["weight"] == 1.0
    # b: two confident sources agree on angry -> relabel with provenance
    assert rows["b"]["rule"] == "relabel" and rows["b"]["label"] == "angry"
    assert rows["b"]["original_label"] == "sad" and rows["b"]["source"] == "refined"
    assert json.loads(rows["b"]["votes"]) == {"llm": ["angry", 0.9], "oof": ["angry", 0.95]}
    # c: two sources agree on sad but mean confidence 0.7 ... (0.5+0.9)/2 = 0.7 >= 0.7 -> relabel
    assert rows["c"]["rule"] == "relabel" and rows["c"]["label"] == "sad"
    # d: sources split (happy vs neutral=original): tie goes to the original -> agree
    assert rows["d"]["rule"] == "agree" and rows["d"]["label"] == "neutral"
    # e: nobody else voted
    assert rows["e"]["rule"] == "no_votes" and rows["e"]["weight"] == 1.0
    assert rule_counts(out) == {"agree": 2, "relabel": 2, "no_votes": 1}


def test_downweight_when_consensus_is_weak() -> None:
    oof = _probs({"a": ("angry", 0.6)})
    cfg = RelabelConfig(min_agree=1, min_confidence=0.8, downweight=0.3)
    out = refine_labels(ORIGINAL, {"oof": oof}, cfg).to_pylist()[0]
    assert out["rule"] == "downweight" and out["label"] == "happy" and out["weight"] == pytest.approx(0.3)
    strong = refine_labels(ORIGINAL, {"oof": _probs({"a": ("angry", 0.9)})}, cfg).to_pylist()[0]
    assert strong["rule"] == "relabel" and strong["label"] == "angry"


def test_source_weights_can_protect_the_original() -> None:
    oof = _probs({"a": ("angry", 0.99)})
    cfg = RelabelConfig(min_agree=1, min_confidence=0.5, source_weights={"original": 2.0, "oof": 1.0})
    out = refine_labels(ORIGINAL, {"oof": oof}, cfg).to_pylist()[0]
    assert out["rule"] == "downweight" and out["label"] == "happy"


def test_unknown_label_in_a_source_is_named() -> None:
    bad = pa.table({"clip_id": ["a"], "label": ["bored"]})
    with pytest.raises(ValueError, match=r"'llm'.*'a'.*'bored'"):
        refine_labels(ORIGINAL, {"llm": bad}, RelabelConfig())


def test_weak_disagreement_keeps_full_weight() -> None:
    cfg = RelabelConfig(min_agree=1, min_confidence=0.8, downweight=0.3, downweight_min_confidence=0.5)
    weak = refine_labels(ORIGINAL, {"oof": _probs({"a": ("angry", 0.4)})}, cfg).to_pylist()[0]
    assert weak["rule"] == "uncertain" and weak["label"] == "happy" and weak["weight"] == 1.0
    assert weak["consensus_label"] == "angry"
    firm = refine_labels(ORIGINAL, {"oof": _probs({"a": ("angry", 0.55)})}, cfg).to_pylist()[0]
    assert firm["rule"] == "downweight" and firm["weight"] == pytest.approx(0.3)
