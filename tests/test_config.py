"""Config schema: defaults validate, overrides apply and are validated, bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from mer.cli import build_parser, main
from mer.config import BRANCHES, LABELS, ConfigError, apply_overrides, cpu_only, gpu_requests, load_config


def test_repo_config_validates_both_profiles() -> None:
    cfg = load_config()
    assert cfg.profile == "default"
    assert cfg.models.global_visual.model_id == "openai/clip-vit-large-patch14"
    tiny = load_config(profile="tiny")
    assert tiny.models.llm.model_id == "tiny:llm"
    assert set(BRANCHES) == {"global_visual", "face", "audio", "text"}
    assert LABELS == ("neutral", "angry", "happy", "sad", "worried", "surprise")


def test_overrides_are_typed_and_validated() -> None:
    cfg = load_config(overrides=["train.lr=3e-4", "train.modalities=[audio,text]", "ray.address=null"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.modalities == ["audio", "text"]
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.not_a_key: unknown key"):
        load_config(overrides=["train.not_a_key=1"])
    with pytest.raises(ConfigError, match=r"train\.modalities"):
        load_config(overrides=["train.modalities=[smell]"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["train.lr"])


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    missing_profile = tmp_path / "p.yaml"
    missing_profile.write_text("profiles: {}\n")
    with pytest.raises(ConfigError, match="profiles.default"):
        load_config(missing_profile)


def test_hash_changes_with_config() -> None:
    a, b = load_config(), load_config(overrides=["train.lr=0.5"])
    assert a.hash() != b.hash()
    assert a.section_hash("extract") == b.section_hash("extract")


def test_apply_overrides_creates_sections() -> None:
    raw: dict = {}
    apply_overrides(raw, ["a.b.c=1", "a.d=x"])
    assert raw == {"a": {"b": {"c": 1}, "d": "x"}}


def test_cli_reports_bad_config_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--set", "extract.decode.num_frames=0"]) == 2
    err = capsys.readouterr().err
    assert "extract.decode.num_frames" in err


def test_cli_contract_commands_exist() -> None:
    parser = build_parser()
    for argv in (["models", "tiny", "--out", "x"], ["models", "random", "--out", "x", "--slots", "text"],
                 ["data", "synth", "--out", "x"], ["bench", "extract", "--json"],
                 ["data", "import-mer2025", "--root", "r", "--out", "m"],
                 ["extract", "--manifest", "m", "--out", "f"], ["train", "--features", "f", "--out", "r"],
                 ["score", "--run", "r", "--features", "f", "--out", "p"],
                 ["score", "--run", "r", "--manifest", "m", "--out", "p"],
                 ["evaluate", "--pred", "p", "--labels", "l"], ["demo", "--workdir", "d"],
                 ["bench", "extract"], ["bench", "train"], ["bench", "enrich"],
                 ["relabel", "--run", "r", "--features", "f", "--out", "o"],
                 ["pseudolabel", "--features", "f", "--out", "o"], ["enrich", "--manifest", "m", "--out", "o"]):
        args = parser.parse_args([*argv, "--profile", "tiny", "--set", "train.lr=0.1"])
        assert callable(args.fn)
        assert args.overrides == ["train.lr=0.1"]


def test_gpu_requests_are_listed_and_cpu_only_clears_them() -> None:
    cfg = load_config(overrides=["extract.encoders.audio.resources.num_gpus=0.5", "train.use_gpu=true",
                                 "score.num_gpus=0"])
    wanted = gpu_requests(cfg)
    assert "extract.encoders.audio.resources.num_gpus" in wanted and "train.use_gpu" in wanted
    assert "score.num_gpus" not in wanted
    assert gpu_requests(cpu_only(cfg)) == []


def test_random_profile_resolves_every_slot_to_random_models() -> None:
    cfg = load_config(profile="random", overrides=["storage.random_models_dir=/tmp/rm"])
    assert cfg.storage.random_models_dir == "/tmp/rm"
    assert {getattr(cfg.models, s).model_id for s in ("global_visual", "face", "audio", "text", "llm")} == {
        f"random:{s}" for s in ("global_visual", "face", "audio", "text", "llm")}
    # the same model classes as the default profile: same architectures, random weights
    default = load_config(profile="default")
    assert all(getattr(cfg.models, s).model_class == getattr(default.models, s).model_class
               for s in ("global_visual", "face", "audio", "text"))
