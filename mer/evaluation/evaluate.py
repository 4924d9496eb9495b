"""``mer evaluate``: WAF, accuracy and per-class F1 of a predictions table against labels.

Both sides may use the project's names (``clip_id``, ``pred_label``/``label``) or the MER2025 CSV names
(``name``, ``discrete``). Ids present on one side only are reported, never silently dropped.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import pyarrow as pa

from mer.config import LABELS
from mer.evaluation.metrics import accuracy, confusion, per_class_f1, plot_confusion, weighted_f1
from mer.store import storage
from mer.store.parts import PartStore


def _read_any(uri: str) -> pa.Table:
    """A CSV, a Parquet file, a part store, or the directory ``mer score --out`` wrote (its ``predictions/``)."""
    if uri.endswith(".csv"):
        text = storage.read_text(uri)
        rows = list(csv.DictReader(io.StringIO(text)))
        cols = rows[0].keys() if rows else []
        return pa.table({c: [r[c] for r in rows] for c in cols})

    if not storage.exists(uri):
        raise FileNotFoundError(f"no such file or directory: {uri}")
    for store in (PartStore(storage.join(uri, "predictions")), PartStore(uri)):
        if storage.exists(store.uri) and store.parts:
            return store.read()
    return storage.read_table(uri)


def _pick(table: pa.Table, names: tuple[str, ...], what: str, uri: str) -> list:
    for n in names:
        if n in table.column_names:
            return table.column(n).to_pylist()
    raise ValueError(f"{uri}: no {what} column (looked for {', '.join(names)})")


def _normalise(label: object) -> str | None:
    if label is None:
        return None
    text = str(label).strip().lower()
    return text or None


def label_rows(uri: str) -> list[tuple[Any, str]]:
    """(clip id, lower-cased label) of every labelled row of a labels table (CSV, Parquet or part store; project
    or MER2025 column names), in file order; rows without a label are left out, unknown labels are not."""
    table = _read_any(uri)
    ids, labels = _pick(table, ("clip_id", "name"), "id", uri), _pick(table, ("label", "discrete"), "label", uri)
    return [(c, lab) for c, lab in zip(ids, map(_normalise, labels)) if lab is not None]


def read_labels(uri: str) -> dict[str, str]:
    """{clip id: lower-cased label} of a labels table (:func:`label_rows`)."""
    return {str(c): lab for c, lab in label_rows(uri)}


def evaluate(pred_uri: str, labels_uri: str, out_dir: str | None = None) -> dict:
    """Compare predictions with labels; write ``report.json`` and ``confusion_matrix.png`` to ``out_dir``."""
    pred_t = _read_any(pred_uri)
    pred_ids = _pick(pred_t, ("clip_id", "name"), "id", pred_uri)
    preds = _pick(pred_t, ("pred_label", "discrete", "label"), "prediction", pred_uri)

    truth = {}
    unknown_labels = []
    for cid, lab in label_rows(labels_uri):
        if lab not in LABELS:
            unknown_labels.append({"clip_id": cid, "label": lab})
            continue
        truth[cid] = lab
    predicted = {cid: _normalise(p) for cid, p in zip(pred_ids, preds)}
    duplicates = len(pred_ids) - len(predicted)

    matched = [cid for cid in truth if cid in predicted]
    missing = sorted(cid for cid in truth if cid not in predicted)
    extra = sorted(cid for cid in predicted if cid not in truth)
    no_prediction = sorted(cid for cid in matched if predicted[cid] not in LABELS)
    # A clip we were asked about but could not predict counts as wrong, not as absent.
    y_true = [LABELS.index(truth[c]) for c in matched + missing]
    y_pred = [LABELS.index(predicted[c]) if c in predicted and predicted[c] in LABELS else -1
              for c in matched + missing]

    report: dict = {
        "pred": pred_uri, "labels": labels_uri,
        "n_labels": len(truth), "n_predictions": len(predicted), "n_scored": len(y_true),
        "missing_in_pred": missing, "extra_in_pred_count": len(extra), "extra_in_pred": extra[:50],
        "no_prediction": no_prediction, "duplicate_pred_rows": duplicates,
        "unknown_labels": unknown_labels,
    }
    if y_true:
        report["waf"] = weighted_f1(y_true, y_pred)
        report["accuracy"] = accuracy(y_true, y_pred)
        report["per_class_f1"] = per_class_f1(y_true, y_pred)
        cm = confusion(y_true, y_pred)
        report["confusion"] = cm.tolist()
        if out_dir:
            plot_confusion(cm, storage.join(out_dir, "confusion_matrix.png"))
    if out_dir:
        storage.write_json(storage.join(out_dir, "report.json"), report)
    return report


def format_report(report: dict) -> str:
    """Human-readable summary of :func:`evaluate`'s report."""
    lines = [f"scored {report['n_scored']} of {report['n_labels']} labelled clips "
             f"({report['n_predictions']} predictions)"]
    if "waf" in report:
        lines.append(f"WAF {report['waf']:.4f}   accuracy {report['accuracy']:.4f}")
        lines.append("per-class F1: " + "  ".join(f"{k} {v:.3f}" for k, v in report["per_class_f1"].items()))
    for key, what in (("missing_in_pred", "labelled clips without a prediction (counted wrong)"),
                      ("no_prediction", "predictions without a label (failed rows, counted wrong)"),
                      ("unknown_labels", "label rows with an unknown label (ignored)")):
        if report[key]:
            shown = report[key][:10]
            lines.append(f"{len(report[key])} {what}: {shown}{' …' if len(report[key]) > 10 else ''}")
    if report["extra_in_pred_count"]:
        lines.append(f"{report['extra_in_pred_count']} predictions have no label (not scored)")
    if report["duplicate_pred_rows"]:
        lines.append(f"{report['duplicate_pred_rows']} duplicate prediction rows (last one kept)")
    return "\n".join(lines)
