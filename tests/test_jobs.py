"""``ray job submit`` end to end: the session's Ray head on 127.0.0.1 (conftest: ``ray start --head`` with
token auth, the one every test uses), jobs submitted through the Jobs API, all storage (manifest, videos,
features, run, predictions) on a moto S3 server.

extract → train → score run as three jobs (``python -m jobs.<name>``) with a working_dir upload of the
repository, exactly as ``ray job submit --working-dir . -- python -m jobs.train ...`` does on a cluster.
"""

from __future__ import annotations

import secrets
import shlex
from pathlib import Path

import pytest

from waiting import wait_for

# make check leaves the module out: three submitted jobs each (extract/train/score, tune/ensemble/score) on S3
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "s3://mer-test"
PREFIX = f"{BUCKET}/jobs-e2e"
# The same small-machine overrides as the `tiny_config` fixture (2 CPUs in all, no GPU).
TINY_SETS = [
    "extract.decode.num_frames=4",
    "extract.decode.frame_size=64",
    "extract.decode.resources.concurrency=1",
    "extract.decode.resources.num_cpus=0.5",
    "extract.face.resources.num_cpus=0.5",
    "extract.encoders.global_visual.resources.num_cpus=0.25",
    "extract.encoders.face.resources.num_cpus=0.25",
    "extract.encoders.audio.resources.num_cpus=0.25",
    "extract.encoders.text.resources.num_cpus=0.25",
    "train.resources.concurrency=2",
    "train.resources.num_cpus=0.5",
    "train.parallel_folds=1",
    "train.folds=2",
    "train.max_epochs=3",
    "train.patience=2",
    "train.poll_interval_s=0.1",
    "score.resources.num_cpus=0.5",
]


def _submit_and_wait(head, client, entrypoint: list[str], env_vars: dict[str, str],
                     deadline_s: float = 900.0) -> str:
    """Submit one job with the repo as working_dir, wait for a terminal state, return its logs."""
    try:
        return _run_job(client, entrypoint, env_vars, deadline_s)
    except (ConnectionError, OSError, RuntimeError) as e:
        pytest.fail(f"job {' '.join(entrypoint[:3])}: {e!r}\n{head.diagnostics()}")


def _run_job(client, entrypoint: list[str], env_vars: dict[str, str], deadline_s: float) -> str:
    from ray.job_submission import JobStatus

    runtime_env = {"working_dir": str(ROOT), "env_vars": env_vars,
                   "excludes": [".git", ".venv", ".cache", "/runs", "tests", "*.png"]}
    def submit() -> str | None:
        try:
            return client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env)
        except RuntimeError as e:  # "No available agent to submit job" while the head warms up
            if "agent" not in str(e):
                raise
            return None

    sub_id = wait_for("a job agent taking the submission", submit, 120, every_s=2.0)

    def ended() -> JobStatus | None:
        status = client.get_job_status(sub_id)
        return status if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) else None

    try:
        status = wait_for(f"job {' '.join(entrypoint[:3])} to end", ended, deadline_s, every_s=2.0)
    except TimeoutError:
        client.stop_job(sub_id)
        status = client.get_job_status(sub_id)
    logs = client.get_job_logs(sub_id)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(sub_id)
        pytest.fail(f"job {' '.join(entrypoint[:3])} ended {status}: {info.message}\n--- logs ---\n{logs[-8000:]}")
    return logs


def _s3_keys(fs, prefix: str) -> list[str]:
    return [p for p in fs.find(prefix.removeprefix("s3://"))]


def _upload_dataset(synth: dict, fs) -> tuple[str, list[str]]:
    """Videos to the bucket, then the manifest rewritten to their s3:// URIs and written there too."""
    import pyarrow as pa

    from mer.data.manifest import read_manifest, write_manifest

    manifest = read_manifest(synth["manifest"])
    uris = []
    for local in manifest.column("video_uri").to_pylist():
        uri = f"{PREFIX}/data/video/{Path(local).name}"
        if Path(local).exists():  # the synth's "missing_video" row stays missing on S3 too
            fs.put(local, uri.removeprefix("s3://"))
        uris.append(uri)
    idx = manifest.column_names.index("video_uri")
    manifest = manifest.set_column(idx, "video_uri", pa.array(uris, pa.string()))
    uri = f"{PREFIX}/data/manifest.parquet"
    write_manifest(manifest, uri)
    return uri, manifest.column("clip_id").to_pylist()


