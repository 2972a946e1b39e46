"""The segment submission benchmark runs end to end in its tiny mode and writes its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_segment_submission.py"


@pytest.mark.timeout(120)
def test_bench_segment_submission_tiny(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARK), "--tiny", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((tmp_path / "bench_segment_submission_tiny.json").read_text())["rows"][0]
    assert row["segments"] == 20_000 and 0 < row["classes_listed"] <= 1000
    assert 0 < row["max_ids_per_class"] <= 100_000 and row["peak_rss_MiB"] > 0
