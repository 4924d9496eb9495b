"""The ``mer`` command. Thin: parse arguments, load the config, call library functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mer.bench import BENCHES, add_commands as add_bench_commands
from mer.config import MerConfig, apply_overrides, cpu_only, dump_config, load_config
from mer.data.mer2025 import import_mer2025
from mer.demo import DEMO_OVERRIDES, run_demo
from mer.enrich.run import enrich_manifest
from mer.evaluation.evaluate import evaluate, format_report
from mer.extract.pipeline import extract_features
from mer.labels.llm_vote import llm_vote
from mer.labels.loop import label_loop
from mer.labels.relabel import relabel_run
from mer.labels.sources import parse_sources
from mer.models.random import build_random_models, describe
from mer.models.tiny import build_tiny_models
from mer.predict.combine import build_ensemble
from mer.predict.score import score
from mer.runs.layout import best_run
from mer.runtime import console
from mer.runtime.placement import PlacementError
from mer.runtime.stall import StreamStalled
from mer.runtime.session import init_ray, setup_logging
from mer.store.redact import redact
from mer.synth.dataset import synth_dataset
from mer.train import ablation_table, train_run
from mer.tune.leaderboard import study_runs
from mer.tune.study import tune_study

log = logging.getLogger("mer")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=None, help="config file (default: the repo's ray_config.yaml)")
    p.add_argument("--overlay", dest="overlays", action="append", default=[], metavar="FILE",
                   help="a partial config merged over --config, e.g. cluster/ray_config.gpu.yaml (repeatable, "
                        "in order; --set flags apply after)")
    p.add_argument("--profile", choices=["default", "tiny", "random"], default=None,
                   help="model profile; tiny / random (full-size, random weights) build offline models on first use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--cpu", action="store_true", help="zero every GPU request (laptop / CI)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="DEBUG puts Ray's, DeepSpeed's and vLLM's own output on the console too")
    p.add_argument("--json", action="store_true", help="print the command's result as indented JSON")
    p.add_argument("--log-dir", default=None,
                   help="where the full logs go (default <out>/logs, or <workdir>/logs for the demo)")
    return p


def resolve_config(args: argparse.Namespace) -> MerConfig:
    """The config a command runs with: ``--config``, the command's preset, ``--overlay`` files, ``--set`` flags,
    ``--profile``, then ``--cpu``. Every handler, and through :func:`main` every job, gets its config here; with
    ``log_config`` (jobs) the resolved config is logged, redacted, exactly as it is used.

    The preset (overrides, default profile) is what the command's parser sets as ``preset``: the demo's laptop
    scale and tiny models, ``bench labels``' laptop-scale training; placement is fitted to the local Ray like
    any command's."""
    preset, profile = getattr(args, "preset", None) or ([], None)
    cfg = load_config(args.config, overlays=[apply_overrides({}, preset), *args.overlays],
                      overrides=args.overrides, profile=args.profile or profile)
    cfg = cpu_only(cfg) if args.cpu else cfg
    if getattr(args, "log_config", False):
        log.info("resolved config (hash %s):\n%s", cfg.hash(),
                 yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False))
    return cfg


def _with_ray(args: argparse.Namespace) -> MerConfig:
    """The command's config (:func:`resolve_config`), with Ray joined or started for it (and fitted to a local
    Ray it started, :func:`mer.runtime.session.init_ray`)."""
    return init_ray(resolve_config(args))


_JSON = {"indent": None}


def _print(obj: Any) -> None:
    """A command's result on stdout: one line of JSON (``--json``: indented)."""
    print(json.dumps(obj, indent=_JSON["indent"], sort_keys=True, default=str))


# --- handlers: each loads the config and calls one library function --------------------------------

def _models_tiny(args: argparse.Namespace) -> None:
    _print(build_tiny_models(args.out, force=args.force))


