"""No silent train/serve skew: a run records its store's extraction settings; scoring a store with another config
hash refuses (naming the differing keys) unless allowed; scoring raw videos extracts with the run's settings."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from mer.config import load_config, with_overrides
from mer.extract import schema
from mer.extract.schema import FeatureConfigMismatch
from mer.runs.provenance import check_store, extraction_config, store_record
from mer.store import storage


def _run_with_record(root: Path, record: dict | None) -> str:
    """A run directory whose ``models/model.json`` holds only the provenance record (what the checks read)."""
    spec: dict = {"arch": "ecmf"}
    if record is not None:
        spec["features"] = record
    storage.write_json(str(root / "run" / "models" / "model.json"), spec)
    return str(root / "run")


def _store(root: Path, cfg) -> str:
    uri = str(root / "store")
    schema.ensure_meta(cfg, uri)
    return uri


def test_feature_settings_reproduce_the_hash_and_keep_the_rest() -> None:
    trained = load_config(profile="tiny", overrides=["extract.decode.num_frames=4", "extract.face.margin=0.1",
                                                     "enrich.enabled=true", "enrich.compose=replace"])
    serving = load_config(overrides=["extract.decode.resources.concurrency=7", "score.rows_per_part=5"])
    assert schema.config_hash(serving) != schema.config_hash(trained)
    adopted = schema.apply_feature_settings(serving, schema.feature_settings(trained))
    assert schema.config_hash(adopted) == schema.config_hash(trained)
    assert adopted.profile == "tiny" and adopted.extract.decode.num_frames == 4 and adopted.enrich.compose == "replace"
    # Resources and other sections stay the serving config's.
    assert adopted.extract.decode.resources.concurrency == 7 and adopted.score.rows_per_part == 5


def test_store_meta_records_settings_and_a_refusal_names_the_keys(tmp_path: Path) -> None:
    cfg = load_config()
    uri = _store(tmp_path, cfg)
    assert store_record(uri)["settings"]["extract.decode.frame_size"] == 224
    storage.write_bytes(storage.join(uri, "part-x.parquet"), b"")  # a committed part: the store is not empty
    other = with_overrides(cfg, ["extract.decode.frame_size=112"])
    with pytest.raises(FeatureConfigMismatch, match=r"extract\.decode\.frame_size \(store 224, config 112\)"):
        schema.ensure_meta(other, uri)


def test_scoring_a_store_of_another_config_is_refused_naming_the_keys(tmp_path: Path, caplog) -> None:
    trained = load_config(overrides=["extract.decode.num_frames=4"])
    run = _run_with_record(tmp_path / "a", store_record(_store(tmp_path / "a", trained)))
    same = _store(tmp_path / "b", with_overrides(trained, ["extract.decode.resources.concurrency=3"]))
    check_store(run, same)  # resources are not feature settings
    other = _store(tmp_path / "c", with_overrides(trained, ["extract.decode.num_frames=8", "profile=tiny"]))
    with pytest.raises(FeatureConfigMismatch) as err:
        check_store(run, other)
    msg = str(err.value)
    assert "extract.decode.num_frames (run 4, store 8)" in msg and "profile (run 'default', store 'tiny')" in msg
    assert "--allow-config-change" in msg and "\n" not in msg
    with caplog.at_level(logging.WARNING, logger="mer.provenance"):
        check_store(run, other, allow_config_change=True)
    assert "extract.decode.num_frames" in caplog.text


def test_extraction_for_a_run_uses_its_settings_or_refuses(tmp_path: Path, caplog) -> None:
    trained = load_config(profile="tiny", overrides=["extract.decode.num_frames=4"])
    run = _run_with_record(tmp_path / "a", store_record(_store(tmp_path / "a", trained)))
    serving = load_config(overrides=["extract.decode.num_frames=16", "extract.decode.resources.concurrency=5"])
    with caplog.at_level(logging.WARNING, logger="mer.provenance"):
        adopted = extraction_config(serving, run)
    assert schema.config_hash(adopted) == schema.config_hash(trained)
    assert adopted.extract.decode.num_frames == 4 and adopted.extract.decode.resources.concurrency == 5
    assert "extract.decode.num_frames (run 4, config 16)" in caplog.text
    assert extraction_config(serving, run, allow_config_change=True) is serving
    assert extraction_config(trained, run) is trained

    # A run that records only a hash cannot be reproduced: refused unless allowed.
    hash_only = _run_with_record(tmp_path / "h", {**store_record(str(tmp_path / "a" / "store")), "settings": None})
    with pytest.raises(FeatureConfigMismatch, match="run records no feature settings"):
        extraction_config(serving, hash_only)
    assert extraction_config(serving, hash_only, allow_config_change=True) is serving
    # Runs from before the record (or on stores without a hash) are not checked.
    assert extraction_config(serving, _run_with_record(tmp_path / "old", None)) is serving


@pytest.mark.slow
def test_trained_run_records_its_store(trained_run: Path, train_store: str) -> None:
    spec = json.loads((trained_run / "models" / "model.json").read_text())
    assert spec["features"] == store_record(train_store)
    assert spec["features"]["uri"] == train_store


@pytest.fixture
def run_on_extracted_store(trained_run: Path, extracted_store, tmp_path: Path) -> str:
    """The session's run as if trained on the session's extracted store (the dims are the tiny encoders')."""
    _, store, _ = extracted_store
    run = tmp_path / "run"
    shutil.copytree(trained_run / "models", run / "models")
    shutil.copy(trained_run / "metrics.json", run / "metrics.json")
    spec = json.loads((run / "models" / "model.json").read_text())
    (run / "models" / "model.json").write_text(json.dumps({**spec, "features": store_record(store)}))
    return str(run)


@pytest.mark.slow
def test_score_manifest_extracts_with_the_runs_settings(ray_local, run_on_extracted_store: str, extracted_store,
                                                        combined_manifest: str, tmp_path: Path) -> None:
    """A config with other decode settings scores raw videos with the run's: the copy of the run's store that
    the extraction resumes accepts it (another hash would be refused) and nothing is re-extracted."""
    from mer.predict.score import score

    ex_cfg, store, _ = extracted_store
    serving = with_overrides(ex_cfg, ["extract.decode.num_frames=8", "extract.decode.frame_size=96"])
    out = tmp_path / "pred"
    shutil.copytree(store, out / "features")
    summary = score(serving, run_on_extracted_store, str(out), manifest_uri=combined_manifest)
    assert summary["extract"]["processed"] == 0
    assert summary["extract"]["config_hash"] == store_record(store)["config_hash"]
    assert summary["submission_rows"] == summary["extract"]["manifest_rows"]


@pytest.mark.slow
def test_cli_refuses_a_store_of_another_config_in_one_line(ray_local, run_on_extracted_store: str, extracted_store,
                                                           tmp_path: Path, capsys) -> None:
    from mer.cli import main
    from mer.config import dump_config

    ex_cfg, store, _ = extracted_store
    other = tmp_path / "features"
    shutil.copytree(store, other)
    meta = json.loads((other / "_meta.json").read_text())
    meta["settings"]["extract.decode.frame_size"] = 32
    (other / "_meta.json").write_text(json.dumps({**meta, "config_hash": "0123456789abcdef"}))
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(ex_cfg))
    args = ["score", "--config", str(config), "--run", run_on_extracted_store, "--features", str(other)]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mer: ")]
    assert len(err) == 1 and err[0].startswith("mer: run ") and "extract.decode.frame_size (run 64, store 32)" in err[0]
    assert not (tmp_path / "refused" / "predictions").exists()
    assert main([*args, "--out", str(tmp_path / "allowed"), "--allow-config-change"]) == 0
    assert (tmp_path / "allowed" / "submission.csv").exists()


