"""A tiny run of the benchmark command: the flowkeeper part only, no peers.

The real benchmark (``./bench/run``) is not a test; this only keeps the
command working and its table printing, in CI's time budget.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compare_prints_the_table_for_flowkeeper_alone() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.compare",
            "--workflows=20",
            "--rounds=1",
            "--warmup=5",
            "--invocation-workflows=5",
            "--pgbench-seconds=1",
            "--import-runs=1",
            "--stats-settle=0",
            "--peers",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    # Commits are read unsettled here (--stats-settle=0): any number, even below 0.
    row = r"^flowkeeper \S+ +workflow of 3 steps \(HTTP endpoint\) +\d+ +\d+-\d+ +-?\d+\.\d\d$"
    assert re.search(row, text, re.M), text
    assert re.search(r"pgbench single-row INSERT tps, 8 clients \(each round\) +\d+", text), text
    # Checkpointing: a 5-step workflow costs one HTTP invocation, one with a sleep two.
    assert re.search(r"per 5-step workflow, no sleep +1\.00$", text, re.M), text
    assert re.search(r"per 5-step workflow, one sleep +2\.00$", text, re.M), text
    assert re.search(r"import time, flowkeeper \(median of 1\) +\d+ ms", text), text
    assert "commands:" in text and "bench.compare" in text
