"""``mer tune`` and ``mer ensemble``: the search space's validation, a tiny study interrupted and resumed with
``Tuner.restore`` (its leaderboard, plot and best run), ensembles of finished runs and ``mer score`` on one.

The study runs as a ``mer tune`` process joined to the session's Ray head, so that it can be killed for real
(SIGKILL: its trials, and their folds' Ray Train runs, die with it) and re-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mer.config import PROB_COLUMNS, ConfigError, load_config
from mer.store import storage

from waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent


# --- search space ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, named", [
    ("tune.space.hiddn_dim=[choice, 64]", "hiddn_dim: not a train setting"),
    ("tune.space.resources.batch_sise=[choice, 8]", "resources.batch_sise: not a train setting"),
    ("tune.space.dropout=[uniform, 0.2, 1.5]", "dropout=1.5"),
    ("tune.space.lr=[choice, fast]", "lr='fast'"),
    ("tune.space.lr=[gaussian, 0.1, 0.2]", "lr: expected [sampler"),
    ("tune.space.lr=[loguniform, 0, 0.1]", "lr: loguniform needs low > 0"),
    ("tune.space.num_heads=[randint, 4, 2]", "num_heads: randint needs"),
    ("tune.train.resources.num_cpu=0.5", "resources.num_cpu: not a train setting"),
    ("tune.asha.grace=2", "tune.asha.grace: unknown key"),
])
def test_bad_search_space_fails_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert named in str(e.value)
    assert ("tune.space" in str(e.value)) or ("tune.train" in str(e.value)) or ("tune.asha" in str(e.value))


def test_search_space_samplers_default_point_and_trial_config() -> None:
    from ray import tune

    from mer.tune.space import default_point, param_space, trial_config

    cfg = load_config(overrides=["tune.space.num_layers=[randint, 1, 3]", "tune.space.model=null",
                                 "tune.space.lr=[loguniform, 1.0e-4, 1.0e-2]"])
    space = param_space(cfg.tune)
    assert "model" not in space and set(space) == set(cfg.tune.dimensions)
    assert isinstance(space["hidden_dim"], tune.search.sample.Categorical)
    assert isinstance(space["lr"].get_sampler(), tune.search.sample.LogUniform)
    assert (space["num_layers"].lower, space["num_layers"].upper) == (1, 4)  # inclusive high -> Tune's exclusive
    default = default_point(cfg)
    assert default["hidden_dim"] == cfg.train.hidden_dim and default["resources.batch_size"] == 32
    t = trial_config(cfg, {"hidden_dim": 256, "resources.batch_size": 64, "dropout": np.float64(0.3)})
    # tune.train applies under the sampled values, the rest of train stays as the file says.
    assert (t.train.hidden_dim, t.train.resources.batch_size, t.train.dropout) == (256, 64, 0.3)
    assert (t.train.parallel_folds, t.train.resources.num_cpus) == (5, 0.25)
    assert t.train.lr == cfg.train.lr
    with pytest.raises(ConfigError, match="hidden_dim"):
        trial_config(cfg, {"hidden_dim": 2})


def test_epoch_scores_wait_for_every_fold_and_keep_a_finished_folds_best() -> None:
    from mer.tune.trial import EpochScores

    s = EpochScores(folds=2)
    s.add(0, 1, 0.30, False)
    s.add(0, 2, 0.40, True)  # fold 0 stops early (patience) at epoch 2
    assert s.ready() == []  # fold 1 has not reported yet
    s.add(1, 1, 0.20, False)
    assert s.ready() == [(1, pytest.approx(0.25))]
    s.add(1, 2, 0.20, False)
    s.add(1, 3, 0.50, True)
    assert s.ready() == [(2, pytest.approx(0.30)), (3, pytest.approx(0.45))]
    assert s.ready() == []
    resumed = EpochScores(folds=1)
    resumed.add(0, 4, 0.6, False)  # a fold resumed from its epoch-3 checkpoint
    assert resumed.ready() == [(1, 0.6), (2, 0.6), (3, 0.6), (4, 0.6)]


# --- a tiny study, interrupted and resumed ----------------------------------------------------------------

SPACE_OFF = ["model", "num_heads", "num_layers", "dropout", "modality_dropout", "resources.batch_size", "patience"]
STUDY_SETS = [
    # small_config's training (tests/conftest.py train_cfg), 2 folds x 3 epochs
    "train.modalities=[audio,text]", "train.folds=2", "train.max_epochs=3", "train.patience=3",
    "train.hidden_dim=32", "train.num_heads=4", "train.resources.batch_size=16", "train.lr=0.003",
    "train.max_failures=0", "train.resources.concurrency=2", "train.poll_interval_s=0.1", "train.zero_stage=2",
    # 3 trials (the default config first) over hidden size and learning rate; each trial 2 folds at once (two
    # worker groups reporting to one trial) of one worker x 0.25 CPU: two trials share the 2-CPU head. One worker
    # per group: a second would add a process with torch and DeepSpeed to start for each of the study's ~10 groups
    # and test nothing of tuning (data-parallel workers are tests/test_train.py's).
    "tune.num_samples=3", "tune.seed=1", "tune.space.hidden_dim=[choice, 16, 32]",
    "tune.space.lr=[choice, 0.003, 0.0003]", *(f"tune.space.{k}=null" for k in SPACE_OFF),
    "tune.train={parallel_folds: 2, resources: {num_cpus: 0.25, concurrency: 1}}", "tune.asha.grace_period=1",
]


def _mer_tune(ray_head, store: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_head.address, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mer.cli", "tune", "--features", store, "--out", str(out), "--cpu",
           *(x for s in STUDY_SETS for x in ("--set", s))]
    log = open(out.parent / f"{out.name}.{int(time.time() * 1000)}.log", "w")  # noqa: SIM115 - closed by the OS
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _logs(out: Path, tail: int | None = 4000) -> str:
    return "\n".join(p.read_text(errors="replace")[-tail if tail else 0:]
                     for p in sorted(out.parent.glob(f"{out.name}.*.log")))


@pytest.fixture(scope="module")
def study(ray_local, ray_head, train_store: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny study: started, SIGKILLed once a trial has finished a fold and Tune has saved the experiment,
    then run again to the end. Returns the fold records seen before the kill and the final summary."""
    out = tmp_path_factory.mktemp("tune") / "study"
    out.mkdir()
    proc = _mer_tune(ray_head, train_store, out)

    def saved_with_a_fold() -> list[Path]:
        assert proc.poll() is None, f"the study ended (rc={proc.returncode}) before the kill:\n{_logs(out)}"
        records = list(out.glob("trials/*/folds/fold_*.json"))
        return records if records and list(out.glob("tune/study/experiment_state*.json")) else []

    records = wait_for("a finished fold and Tune's saved experiment", saved_with_a_fold, 900, every_s=0.5,
                       details=lambda: _logs(out))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Only what was committed before the kill: a record written since would be a resumed fold.
    before = {str(p): json.loads(p.read_text())["finished_at"] for p in records}
    assert not (out / "study.json").exists()
    proc = _mer_tune(ray_head, train_store, out)
    assert proc.wait(timeout=1200) == 0, _logs(out)
    return {"out": out, "before": before, "summary": json.loads((out / "study.json").read_text()),
            "log": _logs(out, tail=None)}


