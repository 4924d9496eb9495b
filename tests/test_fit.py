"""Stage resources against the cluster: a local Ray is fitted, a joined fixed cluster fails fast.

The session's Ray head (2 CPUs, no GPU, no autoscaler) is the joined fixed cluster.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from mer.config import BRANCHES, load_config, with_overrides
from mer.enrich.stage import build_enrich_stage
from mer.extract.pipeline import build_stages
from mer.runtime import placement
from mer.runtime.placement import (Cluster, PlacementError, check_placement, enrich_demands, fit_local,
                                   llm_placement, placement_problem, stage_demands, stream_demands,
                                   stream_fits_with_llm, train_demands)

LAPTOP = Cluster(cpus=2.0, gpus=0.0, node_cpus=2.0, node_gpus=0.0)


def test_a_two_core_laptop_gets_cpu_placement_and_every_pool_at_once() -> None:
    cfg = load_config(profile="tiny")  # the repo's defaults: 8 CPU of pools and GPU encoders
    assert sum(d.cpus for d in stream_demands(cfg)) == 8 and sum(d.gpus for d in stream_demands(cfg)) == 1
    fitted, note = fit_local(cfg, LAPTOP)
    # the four encoders share one pool (batch: the smallest branch batch) and one decode actor feeds them, so
    # the stream wants 1+1+1+1 CPUs
    assert "no GPU" in note and "encoders in one pool" in note and "one decode actor" in note
    assert "stream 4->" in note
    col = fitted.extract.encoders.colocated
    assert col is not None and col.batch_size == 8 and col.concurrency == 1
    assert [d.key for d in stream_demands(fitted)].count("extract.encoders.colocated") == 1
    assert not any(d.key.startswith("extract.encoders.text") for d in stream_demands(fitted))
    stream = stream_demands(fitted)
    assert sum(d.gpus for d in stream) == 0
    assert sum(d.cpus for d in stream) <= 2 - 0.25 + 1e-9
    assert placement_problem(stream, LAPTOP) is None
    assert placement_problem(train_demands(fitted), LAPTOP) is None
    # proportions kept, sizes untouched but the decode pool's
    assert fitted.extract.decode.resources.num_cpus == fitted.extract.face.resources.num_cpus
    assert cfg.extract.decode.resources.concurrency == 2 and fitted.extract.decode.resources.concurrency == 1
    assert fitted.extract.decode.resources.batch_size == cfg.extract.decode.resources.batch_size
    assert fitted.extract.decode.num_frames == cfg.extract.decode.num_frames
    # idempotent: a fitted config fits
    again, note2 = fit_local(fitted, LAPTOP)
    assert note2 == "" and again.model_dump() == fitted.model_dump()


def test_encoders_stay_in_their_own_pools_where_they_fit_or_when_told() -> None:
    cfg = load_config(profile="tiny")
    never, note = fit_local(load_config(profile="tiny", overrides=["extract.encoders.colocate=never",
                                                                   "extract.decode.trim=never"]), LAPTOP)
    assert never.extract.encoders.colocated is None and "stream 8->" in note and "one pool" not in note
    assert never.extract.decode.resources.concurrency == 2 and "decode actor" not in note
    # a 16-core CPU box: the 8 CPUs of pools fit as configured, each encoder keeps its pool and its core, and
    # the decode pool its two actors
    big, note = fit_local(cfg, Cluster(cpus=16, gpus=0, node_cpus=16, node_gpus=0))
    assert big.extract.encoders.colocated is None and "one pool" not in note
    assert big.extract.decode.resources.concurrency == 2 and "decode actor" not in note
    # one branch: nothing to colocate
    one, _ = fit_local(load_config(profile="tiny", overrides=[f"extract.encoders.{b}.enabled=false"
                                                             for b in BRANCHES if b != "audio"]), LAPTOP)
    assert one.extract.encoders.colocated is None


def test_a_gpu_workstation_keeps_gpus_and_shares_them_by_fraction() -> None:
    cfg = load_config(profile="tiny", overrides=[f"extract.encoders.{b}.resources.num_gpus=0.5" for b in BRANCHES])
    fitted, note = fit_local(cfg, Cluster(cpus=16, gpus=1, node_cpus=16, node_gpus=1))
    assert "no GPU" not in note
    gpus = [getattr(fitted.extract.encoders, b).resources.num_gpus for b in BRANCHES]
    assert all(0 < g <= 0.25 for g in gpus) and sum(gpus) <= 1
    assert fitted.extract.decode.resources.num_cpus == 1.0  # 8 CPU of pools fit 15.75: nothing to scale


def test_the_label_loop_s_parallel_runs_are_fitted_together() -> None:
    cfg = load_config(overrides=["labels.parallel_runs=4", "train.resources.concurrency=2"])
    fitted, _ = fit_local(cfg, LAPTOP)
    assert 4 * 2 * fitted.train.resources.num_cpus <= 2 - 0.25 + 1e-9


def test_the_placement_error_lists_each_stage_against_the_cluster() -> None:
    cfg = load_config(profile="tiny", overrides=[f"extract.encoders.{b}.resources.num_gpus=0" for b in BRANCHES])
    demands = stream_demands(cfg)
    with pytest.raises(PlacementError) as e:
        check_placement("extraction", demands, autoscaler=False, cluster=LAPTOP)
    msg = str(e.value)
    for d in demands:
        assert d.key in msg
    assert "total: 8 CPU" in msg and "the cluster has 2 CPU" in msg and "ray.autoscaler" in msg
    check_placement("extraction", demands, autoscaler=True, cluster=LAPTOP)  # an autoscaler may add nodes
    big_unit = load_config(overrides=["train.resources.num_cpus=4", "train.resources.concurrency=1"])
    assert "larger than any node" in placement_problem(
        train_demands(big_unit), Cluster(cpus=8, gpus=0, node_cpus=2, node_gpus=0))


@pytest.mark.timeout(300)  # a stall (Ray waiting forever for the pools) ends here as a failure
def test_a_joined_fixed_cluster_fails_at_once_instead_of_stalling(ray_local, tiny_config, tmp_path) -> None:
    from mer.config import with_overrides
    from mer.extract.pipeline import build_dataset, build_stages
    from mer.train import train_run

    cfg = with_overrides(tiny_config, ["extract.decode.resources.concurrency=3",
                                       "extract.decode.resources.num_cpus=1"])
    stages = build_stages(cfg)
    assert sum(d.cpus for d in stage_demands(stages)) > 2
    from mer.data.manifest import MANIFEST_SCHEMA

    manifest = pa.Table.from_pylist([{"clip_id": "a", "video_uri": "/nope.mp4", "audio_uri": None, "text": "x",
                                      "label": "happy", "split": "train"}], schema=MANIFEST_SCHEMA)
    with pytest.raises(PlacementError, match=r"decode: 3 x \(1 CPU"):
        build_dataset(cfg, manifest, stages)
    with pytest.raises(PlacementError, match="train.resources: 4 x"):
        train_run(with_overrides(tiny_config, ["train.resources.concurrency=4", "train.resources.num_cpus=1"]),
                  str(tmp_path / "nofeatures"), str(tmp_path / "run"))


def test_a_stream_restarted_while_a_node_is_replaced_waits_instead_of_failing(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A stream restarted after a node loss meets a cluster smaller than the one it started on: what was
    placeable once in this process only logs (its pools wait for the node to come back); a stream that never
    fitted still fails at once."""
    import ray

    from mer.runtime import placement

    demands = stream_demands(load_config(profile="tiny"))
    sizes = iter([Cluster(8, 1, 8, 1), Cluster(0, 0, 0, 0), Cluster(0, 0, 0, 0)])
    monkeypatch.setattr(placement.Cluster, "current", classmethod(lambda cls: next(sizes)))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(placement, "_placed", set())
    monkeypatch.setitem(placement._policy, "check", True)
    monkeypatch.setitem(placement._policy, "autoscaler", False)
    placement.ensure_placeable("the stream a -> b", demands)  # the whole cluster: placed
    with caplog.at_level("WARNING", logger="mer.fit"):
        placement.ensure_placeable("the stream a -> b", demands)  # its node gone: the restart waits
    assert "smaller than when it started" in caplog.text
    with pytest.raises(PlacementError, match="the stream c -> d cannot start"):
        placement.ensure_placeable("the stream c -> d", demands)
    # the same stream with other pools (another config in the same process) is checked as new
    bigger = stream_demands(load_config(profile="tiny", overrides=["extract.face.resources.concurrency=3"]))
    sizes = iter([Cluster(0, 0, 0, 0)])
    with pytest.raises(PlacementError, match="the stream a -> b cannot start"):
        placement.ensure_placeable("the stream a -> b", bigger)