def _models_random(args: argparse.Namespace) -> None:
    slots = args.slots.split(",") if args.slots else None
    build_random_models(args.out, force=args.force, slots=slots, dtype=args.dtype)
    _print({s: v for s, v in describe(args.out, dtype=args.dtype).items() if slots is None or s in slots})


def _data_synth(args: argparse.Namespace) -> None:
    _print(synth_dataset(args.out, n_train=args.n_train, n_unlabeled=args.n_unlabeled,
                         n_test=args.n_test, seed=args.seed))


def _data_import(args: argparse.Namespace) -> None:
    resolve_config(args)  # validates config / storage overrides
    kwargs: dict[str, Any] = {}
    if args.test_labels:
        kwargs["test_labels"] = args.test_labels
    kwargs["keep_missing"] = args.keep_missing
    _print(import_mer2025(args.root, args.out, **kwargs))


def _extract(args: argparse.Namespace) -> None:
    cfg = _with_ray(args)
    _print(extract_features(cfg, args.manifest, args.out, limit=args.limit))


def _enrich(args: argparse.Namespace) -> None:
    cfg = _with_ray(args)
    _print(enrich_manifest(cfg, args.manifest, args.out))


def _train(args: argparse.Namespace) -> None:
    cfg = _with_ray(args)
    mods = args.modalities.split(",") if args.modalities else None
    _print(train_run(cfg, args.features, args.out, resume=args.resume, labels_uri=args.labels,
                     modalities=mods))


def _ablation(args: argparse.Namespace) -> None:
    cfg = _with_ray(args)
    _print(ablation_table(cfg, args.features, args.out))


def _relabel(args: argparse.Namespace) -> None:
    cfg = resolve_config(args)
    runs = {"fused": args.run, **parse_sources(args.source_run)}
    _print(relabel_run(cfg, args.features, args.out, runs=runs, tables=parse_sources(args.source)))


def _llm_vote(args: argparse.Namespace) -> None:
    cfg = _with_ray(args)
    _print(llm_vote(cfg, args.manifest, args.out, enriched_uri=args.enriched, features_uri=args.features))


def _pseudolabel(args: argparse.Namespace) -> None:
    cfg = _with_ray(args)
    _print(label_loop(cfg, args.features, args.out, tables=parse_sources(args.source), base_run=args.run,
                      rounds=args.rounds))


def _tune(args: argparse.Namespace) -> None:
    cfg = _with_ray(args)
    _print(tune_study(cfg, args.features, args.out))


def _ensemble(args: argparse.Namespace) -> None:
    resolve_config(args)
    runs = list(args.runs) + (study_runs(args.from_study, args.top) if args.from_study else [])
    _print(build_ensemble(runs, args.out, weighting=args.weighting))


def _score(args: argparse.Namespace) -> None:
    best_run(args.run)  # a directory that is not a run fails before Ray starts
    cfg = _with_ray(args)
    _print(score(cfg, args.run, args.out, features_uri=args.features, manifest_uri=args.manifest,
                 features_out=args.features_out, splits=args.splits.split(",") if args.splits else None,
                 allow_config_change=args.allow_config_change))


def _evaluate(args: argparse.Namespace) -> None:
    resolve_config(args)
    report = evaluate(args.pred, args.labels, out_dir=args.out)
    print(format_report(report))


def _demo(args: argparse.Namespace) -> None:
    run_demo(resolve_config(args), args.workdir, n_train=args.n_train, n_unlabeled=args.n_unlabeled,
             n_test=args.n_test)


def _bench(args: argparse.Namespace) -> None:
    """``mer bench <what>``: the bench module's handler (:mod:`mer.bench`) with the config and Ray started."""
    t0 = time.perf_counter()
    cfg = _with_ray(args) if getattr(args, "needs_ray", True) else resolve_config(args)
    args.ray_init_s = time.perf_counter() - t0
    out = args.bench(cfg, args)
    if isinstance(out, str):
        print(out)
    elif out is not None:
        _print(out)


