"""benchmarks/gpu_session.sh --dry-run: every stage's CPU fallback runs, within its budget, and the
session returns at most 8 files (the device tool's limit) holding every stage's results, without
touching benchmarks/results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("setup", "versions", "ceilings", "tests", "kernel", "model", "train", "mix3", "optimizer")


@pytest.mark.timeout(240)
def test_gpu_session_dry_run_runs_every_stage_and_returns_at_most_8_files(tmp_path):
    results_before = sorted(p.name for p in (REPO / "benchmarks" / "results").iterdir())
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    environment.pop("TRITON_INTERPRET", None)  # the script sets it for the stage that needs it
    completed = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), "--dry-run"],
                               capture_output=True, text=True, timeout=230, env=environment, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]

    returned = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert returned == ["results.tar.gz", "session.log", "summary.md"]
    summary = (out / "summary.md").read_text()
    for stage in STAGES:
        assert re.search(rf"^\| {stage} \| \d+ \| \d+ \| ok \|$", summary, re.MULTILINE), (stage, summary)
    # the kernel and training targets are printed (N/A: tiny CPU shapes are not what they judge)
    targets = re.findall(r"^- TARGET (\S+) (.*)$", summary, re.MULTILINE)
    assert len(targets) >= 7 and all(verdict == "N/A" for verdict, _ in targets), summary
    assert any("torch.compile" in text for _, text in targets)
    assert any("nextvlad_mix3 model only" in text for _, text in targets)

    with tarfile.open(out / "results.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
        assert {"ceilings_cpu.json", "aggregation_cpu_quick.json", "train_nextvlad_cpu_tiny.json",
                "train_nextvlad_mix3_cpu_tiny.json", "aggregation_roofline_measured.json",
                "kernel_model_measured.json", "optimizer_nextvlad_cpu_tiny.json"} <= names
        ceilings = json.load(archive.extractfile("./ceilings_cpu.json"))["meta"]["ceilings"]
        train = json.load(archive.extractfile("./train_nextvlad_cpu_tiny.json"))
        kernel = json.load(archive.extractfile("./aggregation_cpu_quick.json"))
        roofline = json.load(archive.extractfile("./aggregation_roofline_measured.json"))
    assert ceilings["copy_GBps"] > 0 and ceilings["bf16_TFLOPs"] > 0
    assert roofline["meta"]["copy_GBps"] == pytest.approx(ceilings["copy_GBps"])
    # MFU is judged against the measured ceiling the earlier stage wrote
    assert train["meta"]["MFU_peak_TFLOPs"] == pytest.approx(ceilings["bf16_TFLOPs"])
    workloads = [row["workload"] for row in train["rows"]]
    assert "model only, reference aggregation" in workloads and any(w.startswith("end to end") for w in workloads)
    assert kernel["meta"]["float32_matmul_precision"] == "high"
    assert {row["provider"] for row in kernel["rows"]} == {"reference", "triton"}
    assert all(row["ms"] > 0 for row in kernel["rows"])
    assert sorted(p.name for p in (REPO / "benchmarks" / "results").iterdir()) == results_before
