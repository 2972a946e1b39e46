"""The data benchmark runs end to end in its tiny mode and writes its table to a scratch folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"
RESULTS = BENCHMARK.parent / "results"


@pytest.mark.timeout(120)
def test_bench_data_tiny_writes_to_scratch_not_the_committed_results(tmp_path):
    committed = {path: path.read_bytes() for path in RESULTS.iterdir()}
    # without --output-dir the results go to the scratch folder, under the temp dir
    result = subprocess.run([sys.executable, str(BENCHMARK), "--tiny", "--data-dir", str(tmp_path / "data")],
                            capture_output=True, text=True, timeout=110, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| nextvlad -> uint8 batch (1 process) |" in result.stdout
    assert {path: path.read_bytes() for path in RESULTS.iterdir()} == committed
    scratch = tmp_path / "nextvlad_bench_results"
    assert f"wrote {scratch / 'bench_data_tiny.json'}" in result.stdout
    written = json.loads((scratch / "bench_data_tiny.json").read_text())
    readers = {row["reader"]: row for row in written["rows"]}
    assert len(readers) == 9
    # every reader decoded every video, in one process and with workers
    assert {row["videos"] for row in readers.values()} == {48}
    assert all(row["videos_per_s"] > 0 and row["MB_per_s"] > 0 for row in readers.values())
    assert (scratch / "bench_data_tiny.md").read_text().startswith("# bench_data_tiny")


def test_aggregation_benchmark_defaults_to_the_scratch_folder():
    sys.path.insert(0, str(BENCHMARK.parent))
    try:
        import bench_aggregation
        from _common import SCRATCH_DIR
    finally:
        sys.path.remove(str(BENCHMARK.parent))
    assert bench_aggregation.parse_args([]).output_dir == SCRATCH_DIR != RESULTS
