"""Shared fixtures: local Ray (2 CPUs), a moto S3 server on 127.0.0.1, tiny models, generated data, and what
is expensive to make and read-only once made — a trained ablation (its fused run is the suite's trained run),
a clip set and its extracted feature store — built once per session. Tests that train, extract, or start
clusters or engines are marked ``slow``: ``make check`` runs the others, ``make test`` everything."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from waiting import wait_for

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
# The session's Ray head runs with token authentication, as the cluster recipes do. Ray reads the mode and the
# token once per process, so this process (a driver of that head) has them before anything imports Ray.
SESSION_TOKEN = secrets.token_hex(16)
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": SESSION_TOKEN})


# Session fixtures that train or extract (minutes on 2 cores). A test using one is marked `slow` (`make check`
# leaves it out); collection fails on one that is not, so the fast tier stays fast.
SLOW_FIXTURES = ("ablation", "trained_run", "extracted_store")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items if item.get_closest_marker("slow") is None
                and any(f in getattr(item, "fixturenames", ()) for f in SLOW_FIXTURES)]
    if unmarked:
        raise pytest.UsageError(f"tests using {', '.join(SLOW_FIXTURES)} must be marked slow: {unmarked}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class RayHead:
    """A ``ray start --block`` node in a process group of its own (SIGTERM to it stops exactly this node, SIGKILL
    to the group is the node lost). By default a head with 2 CPUs and its dashboard (the Jobs API); with
    ``address`` a worker node joining that head; ``env`` adds variables (e.g. Ray's health-check timings)."""

    STARTED = "Ray runtime started."

    def __init__(self, token: str, attempts: int = 3, *, num_cpus: float = 2, address: str | None = None,
                 dashboard: bool = True, env: dict[str, str] | None = None) -> None:
        self.token, self.num_cpus, self.head_address, self.extra_env = token, num_cpus, address, env or {}
        self.dashboard_on = dashboard and address is None
        # Unix socket paths must stay short, hence /tmp rather than pytest's deep tmp_path.
        self.temp_dir = tempfile.mkdtemp(prefix="mer-ray-", dir="/tmp")
        self.log_path = Path(self.temp_dir) / "node.log"
        self._log = None
        # On a loaded machine the raylet can give up waiting for its dashboard agent (a fixed 15 s in Ray,
        # ray-project/ray#65983); the node then never comes up and a fresh start usually succeeds.
        for attempt in range(attempts):
            self._start()
            if self._wait_started():
                return
            diagnostics = self.diagnostics()
            self._terminate()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        raise RuntimeError(f"ray node did not start after {attempts} attempts:\n{diagnostics}")

    def _start(self) -> None:
        gcs, dash, agent_http, agent_grpc, env_agent, metrics, node_mgr, obj_mgr, client = _free_ports(9)
        self.address = self.head_address or f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        env = dict(os.environ)
        env.update({
            # The job entrypoint's `python` must be this venv's interpreter.
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
            **self.extra_env,
        })
        for k in [k for k in env if k.startswith("AWS_")]:
            del env[k]  # the jobs get S3 settings only through their runtime_env, as on a real cluster
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--num-cpus", f"{self.num_cpus:g}", "--num-gpus", "0",
               "--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", str(agent_http),
               "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
               "--metrics-export-port", str(metrics), "--node-manager-port", str(node_mgr),
               "--object-manager-port", str(obj_mgr), "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        if self.head_address:
            cmd += ["--address", self.head_address]
        else:
            cmd += ["--head", "--port", str(gcs), "--ray-client-server-port", str(client)]
            cmd += (["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true"]
                    if self.dashboard_on else ["--include-dashboard", "false"])
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in _terminate()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def _wait_started(self, deadline_s: float = 240.0) -> bool:
        """Whether the node came up within ``deadline_s``: its log says so and its process still runs."""

        def state() -> str | None:
            if self.STARTED in self.log_path.read_text(errors="replace"):
                return "started"
            return "exited" if self.proc.poll() is not None else None

        try:
            return wait_for("the Ray node", state, deadline_s, every_s=1.0) == "started" and self.proc.poll() is None
        except TimeoutError:
            return False

    def client(self, deadline_s: float = 300.0):
        """A JobSubmissionClient once the dashboard and its job agent accept submissions."""
        from ray.job_submission import JobSubmissionClient

        headers = {"Authorization": f"Bearer {self.token}"}
        errors: list[Exception] = []

        def connect() -> JobSubmissionClient | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                c = JobSubmissionClient(self.dashboard, headers=headers)
                c.list_jobs()
                return c
            except Exception as e:  # noqa: BLE001 - not up yet
                errors.append(e)
                return None

        return wait_for(f"the Jobs API of the ray head at {self.dashboard}", connect, deadline_s, every_s=1.0,
                        details=lambda: f"last error: {errors[-1] if errors else None}")

    def diagnostics(self) -> str:
        """Head process state and the tails of its logs (for failure messages)."""
        out = [f"head alive: {self.proc.poll() is None} (rc={self.proc.returncode})"]
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        for p in [self.log_path, logs / "dashboard.log", logs / "dashboard_agent.log", logs / "raylet.out"]:
            if p.exists():
                out.append(f"--- {p.name} ---\n{p.read_text(errors='replace')[-2500:]}")
        return "\n".join(out)

    def kill(self) -> None:
        """The node lost: every process of it (raylet, object store, agents, workers) killed at once."""
        from faults import kill_tree

        kill_tree(self.proc.pid)
        self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()

    def _terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # --block: shuts down its raylet, GCS, dashboard
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything of this head's session still alive (all share its process group)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()

    def stop(self) -> None:
        """Gone, with its temp dir. Nothing of a test cluster is worth a graceful shutdown (SIGTERM to
        ``ray start --block`` takes ~30 s here)."""
        if self.proc.poll() is None:
            self.kill()
        elif self._log is not None:
            self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


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
    from mer.synth.dataset import synth_dataset

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
            "train.poll_interval_s=0.1",
        ],
    ))


