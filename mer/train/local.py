"""In-process k-fold fitting (plain PyTorch, no Ray, no DeepSpeed) for benches and tests.

The same model classes (:func:`mer.fusion.build_model`), the same objective (:meth:`FusionModel.loss`), the same
optimiser settings (AdamW with ``train.lr``/``train.weight_decay``, gradient clipping at 1, as the worker's
DeepSpeed config), the same effective batch (``batch_size`` x ``concurrency`` rows per step: the workers' data
parallel step), the same input standardisation and the same model selection (each fold keeps its best epoch by
validation WAF, patience ``train.patience``) as :mod:`mer.train.worker` — on arrays held in memory. A generated
store's hundred rows train in well under a second a fold, so ``mer bench fusion`` can fit every candidate over
many scenarios and seeds. :func:`write_run` makes a fit a run directory that ``mer score`` and
:func:`mer.train.ensemble.load_ensemble` read like a ``train_run`` output.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mer.config import LABELS, TrainConfig
from mer.evaluation.metrics import accuracy, weighted_f1
from mer.runs.layout import model_file
from mer.store import storage
from mer.train.results import prediction_table


@dataclass
class LocalFit:
    """One model's k-fold fit: out-of-fold probabilities/weights for every row, each fold's best state."""

    arch: str
    dims: dict[str, int]
    spec: dict[str, Any]
    fold_of: np.ndarray
    oof_probs: np.ndarray        # [N, C]: row i by the fold model that never trained on it
    oof_weights: np.ndarray      # [N, M]
    states: list[dict[str, Any]]  # per fold: the best epoch's state dict
    folds: list[dict[str, Any]] = field(default_factory=list)  # per fold: best_epoch, val_waf, epochs

    def waf(self, y: np.ndarray) -> float:
        """Out-of-fold WAF against ``y``."""
        return weighted_f1(y, self.oof_probs.argmax(axis=1))

    def models(self) -> list[Any]:
        """The fold models, eval mode."""
        from mer.fusion import model_from_spec

        out = []
        for st in self.states:
            m = model_from_spec(self.spec)
            m.load_state_dict(st)
            out.append(m.eval())
        return out

    def predict(self, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(probs [N, folds, C], weights [N, folds, M])`` of every fold model on new rows."""
        return predict_models(self.models(), x, mask)


