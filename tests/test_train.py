"""k-fold DeepSpeed training through Ray Train on 2 CPU workers, on a generated feature store.

The session's ablation (conftest: each single modality, then both fused) is trained once; the tests read its
runs (the fused one is the suite's trained run).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mer.config import LABELS
from mer.store import storage
from mer.train import load_ensemble, train_run
from mer.train.fold import checkpoint_dirs, group_name
from mer.train.run import cv_folds, label_rows

MODS = ["audio", "text"]


@pytest.fixture
def store(train_store: str) -> str:
    return train_store


@pytest.mark.slow
def test_fused_learns_and_beats_every_single_modality(ablation) -> None:
    table, _ = ablation
    assert set(table) == {"audio", "text", "fused"}
    assert table["fused"] > 0.5, table  # chance is ~1/6
    for m in ("audio", "text"):
        assert table["fused"] > table[m] + 0.05, table
        assert table[m] > 0.2, table  # each branch alone is informative


@pytest.mark.slow
def test_run_directory_contract(ablation, store: str) -> None:
    _, out = ablation
    run = out / "fused"
    for name in ("config.yaml", "metrics.json", "fold_metrics.parquet", "history.parquet", "oof.parquet",
                 "test_predictions.parquet", "confusion_matrix.png", "curves.png", "modality_weights.json",
                 "models/model.json", "models/fold_0.pt", "models/fold_1.pt"):
        assert (run / name).exists(), name
    metrics = storage.read_json(str(run / "metrics.json"))
    assert len(metrics["folds"]) == 2 and metrics["modalities"] == ["audio", "text"]
    assert 0.5 < metrics["waf"] <= 1.0 and metrics["test"]["n"] == 60
    assert metrics["test"]["waf"] == pytest.approx(ablation[0]["fused"])

    n_train = sum(1 for s in pq.read_table(store, columns=["split"]).column("split").to_pylist() if s == "train")
    oof = pq.read_table(run / "oof.parquet")
    assert oof.num_rows == n_train and set(oof.column("fold").to_pylist()) == {0, 1}
    probs = np.stack([oof.column(f"prob_{lab}").to_numpy() for lab in LABELS], axis=1)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)

    hist = pq.read_table(run / "history.parquet").to_pylist()
    assert {(r["fold"], r["epoch"]) for r in hist} == {(f, e) for f in (0, 1) for e in range(1, 9)}
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # what the workers really ran with: gloo and fp32 weights on CPU (the GPU test asks for nccl and bf16)
    assert {(r["dist_backend"], r["weights_dtype"]) for r in hist} == {("gloo", "float32")}
    fm = pq.read_table(run / "fold_metrics.parquet").to_pylist()
    assert [r["fold"] for r in fm] == [0, 1] and all(r["n_val"] + r["n_train"] == n_train for r in fm)

    weights = storage.read_json(str(run / "modality_weights.json"))
    assert set(weights["per_class"]) == set(LABELS)
    for per_mod in weights["per_class"].values():
        assert set(per_mod) == {"audio", "text"} and 0.9 < sum(per_mod.values()) <= 1.0 + 1e-5
    assert "zero_stage: 2" in (run / "config.yaml").read_text()

    # Ray Train checkpoints of the group (both folds, in turn): DeepSpeed shards of both ranks merged in one
    # directory + our state; the last holds both folds' outputs.
    ckpts = checkpoint_dirs(str(run / "ray"), group_name([0, 1]))
    assert 1 <= len(ckpts) <= 2  # checkpoints_to_keep
    last = run / "ray" / group_name([0, 1]) / ckpts[-1]
    files = {str(p.relative_to(last)) for p in last.rglob("*")}
    assert {"state.json", "fold_0/best.pt", "fold_0/val_pred.parquet", "fold_1/best.pt",
            "fold_1/val_pred.parquet"} <= files
    assert any("zero_pp_rank_1" in f for f in files) and any("zero_pp_rank_0" in f for f in files)


@pytest.mark.slow
def test_ensemble_matches_test_predictions(ablation, store: str) -> None:
    _, out = ablation
    ens = load_ensemble(str(out / "fused"))
    assert ens.modalities == ["audio", "text"] and len(ens.models) == 2
    table = pq.read_table(store)
    test = table.filter(pa.compute.equal(table.column("split"), "test"))
    p = ens.predict_proba(test)
    assert p.shape == (test.num_rows, 2, len(LABELS))
    mean = p.mean(axis=1)
    preds = pq.read_table(out / "fused" / "test_predictions.parquet")
    order = {c: i for i, c in enumerate(test.column("clip_id").to_pylist())}
    idx = [order[c] for c in preds.column("clip_id").to_pylist()]
    got = np.stack([preds.column(f"prob_{lab}").to_numpy() for lab in LABELS], axis=1)
    assert np.allclose(got, mean[idx], atol=1e-5)
    # A clip with every modality missing still gets a (finite) prediction; text-only works too.
    blank = test.slice(0, 2).drop_columns(["audio"])
    assert np.isfinite(ens.predict_proba(blank)).all()


@pytest.mark.slow
def test_resume_skips_finished_run_and_folds(trained_run: Path, store: str, train_cfg, tmp_path: Path) -> None:
    run = tmp_path / "fused"
    shutil.copytree(trained_run, run)  # the session's run stays as it is
    before = storage.read_json(str(run / "metrics.json"))
    ckpts = checkpoint_dirs(str(run / "ray"), group_name([0, 1]))
    again = train_run(train_cfg(), store, str(run), resume=True)
    assert again == before  # the finished run's record, returned as it is (its "seconds" included)
    # Without the run-level record, every fold is skipped by its own record and only reports are redone.
    (run / "metrics.json").unlink()
    redone = train_run(train_cfg(), store, str(run), resume=True)
    assert redone["skipped_folds"] == [0, 1]
    assert checkpoint_dirs(str(run / "ray"), group_name([0, 1])) == ckpts
    assert redone["test"]["waf"] == pytest.approx(before["test"]["waf"])


def test_label_table_pseudo_rows_only_train(tmp_path: Path, store: str) -> None:
    labels = pq.read_table(store, columns=["clip_id", "split", "label"]).to_pylist()
    train = [r for r in labels if r["split"] == "train"]
    test = [r for r in labels if r["split"] == "test"]
    rows = [{"clip_id": r["clip_id"], "label": r["label"], "weight": 0.5, "source": "refined", "fold": None}
            for r in train[:60]]
    rows += [{"clip_id": r["clip_id"], "label": "happy", "weight": 0.8, "source": "pseudo",
              "fold": None if i % 2 else 1} for i, r in enumerate(train[60:80])]
    rows += [{"clip_id": r["clip_id"], "label": "sad", "weight": 1.0, "source": "pseudo"} for r in test[:5]]
    rows += [{"clip_id": "not-in-store", "label": "sad", "weight": 1.0, "source": "original"}]
    uri = str(tmp_path / "labels.parquet")
    storage.write_table(uri, pa.Table.from_pylist(rows))
    cv, pseudo, _, store_train = label_rows(store, uri)
    assert cv.num_rows == 60 and np.allclose(cv.column("w").to_numpy(), 0.5)
    assert pseudo.num_rows == 20, "test-split clips never train, pseudo rows never validate"
    assert set(pseudo.column("y").to_pylist()) == {LABELS.index("happy")}
    assert pseudo.column("fold").to_pylist() == [1, None] * 10  # per-fold pseudo rows keep their fold
    # Folds come from the store's labelled train rows: a clip keeps its fold whatever the label table holds.
    all_ids = store_train.column("clip_id").to_pylist()
    every = dict(zip(all_ids, cv_folds(store_train, all_ids, 2, seed=0).tolist()))
    sizes = np.bincount(list(every.values()))
    assert sizes.sum() == len(train) and abs(int(sizes[0]) - int(sizes[1])) <= len(LABELS)
    subset = cv_folds(store_train, cv.column("clip_id").to_pylist(), 2, seed=0)
    assert subset.tolist() == [every[c] for c in cv.column("clip_id").to_pylist()]


def test_a_label_table_decided_per_fold_gives_each_fold_its_own_labels(tmp_path: Path, store: str,
                                                                         train_cfg) -> None:
    """The label loop's refinement decides every clip once per fold: fold k trains and validates on the rows
    with fold = k, a clip without one keeps its fold-free row, pseudo rows are unchanged."""
    from mer.store.parts import PartStore
    from mer.train.run import RunPlan

    labels = pq.read_table(store, columns=["clip_id", "split", "label"]).to_pylist()
    train = [r for r in labels if r["split"] == "train"]
    other = {lab: LABELS[(LABELS.index(lab) + 1) % len(LABELS)] for lab in LABELS}
    rows = [{"clip_id": r["clip_id"], "label": r["label"] if k == 0 else other[r["label"]],
             "weight": 0.9 if k == 0 else 0.4, "source": "original", "fold": k}
            for k in (0, 1) for r in train[:40]]
    rows += [{"clip_id": r["clip_id"], "label": r["label"], "weight": 1.0, "source": "original", "fold": None}
             for r in train[40:60]]
    uri = str(tmp_path / "labels.parquet")
    storage.write_table(uri, pa.Table.from_pylist(rows))
    cv, _, _, _ = label_rows(store, uri)
    assert cv.num_rows == 100 and "fold" in cv.column_names
    plan = RunPlan(train_cfg(**{"train.modalities": MODS}), PartStore.of(store), str(tmp_path / "run"),
                   resume=False, labels_uri=uri, modalities=MODS, run_name="r")
    assert sorted(plan.cv_ids) == sorted(r["clip_id"] for r in train[:60])  # one CV row per clip
    true = {r["clip_id"]: LABELS.index(r["label"]) for r in train}
    shifted = {c: (y + 1) % len(LABELS) for c, y in true.items()}
    for k, want, w in ((0, true, 0.9), (1, shifted, 0.4)):
        tr, val = plan.fold_targets(k)
        for c, (y, wt) in {**tr, **val}.items():
            if c in {r["clip_id"] for r in train[:40]}:
                assert y == want[c], (k, c)
                assert wt == pytest.approx(w if c in tr else 1.0)
            else:  # fold-free rows: the same label and weight in every fold
                assert (y, wt) == (true[c], 1.0)
        assert not set(tr) & set(val) and len(tr) + len(val) == 60
    bad = str(tmp_path / "bad.parquet")
    storage.write_table(bad, pa.Table.from_pylist([{**rows[0], "fold": 5}]))
    with pytest.raises(ValueError, match="labelled rows for folds \\[5\\]"):
        RunPlan(train_cfg(**{"train.modalities": MODS}), PartStore.of(store), str(tmp_path / "bad"),
                resume=False, labels_uri=bad, modalities=MODS, run_name="b")


def test_folds_do_not_depend_on_the_order_rows_were_committed() -> None:
    """The same labelled clips in another part order (extraction actors finishing in another order) get the
    same folds."""
    rng = np.random.default_rng(0)
    ids = [f"clip_{i:03d}" for i in range(60)]
    table = pa.table({"clip_id": ids, "y": pa.array(rng.integers(0, len(LABELS), 60), pa.int64())})
    shuffled = table.take(pa.array(rng.permutation(60)))
    in_order = dict(zip(ids, cv_folds(table, ids, 3, seed=0).tolist()))
    assert dict(zip(ids, cv_folds(shuffled, ids, 3, seed=0).tolist())) == in_order
    assert sorted(np.bincount(list(in_order.values())).tolist()) == [20, 20, 20]


@pytest.mark.gpu
def test_gpu_bf16_zero2_nccl(ray_local, store: str, train_cfg, tmp_path: Path) -> None:
    """The GPU path: NCCL process group, bf16, ZeRO-2 (one worker per GPU)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    n_gpu = min(torch.cuda.device_count(), 2)
    cfg = train_cfg(**{"train.resources.num_gpus": 1, "train.resources.concurrency": n_gpu,
                          "train.resources.dtype": "bfloat16", "train.max_epochs": 4, "train.patience": 4})
    metrics = train_run(cfg, store, str(tmp_path / "gpu"))
    assert metrics["test"]["waf"] > 0.4
    # What the workers really ran with, as each epoch's row records it: an NCCL process group and DeepSpeed's
    # bf16 weights (asking for them is not enough: a CPU fallback would still train, on gloo in fp32).
    hist = pq.read_table(tmp_path / "gpu" / "history.parquet").to_pylist()
    assert len(hist) == 2 * 4 and {r["fold"] for r in hist} == {0, 1}
    assert {(r["dist_backend"], r["weights_dtype"]) for r in hist} == {("nccl", "bfloat16")}, hist


