"""EvaluationReport (validate/test table, JSON, per-class AP plot) and MAP's per-class values."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from toy_data import NUM_CLASSES, SMALL, collate, loader, toy_videos, trainer

from nextvlad.callbacks import EvaluationReport, plot_class_average_precision
from nextvlad.metrics import MeanAveragePrecision
from nextvlad.module import VideoClassifier


def per_class_ap_oracle(preds: np.ndarray, target: np.ndarray, top_k: int) -> np.ndarray:
    """SPEC 5 per-class AP in float64: class c ranks the videos whose top-k holds c (distinct scores)."""
    preds, target = np.asarray(preds, np.float64), np.asarray(target, np.float64)
    num_videos, num_classes = preds.shape
    top = np.argsort(-preds, axis=1, kind="stable")[:, :top_k]
    ap = np.zeros(num_classes)
    for c in range(num_classes):
        positives = target[:, c].sum()
        if positives == 0:
            continue
        videos = [v for v in range(num_videos) if c in top[v]]
        ranked = sorted(videos, key=lambda v: -preds[v, c])
        hits, total = 0, 0.0
        for rank, v in enumerate(ranked, start=1):
            if target[v, c]:
                hits += 1
                total += hits / rank
        ap[c] = total / positives
    return ap


def test_compute_per_class_matches_float64_oracle_and_compute():
    g = torch.Generator().manual_seed(0)
    preds = torch.rand(40, 7, generator=g)
    target = (torch.rand(40, 7, generator=g) > 0.6).float()
    target[:, 5] = 0  # a class without positives: AP 0, counted by compute() (authors' MAP)
    metric = MeanAveragePrecision(num_classes=7, top_k=3)
    for chunk in range(0, 40, 16):
        metric.update(preds[chunk:chunk + 16], target[chunk:chunk + 16])
    average_precision, positives = metric.compute_per_class()
    expected = per_class_ap_oracle(preds.double().numpy(), target.numpy(), top_k=3)
    assert average_precision.dtype == torch.float64
    np.testing.assert_allclose(average_precision.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(positives.numpy(), target.sum(0).numpy())
    assert metric.compute().item() == pytest.approx(expected.mean(), abs=1e-12)

    filtered = MeanAveragePrecision(num_classes=7, top_k=3, filter_empty_classes=True)
    filtered.update(preds, target)
    all_classes, _ = filtered.compute_per_class()  # every class, whatever the filter
    assert all_classes.shape == (7,)
    assert filtered.compute().item() == pytest.approx(expected[target.sum(0).numpy() > 0].mean(), abs=1e-12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[VideoClassifier, str]:
    """A briefly trained module and its checkpoint (reports go next to it)."""
    torch.manual_seed(0)
    tmp_path = tmp_path_factory.mktemp("trained")
    module = VideoClassifier(**SMALL, learning_rate=1e-2)
    run = trainer(max_epochs=2, default_root_dir=tmp_path)
    run.fit(module, loader(64))
    ckpt = tmp_path / "model.ckpt"
    run.save_checkpoint(ckpt)
    return module, str(ckpt)


def model_predictions(module: VideoClassifier, videos: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    batch = collate(videos)
    module.eval()
    with torch.no_grad():
        probabilities = torch.sigmoid(module(batch["rgb"], batch["audio"], batch["lengths"]))
    return probabilities.double().numpy(), batch["labels"].numpy()


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_report_prints_table_and_writes_json_and_plot_next_to_checkpoint(trained, capsys, stage):
    module, ckpt = trained
    tmp_path = pathlib.Path(ckpt).parent
    capsys.readouterr()
    run = trainer(default_root_dir=tmp_path, callbacks=[EvaluationReport()])
    evaluate = run.validate if stage == "validate" else run.test
    (results,) = evaluate(module, loader(40, seed=3), ckpt_path=ckpt, verbose=False)
    prefix = "val/" if stage == "validate" else "test/"

    printed = capsys.readouterr().out
    for label, key in [("GAP@20", "gap"), ("Hit@1", "hit_at_one"), ("PERR", "perr"), ("MAP", "map"), ("loss", "loss")]:
        line = next(line for line in printed.splitlines() if line.split()[:1] == [label])
        assert float(line.split()[1]) == pytest.approx(results[prefix + key], abs=1e-6)

    report = json.loads((tmp_path / f"model.{stage}.json").read_text())
    assert report["stage"] == stage and report["checkpoint"] == ckpt
    assert report["metrics"] == pytest.approx({k.removeprefix(prefix): v for k, v in results.items()})
    # Per-class AP: an independent oracle on the module's own predictions.
    preds, labels = model_predictions(module, toy_videos(40, 3))
    np.testing.assert_allclose(report["per_class"]["average_precision"],
                               per_class_ap_oracle(preds, labels, top_k=20), atol=1e-6)
    assert report["per_class"]["positives"] == labels.sum(0).tolist()
    assert np.mean(report["per_class"]["average_precision"]) == pytest.approx(results[prefix + "map"], abs=1e-6)

    png = tmp_path / f"model.{stage}_class_ap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (540, 840)  # 7 x 4.5 inches at 120 dpi


def test_report_without_checkpoint_goes_to_the_log_dir(tmp_path):
    module = VideoClassifier(**SMALL)
    trainer(default_root_dir=tmp_path, callbacks=[EvaluationReport(plot=False)]).test(module, loader(16), verbose=False)
    report = json.loads((tmp_path / "test_metrics.json").read_text())
    assert report["checkpoint"] is report["checkpoint_file"] is None
    assert set(report["metrics"]) == {"gap", "hit_at_one", "perr", "map", "loss"}
    assert len(report["per_class"]["positives"]) == NUM_CLASSES
    assert not (tmp_path / "test_class_ap.png").exists()


def test_validation_inside_fit_writes_no_report(tmp_path):
    module = VideoClassifier(**SMALL)
    out = tmp_path / "reports"
    run = trainer(max_epochs=1, default_root_dir=tmp_path, callbacks=[EvaluationReport(output_dir=str(out))])
    run.fit(module, loader(16), loader(8))
    assert not out.exists()


def test_unlabelled_evaluation_set_is_an_error_not_a_report_of_zeros(tmp_path):
    module = VideoClassifier(**SMALL)
    run = trainer(default_root_dir=tmp_path, callbacks=[EvaluationReport(output_dir=str(tmp_path / "r"))])
    with pytest.raises(ValueError, match=r"no video of the validation data has labels \(the evaluated data\)"):
        run.validate(module, loader(16, labelled=False), verbose=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_ddp_report_gathers_per_class_values_from_every_rank(trained, tmp_path):
    """Two gloo processes, 20 videos each: the same report as one process over all 40."""
    module, ckpt = trained
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    trainer(callbacks=[EvaluationReport(output_dir=str(single), plot=False)]).validate(
        module, loader(40, seed=3), ckpt_path=ckpt, verbose=False)
    trainer(strategy="ddp_spawn", devices=2, callbacks=[EvaluationReport(output_dir=str(ddp), plot=False)]).validate(
        module, loader(40, seed=3), ckpt_path=ckpt, verbose=False)
    one, two = (json.loads((d / "model.validate.json").read_text()) for d in (single, ddp))
    assert two["per_class"]["positives"] == one["per_class"]["positives"]
    np.testing.assert_allclose(two["per_class"]["average_precision"], one["per_class"]["average_precision"], atol=1e-12)
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_report_without_a_checkpoint_is_written_to_the_log_folder(trained, tmp_path):
    """No checkpoint (nor a local one: a URL takes the same path): the report goes to the log folder,
    which Lightning broadcasts from rank 0; asked on rank 0 alone, rank 0 waited there forever while
    rank 1 waited in the shutdown barrier."""
    module, _ = trained
    trainer(strategy="ddp_spawn", devices=2, default_root_dir=tmp_path, callbacks=[EvaluationReport(plot=False)]
            ).validate(module, loader(40, seed=3), verbose=False)
    report = json.loads((tmp_path / "validate_metrics.json").read_text())
    assert report["checkpoint"] is None and set(report["metrics"]) == {"gap", "hit_at_one", "perr", "map", "loss"}


class RankShards(torch.utils.data.IterableDataset):
    """Videos [0, split) on rank 0 and [split, n) on rank 1, as YT8MDataModule shards (no padding,
    unequal counts); all of them in one process."""

    def __init__(self, videos: list[dict], split: int):
        self.videos, self.split = videos, split

    def __iter__(self):
        if not torch.distributed.is_initialized():
            return iter(self.videos)
        rank = torch.distributed.get_rank()
        return iter(self.videos[: self.split] if rank == 0 else self.videos[self.split:])


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("split", [7, 13], ids=["7+6 videos", "13+0 videos"])
def test_ddp_loss_and_metrics_of_unequal_ranks_are_those_of_one_process(trained, tmp_path, split):
    """13 videos in batches of 4 on two ranks of 7 and 6 (2 batches each, of 4+3 and 4+2), or 13 and
    none: the mean loss over all videos, as one process computes it. Lightning's synced mean gave
    x13/12 (its batch-size count is averaged as an integer), and a rank without a batch left the
    other waiting forever in the loss's collective."""
    module, ckpt = trained
    data = torch.utils.data.DataLoader(RankShards(toy_videos(13, seed=3), split), batch_size=4, collate_fn=collate)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    trainer(callbacks=[EvaluationReport(output_dir=str(single), plot=False)]).validate(
        module, data, ckpt_path=ckpt, verbose=False)
    trainer(strategy="ddp_spawn", devices=2, callbacks=[EvaluationReport(output_dir=str(ddp), plot=False)]).validate(
        module, data, ckpt_path=ckpt, verbose=False)
    one, two = (json.loads((d / "model.validate.json").read_text()) for d in (single, ddp))
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-6)
    videos = toy_videos(13, seed=3)
    with torch.no_grad():
        reloaded = VideoClassifier.load_from_checkpoint(ckpt).eval()
        batch = collate(videos)
        logits = reloaded(batch["rgb"], batch["audio"], batch["lengths"]).double()
    oracle = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"].double(),
                                                                  reduction="none").sum(1).mean()
    assert two["metrics"]["loss"] == pytest.approx(oracle.item(), rel=1e-5)