@pytest.mark.slow
def test_study_resumes_after_being_killed_and_ranks_its_trials(study: dict) -> None:
    out, summary = study["out"], study["summary"]
    assert "resuming study" in study["log"]  # Tuner.restore, not a new study
    board = pq.read_table(out / "leaderboard.parquet").to_pylist()
    assert len(board) == 3 and summary["trials"] == 3
    assert len({r["trial_id"] for r in board}) == 3
    # Every trial dir the killed study had started is a trial of the resumed study (same ids).
    started = {Path(p).parents[1].name for p in study["before"]}
    assert started <= {r["trial_id"] for r in board}
    # A fold committed before the kill was not trained again.
    for path, finished_at in study["before"].items():
        assert json.loads(Path(path).read_text())["finished_at"] == finished_at
    assert sum(r["is_default"] for r in board) == 1
    default = next(r for r in board if r["is_default"])
    assert json.loads(default["config"]) == {"hidden_dim": 32, "lr": 0.003}
    finished = [r for r in board if r["status"] == "finished"]
    assert finished and all(r["status"] in ("finished", "stopped") for r in board)
    # Ranked by mean fold validation WAF (finished first), with its spread, OOF WAF, time and parameters.
    assert [r["waf_mean"] for r in finished] == sorted((r["waf_mean"] for r in finished), reverse=True)
    assert [r["rank"] for r in board] == [1, 2, 3]
    # The trials trained on the study's fit service (worker groups that started once per study process).
    assert summary["fit_service"] is True
    for r in finished:
        m = json.loads((Path(r["run"]) / "metrics.json").read_text())
        assert m["timing"]["rows"] == "service"
        fold_waf = [f["val_waf"] for f in m["folds"]]
        assert r["waf_mean"] == pytest.approx(np.mean(fold_waf)) and r["waf_std"] == pytest.approx(np.std(fold_waf))
        assert r["oof_waf"] == pytest.approx(m["waf"]) and r["seconds"] > 0
        assert r["param.hidden_dim"] in (16, 32) and r["param.lr"] in (0.003, 0.0003)
    # The best finished trial as a plain run directory (no checkpoints), and the plot.
    best = out / "best"
    assert summary["best"]["trial_id"] == finished[0]["trial_id"] and summary["best"]["run"] == str(best)
    assert (best / "models" / "model.json").exists() and not (best / "ray").exists()
    assert json.loads((best / "metrics.json").read_text())["run_name"] == finished[0]["trial_id"]
    assert (out / "waf_vs_params.png").stat().st_size > 10_000
    if default["status"] == "finished":
        assert summary["gain_vs_default"] == pytest.approx(finished[0]["waf_mean"] - default["waf_mean"])


