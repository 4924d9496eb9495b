"""A finished study's outputs: the leaderboard Parquet, the WAF-vs-parameters plot, the best run directory."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import MerConfig
from mer.evaluation.metrics import save_png
from mer.store import storage
from mer.tune.space import default_point

log = logging.getLogger("mer.tune")

STATUS_ORDER = {"finished": 0, "stopped": 1, "error": 2}


def _same_point(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def eq(x: Any, y: Any) -> bool:
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            return math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12)
        return x == y

    return set(a) == set(b) and all(eq(a[k], b[k]) for k in a)


def _trial_id(result: Any) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    # A trial that failed before its first report: Tune names its directory <trainable>_<trial id>_<n>_<params>.
    parts = str(result.path).rstrip("/").rsplit("/", 1)[-1].split("_")
    return f"{parts[2]}_{parts[3]}" if len(parts) > 3 else parts[-1]


def leaderboard_rows(cfg: MerConfig, study_uri: str, results: list[Any]) -> list[dict[str, Any]]:
    """One row per trial: status, mean/std fold validation WAF, OOF WAF, epochs, seconds, its parameters."""
    keys = list(cfg.tune.dimensions)
    default = default_point(cfg) if cfg.tune.include_default else None
    rows = []
    for r in results:
        m = r.metrics or {}
        tid = _trial_id(r)
        run_uri = storage.join(study_uri, "trials", tid)
        params = {k: (v.item() if hasattr(v, "item") else v) for k, v in (r.config or {}).items() if k in keys}
        row: dict[str, Any] = {"trial_id": tid, "status": "stopped", "waf_mean": m.get("waf"), "waf_std": None,
                               "oof_waf": None, "test_waf": None, "epochs": m.get("epoch"),
                               "seconds": m.get("time_total_s"), "is_default": default is not None
                               and _same_point(params, default), "run": run_uri,
                               "error": None if r.error is None else f"{type(r.error).__name__}: {r.error}"}
        if r.error is not None:
            row["status"] = "error"
        elif storage.exists(storage.join(run_uri, "metrics.json")):
            met = storage.read_json(storage.join(run_uri, "metrics.json"))
            fold_waf = np.array([f["val_waf"] for f in met["folds"]], dtype=np.float64)
            row.update({"status": "finished", "waf_mean": float(fold_waf.mean()), "waf_std": float(fold_waf.std()),
                        "oof_waf": met["waf"], "test_waf": (met.get("test") or {}).get("waf")})
        row["config"] = json.dumps(params, sort_keys=True)
        row.update({f"param.{k}": params.get(k) for k in keys})
        rows.append(row)
    rows.sort(key=lambda x: (STATUS_ORDER[x["status"]], -(x["waf_mean"] if x["waf_mean"] is not None else -1.0)))
    for i, row in enumerate(rows):
        row["rank"] = i + 1
    return rows


def leaderboard_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The rows as Arrow; parameter columns of mixed type (a choice of numbers and strings) as strings."""
    cols: dict[str, Any] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        kinds = {type(v) for v in values if v is not None}
        if name.startswith("param.") and len(kinds) > 1 and not kinds <= {int, float}:
            values = [None if v is None else str(v) for v in values]
        cols[name] = values
    return pa.table(cols)


def plot_waf_vs_params(rows: list[dict[str, Any]], dims: dict[str, list[Any]], uri: str) -> str:
    """One panel per searched key: each trial's mean fold WAF against its value (filled: finished, hollow:
    stopped early by ASHA at its last score, star: the default config)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter


    keys = list(dims)
    scored = [r for r in rows if r["waf_mean"] is not None]
    n = max(1, len(keys))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        values = [r[f"param.{key}"] for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        cats = sorted({str(v) for v in values}) if not numeric else []
        for r, v in zip(scored, values):
            x = float(v) if numeric else cats.index(str(v))
            done = r["status"] == "finished"
            ax.scatter([x], [r["waf_mean"]], marker="*" if r["is_default"] else "o", s=120 if r["is_default"] else 40,
                       facecolors="C0" if done else "none", edgecolors="C0" if done else "C1")
        if not numeric:
            ax.set_xticks(range(len(cats)), cats, rotation=20)
        elif dims[key][0] == "loguniform" or (dims[key][0] == "choice" and values and min(values) > 0
                                              and max(values) / min(values) >= 10):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        if numeric and dims[key][0] == "choice" and values:
            ticks = sorted({float(v) for v in values})
            ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.set_xlabel(key)
        ax.set_ylabel("mean fold val WAF")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("WAF vs parameters (filled: finished, hollow: stopped by ASHA, star: default)")
    fig.tight_layout()
    return save_png(fig, uri)


def finish_study(cfg: MerConfig, study_uri: str, grid: Any) -> dict[str, Any]:
    """Leaderboard, plot and ``best/`` of a study from its ``ResultGrid``; returns the study summary."""
    results = [grid[i] for i in range(len(grid))]
    rows = leaderboard_rows(cfg, study_uri, results)
    board_uri = storage.join(study_uri, "leaderboard.parquet")
    storage.write_table(board_uri, leaderboard_table(rows))
    plot_uri = plot_waf_vs_params(rows, cfg.tune.dimensions, storage.join(study_uri, "waf_vs_params.png"))
    finished = [r for r in rows if r["status"] == "finished"]
    summary: dict[str, Any] = {
        "leaderboard": board_uri, "plot": plot_uri, "trials": len(rows),
        "status_counts": {s: sum(r["status"] == s for r in rows) for s in STATUS_ORDER},
        "best": None, "default": None, "gain_vs_default": None,
    }
    view = ("trial_id", "waf_mean", "waf_std", "oof_waf", "test_waf", "epochs", "seconds", "config", "run")
    default = next((r for r in rows if r["is_default"]), None)
    if default is not None:
        summary["default"] = {**{k: default[k] for k in view}, "status": default["status"]}
    if finished:
        best = finished[0]
        best_uri = storage.join(study_uri, "best")
        if storage.exists(best_uri):  # a resumed study may have found a better trial
            fs, path = storage.filesystem(best_uri)
            fs.delete_dir(path)
        # Checkpoints stay with the trial: the best run directory is what scoring and ensembles read.
        storage.copy_dir(best["run"], best_uri, skip=("ray",))
        summary["best"] = {**{k: best[k] for k in view}, "run": best_uri, "trial_run": best["run"]}
        if default is not None and default["status"] == "finished":
            summary["gain_vs_default"] = best["waf_mean"] - default["waf_mean"]
        log.info("best trial %s: mean fold WAF %.4f ± %.4f (%s) -> %s", best["trial_id"], best["waf_mean"],
                 best["waf_std"], best["config"], best_uri)
    else:
        log.warning("study %s: no trial finished all its folds; no best run", study_uri)
    return summary


def read_leaderboard(study_uri: str) -> pa.Table:
    """A study's leaderboard (best first)."""
    return storage.read_table(storage.join(study_uri, "leaderboard.parquet"))


def study_runs(study_uri: str, top: int) -> list[str]:
    """The run directories of a study's ``top`` best finished trials (leaderboard order: mean fold WAF)."""
    board = read_leaderboard(study_uri).to_pylist()
    runs = [r["run"] for r in board if r["status"] == "finished"][:top]
    if not runs:
        raise ValueError(f"study {study_uri}: no finished trial on its leaderboard")
    return runs
