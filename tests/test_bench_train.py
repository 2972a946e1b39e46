"""The training benchmark runs end to end in its tiny CPU mode and writes its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


@pytest.mark.timeout(300)
def test_bench_train_tiny_with_mixture_comparison(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--tiny", "--mixture", "--output-dir", str(tmp_path), "--name", "tiny"],
        capture_output=True, text=True, timeout=290,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "tiny.json").read_text())
    workloads = [row["workload"] for row in written["rows"]]
    assert workloads == ["model only (1 branch(es))", "model only, 1 branch", "model only, 3 branches",
                         "end to end (1 workers)"]
    assert all(row["videos_per_s"] > 0 for row in written["rows"])
    assert written["rows"][2]["mix3 / (3 x single)"] > 0
    assert written["meta"]["torch"] and "device" in written["meta"]
    assert "| model only, 3 branches |" in result.stdout
