"""The training folds are scikit-learn's StratifiedKFold folds, drawn without importing scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from mer.config import LABELS
from mer.train.run import fold_assignment


def _sklearn_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    # What fold_assignment computed before it drew the folds itself (the rare-class grouping included).
    counts = np.bincount(y, minlength=len(LABELS))
    strat = np.where(counts[y] >= folds, y, -1)
    out = np.zeros(len(y), dtype=np.int64)
    for k, (_, val_idx) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, strat)):
        out[val_idx] = k
    return out


@pytest.mark.filterwarnings("ignore:The least populated class")
@pytest.mark.parametrize("folds", [2, 3, 5])
def test_fold_assignment_equals_stratified_kfold(folds: int) -> None:
    rng = np.random.default_rng(0)
    cases = 0
    for n in (folds, 7, 30, 120, 241):
        for seed in range(6):
            # balanced, skewed (rare classes grouped), and one-class label vectors
            for p in (None, [0.5, 0.3, 0.1, 0.05, 0.03, 0.02], [1, 0, 0, 0, 0, 0]):
                y = rng.choice(len(LABELS), size=n, p=p)
                np.testing.assert_array_equal(fold_assignment(y, folds, seed), _sklearn_folds(y, folds, seed))
                cases += 1
    assert cases == 5 * 6 * 3


def test_fold_assignment_refuses_fewer_rows_than_folds() -> None:
    with pytest.raises(ValueError, match="2 labelled rows cannot make 3 folds"):
        fold_assignment(np.array([0, 1]), 3, 0)
