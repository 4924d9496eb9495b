"""``mer bench fusion``: does what the system ships ever lose to its best input?

Features only (generated stores, :func:`mer.synth.feature_store.make_feature_store` with per-modality cue
strength, dimension and missing rate), in-process k-fold fitting (:mod:`mer.train.local`: the training runs'
models, loss and model selection, without Ray). For every scenario and seed it fits each single modality and
the fused models (ECMF, ``concat_mlp``) on the same folds, stacks the fused ECMF and single-modality runs
(:mod:`mer.train.meta`, nested CV), and ships what :func:`mer.train.stack.select_candidate` picks by
out-of-fold WAF. The test split is only ever scored, never used to choose.

Targets (issue 32), printed as PASS/FAIL: in every scenario the shipped mean test WAF is at least the mean of the
best single modality (per seed the single with the highest *test* WAF: the strictest reading) and no seed is
more than 2 points below its best single; where two or more modalities carry the label the shipped mean is
at least 3 points above the best single; ECMF ≥ ``concat_mlp`` where every modality is informative.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from mer.config import MerConfig, TrainConfig, with_overrides
from mer.evaluation.metrics import weighted_f1
from mer.store.parts import read_parts
from mer.synth.feature_store import make_feature_store
from mer.train.features import label_index, table_inputs
from mer.train.local import fit_local
from mer.train.meta import fit_stack, stack_fold_probs
from mer.train.run import fold_assignment
from mer.train.stack import select_candidate

MODS = ("global_visual", "face", "audio", "text")
DIM = 32
WIDE = 768

# name → (what it is, store arguments, how many modalities carry the label)
SCENARIOS: dict[str, tuple[str, dict[str, Any], int]] = {
    "all_informative": ("every modality carries the label (strength 1)", {}, 4),
    # The same at half strength: at strength 1 every fusion model is at its ceiling (test WAF ~0.997), too close to
    # tell two models apart; here a single modality reaches ~0.4 and fusion has room to differ.
    "all_weak": ("every modality carries the label at half strength (0.5)", {"strength": {m: 0.5 for m in MODS}}, 4),
    "one_strong": ("text carries it, the other three are noise (strength 0)",
                   {"strength": {"global_visual": 0.0, "face": 0.0, "audio": 0.0}}, 1),
    "strong_weak_noise": ("text strong (1), audio weak (0.5), visual and face noise (0)",
                          {"strength": {"global_visual": 0.0, "face": 0.0, "audio": 0.5}}, 2),
    "missing_30": ("every modality informative, each absent in 30 % of the rows",
                   {"missing": {m: 0.3 for m in MODS}}, 4),
    # The 768-d modality carries the same total signal as a 32-d one (per-dimension strength sqrt(32/768)):
    # the scenario is about a wide, mostly noisy vector next to narrow ones, not about a free extra signal.
    "unequal_dims": (f"every modality informative; text {WIDE}-d (same total signal), the others {DIM}-d",
                     {"dims": {"global_visual": DIM, "face": DIM, "audio": DIM, "text": WIDE},
                      "strength": {"text": math.sqrt(DIM / WIDE)}}, 4),
}
CANDIDATES = (*MODS, "ecmf", "concat_mlp", "stacked", "shipped")


def bench_config(cfg: MerConfig, folds: int) -> TrainConfig:
    """The training settings of the bench: the config's, at the generated stores' scale (the tests' small
    settings: hidden 32, lr 3e-3; batch 32 x 2 workers), ``folds`` folds, 20 epochs, patience 5."""
    return with_overrides(cfg, [f"train.folds={folds}", "train.max_epochs=20", "train.patience=5",
                                "train.hidden_dim=32", "train.num_heads=4", "train.resources.batch_size=32",
                                "train.resources.concurrency=2", "train.lr=0.003"]).train


def run_case(tc_json: dict[str, Any], scenario: str, seed: int, n: int, test_frac: float) -> dict[str, Any]:
    """One scenario and seed: every candidate's out-of-fold and test WAF, the selection, the mean modality
    weights of the fused ECMF (test rows)."""
    import torch
    from threadpoolctl import threadpool_limits

    # One thread per case, BLAS included: cases run side by side, and on a shared box idle-spinning thread
    # pools of scikit-learn's BLAS cost far more than they give.
    torch.set_num_threads(1)
    threadpool_limits(1)
    tc = TrainConfig.model_validate(tc_json)
    _, kw, _ = SCENARIOS[scenario]
    dims = dict(kw.get("dims") or {m: DIM for m in MODS})
    with tempfile.TemporaryDirectory(prefix="mer-bench-fusion-") as tmp:
        make_feature_store(os.path.join(tmp, "store"), n=n, dims=dims, seed=seed, test_frac=test_frac,
                           **{k: v for k, v in kw.items() if k != "dims"})
        table = read_parts(os.path.join(tmp, "store"))
    x, mask = table_inputs(table, list(MODS), dims)
    y = label_index(table.column("label").to_pylist())
    split = np.array(table.column("split").to_pylist())
    tr, te = split == "train", split == "test"
    fold_of = fold_assignment(y[tr], tc.folds, tc.seed)
    offsets = np.cumsum([0, *dims.values()])

    def cols(ms: list[str]) -> np.ndarray:
        return np.concatenate([np.arange(offsets[MODS.index(m)], offsets[MODS.index(m) + 1]) for m in ms])

    t0 = time.time()
    fits, test_fold_probs, present = {}, {}, {}
    settings = {m: (tc.model, [m]) for m in MODS}
    settings.update({"ecmf": ("ecmf", list(MODS)), "concat_mlp": ("concat_mlp", list(MODS))})
    for name, (arch, ms) in settings.items():
        c, j = cols(ms), [MODS.index(m) for m in ms]
        fit = fit_local(tc, arch, {m: dims[m] for m in ms}, x[tr][:, c], mask[tr][:, j], y[tr], fold_of)
        fits[name] = fit
        test_fold_probs[name], tw = fit.predict(x[te][:, c], mask[te][:, j])
        present[name] = (mask[tr][:, j].any(axis=1), mask[te][:, j].any(axis=1))
        if name == "ecmf":
            ecmf_weights = tw.mean(axis=1)
    oof = {name: f.waf(y[tr]) for name, f in fits.items()}
    test = {name: weighted_f1(y[te], p.mean(axis=1).argmax(axis=1)) for name, p in test_fold_probs.items()}

    # Stacking over what the label loop trains: the fused run (ECMF) and one run per modality.
    members = ["ecmf", *MODS]
    stack = fit_stack([fits[m].oof_probs for m in members], y[tr], fold_of, [present[m][0] for m in members])
    folds = sorted(set(fold_of.tolist()))
    st_test = stack_fold_probs(stack.metas, folds, [test_fold_probs[m] for m in members],
                               [present[m][1] for m in members])
    oof["stacked"] = stack.waf(y[tr])
    test["stacked"] = weighted_f1(y[te], st_test.mean(axis=1).argmax(axis=1))
    sel = select_candidate(("ecmf", oof["ecmf"]), ("stacked", oof["stacked"]), {m: oof[m] for m in MODS})
    oof["shipped"], test["shipped"] = oof[sel["candidate"]], test[sel["candidate"]]
    best_single = max(MODS, key=lambda m: test[m])
    present_te = mask[te]
    mean_w = {m: float(ecmf_weights[present_te[:, j], j].mean()) for j, m in enumerate(MODS)}
    return {"scenario": scenario, "seed": seed, "oof": oof, "test": test, "shipped": sel["candidate"],
            "selection": sel, "best_single": best_single, "ecmf_weights": mean_w,
            "meta_learners": {k: f"{v['kind']}:{v['reg']:g}" for k, v in stack.metas.items()},
            "seconds": round(time.time() - t0, 1), "n_train": int(tr.sum()), "n_test": int(te.sum())}


def bench_fusion(cfg: MerConfig, *, scenarios: list[str] | None = None, seeds: int = 5, n: int = 480,
                 test_frac: float = 0.4, folds: int = 3, jobs: int = 2, seed_start: int = 0) -> dict[str, Any]:
    """Run every (scenario, seed) case (``jobs`` processes at a time) and check the targets; prints the
    tables and returns the figures."""
    names = list(scenarios or SCENARIOS)
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    tc = bench_config(cfg, folds)
    t0 = time.time()
    # Seed-major: an interrupted bench has printed every scenario's first seeds.
    cases = [(s, seed) for seed in range(seed_start, seed_start + seeds) for s in names]
    args = [(tc.model_dump(mode="json"), s, seed, n, test_frac) for s, seed in cases]
    results = []
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for r in pool.map(run_case, *zip(*args)):
            results.append(r)
            print(f"[bench fusion] {r['scenario']} seed {r['seed']}: " + " ".join(
                f"{c} {r['test'][c]:.3f}" for c in CANDIDATES) + f" | ships {r['shipped']} ({r['seconds']} s)",
                flush=True)
    out = {"scenarios": {s: SCENARIOS[s][0] for s in names}, "seeds": seeds, "n": n, "test_frac": test_frac,
           "folds": folds, "cases": results, "seconds": round(time.time() - t0, 1)}
    out["summary"] = summarise(results, names)
    out["targets"] = check_targets(out["summary"], results, names)
    print(format_bench(out))
    return out


def _ms(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def summarise(results: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per scenario: mean and spread (std over seeds) of every candidate's test and OOF WAF, of the best single
    (by test), and of the fused ECMF's mean modality weights."""
    out: dict[str, Any] = {}
    for s in names:
        rs = [r for r in results if r["scenario"] == s]
        row: dict[str, Any] = {"test": {c: _ms([r["test"][c] for r in rs]) for c in CANDIDATES},
                               "oof": {c: _ms([r["oof"][c] for r in rs]) for c in CANDIDATES},
                               "best_single": _ms([r["test"][r["best_single"]] for r in rs]),
                               "weights": {m: float(np.mean([r["ecmf_weights"][m] for r in rs])) for m in MODS},
                               "shipped": [r["shipped"] for r in rs]}
        out[s] = row
    return out


