"""A tiny run of the payments benchmark (``python -m bench.payments --quick``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_payments_benchmark_prints_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.payments", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for workload in ("three", "three-plain-write", "three-tx"):
        assert re.search(rf"^40 x {workload} +\d+ +-?\d+\.\d\d", text, re.M), text
    assert re.search(r"transaction step commits/run minus plain: [+-]\d+\.\d\d", text), text
    assert re.search(r"codec throughput cost on the 3-step workflow: -?\d+\.\d%", text), text
    assert "command: " in text and "bench.payments --quick" in text
