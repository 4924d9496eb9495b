"""The k-fold ensemble of a training run, loadable without DeepSpeed or Ray (scoring, pseudo-labelling)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mer.runs.layout import model_file
from mer.store import storage
from mer.train.features import table_inputs
from mer.train.members import MemberRuns
from mer.train.meta import StackedEnsemble


@dataclass
class Ensemble:
    """Fold models of one run. ``predict_proba`` gives per-fold class probabilities ``[N, folds, 6]``."""

    spec: dict[str, Any]
    models: list[Any]
    device: str = "cpu"
    batch_size: int = 1024
    folds: list[int] = field(default_factory=list)

    @property
    def modalities(self) -> list[str]:
        return list(self.spec["modalities"])

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(self.spec["dims"][m]) for m in self.modalities}

    def predict(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """``(probs [N, folds, 6], modality weights [N, folds, M])`` for rows of a feature table.

        Modality columns the table lacks, and null or malformed vectors, count as missing modalities.
        """
        import torch


        x, mask = table_inputs(table, self.modalities, self.dims)
        n, f, m = table.num_rows, len(self.models), len(self.modalities)
        probs = np.zeros((n, f, len(self.spec["labels"])), dtype=np.float32)
        weights = np.zeros((n, f, m), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, n, self.batch_size):
                xb = torch.from_numpy(x[s:s + self.batch_size]).to(self.device)
                mb = torch.from_numpy(mask[s:s + self.batch_size]).to(self.device)
                for k, model in enumerate(self.models):
                    logits, w = model(xb, mb)
                    probs[s:s + len(xb), k] = torch.softmax(logits.float(), dim=1).cpu().numpy()
                    weights[s:s + len(xb), k] = w.float().cpu().numpy()
        return probs, weights

    def predict_proba(self, table: pa.Table) -> np.ndarray:
        """Per-fold class probabilities ``[N, folds, 6]`` (average over axis 1 for the ensemble)."""
        return self.predict(table)[0]


@dataclass
class RunsEnsemble(MemberRuns):
    """Several runs' fold ensembles as one (``mer ensemble``): fold k's probabilities are the members' fold-k
    probabilities averaged with the members' weights. A member has a say on a row only when the row holds one of
    its modalities (weights renormalised per row). Same interface as :class:`Ensemble`."""

    weights: list[float]

    def predict(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """``(probs [N, folds, 6], modality weights [N, folds, M])`` — weighted means over the members."""
        n, f, mods = table.num_rows, len(self.folds), self.modalities
        probs = np.zeros((n, f, len(self.spec["labels"])), dtype=np.float64)
        mod_w = np.zeros((n, f, len(mods)), dtype=np.float64)
        mod_norm = np.zeros((n, 1, len(mods)), dtype=np.float64)
        total = np.zeros((n, 1, 1), dtype=np.float64)
        plain = np.zeros_like(probs)
        for member, w in zip(self.members, self.weights):
            _, mask = table_inputs(table, member.modalities, member.dims)
            say = (mask.any(axis=1) * w)[:, None, None]  # [N, 1, 1]
            p, mw = member.predict(table)
            probs += say * p
            plain += p
            total += say
            cols = [mods.index(m) for m in member.modalities]
            mod_w[:, :, cols] += say * mw
            mod_norm[:, :, cols] += say
        # A row none of the members can read keeps an unweighted mean (scoring marks it no_features anyway).
        probs = np.where(total > 0, probs / np.where(total > 0, total, 1.0), plain / len(self.members))
        mod_w = np.divide(mod_w, mod_norm, out=np.zeros_like(mod_w), where=mod_norm > 0)
        return probs.astype(np.float32), mod_w.astype(np.float32)

    def predict_proba(self, table: pa.Table) -> np.ndarray:
        """Per-fold class probabilities ``[N, folds, 6]``."""
        return self.predict(table)[0]


def load_ensemble(run_uri: str, device: str = "cpu") -> Ensemble | RunsEnsemble | StackedEnsemble:
    """Load ``<run>/models/model.json`` and every ``fold_<k>.pt`` (plain torch state dicts); for a
    ``mer ensemble`` directory, each member run's fold ensemble (``members/<name>``); for a stacked run
    (:mod:`mer.train.stack`), its members and per-fold meta-learners."""
    import torch  # lazy: torch and the fusion models load only where a model is built

    from mer.fusion import model_from_spec

    spec = storage.read_json(model_file(run_uri))
    if "members" in spec:
        members = [load_ensemble(storage.join(run_uri, *m["path"].split("/")), device) for m in spec["members"]]
        if "stack" in spec:
            return StackedEnsemble(spec=spec, members=members, metas={int(k): v for k, v in spec["stack"].items()})
        return RunsEnsemble(spec=spec, members=members, weights=[float(m["weight"]) for m in spec["members"]])
    files = storage.list_files(storage.join(run_uri, "models"), ".pt")
    fold_files = sorted((int(f.rsplit("fold_", 1)[1][:-3]), f) for f in files if "fold_" in f.rsplit("/", 1)[-1])
    if not fold_files:
        raise FileNotFoundError(f"no fold models under {storage.join(run_uri, 'models')}")
    models = []
    for _, f in fold_files:
        model = model_from_spec(spec)
        model.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(f)), map_location="cpu", weights_only=True))
        model.to(device).eval()
        models.append(model)
    return Ensemble(spec=spec, models=models, device=device, folds=[k for k, _ in fold_files])
