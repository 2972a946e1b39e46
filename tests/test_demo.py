"""`make demo` (nextvlad.demo) end to end on a small dataset: data reuse, fit, logs, checkpoint, report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nextvlad import demo
from nextvlad.data import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def test_demo_trains_and_reports_where_outputs_are(tmp_path, capsys):
    data_dir = tmp_path / "synthetic"
    write_synthetic_dataset(data_dir, num_train=48, num_validate=16, num_test=8, num_classes=100,
                            files_per_split=2, **demo.DEMO_DATA)
    pattern = lambda split: f"--data.init_args.{split}_pattern={data_dir}/{'validate' if split == 'val' else split}*.tfrecord"
    demo.main([
        "--config", str(REPO / "configs" / "demo.yaml"), "--data-dir", str(data_dir),
        pattern("train"), pattern("val"), "--data.init_args.batch_size=16", "--data.init_args.num_workers=0",
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ])
    out = capsys.readouterr().out
    assert f"synthetic data: reusing {data_dir}" in out
    assert "validation GAP@20:" in out and "chance level (random scores):" in out
    logs = list((tmp_path / "runs" / "demo").glob("version_*/events.out.tfevents.*"))
    checkpoints = list((tmp_path / "runs" / "demo").glob("version_*/checkpoints/last.ckpt"))
    assert logs and checkpoints
    assert f"last checkpoint:  {checkpoints[0]}" in out
    best = checkpoints[0].with_name("best.ckpt")
    assert f"best checkpoint:  {best}  ({best.resolve().name})" in out and best.resolve().name.startswith("epoch")


def test_chance_gap_of_random_scores_is_low(tmp_path):
    write_synthetic_dataset(tmp_path, num_train=0, num_validate=40, num_test=0, num_classes=100,
                            files_per_split=1, **demo.DEMO_DATA)
    assert 0.0 < demo.chance_gap(str(tmp_path / "validate*.tfrecord"), 100) < 0.1


def test_demo_outside_the_repository_stops_before_writing_data(tmp_path, monkeypatch, capsys):
    """`python -m nextvlad.demo` from an installed package elsewhere: no configs/demo.yaml there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_code:
        demo.main([])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --config configs/demo.yaml: no such file (the demo runs from the repository's root)")
    assert not any(tmp_path.iterdir())  # no data written


@pytest.mark.slow
def test_make_demo_as_written(tmp_path):
    """What `make demo` runs (`python -m nextvlad.demo`, no arguments) in a directory laid out as a
    clone: it writes the 4,000-video dataset, trains two epochs and reports far above chance."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    result = subprocess.run([sys.executable, "-m", "nextvlad.demo"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "synthetic data: writing data/synthetic ..." in result.stdout
    assert len(list((tmp_path / "data" / "synthetic").glob("*.tfrecord"))) > 3
    found = re.search(r"validation GAP@20: ([0-9.]+) \(last epoch\), best ([0-9.]+); "
                      r"chance level \(random scores\): ([0-9.]+)", result.stdout)
    assert found, result.stdout[-2000:]
    last, best, chance = map(float, found.groups())
    assert best >= last > 0.95 and chance < 0.02  # the README: 0.9878 against 0.0058
    for line in ("best checkpoint:  runs/demo/version_0/checkpoints/best.ckpt",
                 "last checkpoint:  runs/demo/version_0/checkpoints/last.ckpt"):
        assert line in result.stdout
    assert (tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "best.ckpt").is_file()
