"""The data benchmark runs end to end in its tiny mode and writes its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"


@pytest.mark.timeout(120)
def test_bench_data_tiny(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARK), "--tiny", "--data-dir", str(tmp_path / "data"),
                             "--output-dir", str(tmp_path / "results")],
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| nextvlad -> uint8 batch (1 process) |" in result.stdout
    written = json.loads((tmp_path / "results" / "bench_data_tiny.json").read_text())
    readers = {row["reader"]: row for row in written["rows"]}
    assert len(readers) == 9
    # every reader decoded every video, in one process and with workers
    assert {row["videos"] for row in readers.values()} == {48}
    assert all(row["videos_per_s"] > 0 and row["MB_per_s"] > 0 for row in readers.values())
    assert (tmp_path / "results" / "bench_data_tiny.md").read_text().startswith("# bench_data_tiny")
