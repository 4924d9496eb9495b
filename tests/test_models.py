"""Tiny offline models and the model registry: build, reload via from_pretrained, determinism, tokenizers."""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mer.config import BRANCHES
from mer.models import registry
from mer.models.tiny import SLOTS, build_tiny_llm, build_tiny_models, describe

EXPECTED_CLASSES = {
    "global_visual": "CLIPVisionModel",
    "face": "ViTModel",
    "audio": "HubertModel",
    "text": "XLMRobertaModel",
    "llm": "Qwen2ForCausalLM",
    "asr": "WhisperForConditionalGeneration",
    "vlm": "Blip2ForConditionalGeneration",
}
ZH = "今天我真的很生气，为什么没有人告诉我？哈哈，太意外了！龘"


def test_all_slots_built_and_reload_through_registry(tiny_models_dir: Path, tiny_config) -> None:
    state = describe(tiny_models_dir)
    assert sorted(state) == sorted(SLOTS)
    assert all(s["complete"] for s in state.values()), state
    for slot in SLOTS:
        spec = getattr(tiny_config.models, slot)
        path = registry.resolve_model_id(spec, tiny_config)
        assert Path(path) == tiny_models_dir / slot
        assert (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()
        model = registry.load_model(spec, tiny_config)
        assert type(model).__name__ == EXPECTED_CLASSES[slot]
        assert not model.training
        assert next(model.parameters()).dtype == torch.float32  # dtype auto on CPU
        assert registry.load_processor(spec, tiny_config) is not None


def test_build_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    a = build_tiny_models(tmp_path / "a", slots=["face", "text"])
    b = build_tiny_models(tmp_path / "b", slots=["face", "text"])
    from transformers import AutoModel

    for slot in ("face", "text"):
        sa = AutoModel.from_pretrained(a[slot]).state_dict()
        sb = AutoModel.from_pretrained(b[slot]).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert (Path(a[slot]) / "tokenizer.json").exists() == (slot == "text")
    assert (Path(a["text"]) / "tokenizer.json").read_bytes() == (Path(b["text"]) / "tokenizer.json").read_bytes()

    weights = Path(a["face"]) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_models(tmp_path / "a", slots=["face"]) == {"face": a["face"]}
    assert weights.stat().st_mtime_ns == before  # completion marker present: not rebuilt
    build_tiny_models(tmp_path / "a", slots=["face"], force=True)
    assert (Path(a["face"]) / "model.safetensors").stat().st_mtime_ns != before
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp dirs left

    with pytest.raises(ValueError, match="unknown tiny model slots"):
        build_tiny_models(tmp_path / "a", slots=["nope"])


def test_a_fresh_build_leaves_the_console_to_mer(tmp_path: Path) -> None:
    """As on a new machine (`make demo` builds every slot first): no "Writing model shards" bar and no
    transformers notice (the face slot's processor falls back for want of torchvision) on the console; mer's own
    line says what was built. A fresh process, so no earlier build in this one has used up a once-only notice."""
    import subprocess
    import sys

    code = ("import sys; from mer.runtime import console; console.setup(directory=sys.argv[2]); "
            "from mer.models.tiny import build_tiny_models; build_tiny_models(sys.argv[1], slots=['face', 'text'])")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "models"), str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=300, check=True)
    console_text = done.stdout + done.stderr
    assert "Writing model shards" not in console_text and "[transformers]" not in console_text, console_text
    assert [line for line in console_text.splitlines() if line] == [
        f"built model {slot} -> {tmp_path / 'models' / slot}" for slot in ("face", "text")]
    if importlib.util.find_spec("torchvision") is None:  # as `make venv` leaves it: the notice is in the log file
        assert "requires torchvision" in (tmp_path / "logs" / "mer.log").read_text()


def test_partial_slot_is_rebuilt_and_concurrent_builds_agree(tmp_path: Path) -> None:
    out = tmp_path / "m"
    (out / "audio").mkdir(parents=True)
    (out / "audio" / "config.json").write_text("{}")  # a crashed build: no completion marker
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: build_tiny_models(out, slots=["audio"]), range(2)))
    assert results[0] == results[1]
    assert describe(out)["audio"]["complete"]
    assert json.loads((out / "audio" / "config.json").read_text())["model_type"] == "hubert"
    assert sorted(p.name for p in out.iterdir()) == ["audio"]


def test_text_tokenizer_chinese_round_trip(tiny_models_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models_dir / "text")
    enc = tok([ZH, "hello"], padding=True)
    ids = enc["input_ids"][0]
    assert ids[0] == tok.cls_token_id == 0 and ids[-1] == tok.sep_token_id == 2
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == ZH
    assert enc["input_ids"][1][-1] == tok.pad_token_id == 1 and enc["attention_mask"][1][-1] == 0
    # Emotion words were in the training corpus: they merge into fewer tokens than their UTF-8 bytes.
    assert len(tok("生气", add_special_tokens=False)["input_ids"]) < len("生气".encode())
    assert len(tok) == json.loads((tiny_models_dir / "text" / "config.json").read_text())["vocab_size"]


