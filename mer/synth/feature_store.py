"""A generated feature store for tests, benchmarks and development (no extraction needed).

Each branch sees the class only through a pairing: classes are grouped in pairs (a different pairing per
branch) and a branch's vector carries a strong signal of the pair plus a weak signal of the class, under
Gaussian noise. A single branch therefore confuses the two classes of its pairs (well above chance, far
from perfect) while the branches together disambiguate every pair — so fusion must beat every single
modality. Some vectors are null (missing modality, with a ``<branch>_status`` saying why).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from mer.config import LABELS, MerConfig, load_config
from mer.store import storage

DEFAULT_DIMS = {"global_visual": 32, "face": 24, "audio": 16, "text": 24}
_MISSING_STATUS = {"global_visual": "decode_error", "face": "no_face", "audio": "no_audio", "text": "empty_text",
                   "text_enriched": "empty_text"}


def _pairings(branches: list[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """class → pair id per branch, from a 1-factorisation of K6: the pairings of different branches share
    no pair, so any two branches together tell every pair of classes apart."""
    c = len(LABELS)
    matchings = [[(c - 1, r), ((r + 1) % (c - 1), (r + c - 2) % (c - 1)), ((r + 2) % (c - 1), (r + 3) % (c - 1))]
                 for r in range(c - 1)]
    perm = rng.permutation(c)
    order = rng.permutation(len(matchings))
    out: dict[str, np.ndarray] = {}
    for j, b in enumerate(branches):
        group = np.empty(c, dtype=np.int64)
        for g, (a, b2) in enumerate(matchings[order[j % len(matchings)]]):
            group[perm[a]] = group[perm[b2]] = g
        out[b] = group
    return out


def make_feature_store(uri: str, n: int = 240, dims: dict[str, int] | None = None, seed: int = 0,
                       noise: float = 1.0, *, missing: float | dict[str, float] = 0.1, test_frac: float = 0.25,
                       unlabeled_frac: float = 0.0, class_signal: float = 0.3, label_noise: float = 0.0,
                       strength: dict[str, float] | None = None, rows_per_part: int = 64) -> dict:
    """Write a synthetic feature store (Parquet parts + ``_meta.json``) to ``uri``; returns a summary.

    ``n`` rows split into ``test`` (labelled), ``unlabeled`` (label null) and ``train``; ``missing`` is the
    chance that one branch's vector is null (one figure for every branch, or per branch; a row always keeps
    at least one branch). ``label_noise``: the fraction of ``train`` labels replaced by another class
    (annotator noise; features keep the true class). The same arguments with ``label_noise=0`` regenerate
    the true labels. ``strength``: per-branch cue strength, the factor on the branch's label signal (pair and
    class prototypes) against its unit noise: 1 (the default for a branch not named) is the generator's usual
    signal, 0 a branch that carries no label at all (a broken camera, a silent room). Random draws do not
    depend on ``strength`` or ``missing``, so the defaults write exactly the store they always wrote.
    """
    dims = dict(dims or DEFAULT_DIMS)
    branches = list(dims)
    unknown = sorted(set(strength or {}) - set(branches)) + (sorted(set(missing) - set(branches))
                                                           if isinstance(missing, dict) else [])
    if unknown:
        raise ValueError(f"strength/missing name branches {unknown} not in dims {branches}")
    strength = {b: float((strength or {}).get(b, 1.0)) for b in branches}
    miss = (np.array([float(missing.get(b, 0.1)) for b in branches]) if isinstance(missing, dict)
            else float(missing))
    rng = np.random.default_rng(seed)
    c = len(LABELS)
    y = rng.integers(0, c, size=n)
    groups = _pairings(branches, rng)
    n_test, n_unl = int(round(n * test_frac)), int(round(n * unlabeled_frac))
    split = np.array(["test"] * n_test + ["unlabeled"] * n_unl + ["train"] * (n - n_test - n_unl))
    rng.shuffle(split)

    present = rng.random((n, len(branches))) >= miss
    empty = ~present.any(axis=1)
    present[empty, rng.integers(0, len(branches), size=int(empty.sum()))] = True

    # Flips draw from their own generator so that the features do not depend on label_noise.
    shown = y.copy()
    train_rows = np.flatnonzero(split == "train")
    flip_rng = np.random.default_rng([seed, 1])
    flipped = flip_rng.choice(train_rows, size=int(round(label_noise * len(train_rows))), replace=False)
    shown[flipped] = (y[flipped] + flip_rng.integers(1, c, size=len(flipped))) % c

    cols: dict[str, pa.Array] = {
        "clip_id": pa.array([f"synth_{i:05d}" for i in range(n)]),
        "split": pa.array(split.tolist()),
        "label": pa.array([LABELS[k] if s != "unlabeled" else None for k, s in zip(shown, split)], pa.string()),
    }
    errors: list[list[str]] = [[] for _ in range(n)]
    for j, b in enumerate(branches):
        d = dims[b]
        pair_proto = rng.normal(size=(c // 2, d)).astype(np.float32)
        class_proto = rng.normal(size=(c, d)).astype(np.float32)
        signal = pair_proto[groups[b][y]] + class_signal * class_proto[y]
        if strength[b] != 1.0:  # x1.0 would round identically; skipped to keep the default path as it was
            signal = strength[b] * signal
        vec = signal + noise * rng.normal(size=(n, d))
        vec = vec.astype(np.float32)
        values = [v.tolist() if ok else None for v, ok in zip(vec, present[:, j])]
        cols[b] = pa.array(values, pa.list_(pa.float32()))
        cols[f"{b}_status"] = pa.array(["ok" if ok else _MISSING_STATUS.get(b, "error") for ok in present[:, j]])
        for i in np.flatnonzero(~present[:, j]):
            errors[i].append(f"{b}: {_MISSING_STATUS.get(b, 'error')}")
    cols["status"] = pa.array(["ok" if p.all() else "partial" for p in present])
    cols["error"] = pa.array(["; ".join(e) if e else None for e in errors], pa.string())
    cols["config_hash"] = pa.array(["synthetic"] * n)
    cols["model_ids"] = pa.array([json.dumps({b: "synthetic" for b in branches})] * n)
    table = pa.table(cols)

    for k, start in enumerate(range(0, n, rows_per_part)):
        storage.write_table(storage.join(uri, f"part-{k:05d}.parquet"), table.slice(start, rows_per_part))
    meta = {"synthetic": True, "n": n, "dims": dims, "seed": seed, "noise": noise, "missing": missing,
            **({"strength": strength} if any(v != 1.0 for v in strength.values()) else {}),
            "label_noise": label_noise, "flipped": int(len(flipped)),
            "branches": branches, "splits": {s: int((split == s).sum()) for s in ("train", "unlabeled", "test")}}
    storage.write_json(storage.join(uri, "_meta.json"), meta)
    return {"uri": uri, **meta}


def small_config(modalities: list[str] | None = None, **overrides: object) -> MerConfig:
    """The repo config with small, fast training settings (2 workers x 1 CPU, 2 folds, 8 epochs, the demo's
    0.1 s controller poll) for tests, benchmarks and the synthetic store; ``overrides`` are dotted keys
    (``train.max_epochs=4``)."""
    base: dict[str, object] = {
        "train.resources.concurrency": 2, "train.folds": 2, "train.max_epochs": 8, "train.patience": 8,
        "train.hidden_dim": 32, "train.num_heads": 4, "train.resources.batch_size": 16, "train.lr": 0.003,
        "train.max_failures": 0, "train.resources.num_cpus": 1, "train.resources.num_gpus": 0,
        "train.poll_interval_s": 0.1,
    }
    if modalities:
        base["train.modalities"] = "[" + ",".join(modalities) + "]"
    base.update(overrides)
    return load_config(overrides=[f"{k}={v}" for k, v in base.items()])