def visible_tick_labels(axis, limits) -> list[float]:
    """The numbers the drawn axis labels, within its limits, minor ticks included."""
    ticks = list(zip(axis.get_majorticklocs(), axis.get_majorticklabels()))
    ticks += list(zip(axis.get_minorticklocs(), axis.get_minorticklabels()))
    return sorted(float(label.get_text()) for location, label in ticks
                  if label.get_text() and limits[0] <= location <= limits[1])


@pytest.mark.parametrize("low, high, expected", [
    (2, 45, [2, 5, 10, 20]),                     # under two decades: 1-2-5 steps
    (3, 8, [3, 4, 5, 6, 7, 8]),                  # under one decade: every integer step
    (1, 3000, [1, 10, 100, 1000]),               # many decades: powers of ten
    (7, 7, [5, 6, 7, 8, 9, 10]),                 # one count
])
def test_class_ap_plot_labels_its_log_axis_across_the_range(tmp_path, low, high, expected):
    positives = np.geomspace(low, high, num=60).round()
    ap = np.linspace(0, 1, positives.size)
    figure = plot_class_average_precision(ap, positives, tmp_path / "ap.png")
    figure.canvas.draw()  # tick labels are set when drawn
    axes = figure.axes[0]
    labels = visible_tick_labels(axes.xaxis, axes.get_xlim())
    assert set(expected) <= set(labels)
    assert len(labels) <= 12  # still readable
    assert (tmp_path / "ap.png").stat().st_size > 0


