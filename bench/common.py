"""Helpers shared by the benchmarks: child processes with their own peak memory, and inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / ".data"


def run_child(code: str, *args: str | Path) -> dict:
    """Run ``code`` in a child Python whose last stdout line is JSON; add the wall seconds and the
    child's peak RSS in MB (wait4: the child's own and its descendants', not this process's)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                                stderr=err, text=True, cwd=ROOT)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"child failed:\n{err.read().decode()[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def synth_pbf(km2: float, seed: int = 1) -> Path:
    """A synthetic city PBF, made once, in a child: a large parent would inflate its children's peak
    RSS (Linux keeps ru_maxrss across fork and exec)."""
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"synth-{km2:g}km2-seed{seed}.osm.pbf"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "geojepa.cli", "synth", str(path), "--km2", str(km2), "--seed",
                        str(seed)], check=True, capture_output=True, cwd=ROOT)
    return path
