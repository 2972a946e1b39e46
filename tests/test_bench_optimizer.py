"""The optimizer benchmark: fused and foreach TF1Adam steps side by side, and the bytes they move."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_optimizer.py"


@pytest.mark.timeout(180)
def test_bench_optimizer_tiny_reports_both_implementations_and_their_traffic(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARK), "--tiny", "--device", "cpu", "--steps", "3",
                             "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "optimizer_nextvlad_cpu_tiny.json").read_text())
    fused, foreach = written["rows"]
    assert (fused["implementation"], foreach["implementation"]) == ("fused", "foreach")
    count = fused["parameters"]
    assert count == foreach["parameters"] > 1_000_000  # the tiny model keeps the 3862-class classifier
    # minimal traffic per fp32 parameter: fused Adam 7 tensors x 4 bytes, foreach 18 x 4, clip 3 x 4
    assert fused["minimal_GB"] == pytest.approx(count * (28 + 12) / 1e9)
    assert foreach["minimal_GB"] == pytest.approx(count * (72 + 12) / 1e9)
    for row in (fused, foreach):
        assert row["GB/s"] == pytest.approx(row["minimal_GB"] / (row["ms_per_step"] / 1000))
    assert fused["foreach / fused"] == pytest.approx(foreach["ms_per_step"] / fused["ms_per_step"])
    assert written["meta"]["torch"] and written["meta"]["device_type"] == "cpu"
    assert "| fused |" in result.stdout