def check_targets(summary: dict[str, Any], results: list[dict[str, Any]], names: list[str]) -> list[dict]:
    """Issue 32's targets, each ``{"target", "ok", "detail"}``."""
    out = []
    for s in names:
        row = summary[s]
        ship, best = row["test"]["shipped"][0], row["best_single"][0]
        out.append({"target": f"{s}: shipped mean >= best single mean", "ok": ship >= best - 1e-12,
                    "detail": f"{ship:.4f} vs {best:.4f}"})
        worst = min((r["test"]["shipped"] - r["test"][r["best_single"]], r["seed"]) for r in results
                    if r["scenario"] == s)
        out.append({"target": f"{s}: no seed more than 2 points below its best single", "ok": worst[0] >= -0.02,
                    "detail": f"worst seed {worst[1]}: {worst[0]:+.4f}"})
        if SCENARIOS[s][2] >= 2:
            out.append({"target": f"{s}: shipped mean >= best single mean + 0.03", "ok": ship >= best + 0.03 - 1e-12,
                        "detail": f"{ship - best:+.4f}"})
    for s in ("all_informative", "all_weak"):
        if s in names:
            e, c = summary[s]["test"]["ecmf"][0], summary[s]["test"]["concat_mlp"][0]
            out.append({"target": f"{s}: ECMF mean >= concat_mlp mean", "ok": e >= c - 1e-12,
                        "detail": f"{e:.4f} vs {c:.4f}"})
    return out