def _config_show(args: argparse.Namespace) -> None:
    cfg = resolve_config(args)
    print(dump_config(cfg), end="")
    print(f"# config hash: {cfg.hash()}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mer`` command (exposed for tests and docs)."""
    common = _common()
    parser = argparse.ArgumentParser(prog="mer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], None], help_: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=help_)
        p.set_defaults(fn=fn)
        return p

    models = sub.add_parser("models", help="model utilities").add_subparsers(dest="sub", required=True)
    p = add("tiny", _models_tiny, "build offline tiny models of every branch", models)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p = add("random", _models_random, "build full-size random-weight models of the default architectures", models)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--slots", default=None, help="comma list (default: global_visual,face,audio,text,llm)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="sub", required=True)
    p = add("synth", _data_synth, "generate a dataset in the MER2025 layout", data)
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--n-unlabeled", type=int, default=40)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p = add("import-mer2025", _data_import, "MER2025/2026 release layout -> manifest", data)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--test-labels", default=None, help="optional CSV name,discrete of a labelled test split")
    p.add_argument("--keep-missing", choices=["candidates", "all", "none"], default="candidates",
                   help="rows whose video is missing that stay (status missing_file): candidates (unlabeled and "
                        "test, the default), all, none; every missing video is listed in <out>.missing.csv")

    p = add("extract", _extract, "manifest -> Parquet feature store (Ray Data)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None)

    p = add("enrich", _enrich, "LLM-enrich the transcripts of a manifest (vLLM / transformers)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)

    p = add("train", _train, "k-fold ECMF training with Ray Train + DeepSpeed")
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--labels", default=None, help="label table (clip_id,label,weight,source)")
    p.add_argument("--modalities", default=None, help="comma list, e.g. audio,text")

    p = add("ablation", _ablation, "single-modality vs fused WAF table")
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True)

    p = add("relabel", _relabel, "multi-source label refinement of the train split (one stage, no gate)")
    p.add_argument("--run", required=True, help="the fused run (its out-of-fold predictions vote)")
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True, help="refined label table (Parquet)")
    p.add_argument("--source-run", action="append", default=[], metavar="NAME=RUN",
                   help="another finished run on the same folds whose OOF predictions vote (repeatable)")
    p.add_argument("--source", action="append", default=[], metavar="NAME=URI",
                   help="vote table: clip_id and label or prob_<label> columns, e.g. an LLM vote (repeatable)")

    p = add("llm-vote", _llm_vote, "ask the enrichment LLM for one label per clip (a label source)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="the clips' subtitles")
    src.add_argument("--features", help="a feature store: each clip's transcript (subtitle or speech recognition), "
                     "its enriched description and its visual description go into the prompt")
    p.add_argument("--out", required=True, help="vote table (Parquet): clip_id, label, vote_status, answer")
    p.add_argument("--enriched", default=None, help="mer enrich output: its descriptions go into the prompt")

    p = add("pseudolabel", _pseudolabel,
            "the label loop: source runs -> refinement -> pseudo-label rounds, each kept only if it helps")
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True, help="loop directory (mer score --run accepts it)")
    p.add_argument("--run", default=None, help="reuse this finished fused run (same folds) as the labelled-only stage")
    p.add_argument("--source", action="append", default=[], metavar="NAME=URI",
                   help="vote table: clip_id and label or prob_<label> columns, e.g. an LLM vote (repeatable)")
    p.add_argument("--rounds", type=int, default=None)

    p = add("tune", _tune, "hyper-parameter search (Ray Tune + ASHA), each trial a k-fold mer train run")
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True, help="study directory (re-running resumes it)")

    p = add("ensemble", _ensemble, "soft voting of several runs' fold ensembles -> a run directory")
    p.add_argument("--runs", nargs="*", default=[], metavar="RUN", help="finished runs (same store and folds)")
    p.add_argument("--from-study", default=None, metavar="DIR", help="add the best --top trials of a mer tune study")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--weighting", choices=["waf", "mean"], default="waf",
                   help="waf: each run by its mean fold validation WAF; mean: all alike")
    p.add_argument("--out", required=True)

    p = add("score", _score, "batch scoring -> predictions Parquet + submission CSV")
    p.add_argument("--run", required=True,
                   help="a training run, or a label-loop directory (mer pseudolabel --out): its best accepted stage "
                        "(labels.final=ensemble: the accepted stages' ensemble)")
    p.add_argument("--out", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features")
    src.add_argument("--manifest")
    p.add_argument("--features-out", default=None,
                   help="with --manifest: where the extracted features go (default <out>/features)")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits to score, e.g. unlabeled,test (the MER2025 candidates); with "
                        "--manifest only those rows are extracted; default all")
    p.add_argument("--allow-config-change", action="store_true",
                   help="score although the features' extraction settings differ from the run's training store "
                        "(default: --manifest extracts with the run's settings, --features refuses a store "
                        "with another config hash)")

    p = add("evaluate", _evaluate, "WAF / accuracy / per-class F1 of predictions")
    p.add_argument("--pred", required=True)
    p.add_argument("--labels", required=True, help="labels CSV/Parquet (name|clip_id, discrete|label)")
    p.add_argument("--out", default=None, help="directory for report.json and confusion_matrix.png")

    p = add("demo", _demo, "the whole loop on generated data with tiny models")
    p.set_defaults(preset=(DEMO_OVERRIDES, "tiny"))
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--n-unlabeled", type=int, default=300, help="unlabelled pool (MER2025: ~2.7x the labelled set)")
    p.add_argument("--n-test", type=int, default=300, help="labelled test clips: the judge of every stage")

    bench = sub.add_parser("bench", help="benchmarks: " + " | ".join(b.__name__.rsplit(".", 1)[-1] for b in BENCHES))
    bench.set_defaults(fn=_bench)
    add_bench_commands(bench.add_subparsers(dest="what", required=True), [common])

    cfgp = sub.add_parser("config", help="configuration").add_subparsers(dest="sub", required=True)
    add("show", _config_show, "print the resolved, validated config", cfgp)
    return parser