# --- ensembles --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ensemble_of_two_runs_is_no_worse_than_the_worse_and_scores(ray_local, ablation, train_cfg,
                                                                    train_store: str, tmp_path: Path) -> None:
    from mer.predict.combine import build_ensemble
    from mer.predict.score import score
    from mer.runs.layout import run_record
    from mer.store.parts import read_parts

    runs = [str(ablation[1] / "audio"), str(ablation[1] / "fused")]
    members = [json.loads((Path(r) / "metrics.json").read_text()) for r in runs]
    out = str(tmp_path / "ens")
    m = build_ensemble(runs, out, weighting="waf")
    assert [x["weight"] for x in m["members"]] == [pytest.approx(x["cv_waf_mean"]) for x in members]
    assert m["modalities"] == ["audio", "text"]
    assert m["waf"] >= min(x["waf"] for x in members)  # out of fold, on the members' folds
    assert m["test"]["waf"] >= min(x["test"]["waf"] for x in members)
    oof = storage.read_table(storage.join(out, "oof.parquet"))
    assert oof.num_rows == storage.read_table(storage.join(runs[0], "oof.parquet")).num_rows
    # Self-contained: the members' fold models were copied, and the training store's provenance (scoring checks
    # a store against it; --manifest extracts with its settings).
    assert all(Path(out, x["path"], "models", "fold_1.pt").exists() for x in m["members"])
    assert json.loads(Path(out, "models", "model.json").read_text())["features"] == run_record(runs[0]) is not None

    # mer score takes it like a run; its test rows are the ensemble's test predictions.
    res = score(train_cfg(), out, str(tmp_path / "pred"), features_uri=train_store)
    pred = read_parts(res["predictions"])
    store = read_parts(train_store, columns=["split"])
    assert pred.num_rows == store.num_rows and set(pred.column("run_id").to_pylist()) == {"ens"}
    test = storage.read_table(storage.join(out, "test_predictions.parquet")).sort_by("clip_id")
    scored = pred.filter(np.isin(pred.column("clip_id").to_numpy(zero_copy_only=False),
                                 test.column("clip_id").to_numpy(zero_copy_only=False))).sort_by("clip_id")
    for c in PROB_COLUMNS:
        np.testing.assert_allclose(scored.column(c).to_numpy(), test.column(c).to_numpy(), atol=1e-5)

    # Other folds cannot be combined fold by fold: a clear error naming the run.
    other = tmp_path / "other_folds"
    storage.copy_dir(runs[0], str(other))
    t = storage.read_table(str(other / "oof.parquet"))
    swapped = pa.array([1 - f for f in t.column("fold").to_pylist()], pa.int32())  # 2 folds: swap them
    storage.write_table(str(other / "oof.parquet"), t.set_column(t.column_names.index("fold"), "fold", swapped))
    with pytest.raises(ValueError, match="other_folds.*drew other folds"):
        build_ensemble([runs[1], str(other)], str(tmp_path / "bad"))


@pytest.mark.slow
def test_ensemble_of_a_studys_top_trials(study: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mer.cli import main

    out = tmp_path / "top"
    argv = ["ensemble", "--from-study", str(study["out"]), "--top", "2", "--weighting", "mean", "--out", str(out)]
    if study["summary"]["status_counts"]["finished"] < 2:  # ASHA stopped the others
        assert main(argv) == 2  # a user error: one line, no traceback
        assert "at least two runs" in capsys.readouterr().err
        return
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    board = [r for r in pq.read_table(study["out"] / "leaderboard.parquet").to_pylist()
             if r["status"] == "finished"][:2]
    assert [x["run"] for x in m["members"]] == [r["run"] for r in board]
    assert m["weighting"] == "mean" and all(x["weight"] == 1.0 for x in m["members"])