def predict_models(models: list[Any], x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(probs [N, folds, C], weights [N, folds, M])`` of eval-mode models on ``x``/``mask``."""
    import torch

    xt, mt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.ascontiguousarray(mask))
    probs, weights = [], []
    with torch.no_grad():
        for m in models:
            logits, w = m(xt, mt)
            probs.append(torch.softmax(logits.float(), dim=1).numpy())
            weights.append(w.float().numpy())
    return np.stack(probs, axis=1), np.stack(weights, axis=1)


def standardise_stats(x: np.ndarray, mask: np.ndarray, dims: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean/std of the present vectors (what :func:`mer.train.features.input_stats` computes)."""
    means, stds, start = [], [], 0
    for j, d in enumerate(dims.values()):
        v = x[mask[:, j], start:start + d].astype(np.float64)
        start += d
        if len(v) == 0:
            means.append(np.zeros(d))
            stds.append(np.ones(d))
        else:
            means.append(v.mean(axis=0))
            stds.append(v.std(axis=0))
    return np.concatenate(means), np.concatenate(stds)


def fit_fold(tc: TrainConfig, arch: str, dims: dict[str, int], x: np.ndarray, mask: np.ndarray, y: np.ndarray,
             w: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, fold: int,
             stats: tuple[np.ndarray, np.ndarray] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One fold: (best state dict, record {best_epoch, val_waf, epochs, history})."""
    import torch

    from mer.fusion import build_model

    torch.manual_seed(tc.seed * 1000 + fold)  # the worker's initial-weights seed
    model = build_model(arch, dims, tc)
    if stats is not None:
        model.set_input_stats(*stats)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    torch.manual_seed(tc.seed * 1000 + fold * 10 + 1)
    xt, mt = torch.from_numpy(x), torch.from_numpy(mask)
    yt, wt = torch.from_numpy(y), torch.from_numpy(w)
    batch = tc.resources.batch_size * max(1, tc.resources.concurrency)
    rng = np.random.default_rng(tc.seed * 1000 + fold * 100)
    best_state, best_waf, best_epoch, bad, history = None, -1.0, 0, 0, []
    epoch = 0
    for epoch in range(1, tc.max_epochs + 1):
        model.train()
        order = train_idx[rng.permutation(len(train_idx))]
        loss_sum = 0.0
        for s in range(0, len(order), batch):
            idx = torch.from_numpy(order[s:s + batch])
            logits, _ = model(xt[idx], mt[idx])
            loss = model.loss(logits, yt[idx], wt[idx], tc.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            vi = torch.from_numpy(val_idx)
            pred = model(xt[vi], mt[vi])[0].argmax(dim=1).numpy()
        val_waf = weighted_f1(y[val_idx], pred)
        history.append({"epoch": epoch, "train_loss": loss_sum / max(len(order), 1), "val_waf": val_waf,
                        "val_acc": accuracy(y[val_idx], pred)})
        if val_waf > best_waf + 1e-9:
            best_waf, best_epoch, bad = val_waf, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= tc.patience:
                break
    assert best_state is not None
    return best_state, {"fold": fold, "best_epoch": best_epoch, "val_waf": best_waf, "epochs": epoch,
                        "history": history}


def fit_local(tc: TrainConfig, arch: str, dims: dict[str, int], x: np.ndarray, mask: np.ndarray, y: np.ndarray,
              fold_of: np.ndarray, w: np.ndarray | None = None) -> LocalFit:
    """k-fold fit of ``arch`` on the rows ``x``/``mask``/``y`` (fold of each row ``fold_of``, weights ``w``);
    input statistics from all the rows, as ``train_run`` takes them over its CV rows."""
    import torch

    from mer.fusion import build_model

    x = np.ascontiguousarray(x, np.float32)
    mask = np.ascontiguousarray(mask, bool)
    y = np.asarray(y, np.int64)
    w = np.ones(len(y), np.float32) if w is None else np.asarray(w, np.float32)
    stats = standardise_stats(x, mask, dims) if tc.standardize_inputs else None
    folds = sorted(set(fold_of.tolist()))
    oof_p = np.zeros((len(y), len(LABELS)), np.float32)
    oof_w = np.zeros((len(y), len(dims)), np.float32)
    states, records = [], []
    for k in folds:
        tr, va = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        state, rec = fit_fold(tc, arch, dims, x, mask, y, w, tr, va, k, stats)
        model = build_model(arch, dims, tc)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            logits, wts = model(torch.from_numpy(x[va]), torch.from_numpy(mask[va]))
        oof_p[va] = torch.softmax(logits.float(), dim=1).numpy()
        oof_w[va] = wts.float().numpy()
        states.append(state)
        records.append(rec)
    spec = build_model(arch, dims, tc).spec()
    return LocalFit(arch=arch, dims=dict(dims), spec=spec, fold_of=np.asarray(fold_of), oof_probs=oof_p,
                    oof_weights=oof_w, states=states, folds=records)


def write_run(out_uri: str, fit: LocalFit, clip_ids: list[str], y: np.ndarray, *, features_uri: str | None = None,
              features_record: dict[str, Any] | None = None, run_name: str | None = None) -> dict[str, Any]:
    """``fit`` as a run directory (``models/model.json`` + ``fold_<k>.pt``, ``oof.parquet``, ``metrics.json``),
    scorable like a ``train_run`` output; returns its metrics."""
    import torch

    spec = dict(fit.spec)
    if features_record is not None:
        spec["features"] = features_record
    storage.write_json(model_file(out_uri), spec)
    for k, st in zip(sorted(set(fit.fold_of.tolist())), fit.states):
        buf = io.BytesIO()
        torch.save(st, buf)
        storage.write_bytes(storage.join(out_uri, "models", f"fold_{k}.pt"), buf.getvalue())
    mods = list(fit.dims)
    oof = prediction_table(list(clip_ids), [LABELS[i] for i in y], fit.oof_probs, fit.oof_weights, mods,
                           extra={"fold": pa.array(fit.fold_of.astype(np.int32), pa.int32())}).sort_by("clip_id")
    storage.write_table(storage.join(out_uri, "oof.parquet"), oof)
    pred = fit.oof_probs.argmax(axis=1)
    metrics = {"model": fit.arch, "modalities": mods, "waf": weighted_f1(y, pred), "accuracy": accuracy(y, pred),
               "cv_waf_mean": float(np.mean([r["val_waf"] for r in fit.folds])),
               "folds": [{k: r[k] for k in ("fold", "val_waf", "best_epoch", "epochs")} for r in fit.folds],
               "test": None, "features": features_uri, "local": True,
               "run_name": run_name or out_uri.rstrip("/").rsplit("/", 1)[-1]}
    storage.write_json(storage.join(out_uri, "metrics.json"), metrics)
    return metrics
