"""Self-contained HTML reports: a training run (``RUN/report.html``), a label loop (``DIR/report.html``) and the
demo (``runs/demo/report.html``).

One file each, images embedded as base64 PNG, no script and no external resource, so it opens from disk or an
object store in any browser. Everything shown is read back from the run's own outputs (``metrics.json``,
``modality_weights.json``, the PNG plots, ``loop.json``, the demo's ``summary.json``): the report never
recomputes a figure.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from mer.config import LABELS
from mer.extract.schema import status_counts
from mer.store import storage
from mer.store.parts import PartStore

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em;margin-bottom:0}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:4px}table{border-collapse:collapse;margin:8px 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3;text-align:left}
td.l,th.l{text-align:left}tr.no td{color:#a33}tr.best td{font-weight:bold;background:#eef7ee}
img{max-width:100%;border:1px solid #eee;margin:6px 0}.imgs{display:flex;flex-wrap:wrap;gap:12px}
.note{color:#555;font-size:0.9em}code{background:#f4f4f4;padding:1px 4px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return _e(x)


def _img(uri: str, alt: str) -> str:
    """An embedded PNG, or a note when the plot is missing."""
    if not storage.exists(uri):
        return f'<p class="note">({_e(alt)}: not found at {_e(uri)})</p>'
    data = base64.b64encode(storage.read_bytes(uri)).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(head: list[str], rows: list[list[Any]], classes: list[str] | None = None, left: int = 1) -> str:
    out = ["<table><tr>" + "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>'
                                   for i, h in enumerate(head)) + "</tr>"]
    for r, row in enumerate(rows):
        cls = f' class="{classes[r]}"' if classes and classes[r] else ""
        # Text reads left-aligned, figures right-aligned.
        out.append(f"<tr{cls}>" + "".join(f'<td class="{"l" if i < left or isinstance(v, str) else ""}">'
                                          f"{_num(v)}</td>" for i, v in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


def _page(title: str, subtitle: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1><p class=\"sub\">{_e(subtitle)}</p>"
            + "\n".join(body) + "</body></html>\n")


def _weights_table(weights: dict[str, Any]) -> str:
    """Mean modality weight per (true) class, and overall."""
    mods = list(weights.get("modalities") or [])
    per = weights.get("per_class") or {}
    rows = [[lab, *[per[lab].get(m) for m in mods]] for lab in LABELS if lab in per]
    rows.append(["all classes", *[(weights.get("overall") or {}).get(m) for m in mods]])
    return _table(["class", *mods], rows)


def run_sections(run_uri: str, heading: str = "") -> list[str]:
    """The body of a run's report: figures, per-class F1, folds, plots, modality weights, inputs."""
    m = storage.read_json(storage.join(run_uri, "metrics.json"))
    test = m.get("test") or {}
    h = f"{heading} — " if heading else ""
    if m.get("model") == "ensemble":  # mer ensemble or a label loop's: figures and members, no training of its own
        return [f"<h2>{_e(h)}Weighted F1 (WAF) and accuracy</h2>",
                _table(["split", "WAF", "accuracy", "clips"],
                       [["out of fold (store labels)", m.get("waf"), m.get("accuracy"), None],
                        *([["test split", test.get("waf"), test.get("accuracy"), test.get("n")]] if test else [])]),
                f"<h2>{_e(h)}Members ({_e(m.get('weighting'))} of their fold ensembles)</h2>",
                _table(["member", "weight", "out-of-fold WAF", "test WAF", "run"],
                       [[x["name"], x["weight"], x.get("oof_waf"), x.get("test_waf"), x["run"]]
                        for x in m.get("members", [])])]
    body = [f"<h2>{_e(h)}Weighted F1 (WAF) and accuracy</h2>",
            _table(["split", "WAF", "accuracy", "clips"],
                   [["out of fold (training labels)", m.get("waf"), m.get("accuracy"), m.get("n_cv")],
                    *([["test split (fold ensemble)", test.get("waf"), test.get("accuracy"), test.get("n")]]
                      if test else [])]),
            f'<p class="note">model <code>{_e(m.get("model"))}</code>, modalities '
            f'{_e(", ".join(m.get("modalities", [])))}; {_e(len(m.get("folds", [])))} folds; '
            f'{_e(m.get("n_pseudo", 0))} pseudo-labelled clips; label table: {_e(m.get("labels") or "the store labels")}</p>']
    f1 = test.get("per_class_f1") or m.get("per_class_f1") or {}
    if f1:
        body += [f"<h2>{_e(h)}Per-class F1 ({'test split' if test else 'out of fold'})</h2>",
                 _table(list(LABELS), [[f1.get(lab) for lab in LABELS]], left=0)]
    body += [f"<h2>{_e(h)}Folds</h2>",
             _table(["fold", "best val WAF", "val accuracy", "best epoch", "epochs", "seconds"],
                    [[f["fold"], f.get("val_waf"), f.get("val_acc"), f.get("best_epoch"), f.get("epochs"),
                      f.get("seconds")] for f in m.get("folds", [])])]
    body += [f"<h2>{_e(h)}Confusion matrix and training curves</h2>", '<div class="imgs">',
             _img(storage.join(run_uri, "confusion_matrix.png"), f"confusion matrix ({m.get('confusion_source')})"),
             _img(storage.join(run_uri, "curves.png"), "training curves"), "</div>"]
    weights_uri = storage.join(run_uri, "modality_weights.json")
    if storage.exists(weights_uri):
        body += [f"<h2>{_e(h)}Mean modality weights per class</h2>", _weights_table(storage.read_json(weights_uri))]
    features = m.get("features")
    if features:
        body += _store_sections(features)
    return body


