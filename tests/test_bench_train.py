"""The training benchmark: tiny CPU run end to end, its defaults from the config, its step timer."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCHMARK = BENCHMARKS / "bench_train.py"
CONFIGS = BENCHMARKS.parent / "configs"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_train", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_bench_train_tiny_with_mixture_comparison(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--tiny", "--mixture", "--output-dir", str(tmp_path), "--name", "tiny"],
        capture_output=True, text=True, timeout=290,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "tiny.json").read_text())
    workloads = [row["workload"] for row in written["rows"]]
    # the config's model (1 branch) is measured once and serves as the single-model reference
    assert workloads == ["model only (1 branch)", "model only (3 branches)", "end to end (1 workers)"]
    assert all(row["videos_per_s"] > 0 for row in written["rows"])
    mixture, single = written["rows"][1], written["rows"][0]
    assert mixture["mix3 / (3 x single)"] == pytest.approx(mixture["ms_per_step"] / (3 * single["ms_per_step"]))
    assert written["meta"]["torch"] and "device" in written["meta"]
    assert "| model only (3 branches) |" in result.stdout
    # Each model row's TFLOP/s from its own model's FLOPs: 3 branches cost about 3x one (the config's).
    flops = {row["workload"]: row["GFLOP/video"] for row in written["rows"]}
    assert flops["model only (1 branch)"] == pytest.approx(written["meta"]["training_GFLOP_per_video"])
    assert flops["model only (3 branches)"] == pytest.approx(3 * flops["model only (1 branch)"], rel=0.05)
    for row in written["rows"]:
        assert row["TFLOP/s"] == pytest.approx(row["GFLOP/video"] * row["videos_per_s"] / 1e3)


def test_frames_and_workers_default_to_the_config():
    bench = load_benchmark()
    demo = bench.parse_args(["--config", str(CONFIGS / "demo.yaml")])
    assert (demo.frames, demo.workers) == (60, 1)
    paper = bench.parse_args(["--config", str(CONFIGS / "nextvlad.yaml")])
    assert paper.frames == 300
    assert paper.workers == min(8, len(os.sched_getaffinity(0)))  # the config's 8, never more than the cores
    explicit = bench.parse_args(["--config", str(CONFIGS / "demo.yaml"), "--frames", "30", "--workers", "0"])
    assert (explicit.frames, explicit.workers) == (30, 0)


def test_step_timer_leaves_out_warm_up_and_reports_the_median():
    bench = load_benchmark()
    durations = iter([9.0, 7.0, 1.0, 1.5, 8.0, 1.25, 1.0])  # 2 slow warm-up steps, then one slow outlier
    now = [0.0]

    def step():
        now[0] += next(durations)

    synchronized = []
    seconds = bench.median_step_seconds(step, warmup=2, steps=5, synchronize=lambda: synchronized.append(now[0]),
                                        clock=lambda: now[0])
    assert seconds == 1.25
    assert len(synchronized) == 1 + 5  # after the warm-up and after every timed step


def test_training_flops_per_video_match_the_layer_shapes(monkeypatch):
    """FlopCounterMode's count against one made by hand from the model's own layer shapes: every
    Linear is a GEMM of 2*rows*in*out FLOPs forward, twice that backward (input and weight
    gradients) except the expansion FCs, whose input (the data) needs no gradient; the aggregation
    is A^T X forward plus two GEMMs of the same size backward."""
    from torch import nn

    monkeypatch.syspath_prepend(str(BENCHMARK.parent))
    import bench_train

    from nextvlad.models.nextvlad import NeXtVLAD

    frames = 20
    hp = bench_train.model_hparams(BENCHMARK.parents[1] / "configs" / "nextvlad.yaml", bench_train.TINY_MODEL)
    counted = bench_train.training_flops_per_video(hp, frames, torch.device("cpu"))

    model = bench_train.VideoClassifier(**hp).model
    streams = [m for m in model.modules() if isinstance(m, NeXtVLAD)]
    stream_linears = {id(layer) for s in streams for layer in (s.expansion_fc, s.group_attention, s.cluster_logits)}
    expected = 0
    for stream in streams:
        expected += 2 * frames * stream.expansion_fc.in_features * stream.expansion_fc.out_features * 2
        for layer in (stream.group_attention, stream.cluster_logits):
            expected += 2 * frames * layer.in_features * layer.out_features * 3
        expected += 2 * frames * stream.groups * stream.clusters * stream.group_size * 3
    for layer in model.modules():
        if isinstance(layer, nn.Linear) and id(layer) not in stream_linears:
            expected += 2 * layer.in_features * layer.out_features * 3
    assert counted == expected


def test_ceilings_writes_to_a_scratch_folder_unless_told(tmp_path):
    """Its CPU line (the CI fallback) wrote into the committed benchmarks/results/, which every
    benchmark changes only when given --output-dir."""
    committed = {path.name: path.stat().st_mtime_ns for path in (BENCHMARKS / "results").iterdir()}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "ceilings.py"), "--device", "cpu", "--copy-mib", "8",
                             "--gemm-size", "64", "--repeats", "1"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "nextvlad_bench_results" / "ceilings_cpu.json").read_text())["rows"]
    assert {path.name: path.stat().st_mtime_ns for path in (BENCHMARKS / "results").iterdir()} == committed
