"""``mer bench enrich``: the Ray Data vLLM stage against the same engine driven directly (no Ray).

Both sides get identical prompt token ids (built by the stage's PromptBuilder) and sampling params.
Engine start-up is timed separately; the steady-state ratio compares the direct ``LLM.generate`` time
with the Ray stage's engine-busy window (first request arrival → last completion), and the end-to-end
ratio includes actor and engine start-up and Ray Data scheduling.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any

import pyarrow as pa

from mer.config import MerConfig
from mer.enrich.generators import engine_env, engine_kwargs, vllm_generate
from mer.enrich.prepare import IDS, PromptBuilder
from mer.enrich.prompt import sampling_params
from mer.enrich.stage import EnrichStage

_SUBTITLES = [
    "我今天真的太开心了，终于考上了！", "你为什么要这样对我？", "算了，我不想再说了。", "这件事让我很担心。",
    "天哪，怎么会这样！", "没关系，我们慢慢来。", "I can't believe you did that!", "Whatever, it's fine.",
]


def bench_prompts(n: int) -> pa.Table:
    """``n`` generated subtitles (Chinese and English), unique clip ids."""
    texts = [f"{_SUBTITLES[i % len(_SUBTITLES)]} ({i})" for i in range(n)]
    return pa.table({"clip_id": [f"bench_{i:05d}" for i in range(n)], "text": texts})


def _direct_vllm(cfg: MerConfig, model_path: str, prompts: list[list[int]]) -> dict[str, float]:
    """Start ``vllm.LLM`` in this process and generate all prompts in one call."""
    for k, v in engine_env(cfg).items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model_path, **engine_kwargs(cfg))
    startup = time.perf_counter() - t0
    params = SamplingParams(**sampling_params(cfg))
    inputs = [{"prompt_token_ids": p} for p in prompts]
    t1 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    gen = time.perf_counter() - t1
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm, outs
    gc.collect()
    return {"startup_s": startup, "generate_s": gen, "tokens": float(tokens)}


def _ray_stage(cfg: MerConfig, stage: EnrichStage, prompts_ds: Any) -> dict[str, float]:
    """Run the stage's vLLM backend (the Ray Data processor) on prepared rows, with per-request timing."""
    t0 = time.perf_counter()
    wall0 = time.time()
    out = vllm_generate(cfg, stage.model_path, prompts_ds, timing=True).materialize()
    total = time.perf_counter() - t0
    t = pa.concat_tables(list(out.iter_batches(batch_format="pyarrow", batch_size=None)), promote_options="permissive")
    arrivals = [a for a in t["_enrich_t_arrival"].to_pylist() if a is not None]
    ends = [a + lat for a, lat in zip(t["_enrich_t_arrival"].to_pylist(), t["_enrich_latency"].to_pylist())
            if a is not None and lat is not None and lat >= 0]
    window = (max(ends) - min(arrivals)) if arrivals and ends else float("nan")
    first_arrival = (min(arrivals) - wall0) if arrivals else float("nan")
    errors = sum(1 for e in t["_enrich_gen_error"].to_pylist() if e)
    return {"total_s": total, "steady_s": window, "startup_s": first_arrival,
            "tokens": float(sum(t["_enrich_gen_tokens"].to_pylist())), "rows": float(t.num_rows),
            "errors": float(errors)}


def bench_enrich(cfg: MerConfig, n_prompts: int = 64, print_table: bool = True) -> dict[str, Any]:
    """prompts/s and generated tokens/s of the Ray Data vLLM stage vs. direct ``vllm.LLM``; returns figures."""
    import ray

    stage = EnrichStage(cfg, cache_dir=None)
    table = bench_prompts(n_prompts)
    e = cfg.enrich
    builder = PromptBuilder(stage.model_path, stage.template.source_text, list(e.context_columns),
                            e.max_model_len, e.max_tokens, e.truncate_input,
                            trust_remote_code=cfg.models.llm.trust_remote_code)
    prepared = builder(table)
    prompts = [list(p) for p in prepared[IDS].to_pylist()]

    ray_res = _ray_stage(cfg, stage, ray.data.from_arrow(prepared))
    direct = _direct_vllm(cfg, stage.model_path, prompts)

    n = float(n_prompts)
    res: dict[str, Any] = {
        "n_prompts": n_prompts, "max_tokens": e.max_tokens, "model": stage.model_id,
        "device": "gpu" if e.resources.num_gpus > 0 else "cpu",
        "direct_startup_s": round(direct["startup_s"], 2),
        "direct_generate_s": round(direct["generate_s"], 3),
        "direct_prompts_per_s": round(n / direct["generate_s"], 2),
        "direct_tokens_per_s": round(direct["tokens"] / direct["generate_s"], 1),
        "ray_total_s": round(ray_res["total_s"], 2),
        "ray_until_first_request_s": round(ray_res["startup_s"], 2),
        "ray_steady_s": round(ray_res["steady_s"], 3),
        "ray_prompts_per_s": round(n / ray_res["steady_s"], 2),
        "ray_tokens_per_s": round(ray_res["tokens"] / ray_res["steady_s"], 1),
        "ray_prompts_per_s_end_to_end": round(n / ray_res["total_s"], 2),
        "ray_errors": int(ray_res["errors"]),
        "ratio_steady": round(direct["generate_s"] / ray_res["steady_s"], 3),
        "ratio_end_to_end": round((direct["startup_s"] + direct["generate_s"]) / ray_res["total_s"], 3),
        "tokens_direct": int(direct["tokens"]), "tokens_ray": int(ray_res["tokens"]),
    }
    if print_table:
        print(format_table(res))
    return res


def format_table(res: dict[str, Any]) -> str:
    """A small text table of the benchmark figures."""
    rows = [
        ("", "prompts/s", "gen tokens/s", "start-up s", "generate s"),
        ("vLLM direct (no Ray)", res["direct_prompts_per_s"], res["direct_tokens_per_s"], res["direct_startup_s"],
         res["direct_generate_s"]),
        ("Ray Data stage (steady)", res["ray_prompts_per_s"], res["ray_tokens_per_s"],
         res["ray_until_first_request_s"], res["ray_steady_s"]),
        ("Ray Data stage (end-to-end)", res["ray_prompts_per_s_end_to_end"], "", "", res["ray_total_s"]),
    ]
    lines = [f"{r[0]:<28}" + "".join(f"{str(c):>14}" for c in r[1:]) for r in rows]
    lines.append(f"ratio Ray/direct: steady {res['ratio_steady']}, end-to-end {res['ratio_end_to_end']} "
                 f"({res['n_prompts']} prompts x {res['max_tokens']} max tokens, {res['device']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command
def add_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``mer bench enrich [-n N]``."""
    p = sub.add_parser("enrich", parents=parents, help="prompts/s and tokens/s of the Ray Data vLLM stage vs vllm.LLM")
    p.add_argument("-n", type=int, default=32, help="prompts")
    p.set_defaults(bench=run_command)


def run_command(cfg: MerConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The figures (the table is printed as they are measured)."""
    return bench_enrich(cfg, n_prompts=args.n)
