"""The ``mer`` command as a new user types it: no ``--cpu``, no ``--set``, a local Ray mer starts itself.

synth → import → extract → train → score → evaluate, each a fresh process on this 2-CPU machine (the default
config asks for 8 CPUs of actor pools and GPU encoders: auto-fit must make it run), a short console whose full
logs are in ``<out>/logs``, and known errors as one ``mer: …`` line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
MER = [sys.executable, "-m", "mer.cli"]

pytestmark = pytest.mark.timeout(1800)


def user_env() -> dict[str, str]:
    # A user's shell: no Ray address (mer starts its own local Ray), offline model cache of the repo.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "XDG_CACHE_HOME": str(REPO / ".cache")})
    return env


def mer(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*MER, *args], cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=1500)
    if ok:
        assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("plain")
    data, manifest = root / "data", root / "manifest.parquet"
    out = {"root": root}
    out["synth"] = mer("data", "synth", "--out", str(data), "--n-train", "20", "--n-unlabeled", "4", "--n-test", "10")
    out["import"] = mer("data", "import-mer2025", "--root", str(data), "--out", str(manifest),
                        "--test-labels", str(data / "test_labels.csv"))
    out["extract"] = mer("extract", "--profile", "tiny", "--manifest", str(manifest), "--out", str(root / "features"))
    out["train"] = mer("train", "--profile", "tiny", "--features", str(root / "features"), "--out", str(root / "run"))
    out["score"] = mer("score", "--profile", "tiny", "--run", str(root / "run"), "--features",
                       str(root / "features"), "--out", str(root / "scores"))
    out["evaluate"] = mer("evaluate", "--pred", str(root / "scores"), "--labels", str(data / "test_labels.csv"))
    return out


def test_the_plain_chain_runs_on_a_two_cpu_machine(chain: dict) -> None:
    root = chain["root"]
    fitted = chain["extract"].stderr
    assert "local Ray: no GPU: every stage on CPU" in fitted and "fractional CPUs" in fitted
    from mer.store.parts import read_parts

    assert read_parts(str(root / "features")).num_rows == 34  # 20 + 4 + 10, every clip once
    assert (root / "run" / "models" / "model.json").exists() and (root / "run" / "report.html").exists()
    preds = read_parts(str(root / "scores" / "predictions"))
    assert preds.num_rows == 34
    report = chain["evaluate"].stdout
    assert "scored 10 of 10 labelled clips" in report and "WAF" in report


def test_the_console_is_short_and_the_logs_are_in_the_output(chain: dict) -> None:
    root = chain["root"]
    ext = chain["extract"]
    lines = (ext.stdout + ext.stderr).splitlines()
    assert len(lines) <= 25, lines
    text = "\n".join(lines)
    assert "extract: 34/34 rows" in text  # the stream's progress line, final form
    for noise in ("Operator 1", "Execution plan", "Started a local Ray instance", "Dataset throughput"):
        assert noise not in text
    assert f"logs: {root / 'features' / 'logs' / 'mer.log'}" in text
    assert (root / "features" / "logs" / "mer.log").stat().st_size > 0
    tr = chain["train"]
    assert len((tr.stdout + tr.stderr).splitlines()) <= 25
    workers = (root / "run" / "logs" / "ray-workers.log").read_text()
    assert workers.strip()  # the workers' own output (Ray Train, DeepSpeed) went to the file
    for noise in ("DeepSpeed", "deepspeed"):
        assert noise not in tr.stderr


def test_known_errors_are_one_line_naming_the_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"clip_id": ["a"], "text": ["hi"]}), bad)
    cases = {
        "manifest": (["extract", "--manifest", str(bad), "--out", str(tmp_path / "f")], str(bad)),
        "config": (["config", "show", "--set", "train.no_such_key=1"], "train.no_such_key"),
        "run": (["score", "--run", str(tmp_path), "--features", str(tmp_path), "--out", str(tmp_path / "s")],
                "is not a training run"),
        "store": (["train", "--features", str(tmp_path / "nostore"), "--out", str(tmp_path / "r")],
                  str(tmp_path / "nostore")),
        "pred": (["evaluate", "--pred", str(tmp_path / "nopred"), "--labels", str(bad)], str(tmp_path / "nopred")),
    }
    for name, (args, needle) in cases.items():
        proc = mer(*args, ok=False)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mer: ")]
        assert len(err_lines) == 1 and needle in proc.stderr, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