@pytest.mark.slow
def test_parallel_folds_overlap_and_resume_the_failed_one(ray_local, store: str, train_cfg, kill_worker,
                                                          tmp_path: Path) -> None:
    """Folds as concurrent worker groups: they overlap in time; one failing fold fails the run after the
    other commits, and resume trains only the failed one."""
    # 0.1 CPU per worker: both worker groups fit beside whatever else the session's Ray holds. One worker per group:
    # what is tested is groups side by side (a group's data-parallel ranks are the suite run's, two per group).
    cfg = train_cfg(**{"train.parallel_folds": 2, "train.resources.num_cpus": 0.1, "train.max_failures": 0,
                       "train.resources.concurrency": 1,
                       "train.max_epochs": 10, "train.patience": 10})
    out = str(tmp_path / "par")
    # fold 1, rank 0 dies in epoch 2 with no retries left: the run must fail, fold 0 must still commit.
    kill = kill_worker(tmp_path / "fault.marker", in_epoch=2, rank=0, fold=1)
    import faults

    # Fold 0 waits after its first epoch until fold 1 has reached its fault, and fold 1 after its first epoch (before
    # the fault) until fold 0 has got there: on a loaded machine either group could otherwise be done, or not yet
    # up, while the other trains. Folds run in turn would fail here (each would wait for the other).
    arrived = tmp_path / "fold0.arrived"
    hold = faults.HoldFold(tmp_path / "fault.marker", fold=0, after_epoch=1, arrived=arrived)
    hold_1 = faults.HoldFold(arrived, fold=1, after_epoch=1)
    with pytest.raises(Exception, match="fold"):
        train_run(cfg, store, out, callbacks=[hold_1.callback(), kill.callback(), hold.callback()])
    assert (tmp_path / "par" / "folds" / "fold_0.json").exists()
    assert not (tmp_path / "par" / "folds" / "fold_1.json").exists()
    r0 = storage.read_json(f"{out}/folds/fold_0.json")
    # when fold 1's worker reached the fault: fold 1 was training while fold 0's worker group was
    fold1_training_at = float((tmp_path / "fault.marker").read_text().split("reached_at ")[1])
    assert r0["started_at"] < fold1_training_at < r0["finished_at"], (r0["started_at"], fold1_training_at,
                                                                        r0["finished_at"])
    metrics = train_run(cfg, store, out, resume=True)
    assert metrics["skipped_folds"] == [0]
    assert [f["fold"] for f in metrics["folds"]] == [0, 1]
    assert metrics["waf"] > 0.3, metrics["waf"]