def test_llm_tokenizer_chat_template_and_generate(tiny_models_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = tiny_models_dir / "llm"
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    ids = tok(ZH, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == ZH
    prompt = tok.apply_chat_template([{"role": "user", "content": ZH}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and f"<|im_start|>user\n{ZH}<|im_end|>" in prompt
    gen = GenerationConfig.from_pretrained(path)
    assert tok.eos_token_id in (gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    assert (cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 2)
    assert cfg.vocab_size == len(tok) and cfg.max_position_embeddings == 2048
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert build_tiny_llm(tiny_models_dir) == str(path)


def _spec(cfg, change: str):
    """A model spec of ``cfg``'s profile with one field changed (``slot.field=value``)."""
    from mer.config import with_overrides

    slot = change.split(".", 1)[0]
    return getattr(with_overrides(cfg, [f"profiles.{cfg.profile}.{change}"]).models, slot)


@pytest.mark.parametrize("change,load,match", [
    ("face.model_class=os", "load_model", r"profiles\.tiny\.face\.model_class.*'os'"),
    ("face.model_class=logging", "load_model", "not a loadable class"),
    ("text.processor_class=__import__", "load_processor", r"profiles\.tiny\.text\.processor_class"),
    ("text.model_id=tiny:nope", "resolve_model_id", "unknown tiny model"),
])
def test_registry_rejects_non_transformers_classes(tiny_config, change: str, load: str, match: str) -> None:
    with pytest.raises(registry.ModelConfigError, match=match):
        getattr(registry, load)(_spec(tiny_config, change), tiny_config)


def test_registry_resolution_device_and_dtype(tiny_config) -> None:
    from mer.config import load_config

    default = load_config(profile="default")
    assert registry.resolve_model_id(default.models.text, default) == "FacebookAI/xlm-roberta-large"
    assert registry.model_ids(default)["llm"] == "Qwen/Qwen2.5-7B-Instruct"
    assert registry.pick_device(0) == "cpu"
    expected_gpu = "cuda" if torch.cuda.is_available() else "cpu"
    assert registry.pick_device(0.25) == expected_gpu
    assert registry.resolve_dtype("auto", "cpu") == torch.float32
    assert registry.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert registry.resolve_dtype("float16", "cpu") == torch.float16
    model = registry.load_model(tiny_config.models.text, tiny_config, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert set(BRANCHES) < set(registry.SLOTS)


# Published sizes of the default profile's models (parameters of the transformers class the profile loads).
FULL_SIZE = {"global_visual": (1024, 24, 303_179_776), "face": (768, 12, 86_389_248),
             "audio": (1024, 24, 315_438_720), "text": (1024, 24, 559_890_432), "llm": (896, 24, 494_032_768)}


def test_random_models_have_the_full_size_architectures() -> None:
    from mer.models import random

    for slot, (hidden, layers, params) in FULL_SIZE.items():
        conf = random.model_config(slot)
        assert (conf.hidden_size, conf.num_hidden_layers) == (hidden, layers), slot
        assert random.parameter_count(slot) == params, slot  # meta device: nothing allocated
        assert random.ARCHITECTURES[slot][1] == EXPECTED_CLASSES[slot]
    assert random.model_config("text").vocab_size == 250002 and random.model_config("llm").vocab_size == 151936
    assert random.model_config("global_visual").patch_size == 14
    assert random.model_config("audio").conv_dim == (512,) * 7


SHRUNK = {"global_visual": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=16),
          "face": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                       image_size=32),
          "audio": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
          "text": dict(hidden_size=40, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
          "llm": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_window_layers=1)}


def test_random_build_saves_loadable_models_through_the_random_profile(tmp_path: Path) -> None:
    from mer.config import load_config
    from mer.encoders import encoder_dims
    from mer.models import random

    # The full recipe (processors, tokenizers, vocab sizes, save_pretrained), shrunken in width and depth.
    built = random.build_random_models(tmp_path, overrides=SHRUNK)
    cfg = load_config(profile="random", overrides=[f"storage.random_models_dir={tmp_path}"])
    for slot in random.SLOTS:
        spec = getattr(cfg.models, slot)
        assert registry.resolve_model_id(spec, cfg) == built[slot]  # any finished build is used as it is
        model = registry.load_model(spec, cfg)
        assert type(model).__name__ == EXPECTED_CLASSES[slot]
        assert json.loads((Path(built[slot]) / "config.json").read_text())["dtype"] == "bfloat16"
        assert registry.load_processor(spec, cfg) is not None
    assert encoder_dims(cfg) == {"global_visual": 32, "face": 24, "audio": 16, "text": 40}
    text = registry.load_processor(cfg.models.text, cfg)
    ids = text(ZH)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and text.decode(ids, skip_special_tokens=True) == ZH
    llm_tok = registry.load_processor(cfg.models.llm, cfg)
    llm = registry.load_model(cfg.models.llm, cfg)
    assert llm.config.eos_token_id == llm_tok.convert_tokens_to_ids("<|im_end|>")
    assert llm.config.vocab_size == 151936 and "<|im_start|>assistant" in llm_tok.apply_chat_template(
        [{"role": "user", "content": ZH}], tokenize=False, add_generation_prompt=True)
    state = random.describe(tmp_path)
    assert not state["text"]["complete"] and "hidden_size=40" in state["text"]["build"]  # a shrunken build
    # a second build with the same recipe is a no-op
    mtime = (Path(built["face"]) / "model.safetensors").stat().st_mtime_ns
    random.build_random_models(tmp_path, slots=["face"], overrides=SHRUNK)
    assert (Path(built["face"]) / "model.safetensors").stat().st_mtime_ns == mtime
