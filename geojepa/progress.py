"""Progress of a long phase a person can follow: counts, rate and the estimated time left.

In a terminal (stderr is a TTY) a live bar is redrawn in place at most a few times a second; anywhere else
(Prefect's and MLflow's logs, a file, CI) it is a plain log line every ``every`` seconds and one at the end, so
logs hold lines, never carriage returns. Standard library only (the training hosts use it too)::

    with Progress("evaluate: embedding", total=len(tiles), unit="tiles") as p:
        for batch in batches:
            ...
            p.update(len(batch))
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("geojepa.progress")


def duration(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 05 s``, ``42 s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class Progress:
    def __init__(self, name: str, total: int, unit: str = "items", every: float = 5.0, logger=None,
                 live: bool | None = None):
        self.name, self.total, self.unit, self.every = name, max(int(total), 0), unit, every
        self.log = logger or log
        self.live = sys.stderr.isatty() if live is None else live
        self.done, self.t0 = 0, time.perf_counter()
        self._last, self._logged = self.t0, -1

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close(failed=exc[0] is not None)

    def line(self) -> str:
        """``name: 120/4,087 tiles (3%), 41.2 tiles/s, 1 min 36 s left``."""
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = (f", {duration((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total
                else f", {duration(elapsed)}")
        return f"{self.name}: {self.done:,}/{self.total:,} {self.unit}{share}, {rate:,.1f} {self.unit}/s{left}"

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.live and now - self._last >= 0.2:
            width = 24
            filled = int(width * self.done / self.total) if self.total else 0
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.line()}\x1b[K")
            sys.stderr.flush()
            self._last = now
        elif not self.live and now - self._last >= self.every:
            self.log.info("%s", self.line())
            self._last, self._logged = now, self.done

    def close(self, failed: bool = False) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        if not failed and (self.live or self._logged != self.done):  # the last count once, not twice
            self.log.info("%s", self.line())
