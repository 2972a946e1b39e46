"""The training benchmark runs end to end in its tiny CPU mode and writes its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
