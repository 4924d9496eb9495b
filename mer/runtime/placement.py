"""Stage resources against the Ray cluster they run on.

Every actor pool of a stream runs at once (decode, face detection, one pool per encoder, the scorer), and
every fold group's worker group of a training run (times ``train.parallel_folds`` and ``labels.parallel_runs``): when
their sum exceeds what the cluster has, Ray Data and Ray Train do not fail, they wait — forever on a fixed
cluster. So:

* on a **local Ray that mer started** (:func:`fit_local`): no GPU → CPU placement; CPU (and GPU) fractions
  scaled so that each group fits at once, leaving a slice for Ray Data's read/write tasks. Batch sizes and frame
  counts stay as configured; where the stream's pools must share the CPUs, the encoders run in one pool and the
  decode pool in one actor (``extract.encoders.colocate``, ``extract.decode.trim``).
* on a **cluster it joined** (:func:`check_placement`): the config is kept; if a stream's or a training run's
  pools cannot all be placed and the cluster cannot grow (``ray.autoscaler: false``), fail at once with each
  stage's demand against the cluster's resources.

The LLM enrichment stage counts like every other pool (:func:`enrich_demands`). Where its engine and the
extraction stream's pools cannot run at once (``enrich.placement: auto``), it runs first as its own stream
(:func:`llm_placement`), so neither waits for the other's CPUs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from mer.config import (MerConfig, Resources, cpu_only, describes, enabled_branches, enriches_inline, transcribes,
                        with_overrides)

log = logging.getLogger("mer.fit")

# CPU kept free of actor pools on a local Ray: Ray Data's read and write tasks and the driver's own work.
TASK_RESERVE_CPU = 0.25
# Smallest fraction a fitted actor gets (Ray accepts 0.0001; below a few hundredths a pool is all overhead).
MIN_FRACTION = 0.05


class PlacementError(RuntimeError):
    """The stage pools of a stream (or a training run's workers) cannot all be placed on the cluster."""


@dataclass(frozen=True)
class Demand:
    """``count`` units (actors or workers) of ``resources`` that must run at the same time."""

    key: str
    resources: Resources
    count: int

    @property
    def cpus(self) -> float:
        return self.count * self.resources.num_cpus

    @property
    def gpus(self) -> float:
        return self.count * self.resources.num_gpus


@dataclass(frozen=True)
class Cluster:
    """What the Ray cluster has: totals, and the largest node (a unit must fit on one node)."""

    cpus: float
    gpus: float
    node_cpus: float
    node_gpus: float

    @classmethod
    def current(cls) -> Cluster:
        """The cluster this process is connected to (alive nodes)."""
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        return cls(cpus=float(total.get("CPU", 0.0)), gpus=float(total.get("GPU", 0.0)),
                   node_cpus=max((float(n.get("CPU", 0.0)) for n in nodes), default=0.0),
                   node_gpus=max((float(n.get("GPU", 0.0)) for n in nodes), default=0.0))


def stream_demands(cfg: MerConfig) -> list[Demand]:
    """The actor pools of the widest stream ``cfg`` builds (extraction with face detection, the speech and
    description stages when on, every enabled encoder and, when scoring from videos, the scorer), each
    ``concurrency`` actors."""
    branches = enabled_branches(cfg)
    pools = [("extract.decode.resources", cfg.extract.decode.resources)]
    if "face" in branches:
        pools.append(("extract.face.resources", cfg.extract.face.resources))
    if transcribes(cfg):
        pools.append(("extract.asr.resources", cfg.extract.asr.resources))
    if describes(cfg):
        pools.append(("extract.describe.resources", cfg.extract.describe.resources))
    if enriches_inline(cfg):  # the enrichment follows the speech stage inside the stream
        pools.append(("enrich.resources", cfg.enrich.resources))
    if cfg.extract.encoders.colocated is not None and branches:
        pools.append(("extract.encoders.colocated", cfg.extract.encoders.colocated))
    else:
        pools += [(f"extract.encoders.{b}.resources", getattr(cfg.extract.encoders, b).resources) for b in branches]
    pools.append(("score.resources", cfg.score.resources))
    return [Demand(k, r, r.concurrency) for k, r in pools]


def enrich_demands(cfg: MerConfig) -> list[Demand]:
    """The enrichment stream: the generator pool and its prompt/finalize helpers."""
    e = cfg.enrich
    return [Demand("enrich.resources", e.resources, e.resources.concurrency * max(1, e.tensor_parallel_size)),
            Demand("enrich.aux_resources", e.aux_resources, e.aux_resources.concurrency)]


def stream_fits_with_llm(cfg: MerConfig, cluster: Cluster, reserve_cpu: float = 0.0) -> bool:
    """Whether the extraction stream's pools and the LLM stage (engine + its small CPU steps) can all run at once
    on ``cluster`` as configured, ``reserve_cpu`` left for Ray Data's tasks."""
    both = stream_demands(cfg) + enrich_demands(cfg)
    spare = Cluster(cpus=max(0.0, cluster.cpus - reserve_cpu), gpus=cluster.gpus, node_cpus=cluster.node_cpus,
                    node_gpus=cluster.node_gpus)
    return placement_problem(both, spare) is None


def llm_placement(cfg: MerConfig, cluster: Cluster | None = None) -> str:
    """Where extraction runs the LLM stage: ``inline`` (an actor pool after the speech stage: with ``text.source``
    asr/auto the transcripts exist only there), ``stream`` (inside the stream, on the manifest rows) or
    ``before`` (first, as its own stream). ``enrich.placement`` unless ``auto``; auto is ``stream`` on a cluster
    that autoscales or where the stream's pools and the engine fit at once, else ``before``. A local Ray that
    mer started was fitted already (:func:`fit_local` writes the choice into the config)."""
    if enriches_inline(cfg):
        return "inline"
    placement = cfg.enrich.placement
    if placement != "auto":
        return placement
    if autoscaling():
        return "stream"
    return "stream" if stream_fits_with_llm(cfg, cluster or Cluster.current(), TASK_RESERVE_CPU) else "before"


def train_demands(cfg: MerConfig, runs: int = 1, *, one_fold: bool = False) -> list[Demand]:
    """Training workers that run at once: ``concurrency`` per fold, ``parallel_folds`` folds, ``runs`` runs
    (the label loop trains ``labels.parallel_runs`` at once). ``one_fold``: a single fold's worker group, the
    unit that must be placeable (parallel folds and runs that do not all fit wait for each other; they do not
    stall)."""
    r = cfg.train.resources
    folds = 1 if one_fold else min(cfg.train.parallel_folds, cfg.train.folds)
    return [Demand("train.resources", r, r.concurrency * (1 if one_fold else folds * max(1, runs)))]


def _scaled(r: Resources, cpu_scale: float, gpu_scale: float) -> dict[str, float]:
    """The fitted CPU and GPU of one unit, rounded down to hundredths (never below :data:`MIN_FRACTION`)."""
    # (the epsilon keeps 0.58 * 1.0 at 0.58: floor(57.99999...) would shave a hundredth off every refit)
    cpus = max(MIN_FRACTION, math.floor(r.num_cpus * cpu_scale * 100 + 1e-6) / 100)
    gpus = r.num_gpus if not r.num_gpus else max(MIN_FRACTION, math.floor(r.num_gpus * gpu_scale * 100 + 1e-6) / 100)
    return {"num_cpus": min(cpus, r.num_cpus), "num_gpus": min(gpus, r.num_gpus)}


def fit_group(demands: list[Demand], cluster: Cluster, reserve_cpu: float = TASK_RESERVE_CPU) -> dict[str, dict]:
    """New ``num_cpus``/``num_gpus`` per demand key so that the whole group runs at once on ``cluster``
    (only keys that change). One scale per resource keeps the configured proportions between stages."""
    budget_cpu = max(cluster.cpus - reserve_cpu, MIN_FRACTION * sum(d.count for d in demands))
    want_cpu = sum(d.cpus for d in demands)
    want_gpu = sum(d.gpus for d in demands)
    cpu_scale = min(1.0, budget_cpu / want_cpu) if want_cpu else 1.0
    cpu_scale = min([cpu_scale, *(cluster.node_cpus / d.resources.num_cpus for d in demands if d.resources.num_cpus)])
    gpu_scale = min(1.0, cluster.gpus / want_gpu) if want_gpu and cluster.gpus else 1.0
    changes: dict[str, dict] = {}
    for d in demands:
        new = _scaled(d.resources, cpu_scale, gpu_scale)
        diff = {k: v for k, v in new.items() if v != getattr(d.resources, k)}
        if diff:
            changes[d.key] = diff
    return changes


def _stream_shares_cpus(cfg: MerConfig, cluster: Cluster) -> bool:
    """True on a local Ray without GPUs where the stream's pools do not all fit its CPUs as configured (the
    condition for colocating the encoders and trimming the decode pool)."""
    return not cluster.gpus and any("num_cpus" in change
                                    for change in fit_group(stream_demands(cfg), cluster).values())


def _colocate_on_cpu(cfg: MerConfig, cluster: Cluster) -> MerConfig | None:
    """``cfg`` with its encoders in one pool when ``extract.encoders.colocate`` is auto, the local Ray has no
    GPU and the stream's pools do not all fit its CPUs as configured (None when that does not apply)."""
    enc = cfg.extract.encoders
    branches = enabled_branches(cfg)
    if enc.colocate != "auto" or enc.colocated is not None or len(branches) < 2:
        return None
    if not _stream_shares_cpus(cfg, cluster):
        return None  # a GPU, or every pool fits as configured
    batch = min(getattr(enc, b).resources.batch_size for b in branches)
    return with_overrides(cfg, [f"extract.encoders.colocated={{batch_size: {batch}, num_cpus: 1.0}}"])


def _one_decode_actor(cfg: MerConfig, cluster: Cluster) -> MerConfig | None:
    """``cfg`` with one decode actor when ``extract.decode.trim`` is auto, the local Ray has no GPU and the
    stream's pools do not all fit its CPUs as configured (None when that does not apply): where every core is
    shared, a second decode actor adds a process to start and no throughput (see ``DecodeConfig.trim``)."""
    d = cfg.extract.decode
    if d.trim != "auto" or d.resources.concurrency == 1 or not _stream_shares_cpus(cfg, cluster):
        return None
    return with_overrides(cfg, ["extract.decode.resources.concurrency=1"])


def fit_local(cfg: MerConfig, cluster: Cluster) -> tuple[MerConfig, str]:
    """``cfg`` sized to a local Ray: CPU placement when it has no GPU, the encoders in one pool and one decode
    actor when the stream's pools must share the CPUs (``extract.encoders.colocate``, ``extract.decode.trim``),
    and each group of pools that runs at once (a stream, enrichment, a training run) scaled to fit. Returns the
    config and one line saying what changed (empty when nothing did)."""
    notes: list[str] = []
    if not cluster.gpus:
        before = cfg
        cfg = cpu_only(cfg)
        if before.model_dump() != cfg.model_dump():
            notes.append("no GPU: every stage on CPU")
    colocated = _colocate_on_cpu(cfg, cluster)
    if colocated is not None:
        cfg = colocated
        notes.append("encoders in one pool (extract.encoders.colocate=never keeps a pool per branch)")
    one_decoder = _one_decode_actor(cfg, cluster)
    if one_decoder is not None:
        cfg = one_decoder
        notes.append("one decode actor (extract.decode.trim=never keeps resources.concurrency)")
    stream = stream_demands(cfg)
    groups = [("stream", stream), ("enrich", enrich_demands(cfg))]
    if cfg.enrich.enabled and cfg.enrich.placement == "auto" and not enriches_inline(cfg):
        # Fitted fractions would let the engine into the stream on any machine, but the engine and the encoders
        # would then share cores the pools already fill: on a machine where they do not fit as configured the
        # engine runs first, alone.
        placement = "stream" if stream_fits_with_llm(cfg, cluster, TASK_RESERVE_CPU) else "before"
        cfg = with_overrides(cfg, [f"enrich.placement={placement}"])
        if placement == "before":
            notes.append(f"LLM enrichment first, as its own stream (its engine and the stream's pools do not fit "
                         f"{cluster.cpus:g} CPUs at once; enrich.placement=stream keeps it in the stream)")
    if cfg.enrich.enabled and cfg.enrich.placement == "stream" and not enriches_inline(cfg):
        groups = [("stream+enrich", stream + enrich_demands(cfg))]
    elif enriches_inline(cfg):  # the engine is one of the stream's pools already (stream_demands)
        groups = [("stream", stream)]
        notes.append("LLM enrichment inside the stream, after speech recognition (text.source="
                     f"{cfg.text.source}: the transcripts exist only there)")
    overrides: list[str] = []
    fitted: list[str] = []
    for name, demands in (*groups, ("train", train_demands(cfg, cfg.labels.parallel_runs))):
        changes = fit_group(demands, cluster)
        for key, diff in changes.items():
            overrides += [f"{key}.{k}={v:g}" for k, v in diff.items()]
        if changes:
            want = sum(d.cpus for d in demands)
            got = sum(d.count * changes.get(d.key, {}).get("num_cpus", d.resources.num_cpus) for d in demands)
            fitted.append(f"{name} {want:g}->{got:g} CPU")
    if overrides:
        cfg = with_overrides(cfg, overrides)
        notes.append(f"fractional CPUs so each group fits {cluster.cpus:g} CPUs at once ({', '.join(fitted)})")
    return cfg, "; ".join(notes)


def _describe(demands: list[Demand], cluster: Cluster) -> str:
    rows = [f"  {d.key}: {d.count} x ({d.resources.num_cpus:g} CPU, {d.resources.num_gpus:g} GPU)"
            f" = {d.cpus:g} CPU, {d.gpus:g} GPU" for d in demands]
    rows.append(f"  total: {sum(d.cpus for d in demands):g} CPU, {sum(d.gpus for d in demands):g} GPU; "
                f"the cluster has {cluster.cpus:g} CPU, {cluster.gpus:g} GPU (largest node {cluster.node_cpus:g} CPU, "
                f"{cluster.node_gpus:g} GPU)")
    return "\n".join(rows)


def placement_problem(demands: list[Demand], cluster: Cluster) -> str | None:
    """Why ``demands`` cannot all run at once on ``cluster`` (None when they can)."""
    eps = 1e-6
    if sum(d.cpus for d in demands) > cluster.cpus + eps or sum(d.gpus for d in demands) > cluster.gpus + eps:
        return "the pools need more than the cluster has"
    for d in demands:
        if d.resources.num_cpus > cluster.node_cpus + eps or d.resources.num_gpus > cluster.node_gpus + eps:
            return f"one unit of {d.key} is larger than any node"
    return None


def check_placement(what: str, demands: list[Demand], autoscaler: bool, cluster: Cluster | None = None) -> None:
    """Raise :class:`PlacementError` when ``demands`` cannot all be placed on the joined cluster and it cannot
    grow; a cluster with an autoscaler is trusted to add nodes."""
    if autoscaler or not demands:
        return
    cluster = cluster or Cluster.current()
    problem = placement_problem(demands, cluster)
    if problem:
        raise PlacementError(
            f"{what} cannot start: {problem} and ray.autoscaler is false, so it would wait forever.\n"
            f"{_describe(demands, cluster)}\n"
            "Lower those resources (--set KEY=VALUE or an --overlay), add nodes, or set ray.autoscaler=true "
            "on an autoscaling cluster.")


# How streams and training runs treat placement in this process: set by :func:`mer.runtime.session.init_ray` (a local
# Ray it started was fitted already; a joined cluster is checked unless it autoscales).
_policy = {"check": True, "autoscaler": False}


def set_policy(*, check: bool, autoscaler: bool) -> None:
    """Record whether pools are checked against the cluster before a stream or training run starts."""
    _policy.update(check=check, autoscaler=autoscaler)


def autoscaling() -> bool:
    """Whether this process runs on a joined cluster that adds nodes on demand (pools that do not fit now are
    left to it; a stalled stream waits for it, :mod:`mer.runtime.stall`)."""
    return bool(_policy["check"] and _policy["autoscaler"])


def ensure_placeable(what: str, demands: list[Demand]) -> None:
    """:func:`check_placement` under this process's policy (a no-op when Ray is not initialised yet).

    Checked against the cluster as it is now, so a stream restarted after a node loss (:mod:`mer.runtime.stream`) could
    be refused while the node is being replaced; the same pools (same stream, counts and resources) placeable
    once in this process are therefore only logged, and wait for the capacity to come back as Ray's pending
    actors do."""
    import ray

    if not (_policy["check"] and ray.is_initialized()):
        return
    key = (what, *sorted((d.key, d.count, d.resources.num_cpus, d.resources.num_gpus) for d in demands))
    try:
        check_placement(what, demands, _policy["autoscaler"])
    except PlacementError as e:
        if key not in _placed:
            raise
        log.warning("%s: the cluster is smaller than when it started (a node lost?); its pools wait for the "
                    "capacity to come back. %s", what, str(e).splitlines()[0])
        return
    _placed.add(key)


# The exact pools (stream, and each pool's count, CPUs, GPUs) placed once in this process.
_placed: set[tuple[Any, ...]] = set()


def stage_demands(stages: list[Any]) -> list[Demand]:
    """Every pool of a stage chain: each :class:`mer.runtime.stream.Stage` of kind ``actor`` with resources, and what a
    ``dataset`` stage declares it starts (its callable's ``demands()``, e.g. the LLM stage's engine and helpers)."""
    out: list[Demand] = []
    for s in stages:
        kind = getattr(s, "kind", None)
        if kind == "actor" and getattr(s, "resources", None) is not None:
            out.append(Demand(s.name, s.resources, s.resources.concurrency))
        elif kind == "dataset" and callable(getattr(s.fn, "demands", None)):
            out += s.fn.demands()
    return out
