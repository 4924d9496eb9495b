"""The progress line a user reads while a stream runs."""

from __future__ import annotations

import io

import pytest

from mer import console
from mer.console import Progress


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
