"""`mer evaluate`: WAF/accuracy against labels, with missing/extra ids reported, on local and S3."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from mer.cli import main
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
