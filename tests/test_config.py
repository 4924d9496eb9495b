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
    cfg = load_config(overrides=["extract.encoders.audio.resources.num_gpus=0.5", "train.resources.num_gpus=1",
                                 "score.resources.num_gpus=0"])
    wanted = gpu_requests(cfg)
    assert "extract.encoders.audio.resources.num_gpus" in wanted and "train.resources.num_gpus" in wanted
    assert "score.resources.num_gpus" not in wanted
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


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_leaves(v, f"{key}.") if isinstance(v, dict) and v else {key: v})
    return out


def test_ray_config_yaml_documents_every_key_with_the_schema_default() -> None:
    """Defaults live in the schema; ray_config.yaml lists every key (profiles aside: they have no default)
    with that same value, so `mer config show` without flags prints the schema's defaults."""
    import yaml

    from mer.config import DEFAULT_CONFIG_PATH, MerConfig

    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    sections = [k for k in MerConfig.model_fields if k not in ("profile", "profiles")]
    schema = MerConfig.model_validate({"profiles": raw["profiles"], **{s: {} for s in sections}})
    documented = {k: v for k, v in _leaves(raw).items() if not k.startswith("profiles.")}
    defaults = {k: v for k, v in _leaves(schema.model_dump(mode="json")).items() if not k.startswith("profiles.")}
    assert set(documented) == set(defaults), (set(defaults) - set(documented), set(documented) - set(defaults))
    resolved = _leaves(load_config().model_dump(mode="json"))
    assert {k: resolved[k] for k in defaults} == defaults


def test_overlays_merge_in_order_then_set_flags(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train: {lr: 0.5, resources: {concurrency: 4}}\nscore: {rows_per_part: 7}\n")
    b.write_text("train: {lr: 0.25}\n")
    cfg = load_config(overlays=[a, b, {"score": {"rows_per_part": 9}}], overrides=["train.max_epochs=3"])
    assert (cfg.train.lr, cfg.train.max_epochs, cfg.score.rows_per_part) == (0.25, 3, 9)
    # a partial section keeps the rest of its own default (not the generic one of its class)
    assert cfg.train.resources.concurrency == 4 and cfg.train.resources.batch_size == 32
    assert load_config(overrides=["extract.encoders.text.resources.concurrency=2"]
                       ).extract.encoders.text.resources.batch_size == 32
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {nope: 1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml[\s\S]*train\.nope: unknown key"):
        load_config(overlays=[bad])
    with pytest.raises(ConfigError, match="overlay not found"):
        load_config(overlays=[tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match=r"train\.resources: .*dtype: float16"):
        load_config(overrides=["train.resources.dtype=float16"])


def test_cli_overlay_is_the_same_as_load_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overlay = tmp_path / "o.yaml"
    overlay.write_text("score: {resources: {num_gpus: 0.5}}\n")
    assert main(["config", "show", "--overlay", str(overlay), "--set", "train.lr=0.1"]) == 0
    out = capsys.readouterr().out
    assert out.rsplit("# config hash: ", 1)[1].strip() == load_config(overlays=[overlay],
                                                                       overrides=["train.lr=0.1"]).hash()
    assert main(["config", "show", "--overlay", str(overlay), "--cpu"]) == 0
    assert "num_gpus: 0.5" not in capsys.readouterr().out


def test_resources_are_the_only_source_of_ray_arguments() -> None:
    from mer.config import Resources, stage_resources

    r = Resources(batch_size=16, concurrency=3, num_cpus=0.5, num_gpus=0.25, memory=1 << 30)
    args = r.map_batches_args()
    assert (args["batch_size"], args["num_cpus"], args["num_gpus"], args["memory"]) == (16, 0.5, 0.25, 1 << 30)
    assert args["compute"].min_size == args["compute"].max_size == 3
    assert args["compute"].max_concurrent_calls_per_actor == 1
    # the decode actors hold two batches: Ray fetches the next block while the child decodes the current one
    assert load_config().extract.decode.resources.map_batches_args()["compute"].max_concurrent_calls_per_actor == 2
    assert "compute" not in r.map_batches_args(actors=False)
    assert "num_gpus" not in Resources().map_batches_args(actors=False)
    sc = r.scaling_config()
    assert sc.num_workers == 3 and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 0.5, "GPU": 0.25, "memory": float(1 << 30)}
    keys = set(stage_resources(load_config()))
    assert {"extract.decode.resources", "extract.face.resources", "extract.encoders.text.resources",
            "enrich.resources", "enrich.aux_resources", "train.resources", "score.resources"} <= keys
