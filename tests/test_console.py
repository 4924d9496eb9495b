"""What a user reads: the progress line while a stream runs, and no library chatter on the console."""

from __future__ import annotations

import io

import pytest

from mer.runtime import console
from mer.runtime.console import Progress


def test_progress_rate_and_eta_leave_out_the_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    p = Progress("extract", 510, stream=out, every_s=0.0)
    assert p.line() == "extract: 0/510 rows (0%), starting"
    clock[0] = 140.0  # 40 s of actor start-up, then the first row
    p.update(1)
    assert out.getvalue().splitlines()[-1] == "extract: 1/510 rows (0%), first rows after 40 s, ETA -"
    clock[0] = 150.0  # then 100 rows in 10 s: 10 rows/s, not 101 rows over 50 s
    p.update(100)
    assert out.getvalue().splitlines()[-1] == "extract: 101/510 rows (20%), 10.00 rows/s, ETA 41 s"
    p.close()
    assert out.getvalue().splitlines()[-1] == "extract: 101/510 rows in 50 s"


def test_ray_llm_loggers_created_later_write_to_the_log_file_not_the_console(
        tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.llm sets up a stdout handler for each logger it creates, and creates some only when a vLLM stage starts
    (the demo's console showed "No cloud storage mirror configured")."""
    import logging
    import sys

    import ray  # noqa: F401 - Ray's own logger configuration, as in every command
    from ray.llm._internal.common.observability.logging import get_logger

    # Ray's console handler keeps the sys.stderr of the moment ray was first imported; in a suite that was an
    # earlier test's capture, which capsys cannot read. Point it at this test's stderr, as in a real command.
    for h in logging.getLogger("ray").handlers:
        if isinstance(h, logging.StreamHandler) and type(h).__module__.startswith("ray"):
            monkeypatch.setattr(h, "stream", sys.stderr)
    console.setup("INFO", tmp_path / "logs")
    try:
        late = get_logger(f"mer_test_late_{tmp_path.name}")
        late.info("late ray.llm line")
        late.error("late ray.llm error")
        for h in logging.getLogger("ray").handlers:
            h.flush()
        err = capsys.readouterr()
        assert "late ray.llm line" not in err.err + err.out
        assert "late ray.llm error" in err.err + err.out  # errors stay on the console
        log = (tmp_path / "logs" / "mer.log").read_text()
        assert "late ray.llm line" in log and log.count("late ray.llm error") == 1
    finally:
        console.setup("INFO")


def test_demo_summary_prints_figures_to_four_places() -> None:
    from mer.demo import format_summary

    summary = {"waf": {"fused": 0.626}, "accuracy_by_setting": {"fused": 0.62666},
               "label_stages": [{"stage": "round_2", "test_waf": None, "gate_waf": 0.56301, "accepted": False,
                                 "decision": "gate WAF 0.5630 < 0.5886"}],
               "best_stage": {"stage": "round_1", "why": "highest gate WAF"}, "label_quality": {},
               "extract_status": {}, "enrich_status": {}, "llm_vote_status": {},
               "scored_test": {"waf": 0.66182983451549, "accuracy": 0.6633333333333333}, "seconds": 478.3,
               "outputs": {}}
    lines = format_summary(summary).splitlines()
    assert "scored test split: WAF 0.6618, accuracy 0.6633" in lines
    assert "fused             0.6260  0.6267" in lines
    assert "round_2                 -   0.5630  REJECTED (gate WAF 0.5630 < 0.5886)" in lines
    summary["scored_test"] = {"waf": None, "accuracy": None}  # a test split without labels
    assert "scored test split: WAF -, accuracy -" in format_summary(summary).splitlines()
