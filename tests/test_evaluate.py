"""`mer evaluate`: WAF/accuracy against labels, with missing/extra ids reported, on local and S3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mer.cli import main
from mer.config import LABELS
from mer.evaluation.evaluate import evaluate, format_report
from mer.store import storage


def _write(tmp: Path) -> tuple[str, str]:
    labels = tmp / "labels.csv"
    labels.write_text("name,discrete\na,happy\nb,sad\nc,angry\nd,Neutral\ne,bored\n")
    preds = tmp / "pred.parquet"
    storage.write_table(str(preds), pa.table({
        "clip_id": ["a", "b", "c", "x"], "pred_label": ["happy", "angry", None, "sad"]}))
    return str(preds), str(labels)


def test_report_counts_and_metrics(tmp_path: Path) -> None:
    pred, labels = _write(tmp_path)
    rep = evaluate(pred, labels, out_dir=str(tmp_path / "eval"))
    # d has a label but no prediction and c's prediction failed: both count as wrong.
    assert rep["n_labels"] == 4 and rep["n_scored"] == 4
    assert rep["missing_in_pred"] == ["d"] and rep["no_prediction"] == ["c"]
    assert rep["extra_in_pred"] == ["x"] and rep["unknown_labels"] == [{"clip_id": "e", "label": "bored"}]
    assert rep["accuracy"] == pytest.approx(0.25)
    # only "happy" is right: F1(happy)=1 with support 1, the others 0 -> WAF = 1/4
    assert rep["waf"] == pytest.approx(0.25)
    assert rep["per_class_f1"]["happy"] == pytest.approx(1.0)
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000
    assert storage.read_json(str(tmp_path / "eval" / "report.json"))["waf"] == pytest.approx(0.25)
    text = format_report(rep)
    assert "WAF 0.2500" in text and "1 labelled clips without a prediction" in text


def test_cli_on_s3(tmp_path: Path, s3_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    pred, labels = _write(tmp_path)
    s3_pred, s3_labels = "s3://mer-test/eval/pred.parquet", "s3://mer-test/eval/labels.csv"
    storage.write_bytes(s3_pred, Path(pred).read_bytes())
    storage.write_bytes(s3_labels, Path(labels).read_bytes())
    assert main(["evaluate", "--pred", s3_pred, "--labels", s3_labels, "--out", "s3://mer-test/eval/out"]) == 0
    assert "WAF 0.2500" in capsys.readouterr().out
    assert storage.exists("s3://mer-test/eval/out/confusion_matrix.png")


def test_missing_column_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,what\n1,2\n")
    with pytest.raises(ValueError, match=r"bad.csv: no id column"):
        evaluate(str(bad), str(bad))


def test_metrics_equal_scikit_learns() -> None:
    """WAF, per-class F1, accuracy and the confusion matrix are scikit-learn's to the last bit, with missing
    predictions (-1), classes never predicted or never true, and a single row."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from mer.evaluation.metrics import accuracy, confusion, per_class_f1, weighted_f1

    rng = np.random.default_rng(1)
    labels = list(range(len(LABELS)))
    for n in (1, 2, 7, 60, 500):
        for _ in range(20):
            t = rng.integers(0, len(LABELS), n)
            p = np.where(rng.random(n) < 0.6, t, rng.integers(-1, len(LABELS), n))
            if n > 2 and rng.random() < 0.3:
                t[t == 2] = 0  # a class never true (but maybe predicted)
            assert weighted_f1(t, p) == float(f1_score(t, p, labels=labels, average="weighted", zero_division=0.0))
            assert list(per_class_f1(t, p).values()) == \
                f1_score(t, p, labels=labels, average=None, zero_division=0.0).tolist()
            assert accuracy(t, p) == float(accuracy_score(t, p))
            np.testing.assert_array_equal(confusion(t, p), confusion_matrix(t, p, labels=labels))
    assert weighted_f1([], []) == 0.0 and accuracy([], []) == 0.0
    assert weighted_f1([1, 1], [-1, -1]) == 0.0 and confusion([1], [-1]).sum() == 0