@pytest.mark.slow
def test_segment_model_report_has_segment_map_through_the_console_script(tmp_path):
    """``nextvlad validate --config <segment config> --config configs/evaluate.yaml --ckpt_path ...``:
    the segment task's main metric (the one its checkpoints are selected on) is in the table and the
    JSON, with the value Lightning's own results table logged as val/segment_map."""
    import re
    import subprocess
    import sys

    import yaml

    from nextvlad.convert import checkpoint_from_module
    from nextvlad.data import write_synthetic_dataset

    repo = pathlib.Path(__file__).resolve().parents[1]
    write_synthetic_dataset(tmp_path / "data" / "synthetic", num_train=0, num_validate=40, num_test=0,
                            num_classes=100, files_per_split=1, min_frames=10, max_frames=60, seed=2, segments=True)
    tiny = dict(num_classes=100, clusters=4, groups=4, hidden_size=16, gating_reduction=4, task="segments")
    torch.manual_seed(0)
    torch.save(checkpoint_from_module(VideoClassifier(**tiny)), tmp_path / "segments.ckpt")
    config = yaml.safe_load((repo / "configs" / "demo_segments.yaml").read_text())
    config["model"]["init_args"] = tiny
    (tmp_path / "segments.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "nextvlad"), "validate", "--config", "segments.yaml", "--config",
         str(repo / "configs" / "evaluate.yaml"), "--ckpt_path", "segments.ckpt", "--data.init_args.num_workers=0",
         "--trainer.enable_progress_bar=false"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    logged = float(re.search(r"val/segment_map[\s│|]*([0-9.]+)", result.stdout).group(1))
    reported = json.loads((tmp_path / "segments.validate.json").read_text())["metrics"]["segment_map"]
    assert 0 < reported <= 1 and reported == pytest.approx(logged, abs=1e-6)
    table_value = float(re.search(r"^segment mAP\s+([0-9.]+)$", result.stdout, re.M).group(1))
    assert table_value == pytest.approx(reported, abs=5e-7)
    # Per-class AP and the plot are the segment metric's (rated segments), not the proxy MAP's.
    report = json.loads((tmp_path / "segments.validate.json").read_text())
    per_class = report["per_class"]
    assert per_class["metric"] == "segment_map"
    average_precision, positives = np.array(per_class["average_precision"]), np.array(per_class["positives"])
    assert average_precision[positives > 0].mean() == pytest.approx(reported, abs=1e-6)


def test_report_names_the_file_a_checkpoint_link_pointed_to(trained):
    """best.ckpt is a link that moves as training goes on: the report keeps the name evaluated
    (its file names follow it) and the file it was at that time."""
    module, ckpt = trained
    folder = pathlib.Path(ckpt).parent
    link = folder / "best.ckpt"
    link.unlink(missing_ok=True)
    link.symlink_to(pathlib.Path(ckpt).name)
    trainer(default_root_dir=folder, callbacks=[EvaluationReport(plot=False)]).validate(
        module, loader(16), ckpt_path=str(link), verbose=False)
    report = json.loads((folder / "best.validate.json").read_text())
    assert report["checkpoint"] == str(link) and report["checkpoint_file"] == str(pathlib.Path(ckpt).resolve())
