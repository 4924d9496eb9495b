"""Fusion models: shapes, gradients, missing-modality masking, modality dropout, metrics, rebuild from spec."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mer.config import LABELS, TrainConfig, load_config
from mer.evaluation.metrics import accuracy, confusion, per_class_f1, plot_confusion, weighted_f1
from mer.fusion import MODELS, build_model, model_from_spec
from mer.train.features import table_inputs

DIMS = {"global_visual": 8, "face": 4, "audio": 6, "text": 5}
MASK = torch.tensor([[1, 1, 1, 1],   # all present
                     [1, 0, 1, 1],   # face missing
                     [0, 0, 0, 1],   # text only
                     [0, 0, 0, 0],   # nothing present
                     [1, 1, 0, 0]], dtype=torch.bool)


def _cfg(*overrides: str) -> TrainConfig:
    base = ["train.hidden_dim=16", "train.num_heads=4", "train.dropout=0.1", "train.modality_dropout=0.0"]
    return load_config(overrides=[*base, *overrides]).train


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_and_masking(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, DIMS, _cfg())
    x = torch.randn(len(MASK), sum(DIMS.values()))
    model.train()
    logits, w = model(x, MASK)
    assert logits.shape == (5, len(LABELS)) and w.shape == (5, 4)
    assert torch.isfinite(logits).all() and torch.isfinite(w).all()
    logits.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    w = model.export_weights(x, MASK)
    assert torch.all(w[~MASK] == 0), "a missing modality must get weight 0"
    assert torch.allclose(w[MASK.any(1)].sum(1), torch.ones(4)), "weights sum to 1 over present modalities"
    assert torch.all(w[3] == 0), "a row with nothing present gets no weight anywhere"
    assert w[2, 3] == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_missing_modality_values_are_ignored(name: str) -> None:
    """Whatever sits in a masked modality's slot cannot change the prediction."""
    torch.manual_seed(1)
    model = build_model(name, DIMS, _cfg()).eval()
    x = torch.randn(5, sum(DIMS.values()))
    x2 = x.clone()
    x2[:, 8:12] = 1000.0  # the face slot; face is missing in rows 1, 2, 3
    a, _ = model(x, MASK)
    b, _ = model(x2, MASK)
    assert torch.allclose(a[1:4], b[1:4], atol=1e-5)
    assert not torch.allclose(a[0], b[0])


def test_ecmf_weights_are_dynamic_and_rebuild_from_spec() -> None:
    torch.manual_seed(2)
    model = build_model("ecmf", DIMS, _cfg()).eval()
    x = torch.randn(5, sum(DIMS.values()))
    full = torch.ones(5, 4, dtype=torch.bool)
    w = model.export_weights(x, full)
    assert not torch.allclose(w[0], w[1]), "ECMF weights depend on the clip"
    clone = model_from_spec(model.spec())
    clone.load_state_dict(model.state_dict())
    clone.eval()
    assert torch.allclose(clone(x, full)[0], model(x, full)[0])
    assert model.spec()["modalities"] == list(DIMS) and model.spec()["labels"] == list(LABELS)
    # one slot per modality for the head; a spec written before slots rebuilds (and loads) the summed head
    h = model.spec()["hidden_dim"]
    assert model.spec()["slots"] and model.head[0].in_features == h * len(DIMS)
    old = model_from_spec({k: v for k, v in model.spec().items() if k != "slots"})
    assert not old.slots and old.head[0].in_features == h
    assert torch.isfinite(old.eval()(x, full)[0]).all()


def test_modality_dropout_never_drops_all() -> None:
    torch.manual_seed(3)
    model = build_model("ecmf", DIMS, _cfg("train.modality_dropout=0.9")).train()
    mask = torch.rand(2000, 4) > 0.3
    mask[0] = False
    dropped = model.drop_modalities(mask)
    assert not (dropped & ~mask).any(), "dropout never adds a modality"
    assert (dropped.any(1) == mask.any(1)).all(), "a row with something present keeps at least one"
    assert dropped.sum() < 0.5 * mask.sum(), "most present modalities were dropped at p=0.9"
    assert torch.equal(model.eval().drop_modalities(mask), mask)


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown fusion model"):
        build_model("transformer9000", DIMS, _cfg())
    with pytest.raises(ValueError, match="divisible"):
        build_model("ecmf", DIMS, _cfg("train.hidden_dim=18"))


def test_table_inputs_nulls_and_bad_vectors() -> None:
    t = pa.table({"audio": pa.array([[1.0, 2.0], None, [1.0], [float("nan"), 0.0]], pa.list_(pa.float32()))})
    x, mask = table_inputs(t, ["audio", "text"], {"audio": 2, "text": 3})
    assert x.shape == (4, 5)
    assert mask.tolist() == [[True, False], [False, False], [False, False], [False, False]]
    assert x[0, :2].tolist() == [1.0, 2.0] and not x[1:].any()


def test_metrics(tmp_path) -> None:
    y = [0, 0, 1, 1, 2, 2, 2, 3]
    p = [0, 1, 1, 1, 2, 2, 0, -1]
    assert accuracy(y, p) == pytest.approx(5 / 8)
    f1 = per_class_f1(y, p)
    assert f1["neutral"] == pytest.approx(0.5) and f1["angry"] == pytest.approx(0.8)
    assert f1["happy"] == pytest.approx(0.8) and f1["sad"] == 0.0
    assert weighted_f1(y, p) == pytest.approx((2 * 0.5 + 2 * 0.8 + 3 * 0.8 + 0) / 8)
    assert weighted_f1(y, y) == 1.0
    cm = confusion(y, p)
    assert cm.shape == (6, 6) and cm.sum() == 7 and cm[2, 0] == 1
    out = plot_confusion(cm, str(tmp_path / "cm.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert np.isclose(weighted_f1([], []), 0.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_input_standardisation_is_applied_and_saved(name: str) -> None:
    """Inputs with a large shared offset and scale give the same outputs as standardised inputs once the
    statistics are set, and the statistics travel with the state dict (scoring uses them)."""
    torch.manual_seed(0)
    total = sum(DIMS.values())
    mean, std = torch.linspace(-5, 5, total), torch.linspace(0.1, 3.0, total)
    z = torch.randn(len(MASK), total)
    plain = build_model(name, DIMS, _cfg()).eval()
    shifted = model_from_spec(plain.spec())
    shifted.load_state_dict(plain.state_dict())
    shifted.set_input_stats(mean.tolist(), std.tolist())
    shifted.eval()
    # missing vectors are zeros in the input layout whatever the statistics: the mask hides them
    x = torch.where(MASK.repeat_interleave(torch.tensor(list(DIMS.values())), dim=1), z * std + mean, 0.0)
    z_masked = torch.where(MASK.repeat_interleave(torch.tensor(list(DIMS.values())), dim=1), z, 0.0)
    with torch.no_grad():
        assert torch.allclose(shifted(x, MASK)[0], plain(z_masked, MASK)[0], atol=1e-4)
        assert not torch.allclose(plain(x, MASK)[0], plain(z_masked, MASK)[0], atol=1e-2)
    again = model_from_spec(plain.spec())
    again.load_state_dict(shifted.state_dict())
    assert torch.allclose(again.in_mean, mean) and torch.allclose(again.in_scale, 1 / std)
    with pytest.raises(ValueError, match="input stats"):
        again.set_input_stats([0.0], [1.0])