def _store_sections(features_uri: str) -> list[str]:
    """Extraction (and enrichment) status counts of the feature store a run trained on."""
    try:
        store = PartStore(features_uri)
        cols = [c for c in store.columns if c == "status" or c.endswith("_status")]
        counts = status_counts(store.read(columns=cols), cols)
    except (FileNotFoundError, OSError, ValueError) as e:
        return [f'<p class="note">feature store {_e(features_uri)}: {_e(e)}</p>']
    return ["<h2>Feature store statuses</h2>", f'<p class="note">{_e(features_uri)}</p>',
            _counts_table(counts)]


def _counts_table(counts: dict[str, dict[str, int]]) -> str:
    values = sorted({v for c in counts.values() for v in c})
    return _table(["column", *values], [[col, *[c.get(v, 0) for v in values]] for col, c in counts.items()])


def write_run_report(run_uri: str) -> str:
    """Write ``RUN/report.html`` for a finished training run; returns its URI."""
    m = storage.read_json(storage.join(run_uri, "metrics.json"))
    uri = storage.join(run_uri, "report.html")
    storage.write_text(uri, _page(f"mer run {m.get('run_name', '')}", run_uri, run_sections(run_uri)))
    return uri


def loop_sections(loop: dict[str, Any]) -> list[str]:
    """The label loop's stages (gate, decision, test figures) and what is scored."""
    rows, classes = [], []
    scored = set(loop["best"].get("members") or [loop["best"]["stage"]])
    for s in loop["stages"]:
        gate, test = s.get("gate") or {}, s.get("test") or {}
        what = s.get("rules") or ({"pseudo-labels (clip, fold)": s["pseudo"]["selected"],
                                   "clips": s["pseudo"]["distinct_clips"]} if s.get("pseudo") else "")
        rows.append([s["stage"], gate.get("waf"), test.get("waf"), "kept" if s["accepted"] else "rejected",
                     s.get("decision", ""), json.dumps(what) if what else ""])
        classes.append("best" if s["stage"] in scored else "" if s["accepted"] else "no")
    best = loop["best"]
    if best["stage"] == "ensemble":
        rows.append(["ensemble", (best.get("gate") or {}).get("waf"), (best.get("test") or {}).get("waf"), "scored",
                     "mean of the accepted stages' fold ensembles (its out-of-fold WAF does not compare with "
                     "theirs: each stage's is read at every fold's best validation epoch on that fold, which "
                     "flatters one run more than a mean of several)",
                     ", ".join(best["members"])])
        classes.append("best")
    sel = best.get("selection")
    if sel and best["stage"] != "ensemble" and best["stage"] not in {x["stage"] for x in loop["stages"]}:
        rows.append([best["stage"], best.get("gate_waf"), (best.get("test") or {}).get("waf"), "shipped",
                     best.get("why", ""), ", ".join(f"{c['kind']} {c['name']}: {c['oof_waf']:.4f}"
                                                   for c in sel["candidates"])])
        classes.append("best")
    return ["<h2>Label stages</h2>",
            '<p class="note">gate WAF: out-of-fold WAF against the original labels (decides); test WAF: the '
            "store's labelled test split (shown, never used to decide). Highlighted: what is scored.</p>",
            _table(["stage", "gate WAF", "test WAF", "decision", "why", "details"], rows, classes, left=1),
            f"<p>scored: <b>{_e(best['stage'])}</b> — {_e(best['why'])}</p>"]