def test_the_llm_stage_is_counted_and_runs_first_where_it_cannot_share_the_machine() -> None:
    """Enrichment's engine and its CPU steps are a pool like the others: on the 2-core laptop they cannot run
    beside the stream's pools, so the LLM stage runs first as its own stream (and the fit line says so); forced
    into the stream, the stream and the engine are fitted together; on a big GPU box it stays in the stream."""
    cfg = load_config(profile="tiny", overrides=["enrich.enabled=true"])
    assert cfg.enrich.placement == "auto"
    fitted, note = fit_local(cfg, LAPTOP)
    assert fitted.enrich.placement == "before" and llm_placement(fitted) == "before"
    assert "LLM enrichment first, as its own stream" in note and "enrich.placement=stream" in note
    assert placement_problem(stream_demands(fitted), LAPTOP) is None
    assert placement_problem(enrich_demands(fitted), LAPTOP) is None
    assert fit_local(fitted, LAPTOP) == (fitted, "")  # idempotent

    forced, note = fit_local(load_config(profile="tiny", overrides=["enrich.enabled=true",
                                                                   "enrich.placement=stream"]), LAPTOP)
    assert "stream+enrich" in note and "LLM enrichment first" not in note
    together = stream_demands(forced) + enrich_demands(forced)
    assert sum(d.cpus for d in together) <= 2 - 0.25 + 1e-9 and placement_problem(together, LAPTOP) is None

    box = Cluster(cpus=32, gpus=2, node_cpus=32, node_gpus=2)
    big, note = fit_local(cfg, box)
    assert big.enrich.placement == "stream" and "LLM" not in note and stream_fits_with_llm(cfg, box)
    off, note = fit_local(load_config(profile="tiny"), LAPTOP)
    assert off.enrich.placement == "auto" and "LLM" not in note  # nothing to place