def test_stores_made_before_the_speech_and_description_stages_keep_their_hash() -> None:
    """A config that runs neither the speech nor the description stage hashes as stores were hashed before those
    stages (and their model slots) existed: stores and runs made then still resume and score. The figures are
    what `mer.extract.schema.config_hash` gave at 1655a5f; change them only on purpose (every existing store and
    run becomes 'another config')."""
    from mer.config import load_config
    from mer.extract.schema import config_hash

    assert config_hash(load_config(profile="tiny")) == "6f9940a2ea669e59"
    assert config_hash(load_config(profile="default", overrides=["enrich.enabled=true"])) == "1720a7a392615cb0"
    with_stage = load_config(profile="tiny", overrides=["text.source=auto"])
    assert config_hash(with_stage) != config_hash(load_config(profile="tiny"))


def test_differing_names_a_stage_one_side_leaves_off_once() -> None:
    """A stage the run ran and this config does not differs in each of its settings: the line names the stage with
    its key count instead of listing every setting, and still lists each setting both sides have."""
    from mer.extract.schema import differing

    run = {"settings": {"text.source": "auto", "enrich.enabled": True, "enrich.seed": 0, "enrich.max_tokens": 64,
                        "extract.decode.num_frames": 8, "models.llm.model_id": "tiny:llm"}}
    config = {"settings": {"text.source": "subtitle", "extract.decode.num_frames": 16}}
    msg = differing(run, config, ("run", "config"))
    assert msg == ("differing keys: extract.decode.num_frames (run 8, config 16), text.source (run 'auto', config "
                   "'subtitle'), set only in the run: enrich.* (3 keys), models.llm.model_id='tiny:llm'")