def scored_sections(loop: dict[str, Any]) -> list[str]:
    """The run ``mer score`` uses; for the accepted stages' ensemble, then also the best single stage's run (its
    folds, plots and modality weights: an ensemble has no training of its own)."""
    best = loop["best"]
    if (best.get("selection") or {}).get("kind") in ("stacked", "single"):
        # A stacked run has no training of its own; a single-modality run is a source run: the best stage's
        # run follows, its modality weights included.
        head = [f"<h2>Shipped: {_e(best['stage'])}</h2>", f"<p>{_e(best['why'])}</p>"]
        stage = loop["best_stage"]
        if best["selection"]["kind"] == "single":
            head += run_sections(best["run"], heading=f"shipped single-modality run ({best['stage']})")
        return head + run_sections(stage["run"], heading=f"best stage ({stage['stage']})")
    if best["stage"] != "ensemble":
        return run_sections(best["run"], heading=f"best stage ({best['stage']})")
    stage = loop["best_stage"]
    return run_sections(best["run"], heading="ensemble of the accepted stages") + \
        run_sections(stage["run"], heading=f"best single stage ({stage['stage']})")


def write_loop_report(loop_uri: str) -> str:
    """Write ``DIR/report.html`` for a label-loop directory (its stages, then the run that is scored)."""
    loop = storage.read_json(storage.join(loop_uri, "loop.json"))
    body = loop_sections(loop) + scored_sections(loop)
    uri = storage.join(loop_uri, "report.html")
    storage.write_text(uri, _page("mer label loop", loop_uri, body))
    return uri


def _quality_section(quality: dict[str, Any]) -> list[str]:
    """What the demo knows from the generator's hidden truth: flipped labels found, pseudo-labels right."""
    if not quality:
        return []
    rows = []
    ref = quality.get("refinement")
    if ref:
        rows.append(["refinement: flipped train labels found (relabelled or down-weighted)",
                     f"{ref['flagged_and_flipped']} of {ref['flipped']} flipped; "
                     f"{ref['flagged']} flagged in all"])
    for name, q in quality.items():
        if name.startswith("round_"):
            rows.append([f"{name}: pseudo-labels right", f"{q['right']} of {q['pseudo_labels']}"])
    return ["<h2>Label quality against the generator's truth</h2>", _table(["what", "count"], rows)]


def write_demo_report(workdir: str, summary: dict[str, Any]) -> str:
    """Write ``<workdir>/report.html``: modality table, label stages, the scored test split, statuses."""
    loop = storage.read_json(storage.join(summary["outputs"]["label_loop"], "loop.json"))
    waf = summary["waf"]
    body = ["<h2>Test-split WAF by modality (labelled-only training, k-fold ensemble)</h2>",
            _table(["setting", "WAF", "accuracy"],
                   [[k, w, summary["accuracy_by_setting"].get(k)] for k, w in waf.items()],
                   ["best" if k == "fused" else "" for k in waf])]
    body += loop_sections(loop)
    body += _quality_section(summary.get("label_quality") or {})
    scored = summary["scored_test"]
    body += ["<h2>Scored test split (mer score + mer evaluate)</h2>",
             f"<p>WAF {_num(scored.get('waf'))}, accuracy {_num(scored.get('accuracy'))}, "
             f"clips missing from the predictions: {_e(scored.get('missing'))}; run {_e(scored.get('run'))} "
             "(its confusion matrix on this split is below)</p>"]
    body += scored_sections(loop)
    video_text = summary.get("video_text") or {}
    statuses = {"extraction (status)": summary.get("extract_status") or {},
                "enrichment": summary.get("enrich_status") or {},
                "transcript source": video_text.get("transcript_source") or {},
                "speech recognition": video_text.get("asr_status") or {},
                "visual description": video_text.get("describe_status") or {},
                "LLM vote": summary.get("llm_vote_status") or {}}
    body += ["<h2>Extraction, enrichment, speech, description and LLM vote statuses</h2>", _counts_table(statuses),
             "<h2>Timings (s)</h2>", _table(list(summary["timings_s"]), [list(summary["timings_s"].values())], left=0)]
    if video_text.get("busy_s"):
        stages = list(video_text["busy_s"])
        body += ["<h2>Text from the video, inside the extraction stream</h2>",
                 _table(["stage", "busy s", "generated tokens"],
                        [[k, video_text["busy_s"][k], (video_text.get("tokens") or {}).get(k)] for k in stages]),
                 "<p>Random-weight tiny models: these transcripts and descriptions carry no emotion.</p>"]
    uri = storage.join(workdir, "report.html")
    storage.write_text(uri, _page("mer demo", f"{workdir} — total {summary['seconds']} s", body))
    return uri