def test_a_joined_cluster_runs_the_llm_stage_in_the_stream_only_where_everything_fits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(profile="tiny", overrides=["enrich.enabled=true"])
    monkeypatch.setitem(placement._policy, "check", True)
    monkeypatch.setitem(placement._policy, "autoscaler", False)
    assert llm_placement(cfg, Cluster(cpus=32, gpus=2, node_cpus=32, node_gpus=2)) == "stream"
    # the stream's pools fit this node, and the engine fits it alone, but not both at once
    assert placement_problem(stream_demands(cfg), Cluster(cpus=9, gpus=1, node_cpus=9, node_gpus=1)) is None
    assert llm_placement(cfg, Cluster(cpus=9, gpus=1, node_cpus=9, node_gpus=1)) == "before"
    monkeypatch.setitem(placement._policy, "autoscaler", True)  # a cluster that grows is trusted to add the nodes
    assert llm_placement(cfg, Cluster(cpus=9, gpus=1, node_cpus=9, node_gpus=1)) == "stream"
    told = load_config(profile="tiny", overrides=["enrich.enabled=true", "enrich.placement=before"])
    assert llm_placement(told, Cluster(cpus=32, gpus=2, node_cpus=32, node_gpus=2)) == "before"


def test_a_stream_with_the_llm_stage_declares_its_engine(tiny_config) -> None:
    """The LLM stage in a stream counts in the stream's placement check (its engine and CPU steps)."""
    cfg = with_overrides(tiny_config, ["enrich.enabled=true", "enrich.resources.num_cpus=1.5"])
    demands = stage_demands(build_stages(cfg, [build_enrich_stage(cfg)]))
    keys = {d.key: d for d in demands}
    assert keys["enrich.resources"].cpus == 1.5 and "enrich.aux_resources" in keys
    assert {"decode", "face_detect"} <= set(keys)
    with pytest.raises(PlacementError, match=r"enrich.resources: 1 x \(1.5 CPU"):
        check_placement("the stream", demands, autoscaler=False, cluster=LAPTOP)


def test_scoring_fits_the_config_it_adopts_from_its_run(monkeypatch, tmp_path) -> None:
    """`mer score --manifest` on a local Ray extracts with its run's feature settings and transcript cache; where they add stages (the
    demo's run transcribes, describes and enriches inside the stream) the adopted config is fitted again, so the new
    pools are placed with the others (unfitted, the describer waited forever for a CPU the fitted pools held)."""
    import json

    from mer.extract.schema import config_hash, feature_settings
    from mer.predict import score as score_mod
    from mer.runtime import session

    plain, _ = fit_local(load_config(profile="tiny"), LAPTOP)
    trained = with_overrides(load_config(profile="tiny"), ["text.source=auto", "extract.describe.enabled=true",
                                                           "enrich.enabled=true"])
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "models" / "model.json").write_text(json.dumps({"features": {
        "uri": None, "config_hash": config_hash(trained), "settings": feature_settings(trained),
        "media_caches": {"asr": str(tmp_path / "asr_cache"), "describe": str(tmp_path / "gone")}}}))
    (tmp_path / "asr_cache").mkdir()
    seen = {}

    class Extracted(Exception):
        pass

    def extract(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise Extracted

    monkeypatch.setattr(score_mod, "extract_features", extract)
    monkeypatch.setattr(Cluster, "current", classmethod(lambda cls: LAPTOP))
    monkeypatch.setitem(session._LOCAL, "started", True)  # as init_ray leaves it after starting a local Ray
    with pytest.raises(Extracted):
        score_mod.score(plain, str(run), str(tmp_path / "out"), manifest_uri=str(tmp_path / "m.parquet"))
    adopted = seen["cfg"]
    assert config_hash(adopted) == config_hash(trained)
    keys = [d.key for d in stream_demands(adopted)]
    assert {"extract.asr.resources", "extract.describe.resources", "enrich.resources"} <= set(keys)
    assert placement_problem(stream_demands(adopted), LAPTOP) is None
    # the transcripts the run's store cached are read again; a recorded cache that is gone is not used
    assert adopted.extract.asr.cache_dir == str(tmp_path / "asr_cache") and adopted.extract.describe.cache_dir is None