def test_input_stats_match_numpy_over_the_chosen_rows(ray_local, store: str) -> None:
    """Run-level standardisation statistics: Ray Data reduces blocks to moments; missing vectors and rows
    outside the training ids don't count."""
    from mer.store.parts import read_dataset
    from mer.train.features import input_stats, modality_dims, table_inputs

    table = pq.read_table(store)
    ids = set(table.column("clip_id").to_pylist()[::3])
    dims = modality_dims(store, MODS)
    mean, std = input_stats(read_dataset(store, columns=MODS), MODS, dims, ids)
    rows = table.filter(pa.array([c in ids for c in table.column("clip_id").to_pylist()]))
    x, mask = table_inputs(rows, MODS, dims)
    a = x[mask[:, 0], :dims["audio"]]
    t = x[mask[:, 1], dims["audio"]:]
    np.testing.assert_allclose(mean, np.concatenate([a.mean(0), t.mean(0)]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std, np.concatenate([a.std(0), t.std(0)]), rtol=1e-3, atol=1e-5)


def test_input_stats_of_the_driver_parts_equal_ray_datas(ray_local, store: str) -> None:
    """A small store's statistics, taken on the driver over its parts (``train.driver_rows_mb``), are the ones
    Ray Data's per-block reduction gives: the same moments per part, summed alike; the model stores them as
    float32, where they are equal to the last bit."""
    from mer.store.parts import PartStore, read_dataset
    from mer.train.features import input_stats, modality_dims, table_stats

    table = pq.read_table(store)
    ids = set(table.column("clip_id").to_pylist()[::3])
    dims = modality_dims(store, MODS)
    assert len(PartStore(store).parts) > 1  # a sum over several parts, as over several blocks
    mean_r, std_r = input_stats(read_dataset(store, columns=MODS).materialize(), MODS, dims, ids)
    mean_d, std_d = table_stats(PartStore(store).iter(columns=MODS), MODS, dims, ids)
    np.testing.assert_allclose(mean_d, mean_r, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(std_d, std_r, rtol=1e-12, atol=1e-14)
    assert np.array_equal(np.float32(mean_d), np.float32(mean_r))
    assert np.array_equal(np.float32(std_d), np.float32(std_r))


@pytest.mark.slow
def test_driver_rows_train_the_run_ray_data_trains(trained_run: Path, store: str, train_cfg, tmp_path: Path
                                                   ) -> None:
    """The suite's run read its small store on the driver and handed the rows over through the object store
    (the default ``train.driver_rows_mb``); the same run through a materialised Ray Data dataset
    (``train.driver_rows_mb=0``) trains the same models to the last bit: same fold figures, out-of-fold and
    test predictions, weights and input statistics."""
    import torch

    run = tmp_path / "fused"
    metrics = train_run(train_cfg(**{"train.driver_rows_mb": 0}), store, str(run), modalities=MODS)
    before = storage.read_json(str(trained_run / "metrics.json"))
    assert before["timing"]["rows"] == "driver" and metrics["timing"]["rows"] == "ray_data"
    for key in ("folds", "waf", "cv_waf_mean", "test", "confusion"):
        got = [{k: v for k, v in f.items() if k != "seconds"} for f in metrics[key]] if key == "folds" \
            else metrics[key]
        want = [{k: v for k, v in f.items() if k != "seconds"} for f in before[key]] if key == "folds" \
            else before[key]
        assert got == want, key
    for name in ("oof.parquet", "test_predictions.parquet"):
        assert pq.read_table(run / name).equals(pq.read_table(trained_run / name)), name
    for k in (0, 1):
        a = torch.load(run / "models" / f"fold_{k}.pt", map_location="cpu", weights_only=True)
        b = torch.load(trained_run / "models" / f"fold_{k}.pt", map_location="cpu", weights_only=True)
        a, b = a.get("state_dict", a), b.get("state_dict", b)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k


def test_training_reads_each_clip_once(ray_local, store: str, tmp_path: Path) -> None:
    """A clip committed twice (two extraction runs racing) is read once, from the first part that holds it, by
    the readers training uses: the labels and folds, and the Ray Data rows the workers train on."""
    from mer.store.parts import part_files, read_dataset, write_part

    copy = str(tmp_path / "features")
    shutil.copytree(store, copy)
    first = storage.read_table(part_files(copy)[0])
    again = first.slice(0, 6).set_column(first.column_names.index("audio"), "audio",
                                          pa.nulls(6, first.schema.field("audio").type))
    write_part(copy, again, "part-zzzz-a-later-run.parquet")  # sorts (and so counts) after every other part
    n = pq.read_table(store, columns=["clip_id"]).num_rows
    rows = read_dataset(copy, columns=MODS).take_all()
    assert len(rows) == n and len({r["clip_id"] for r in rows}) == n
    kept = {r["clip_id"]: r["audio"] for r in rows}
    for cid, vec in zip(first.column("clip_id").to_pylist()[:6], first.column("audio").to_pylist()[:6]):
        assert (kept[cid] is None) == (vec is None), cid  # the first part's row, not the later copy
    cv, _, _, store_train = label_rows(copy, None)
    n_train = sum(1 for s in pq.read_table(store, columns=["split"]).column("split").to_pylist() if s == "train")
    assert cv.num_rows == store_train.num_rows == n_train
    assert len(set(cv.column("clip_id").to_pylist())) == n_train


def test_part_store_reads_plan_no_footer_reader_pool(ray_local, store: str) -> None:
    """A part store's Ray Data read plans the V1 Parquet read (Ray 2.60's default V2 read starts a pool of
    footer-reading actors per read: the costliest part of a small read) and leaves the process's choice of
    reader as it was."""
    from ray.data import DataContext

    from mer.store.parts import read_dataset

    before = DataContext.get_current().use_datasource_v2
    ds = read_dataset(store, columns=MODS).materialize()
    assert DataContext.get_current().use_datasource_v2 == before
    stats = ds.stats()
    assert "ReadParquet" in stats and "ListFiles" not in stats, stats
    assert ds.count() == pq.read_table(store, columns=["clip_id"]).num_rows
