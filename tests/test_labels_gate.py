"""The label loop's acceptance gate on hand-made out-of-fold tables: the figures, the paired bootstrap, the
decision. No Ray, no training: the loop test covers the gate inside whole runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mer.config import LABELS, PROB_COLUMNS
from mer.evaluation.metrics import weighted_f1, weighted_f1_resampled
from mer.labels.gate import better_share, decide, gate_figures, oof_predictions


def _run(tmp_path: Path, name: str, ids: list[str], pred: np.ndarray) -> str:
    """A run directory whose oof.parquet predicts class ``pred[i]`` for clip ``ids[i]``."""
    probs = np.full((len(ids), len(LABELS)), 0.02)
    probs[np.arange(len(ids)), pred] = 0.9
    d = tmp_path / name
    d.mkdir()
    pq.write_table(pa.table({"clip_id": ids, **{c: probs[:, k] for k, c in enumerate(PROB_COLUMNS)}}),
                   d / "oof.parquet")
    return str(d)


def _labels(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, dict[str, str]]:
    y = np.random.default_rng(seed).integers(0, len(LABELS), size=n)
    ids = [f"c{i:04d}" for i in range(n)]
    return ids, y, {c: LABELS[k] for c, k in zip(ids, y)}


def _with_errors(y: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    p = y.copy()
    p[wrong] = (y[wrong] + 1) % len(LABELS)
    return p


def test_resampled_waf_is_sklearns_weighted_f1_of_the_drawn_rows() -> None:
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 6, 50), rng.integers(0, 6, 50)
    counts = rng.multinomial(50, np.full(50, 1 / 50), size=4).astype(float)
    got = weighted_f1_resampled(y, p, counts)
    for row, w in zip(counts, got):
        idx = np.repeat(np.arange(50), row.astype(int))
        assert w == pytest.approx(weighted_f1(y[idx], p[idx]), abs=1e-12)


def test_gate_figures_count_only_clips_with_an_original_label(tmp_path: Path) -> None:
    ids, y, original = _labels(40)
    run = _run(tmp_path, "r", ids + ["pool_1", "pool_2"], np.concatenate([_with_errors(y, np.arange(10)), [0, 1]]))
    g = gate_figures(run, original)
    assert g["n"] == 40 and g["accuracy"] == pytest.approx(0.75)
    assert g["waf"] == pytest.approx(weighted_f1(y, _with_errors(y, np.arange(10))))


def test_bootstrap_share_separates_a_real_gain_from_a_few_clips_luck(tmp_path: Path) -> None:
    ids, y, original = _labels(120)
    best = _run(tmp_path, "best", ids, _with_errors(y, np.arange(0, 120, 2)))           # 60 wrong
    clearly = _run(tmp_path, "clearly", ids, _with_errors(y, np.arange(0, 120, 4)))     # 30 wrong, a subset
    # Two more clips right, but also a different 20 wrong and 22 right: a gain of a few clips' luck.
    wrong = np.concatenate([np.arange(0, 120, 2)[:-22], np.arange(1, 41, 2)])
    lucky = _run(tmp_path, "lucky", ids, _with_errors(y, wrong))
    assert gate_figures(lucky, original)["waf"] > gate_figures(best, original)["waf"]
    clearly, lucky, best = (oof_predictions(r, original) for r in (clearly, lucky, best))
    s_clear = better_share(clearly, best, original)
    s_lucky = better_share(lucky, best, original)
    s_same = better_share(best, best, original)
    assert s_clear > 0.99 and 0.3 < s_lucky < 0.8 and s_same == 0.0, (s_clear, s_lucky, s_same)
    # the same draw every time (the loop's decisions are reproducible)
    assert better_share(lucky, best, original) == s_lucky
    # a margin makes the clear gain less certain
    assert better_share(clearly, best, original, min_gain=0.2) < s_clear


def test_decide_plain_comparison_and_with_confidence() -> None:
    assert decide(0.60, 0.58, 0.0) == (True, "gate WAF 0.6000 ≥ 0.5800")
    assert decide(0.57, 0.58, 0.0)[0] is False
    assert decide(0.60, 0.58, 0.03)[0] is False
    # confidence 0 decides by the plain comparison, and says how sure the gain is
    assert decide(0.60, 0.58, 0.0, share=0.55, confidence=0.0) == (
        True, "gate WAF 0.6000 ≥ 0.5800; better in 55% of bootstrap resamples")
    ok, why = decide(0.60, 0.58, 0.0, share=0.55, confidence=0.8)
    assert not ok and "better in 55% of bootstrap resamples (< 80% asked)" in why
    ok, why = decide(0.60, 0.58, 0.0, share=0.93, confidence=0.8)
    assert ok and "93% of bootstrap resamples (≥ 80% asked)" in why
    # a sure gain below the margin is still rejected
    assert decide(0.60, 0.58, 0.05, share=0.99, confidence=0.8)[0] is False