def format_bench(out: dict[str, Any]) -> str:
    """The scenario x candidate table (test WAF mean ± std over seeds), per seed shipped vs best single, the
    fused ECMF's mean modality weights, and the targets."""
    lines = [f"fusion bench: {out['seeds']} seeds, n={out['n']} ({out['test_frac']:.0%} test), {out['folds']} folds; "
             f"test WAF mean ± std over seeds ({out['seconds']:.0f} s)"]
    for s, what in out["scenarios"].items():
        lines.append(f"  {s}: {what}")
    head = f"{'scenario':<18}" + "".join(f"{c:>15}" for c in (*CANDIDATES, "best single"))
    lines += ["", head]
    for s, row in out["summary"].items():
        cells = [f"{m:.3f}±{sd:.3f}" for m, sd in (*(row["test"][c] for c in CANDIDATES), row["best_single"])]
        lines.append(f"{s:<18}" + "".join(f"{c:>15}" for c in cells))
    lines += ["", "out-of-fold WAF (what selection sees), mean over seeds", head[:18 + 15 * len(CANDIDATES)]]
    for s, row in out["summary"].items():
        lines.append(f"{s:<18}" + "".join(f"{row['oof'][c][0]:>15.3f}" for c in CANDIDATES))
    lines += ["", "per seed: shipped (selected by OOF WAF) vs the best single modality on test",
              f"{'scenario':<18}{'seed':>5}  {'shipped':<14}{'test':>7}  {'best single':<14}{'test':>7}{'diff':>8}"]
    for r in out["cases"]:
        ship, best = r["test"]["shipped"], r["test"][r["best_single"]]
        lines.append(f"{r['scenario']:<18}{r['seed']:>5}  {r['shipped']:<14}{ship:>7.3f}  {r['best_single']:<14}"
                     f"{best:>7.3f}{ship - best:>+8.3f}")
    lines += ["", "fused ECMF: mean modality weight on test rows where the modality is present",
              f"{'scenario':<18}" + "".join(f"{m:>15}" for m in MODS)]
    for s, row in out["summary"].items():
        lines.append(f"{s:<18}" + "".join(f"{row['weights'][m]:>15.3f}" for m in MODS))
    lines += ["", "targets (issue 32)"]
    lines += [f"{'PASS' if t['ok'] else 'FAIL'}  {t['target']} ({t['detail']})" for t in out["targets"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command
def add_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``mer bench fusion``."""
    p = sub.add_parser("fusion", parents=parents,
                       help="single modalities vs ECMF, concat_mlp, stacked and what ships, over generated scenarios")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed-start", type=int, default=0, help="first seed (split a bench over several runs)")
    p.add_argument("--scenario", action="append", default=None, choices=list(SCENARIOS),
                   help="run only these scenarios (repeatable; default every one)")
    p.add_argument("--n", type=int, default=480, help="rows per generated store (60 %% train, 40 %% test)")
    p.add_argument("--folds", type=int, default=3, help="k of the k-fold fits (3: the bench fits 25 cases x 6 models)")
    p.add_argument("--jobs", type=int, default=2, help="cases fitted at once (processes, one thread each)")
    # Features only, in-process: no Ray session is started for it.
    p.set_defaults(bench=run_command, needs_ray=False)


def run_command(cfg: MerConfig, args: argparse.Namespace) -> dict[str, Any] | None:
    """The tables are printed; ``--json`` also prints every figure."""
    out = bench_fusion(cfg, scenarios=args.scenario, seeds=args.seeds, n=args.n, folds=args.folds, jobs=args.jobs,
                       seed_start=args.seed_start)
    return out if args.json else None
