"""The README's "2019 segments" commands, end to end through the console scripts, on CPU:
synthetic data -> video-level training -> segment fine-tuning -> predict on test -> submission ->
score, with the score well above a random ranking of the same candidate segments.

The commands are the README's; only size options are appended (fewer videos, one or two epochs)
so that the test takes about a minute.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nextvlad.data.segments import candidate_starts
from nextvlad.data import iter_videos
from nextvlad.score_segments import read_ratings, read_submission, score_submission
from nextvlad.segments import SegmentRanking, read_class_whitelist

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

README_COMMANDS = [
    "nextvlad-synthetic --out-dir data/synthetic --max-frames 60 --prototype-scale 0.6 --segments",
    "lightning fit --config configs/demo.yaml",
    "nextvlad fit --config configs/demo_segments.yaml --model.init_args.init_from=runs/demo/version_0/checkpoints/last.ckpt",
    "nextvlad predict --config configs/demo_segments.yaml --config configs/predict_segments.yaml "
    "--ckpt_path runs/demo_segments/version_0/checkpoints/best.ckpt "
    "--trainer.callbacks.whitelist_path=data/synthetic/segment_label_ids.csv",
    "nextvlad score-segments --submission segment_submission.csv --data 'data/synthetic/test*.tfrecord' "
    "--output score.json",
]
SIZE_OPTIONS = [
    "--num-train 256 --num-validate 160 --num-test 40 --files-per-split 2",
    "--trainer.max_epochs=1 --data.init_args.num_workers=0 --trainer.enable_progress_bar=false",
    "--trainer.max_epochs=2 --data.init_args.num_workers=0 --trainer.enable_progress_bar=false",
    "--data.init_args.num_workers=0 --trainer.enable_progress_bar=false",
    "",
]


def test_readme_commands_are_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for command in README_COMMANDS:
        assert command in readme.replace("\\\n    ", ""), command


def random_ranking_map(workdir: Path) -> float:
    """mAP of the same pipeline with uniformly random probabilities (the chance level)."""
    whitelist = read_class_whitelist(workdir / "data/synthetic/segment_label_ids.csv", 100)
    ranking = SegmentRanking(whitelist)
    rng = np.random.default_rng(0)
    for video in iter_videos(str(workdir / "data/synthetic/test*.tfrecord"), num_classes=100):
        ids = [f"{video['id']}:{s}" for s in candidate_starts(video["num_frames"])]
        ranking.add(ids, rng.random((len(ids), 100), dtype=np.float32))
    ranking.write(workdir / "random.csv")
    ratings = read_ratings(str(workdir / "data/synthetic/test*.tfrecord"), 100)
    submission, _ = read_submission(workdir / "random.csv", ratings, 100_000)
    return score_submission(submission, ratings)[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_segment_pipeline_end_to_end_through_the_console_scripts(tmp_path):
    if not (BIN / "nextvlad").exists():
        pytest.skip("console scripts not installed")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    outputs = []
    for command, size in zip(README_COMMANDS, SIZE_OPTIONS):
        argv = shlex.split(command) + shlex.split(size)
        argv[0] = str(BIN / argv[0])
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    lines = (tmp_path / "segment_submission.csv").read_text().splitlines()
    assert lines[0] == "Class,Segments"
    classes = [int(line.split(",")[0]) for line in lines[1:]]
    assert classes == sorted(classes) and len(classes) > 10
    score = float(outputs[-1].strip())
    chance = random_ranking_map(tmp_path)
    assert score > 0.8 and score > chance + 0.2, (score, chance)
