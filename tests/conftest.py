"""Shared fixtures: local Ray (2 CPUs), a moto S3 server on 127.0.0.1, tiny models and generated data."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
# Keep every cache inside the workspace; no network beyond loopback.
for _k, _v in {
    "XDG_CACHE_HOME": str(CACHE),
    "HF_HOME": str(CACHE / "hf"),
    "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
    "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "inductor"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """Tiny random-weight models of every branch, built once per cache (saved with save_pretrained)."""
    from mer.models.tiny import build_tiny_models

    out = CACHE / "mer" / "tiny-models"
    build_tiny_models(out)
    return out


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated dataset in the MER2025 release layout (with the broken inputs)."""
    from mer.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("synth")
    synth_dataset(out, n_train=36, n_unlabeled=12, n_test=12, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_config(tiny_models_dir: Path):
    """The repo config with the tiny profile, 2-CPU local Ray and small batches, no GPU."""
    from mer.config import cpu_only, load_config

    return cpu_only(load_config(
        profile="tiny",
        overrides=[
            f"storage.tiny_models_dir={tiny_models_dir}",
            "ray.num_cpus=2",
            "extract.decode.num_frames=4",
            "extract.decode.frame_size=64",
            "extract.decode.resources.concurrency=1",
            "extract.encoders.global_visual.resources.num_cpus=0.25",
            "extract.encoders.face.resources.num_cpus=0.25",
            "extract.encoders.audio.resources.num_cpus=0.25",
            "extract.encoders.text.resources.num_cpus=0.25",
            "extract.face.resources.num_cpus=0.5",
            "extract.decode.resources.num_cpus=0.5",
            "train.resources.concurrency=2",
            "train.folds=2",
            "train.max_epochs=15",
        ],
    ))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 CPUs shared by the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k.startswith(("AWS_", "HF_", "TRANSFORMERS_", "VLLM_", "XDG_"))}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 endpoint: moto's server on 127.0.0.1, with a ``mer-test`` bucket.

    The AWS_* variables are set before Ray starts (fixtures order) so Ray workers inherit them. The
    server's log goes to ``<basetemp>/moto/server.log`` (a 500 from moto is only explained there).
    """
    moto = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="mer-test")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    log.close()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
