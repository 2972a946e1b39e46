"""The synthetic dataset: official format, deterministic, the promised structure, learnable."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nextvlad.data import iter_videos, read_records
from nextvlad.data.parsing import parse_frame_record
from nextvlad.data.synthetic import main, write_synthetic_dataset


def test_structure_and_official_format(synthetic_data):
    seen = {}
    for split in ("train", "validate", "test"):
        assert len(synthetic_data[split]) == 3
        videos = list(iter_videos(synthetic_data[split], num_classes=10))
        seen[split] = videos
        for video in videos:
            assert 20 <= video["num_frames"] <= 60
            assert video["rgb"].shape == (video["num_frames"], 1024)
            if split == "test":
                assert not video["has_labels"] and not video["labels"].any()
            else:
                assert 1 <= len(video["label_ids"]) <= 5 and video["has_labels"]
    assert [len(seen[s]) for s in ("train", "validate", "test")] == [120, 45, 30]
    ids = [v["id"] for s in seen.values() for v in s]
    assert len(ids) == len(set(ids))
    # test ground truth is kept beside the files, in VideoId,Labels form
    lines = open(f"{synthetic_data['dir']}/test_labels.csv").read().splitlines()
    assert lines[0] == "VideoId,Labels" and len(lines) == 31
    # values come from the SPEC 1.1 quantizer: frames are spread over the uint8 range
    frames = parse_frame_record(next(read_records(synthetic_data["train"][0])), 10).rgb
    assert frames.min() < 40 and frames.max() > 215 and 100 < frames.mean() < 156


def test_deterministic_by_seed(tmp_path):
    kwargs = dict(num_train=6, num_validate=2, num_test=2, num_classes=8, files_per_split=2,
                  min_frames=5, max_frames=9)
    a = write_synthetic_dataset(tmp_path / "a", seed=3, **kwargs)
    b = write_synthetic_dataset(tmp_path / "b", seed=3, **kwargs)
    c = write_synthetic_dataset(tmp_path / "c", seed=4, **kwargs)
    for split in a:
        for pa, pb, pc in zip(a[split], b[split], c[split]):
            assert filecmp.cmp(pa, pb, shallow=False)
            assert not filecmp.cmp(pa, pc, shallow=False)
    # a video does not depend on how the split is cut into files
    d = write_synthetic_dataset(tmp_path / "d", seed=3, **{**kwargs, "files_per_split": 3})
    assert ([v["id"] for v in iter_videos(a["train"], num_classes=8)]
            == [v["id"] for v in iter_videos(d["train"], num_classes=8)])
    np.testing.assert_array_equal(next(iter_videos(a["train"], num_classes=8))["rgb"],
                                  next(iter_videos(d["train"], num_classes=8))["rgb"])


def test_command_line(tmp_path, capsys):
    main(["--out-dir", str(tmp_path), "--num-train", "4", "--num-validate", "2", "--num-test", "2",
          "--num-classes", "6", "--files-per-split", "1", "--max-frames", "25", "--gzip"])
    assert "train" in capsys.readouterr().out
    assert open(tmp_path / "train0000.tfrecord", "rb").read(2) == b"\x1f\x8b"
    assert len(list(iter_videos(str(tmp_path / "train*.tfrecord"), num_classes=6))) == 4
    result = subprocess.run([sys.executable, "-m", "nextvlad.data.synthetic", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--num-classes" in result.stdout and not result.stderr
    with pytest.raises(ValueError, match="max_labels"):
        write_synthetic_dataset(tmp_path / "bad", num_classes=3, max_labels=5)


def test_a_bad_option_value_is_one_error_line_and_writes_nothing(tmp_path):
    """`nextvlad-synthetic --max-frames 10` (below the default --min-frames 20) printed a traceback."""
    script = Path(sys.executable).with_name("nextvlad-synthetic")
    result = subprocess.run([str(script), "--out-dir", str(tmp_path / "out"), "--max-frames", "10"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "nextvlad-synthetic: error: need 1 <= min_frames <= max_frames, got 20, 10")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gzip", [False, True])
def test_a_split_without_videos_writes_no_file(tmp_path, gzip):
    """`nextvlad-synthetic --num-test 0`: the test split is left out, every file written is
    readable, and reading the test pattern says it matches nothing."""
    script = Path(sys.executable).with_name("nextvlad-synthetic")
    result = subprocess.run([str(script), "--out-dir", str(tmp_path), "--num-train", "3",
                             "--num-validate", "2", "--num-test", "0", "--num-classes", "6",
                             "--min-frames", "2", "--max-frames", "4", *(["--gzip"] if gzip else [])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "test           0 videos  0 files" in result.stdout
    assert sorted(p.name for p in tmp_path.glob("*.tfrecord")) == [
        "train0000.tfrecord", "train0001.tfrecord", "train0002.tfrecord",
        "validate0000.tfrecord", "validate0001.tfrecord"]
    videos = list(iter_videos(str(tmp_path / "*.tfrecord"), num_classes=6))
    assert len(videos) == 5
    with pytest.raises(FileNotFoundError, match="test"):
        list(iter_videos(str(tmp_path / "test*.tfrecord"), num_classes=6))
    assert open(tmp_path / "test_labels.csv").read() == "VideoId,Labels\n"
    paths = write_synthetic_dataset(tmp_path / "api", num_train=0, num_validate=1, num_test=0,
                                    num_classes=6, min_frames=2, max_frames=4)
    assert paths["train"] == paths["test"] == [] and len(paths["validate"]) == 1


def _gap(scores: torch.Tensor, labels: torch.Tensor, top_k: int = 20) -> float:
    """GAP@k (SPEC 5), computed directly: pool every video's top-k, sort, AP over all positives."""
    top_scores, top_classes = scores.topk(min(top_k, scores.shape[1]), dim=1)
    hits = labels.gather(1, top_classes).flatten()
    order = top_scores.flatten().argsort(descending=True, stable=True)
    hits = hits[order]
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / labels.sum())


def test_learnable_by_frame_pooling_but_not_by_chance(tmp_path):
    """A per-frame linear scorer with log-mean-exp pooling learns the labels within seconds;
    the same model untrained stays near chance."""
    paths = write_synthetic_dataset(tmp_path, num_train=400, num_validate=100, num_test=0,
                                    num_classes=20, files_per_split=1, min_frames=20,
                                    max_frames=60, seed=1)

    def load(files):
        videos = list(iter_videos(files, num_classes=20))
        frames = [torch.from_numpy(np.concatenate([v["rgb"], v["audio"]], 1)) for v in videos]
        return frames, torch.from_numpy(np.stack([v["labels"] for v in videos]))

    (train_x, train_y), (val_x, val_y) = load(paths["train"]), load(paths["validate"])
    torch.manual_seed(0)
    model = torch.nn.Linear(1152, 20)

    def scores(frames):
        return torch.stack([torch.logsumexp(model(x), 0) - np.log(len(x)) for x in frames])

    with torch.no_grad():
        untrained = _gap(scores(val_x), val_y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for start in range(0, len(train_x), 32):
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                scores(train_x[start:start + 32]), train_y[start:start + 32])
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        trained = _gap(scores(val_x), val_y)
    assert untrained < 0.4 and trained > 0.9, (untrained, trained)
