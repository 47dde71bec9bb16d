"""Progress a person can follow: counts, rate, time left; log lines, never carriage returns."""

from __future__ import annotations


def test_progress_logs_counts_and_time_left_once_each_and_never_a_carriage_return(caplog):
    from geojepa.progress import Progress

    with caplog.at_level("INFO", logger="geojepa.progress"):
        with Progress("phase", 4, "tiles", every=0, live=False) as p:
            for _ in range(4):
                p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("phase: 1/4 tiles (25%)") and "left" in lines[0]
    assert lines[-1].startswith("phase: 4/4 tiles (100%)") and len(lines) == 4  # the end is not logged twice
    assert not any("\r" in ln for ln in lines)