def _log_dir(args: argparse.Namespace) -> str | None:
    """``--log-dir``, else ``logs/`` next to the command's output: inside ``--out`` (or the demo's workdir), beside
    it when the output is a single file; an ``s3://`` output logs locally to ``runs/logs/<command>``."""
    if args.log_dir:
        return args.log_dir
    out = getattr(args, "workdir", None) or getattr(args, "out", None)
    if not out:
        return None
    if "://" in out:
        return f"runs/logs/{args.command}"
    p = Path(out)
    return str((p.parent if p.suffix in (".parquet", ".csv", ".json") else p) / "logs")


# Errors a user can cause (bad config, manifest, path, run directory, placement, a stalled stream): one line
# (a stall adds its placement table), no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, PlacementError, StreamStalled)


def main(argv: Sequence[str] | None = None, *, log_config: bool = False) -> int:
    """Entry point of the ``mer`` console script (and of every job, with ``log_config``: the resolved config
    is logged, redacted, when the handler resolves it). Known errors end in one ``mer: …`` line and exit 2
    (``--log-level debug`` adds the traceback)."""
    args = build_parser().parse_args(argv)
    args.log_config = log_config
    _JSON["indent"] = 2 if args.json else None

    setup_logging(args.log_level, _log_dir(args))
    code = 0
    try:
        args.fn(args)
    except USER_ERRORS as e:
        log.debug("traceback", exc_info=True)
        msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"{e.strerror}: {e.filename}"
        print(f"mer: {msg}", file=sys.stderr)
        code = 2
    for line in console.footer():
        print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