@pytest.fixture(scope="session")
def ray_head(s3_server):
    """The session's one Ray cluster: a head on 127.0.0.1 with 2 CPUs, its dashboard (the Jobs API) and token
    authentication, as the cluster recipes run it. The tests drive it (``ray_local``) and submit jobs to it."""
    head = RayHead(SESSION_TOKEN)
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def ray_local(ray_head: RayHead):
    """This process as a driver of the session's Ray head.

    Joined after the S3 server started, so its workers get the AWS_* variables of the moto endpoint (through the
    job's runtime env, as a submitted job's would).
    """
    import ray

    ray.init(address=ray_head.address, log_to_driver=False,
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

    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(f"moto's server on port {port}", listening, 30, every_s=0.2)
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


# --- clips and their extracted features -------------------------------------------------------------------

@pytest.fixture(scope="session")
def clip_manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A generated clip set: 10 good clips + one of each broken input (16 clips), and its manifest."""
    import pyarrow.parquet as pq

    from mer.synth.clips import make_clip_set

    d = tmp_path_factory.mktemp("extract_clips")
    table = make_clip_set(d / "clips", n_ok=10)  # 10 good + 6 broken = 16 clips
    pq.write_table(table, d / "manifest.parquet")
    return str(d / "manifest.parquet")


@pytest.fixture(scope="session")
def synth_subset(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """The data helper's generated MER2025-layout dataset: its 6 broken clips + 4 good ones."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(synth_root / "synth_truth.csv", encoding="utf-8") as f:
        truth = {r["name"]: r["broken"] for r in csv.DictReader(f)}
    manifest = pq.read_table(synth_root / "manifest.parquet")
    pick = [c for c, k in truth.items() if k] + [c for c, k in truth.items() if not k][:4]
    sub = manifest.filter(pa.array([c in set(pick) for c in manifest["clip_id"].to_pylist()]))
    out = tmp_path_factory.mktemp("synth_subset") / "manifest.parquet"
    pq.write_table(sub, out)
    return str(out), {c: truth[c] for c in pick}


@pytest.fixture(scope="session")
def combined_manifest(clip_manifest: str, synth_subset, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The clip set and the generated subset in one manifest (26 clips, 12 of them broken)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    own = pq.read_table(clip_manifest)
    synth = pq.read_table(synth_subset[0]).select(own.column_names).cast(own.schema)
    out = tmp_path_factory.mktemp("combined") / "manifest.parquet"
    pq.write_table(pa.concat_tables([own, synth]), out)
    return str(out)


@pytest.fixture(scope="session")
def extracted_store(ray_local, tiny_config, combined_manifest: str, tmp_path_factory: pytest.TempPathFactory):
    """``(cfg, store, summary)``: every branch of the combined manifest extracted with the tiny models (parts of
    5 rows). Read-only: a test that changes a store works on a copy."""
    from mer.config import with_overrides
    from mer.extract.pipeline import extract_features

    cfg = with_overrides(tiny_config, ["extract.rows_per_part=5"])
    out = str(tmp_path_factory.mktemp("store") / "features")
    return cfg, out, extract_features(cfg, combined_manifest, out)


# --- training ---------------------------------------------------------------------------------------------

# The tiny audio and text encoders' vector sizes: runs trained on the store also score extracted clips.
TRAIN_DIMS = {"audio": 32, "text": 96}


@pytest.fixture(scope="session")
def train_cfg():
    """Small, fast training settings shared by the training tests (2 folds in turn in one worker group of 2
    DeepSpeed workers of half a CPU, 8 epochs, ZeRO-2, fp32, the demo's 0.1 s controller poll):
    ``train_cfg(**{"train.key": value})``. Worker start-up dominates a tiny fold; one group pays it once."""
    from mer.synth.feature_store import small_config

    def make(**extra: object):
        return small_config(list(TRAIN_DIMS), **{"train.zero_stage": 2, "train.parallel_folds": 1,
                                                 "train.resources.num_cpus": 0.5, **extra})

    return make


@pytest.fixture(scope="session")
def train_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A generated feature store: 240 clips (180 train, 60 test), audio and text vectors, some missing."""
    from mer.synth.feature_store import make_feature_store

    out = str(tmp_path_factory.mktemp("train_store") / "features")
    make_feature_store(out, n=240, dims=TRAIN_DIMS, seed=0, noise=2.0, missing=0.1)
    return out


@pytest.fixture(scope="session")
def ablation(ray_local, train_cfg, train_store: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Each modality alone, then both fused (``mer ablation``), each run with its own worker group (no fit service:
    the reference every other way of training is compared with): the table and its directory. Read-only."""
    from mer.train import ablation_table

    out = tmp_path_factory.mktemp("ablation")
    return ablation_table(train_cfg(**{"train.fit_service": False}), train_store, str(out)), out


@pytest.fixture(scope="session")
def trained_run(ablation) -> Path:
    """The suite's trained run (the ablation's fused one, ``train_cfg()`` on ``train_store``). Read-only: a test
    that changes a run works on a copy."""
    return ablation[1] / "fused"


@pytest.fixture(scope="session")
def kill_worker():
    """:class:`KillWorker`, shipped to Ray Train's controller by value (with the :mod:`waiting` it uses)."""
    import faults
    import ray.cloudpickle
    import waiting

    ray.cloudpickle.register_pickle_by_value(faults)
    ray.cloudpickle.register_pickle_by_value(waiting)
    return faults.KillWorker