def test_jobs_extract_train_score_on_s3(ray_head, s3_server, tiny_models_dir, tmp_path):
    """Three submitted jobs read and write only s3://, and leave features, fold models and predictions."""
    from mer.store import storage
    from mer.synth.dataset import synth_dataset

    client = ray_head.client()
    synth = synth_dataset(tmp_path / "synth", n_train=8, n_unlabeled=2, n_test=4, seed=3, seconds=1.0,
                          size=96, fps=8)
    fs = storage.s3fs_filesystem()
    manifest_uri, clip_ids = _upload_dataset(synth, fs)
    assert len(clip_ids) == 14

    # A credential that must never appear in a job's output (moto accepts any).
    secret = f"mer-secret-{secrets.token_hex(8)}"
    env_vars = {
        "AWS_ACCESS_KEY_ID": "mer-test-key", "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server,
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "XDG_CACHE_HOME": str(ROOT / ".cache"), "RAY_USAGE_STATS_ENABLED": "0",
    }
    common = ["--profile", "tiny", "--cpu", "--set", f"storage.tiny_models_dir={tiny_models_dir}",
              *[a for s in TINY_SETS for a in ("--set", s)]]
    features, run, pred = f"{PREFIX}/features", f"{PREFIX}/run", f"{PREFIX}/pred"

    logs = _submit_and_wait(ray_head, client, ["python", "-m", "jobs.extract", "--config", "ray_config.yaml",
                                     "--manifest", manifest_uri, "--out", features, *common], env_vars)
    assert "resolved config" in logs and secret not in logs
    assert "AWS_SECRET_ACCESS_KEY': 'set'" in logs  # presence is logged, never the value
    cols = ["clip_id", "status", "global_visual_status", "audio_status", "text_status"]
    store = storage.read_table(features, columns=cols).to_pylist()
    assert sorted(r["clip_id"] for r in store) == sorted(clip_ids)  # exactly once per clip
    broken = set(synth["broken"].values())
    good = [r for r in store if r["clip_id"] not in broken]
    # Videos were decoded from S3: every intact clip has its scene, audio and text vectors.
    assert all(r["global_visual_status"] == r["audio_status"] == r["text_status"] == "ok" for r in good), good
    zero = next(r for r in store if r["clip_id"] == synth["broken"]["zero_byte"])
    assert zero["status"] != "ok" and zero["global_visual_status"] != "ok"  # a per-row status, no crash

    logs = _submit_and_wait(ray_head, client, ["python", "-m", "jobs.train", "--config", "ray_config.yaml",
                                     "--features", features, "--out", run, *common], env_vars)
    assert secret not in logs
    metrics = storage.read_json(f"{run}/metrics.json")
    assert metrics  # written by the run
    keys = _s3_keys(fs, run)
    assert any(k.endswith("models/fold_0.pt") for k in keys) and any(k.endswith("models/fold_1.pt") for k in keys)
    assert any(k.endswith("models/model.json") for k in keys)
    assert any(k.endswith("oof.parquet") for k in keys)

    logs = _submit_and_wait(ray_head, client, ["python", "-m", "jobs.score", "--config", "ray_config.yaml",
                                     "--run", run, "--features", features, "--out", pred, *common], env_vars)
    assert secret not in logs
    preds = storage.read_table(f"{pred}/predictions")
    ids = preds.column("clip_id").to_pylist()
    assert sorted(ids) == sorted(clip_ids)  # one row per clip, the broken ones with their status
    ok = [s == "ok" for s in preds.column("status").to_pylist()]
    assert sum(ok) >= 10
    probs = [sum(row) for row in zip(*(preds.column(c).to_pylist() for c in preds.column_names
                                       if c.startswith("prob_"))) if None not in row]
    assert probs and all(abs(p - 1.0) < 1e-3 for p in probs)
    with fs.open(f"{pred}/submission.csv".removeprefix("s3://"), "rb") as f:
        lines = f.read().decode().strip().splitlines()
    assert lines[0].split(",") == ["name", "discrete"]
    assert sorted(line.split(",")[0] for line in lines[1:]) == sorted(clip_ids)


def test_jobs_tune_ensemble_score_on_s3(ray_head, s3_server, train_store: str):
    """A study, an ensemble of its two best trials and scoring with it, as three submitted jobs on s3:// only:
    Tune's experiment, the trials' runs, the leaderboard and ``best/`` live in the bucket."""
    import pyarrow.parquet as pq
    from test_tune import STUDY_SETS  # the suite's tiny study (2 folds x 3 epochs of small_config)

    from mer.store import storage

    client = ray_head.client()
    root = f"{BUCKET}/jobs-tune"
    features, study, ens, pred = (f"{root}/{p}" for p in ("features", "study", "ens", "pred"))
    storage.copy_dir(train_store, features)
    env_vars = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server, "RAY_USAGE_STATS_ENABLED": "0"}
    # Two trials, no early stopping: both finish, so the ensemble has its two members whatever ASHA would do.
    # One worker per trial (a fold group of one): 2 trials start 2 DeepSpeed workers on the 2-CPU head, not 8
    # (2-worker ZeRO-2 on S3 is trained by the extract/train/score jobs test).
    sets = [*STUDY_SETS, "tune.num_samples=2", "tune.asha.enabled=false",
            "tune.train={parallel_folds: 1, resources: {num_cpus: 0.25, concurrency: 1}}"]
    common = ["--config", "ray_config.yaml", "--cpu", *[a for s in sets for a in ("--set", s)]]

    logs = _submit_and_wait(ray_head, client, ["python", "-m", "jobs.tune", "--features", features, "--out", study,
                                               *common], env_vars, deadline_s=1200)
    assert "resolved config" in logs
    summary = storage.read_json(f"{study}/study.json")
    assert summary["trials"] == 2 and summary["status_counts"]["finished"] == 2
    fs, path = storage.filesystem(f"{study}/leaderboard.parquet")
    board = pq.read_table(path, filesystem=fs).to_pylist()
    assert [r["rank"] for r in board] == [1, 2] and all(r["run"].startswith(f"{study}/trials/") for r in board)
    assert storage.exists(f"{study}/best/models/model.json") and storage.exists(f"{study}/waf_vs_params.png")
    assert storage.exists(f"{study}/tune/study")  # Tune's experiment state (what a resume restores), in the bucket

    _submit_and_wait(ray_head, client, ["python", "-m", "jobs.ensemble", "--from-study", study, "--top", "2",
                                        "--out", ens, *common], env_vars)
    members = storage.read_json(f"{ens}/metrics.json")["members"]
    assert [m["run"] for m in members] == [r["run"] for r in board]

    _submit_and_wait(ray_head, client, ["python", "-m", "jobs.score", "--run", ens, "--features", features,
                                        "--out", pred, *common], env_vars)
    from mer.store.parts import read_parts

    assert read_parts(f"{pred}/predictions").num_rows == read_parts(features, columns=[]).num_rows
