"""Ray Train + DeepSpeed k-fold training of the fusion models, the run's fold ensemble and the ablation."""

from __future__ import annotations

from mer.train.ablation import ablation_table, format_ablation
from mer.train.ensemble import Ensemble, load_ensemble
from mer.train.run import train_run

__all__ = ["train_run", "load_ensemble", "Ensemble", "ablation_table", "format_ablation"]
