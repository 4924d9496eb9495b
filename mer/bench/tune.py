"""``mer bench tune``: trials/hour of a study with trials running at once vs one at a time, and the best trial's
mean fold WAF gain over the default config.

Both studies draw the same trials (same seed) on the same generated store with ASHA off, so they do the same
work and the throughput ratio is the effect of running trials concurrently (fractional CPUs per worker).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from mer.config import MerConfig, with_overrides
from mer.runtime.session import init_ray
from mer.store import storage
from mer.synth.feature_store import make_feature_store
from mer.tune.study import tune_study

log = logging.getLogger("mer.tune")


def bench_tune(cfg: MerConfig, out_uri: str, *, trials: int = 6, features_uri: str | None = None) -> dict[str, Any]:
    """Run the study of ``cfg`` twice (concurrent as resources allow, then one trial at a time) on a generated
    store (or ``features_uri``); returns trials/hour of each, their ratio and best-vs-default WAF."""
    import ray

    if not ray.is_initialized():
        init_ray(cfg)
    if features_uri is None:
        features_uri = storage.join(out_uri, "features")
        if not storage.exists(storage.join(features_uri, "_meta.json")):
            make_feature_store(features_uri, n=240, dims={"audio": 32, "text": 96}, seed=0, noise=2.0, missing=0.1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, Any] = {}
    for mode, limit in (("concurrent", 0), ("sequential", 1)):
        run_cfg = with_overrides(cfg, [f"tune.num_samples={trials}", "tune.asha.enabled=false",
                                       f"tune.max_concurrent_trials={limit}"])
        t0 = time.time()
        summary = tune_study(run_cfg, features_uri, storage.join(out_uri, f"{stamp}-{mode}"))
        wall = time.time() - t0
        runs[mode] = {"trials": summary["trials"], "at_once": summary["max_concurrent_trials"],
                      "seconds": round(wall, 1), "trials_per_hour": summary["trials"] / wall * 3600.0,
                      "best": summary["best"], "default": summary["default"], "gain": summary["gain_vs_default"],
                      "status_counts": summary["status_counts"]}
    c, s = runs["concurrent"], runs["sequential"]
    result = {"features": features_uri, "trials": trials, "runs": runs,
              "speedup": c["trials_per_hour"] / s["trials_per_hour"] if s["trials_per_hour"] else None}
    storage.write_json(storage.join(out_uri, f"{stamp}-bench.json"), result)
    return result


def format_bench(result: dict[str, Any]) -> str:
    """Plain-text figures of :func:`bench_tune`."""
    lines = [f"tune bench: {result['trials']} trials per study on {result['features']} (ASHA off, same trials)",
             f"{'mode':>11}{'at once':>9}{'seconds':>10}{'trials/h':>10}{'best WAF':>10}{'default':>9}{'gain':>8}"]
    for mode, r in result["runs"].items():
        best = r["best"]["waf_mean"] if r["best"] else float("nan")
        default = r["default"]["waf_mean"] if r["default"] else float("nan")
        gain = r["gain"] if r["gain"] is not None else float("nan")
        lines.append(f"{mode:>11}{r['at_once']:>9}{r['seconds']:>10.1f}{r['trials_per_hour']:>10.1f}"
                     f"{best:>10.4f}{default:>9.4f}{gain:>+8.4f}")
    if result.get("speedup") is not None:
        lines.append(f"concurrent vs one at a time: {result['speedup']:.2f}x trials/hour")
    best = result["runs"]["concurrent"]["best"]
    if best:
        lines.append(f"best config: {json.dumps(json.loads(best['config']), sort_keys=True)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command
def add_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``mer bench tune [--trials N] [--out DIR]``."""
    p = sub.add_parser("tune", parents=parents, help="trials/hour of a study, concurrent vs one trial at a time")
    p.add_argument("--trials", type=int, default=6, help="trials per study")
    p.add_argument("--out", default="runs/bench-tune", help="working directory")
    p.set_defaults(bench=run_command)


def run_command(cfg: MerConfig, args: argparse.Namespace) -> str:
    """The bench's table."""
    return format_bench(bench_tune(cfg, args.out, trials=args.trials))
