"""SubmissionWriter: the SPEC 6 CSV, streamed and renamed atomically; names file; DDP merge; CLI."""

from __future__ import annotations

import csv
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from toy_data import NUM_CLASSES, SMALL, collate, loader, toy_videos, trainer

from nextvlad.callbacks import SubmissionWriter, read_vocabulary, submission_rows
from nextvlad.module import VideoClassifier

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_submission(path) -> dict[str, list[tuple[int, float, str]]]:
    """VideoId -> [(class, score, score text)], checking the header and the line syntax."""
    lines = path.read_text().split("\n")
    assert lines[0] == "VideoId,LabelConfidencePairs"
    assert lines[-1] == ""  # every line ends with \n
    rows = {}
    for line in lines[1:-1]:
        video_id, pairs = line.split(",")
        tokens = pairs.split(" ")
        assert len(tokens) % 2 == 0
        assert video_id not in rows, f"{video_id} twice"
        rows[video_id] = [(int(c), float(s), s) for c, s in zip(tokens[::2], tokens[1::2])]
    return rows


def expected_top_k(module: VideoClassifier, videos: list[dict], k: int) -> dict[str, list[tuple[int, float]]]:
    """Oracle: float64 sort of the module's probabilities by (-score, class)."""
    batch = collate(videos)
    module.eval()
    with torch.no_grad():
        probabilities = torch.sigmoid(module(batch["rgb"], batch["audio"], batch["lengths"]).float()).double().numpy()
    expected = {}
    for video_id, row in zip(batch["id"], probabilities):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]
        expected[video_id] = [(c, row[c]) for c in order]
    return expected


def small_model(**hparams) -> VideoClassifier:
    torch.manual_seed(0)
    module = VideoClassifier(**{**SMALL, **hparams})
    trainer(max_steps=4).fit(module, loader(32))
    return module


@pytest.mark.parametrize("top_k", [20, 5])
def test_submission_has_every_video_once_with_top_k_pairs_by_score(tmp_path, top_k):
    module = small_model(top_k=top_k)
    output = tmp_path / "submission.csv"
    trainer(callbacks=[SubmissionWriter(str(output))]).predict(
        module, loader(21, seed=4, labelled=False), return_predictions=False)
    rows = parse_submission(output)
    expected = expected_top_k(module, toy_videos(21, 4, labelled=False), top_k)
    assert list(rows) == list(expected)  # file order = data order in a single process
    for video_id, pairs in rows.items():
        assert len(pairs) == min(top_k, NUM_CLASSES)
        assert [c for c, _, _ in pairs] == [c for c, _ in expected[video_id]]
        np.testing.assert_allclose([s for _, s, _ in pairs], [s for _, s in expected[video_id]], rtol=1e-5)
        scores = [s for _, s, _ in pairs]
        assert scores == sorted(scores, reverse=True)
        assert all(text == "%g" % float(text) for _, _, text in pairs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]  # no temporary left


def test_rows_use_percent_g_and_break_ties_by_lower_class():
    classes = torch.tensor([[7, 3, 5, 1], [0, 2, 1, 3]])
    scores = torch.tensor([[0.5, 1.0, 0.5, 1.2e-5], [0.25, 0.25, 0.9999999, 0.123456789]])
    assert submission_rows(["ab", "cd"], classes, scores) == [
        "ab,3 1 5 0.5 7 0.5 1 1.2e-05\n",
        "cd,1 1 0 0.25 2 0.25 3 0.123457\n",
    ]


def test_interrupted_prediction_never_replaces_a_complete_csv(tmp_path):
    output = tmp_path / "submission.csv"
    output.write_text("VideoId,LabelConfidencePairs\nold,1 0.5\n")

    class FailsOnThirdBatch(VideoClassifier):
        def predict_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("disk on fire")
            return super().predict_step(batch, batch_idx)

    module = FailsOnThirdBatch(**SMALL)
    with pytest.raises(RuntimeError, match="disk on fire"):
        trainer(callbacks=[SubmissionWriter(str(output))]).predict(module, loader(40, labelled=False))
    assert output.read_text() == "VideoId,LabelConfidencePairs\nold,1 0.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


class CountingClassifier(VideoClassifier):
    predicted_batches = 0

    def predict_step(self, batch, batch_idx):
        type(self).predicted_batches += 1
        return super().predict_step(batch, batch_idx)


@pytest.mark.parametrize("bad", ["directory", "under_a_file"])
def test_unwritable_csv_path_fails_before_predicting(tmp_path, bad):
    if bad == "directory":
        output, error = tmp_path, "is a directory"
    else:
        (tmp_path / "plain_file").write_text("x")
        output, error = tmp_path / "plain_file" / "submission.csv", "cannot write .*plain_file/submission.csv"
    CountingClassifier.predicted_batches = 0
    with pytest.raises(OSError, match=error):
        trainer(callbacks=[SubmissionWriter(str(output))]).predict(CountingClassifier(**SMALL), loader(8, labelled=False))
    assert CountingClassifier.predicted_batches == 0


def test_missing_or_foreign_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path):
    output = tmp_path / "out" / "submission.csv"
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=f"Checkpoint file not found: {missing}"):
        trainer(callbacks=[SubmissionWriter(str(output))]).predict(
            VideoClassifier(**SMALL), loader(8, labelled=False), ckpt_path=str(missing))
    run = trainer(max_steps=1)
    run.fit(VideoClassifier(**SMALL), loader(8))
    run.save_checkpoint(tmp_path / "small.ckpt")
    other = VideoClassifier(**{**SMALL, "hidden_size": 8})
    with pytest.raises(ValueError, match="another architecture.*hidden_size: checkpoint 16 vs config 8"):
        trainer(callbacks=[SubmissionWriter(str(output))]).predict(
            other, loader(8, labelled=False), ckpt_path=str(tmp_path / "small.ckpt"))
    assert not output.exists() and list(output.parent.iterdir()) == []


def write_vocabulary(path, num_classes: int = NUM_CLASSES) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Index", "TrainVideoCount", "KnowledgeGraphId", "Name", "WikiUrl"])
        for index in range(num_classes):
            writer.writerow([index, 100 - index, f"/m/{index}", f"Label {index}, the {index}th", ""])


def test_vocabulary_adds_a_readable_file_with_label_names(tmp_path):
    module = small_model(top_k=3)
    vocabulary = tmp_path / "vocabulary.csv"
    write_vocabulary(vocabulary)
    output = tmp_path / "submission.csv"
    writer = SubmissionWriter(str(output), vocabulary_path=str(vocabulary))
    trainer(callbacks=[writer]).predict(module, loader(10, seed=2, labelled=False))
    rows = parse_submission(output)
    with (tmp_path / "submission_names.csv").open(newline="") as handle:
        named = list(csv.reader(handle))
    assert named[0] == ["VideoId", "Labels"]
    assert [row[0] for row in named[1:]] == list(rows)
    for (video_id, labels), pairs in zip(named[1:], rows.values()):
        expected = "; ".join(f"Label {c}, the {c}th ({s:.4g})" for c, s, _ in pairs)
        assert labels == expected


def test_bad_vocabularies_are_clear_errors(tmp_path):
    missing_column = tmp_path / "no_name.csv"
    missing_column.write_text("Index,Label\n0,a\n")
    with pytest.raises(ValueError, match=r"no_name.csv: a vocabulary needs the columns Index and Name; missing \['Name'\]"):
        read_vocabulary(missing_column)
    bad_index = tmp_path / "bad_index.csv"
    bad_index.write_text("Index,Name\n0,a\nx,b\n")
    with pytest.raises(ValueError, match="bad_index.csv, line 3: Index 'x' is not an integer"):
        read_vocabulary(bad_index)
    short = tmp_path / "short.csv"
    write_vocabulary(short, num_classes=NUM_CLASSES - 2)
    writer = SubmissionWriter(str(tmp_path / "s.csv"), vocabulary_path=str(short))
    with pytest.raises(ValueError, match=r"short.csv: no Name for 2 of the model's 12 class indices \(first: \[10, 11\]\)"):
        trainer(callbacks=[writer]).predict(VideoClassifier(**SMALL), loader(4, labelled=False))
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        read_vocabulary(tmp_path / "absent.csv")


def test_repeated_video_ids_are_listed_once_with_their_first_row(tmp_path):
    """A Kaggle submission lists each id once: of an id the data repeats, the row of its first
    occurrence is kept, and a warning counts the rows dropped. The repeats here are other videos
    under the same ids, so a kept repeat would show in the scores."""
    module = small_model()
    first = toy_videos(8, seed=7, labelled=False)
    again = [{**video, "id": first[index]["id"]} for index, video in zip((1, 4, 4), toy_videos(3, seed=8, labelled=False))]
    data = first[:5] + again[:1] + first[5:] + again[1:]  # v1 again after v4; v4 twice at the end
    output = tmp_path / "submission.csv"
    with pytest.warns(UserWarning, match="repeats 2 video ids; 3 repeated rows dropped"):
        trainer(callbacks=[SubmissionWriter(str(output))]).predict(
            module, DataLoader(data, batch_size=3, collate_fn=collate), return_predictions=False)
    rows = parse_submission(output)  # also asserts that no id appears twice
    expected = expected_top_k(module, first, 20)
    assert list(rows) == list(expected)
    for video_id, pairs in rows.items():
        assert [c for c, _, _ in pairs] == [c for c, _ in expected[video_id]]
        np.testing.assert_allclose([s for _, s, _ in pairs], [s for _, s in expected[video_id]], rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


@pytest.mark.slow
def test_ddp_ranks_write_parts_and_rank_zero_merges_them(tmp_path):
    """Two gloo processes; Lightning's DistributedSampler pads 21 videos to 22 with a repeat, dropped."""
    module = small_model()
    output = tmp_path / "submission.csv"
    run = trainer(strategy="ddp_spawn", devices=2, callbacks=[SubmissionWriter(str(output))])
    run.predict(module, loader(21, seed=6, batch_size=4, labelled=False), return_predictions=False)
    rows = parse_submission(output)
    expected = expected_top_k(module, toy_videos(21, 6, labelled=False), 20)
    assert sorted(rows) == sorted(expected)
    for video_id, pairs in rows.items():
        assert [c for c, _, _ in pairs] == [c for c, _ in expected[video_id]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


# ------------------------------------------------------------------------------ end to end (CLI)
E2E_CLASSES = 25  # more than 20, so every row carries exactly 20 pairs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Synthetic TFRecords, a config, and a checkpoint from `nextvlad fit` (two steps)."""
    from nextvlad.cli import main as cli_main
    from nextvlad.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("e2e")
    write_synthetic_dataset(root / "data", num_train=32, num_validate=16, num_test=23, num_classes=E2E_CLASSES,
                            files_per_split=2, min_frames=5, max_frames=30, seed=3)
    config = root / "e2e.yaml"  # not config.yaml: LightningCLI saves its config under that name there
    config.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root / "checkpoints"}, save_last: true}}
model:
  class_path: nextvlad.VideoClassifier
  init_args: {{num_classes: {E2E_CLASSES}, clusters: 4, groups: 4, hidden_size: 16, gating_reduction: 4}}
data:
  class_path: nextvlad.data.YT8MDataModule
  init_args:
    train_pattern: {root / "data" / "train*.tfrecord"}
    val_pattern: {root / "data" / "validate*.tfrecord"}
    predict_pattern: {root / "data" / "test*.tfrecord"}
    batch_size: 8
    num_workers: 0
    max_frames: 30
    num_classes: {E2E_CLASSES}
""")
    cli_main(["fit", "--config", str(config)])
    return {"root": root, "config": str(config), "ckpt": str(root / "checkpoints" / "last.ckpt")}


@pytest.mark.slow
def test_cli_predict_writes_the_submission_for_an_unlabelled_test_split(trained_run):
    from nextvlad.cli import main as cli_main
    from nextvlad.data import iter_videos

    root = trained_run["root"]
    output = root / "out" / "submission.csv"
    cli_main(["predict", "--config", trained_run["config"], "--config", str(REPO_ROOT / "configs" / "predict.yaml"),
              "--ckpt_path", trained_run["ckpt"], f"--trainer.callbacks.output_path={output}"])
    test_videos = list(iter_videos(str(root / "data" / "test*.tfrecord"), max_frames=30, num_classes=E2E_CLASSES))
    assert test_videos and not any(video["has_labels"] for video in test_videos)  # a test split: no labels
    rows = parse_submission(output)  # also asserts that no id appears twice
    assert sorted(rows) == sorted(video["id"] for video in test_videos)
    for pairs in rows.values():
        assert len(pairs) == 20
        assert len({c for c, _, _ in pairs}) == 20 and all(0 <= c < E2E_CLASSES for c, _, _ in pairs)
        scores = [s for _, s, _ in pairs]
        assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
        assert all(text == "%g" % float(text) for _, _, text in pairs)


@pytest.mark.slow
def test_cli_checkpoint_loads_weights_only_and_validates_with_a_report(trained_run, capsys):
    from nextvlad.cli import main as cli_main

    checkpoint = torch.load(trained_run["ckpt"], weights_only=True)
    assert checkpoint["hyper_parameters"]["num_classes"] == E2E_CLASSES
    cli_main(["validate", "--config", trained_run["config"], "--config", str(REPO_ROOT / "configs" / "evaluate.yaml"),
              "--ckpt_path", trained_run["ckpt"]])
    assert "GAP@20" in capsys.readouterr().out
    assert (trained_run["root"] / "checkpoints" / "last.validate.json").is_file()
    assert (trained_run["root"] / "checkpoints" / "last.validate_class_ap.png").is_file()


@pytest.mark.slow
def test_onnx_export_of_a_cli_checkpoint_reproduces_the_submission(trained_run):
    """The exported graph (no --config: the checkpoint's own hyper-parameters) on the dequantized,
    zero-padded test videos gives the submission's classes and scores."""
    ort = pytest.importorskip("onnxruntime")
    from nextvlad.cli import main as cli_main
    from nextvlad.data import iter_videos

    root = trained_run["root"]
    submission = root / "onnx_check.csv"
    cli_main(["predict", "--config", trained_run["config"], "--config", str(REPO_ROOT / "configs" / "predict.yaml"),
              "--ckpt_path", trained_run["ckpt"], f"--trainer.callbacks.output_path={submission}"])
    model = root / "model.onnx"
    cli_main(["export", "--ckpt_path", trained_run["ckpt"], "--output", str(model)])
    videos = list(iter_videos(str(root / "data" / "test*.tfrecord"), max_frames=30, num_classes=E2E_CLASSES))
    rgb = np.zeros((len(videos), 30, 1024), np.float32)
    audio = np.zeros((len(videos), 30, 128), np.float32)
    for b, video in enumerate(videos):
        rgb[b, :video["num_frames"]], audio[b, :video["num_frames"]] = video["rgb"], video["audio"]
    lengths = np.array([video["num_frames"] for video in videos], np.int64)
    (probabilities,) = ort.InferenceSession(str(model)).run(None, {"rgb": rgb, "audio": audio, "lengths": lengths})
    rows = parse_submission(submission)
    for video, row in zip(videos, probabilities):
        classes = [c for c, _, _ in rows[video["id"]]]
        np.testing.assert_allclose(row[classes], [s for _, s, _ in rows[video["id"]]], atol=1e-4, rtol=0)
        assert np.sort(row)[::-1][19] <= min(s for _, s, _ in rows[video["id"]]) + 1e-4  # nothing better left out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cli_predict_lists_a_repeated_id_once_for_one_and_two_ranks(trained_run, tmp_path):
    """A test file matched twice (under two names): `nextvlad predict` on 1 rank and on 2 DDP ranks
    writes every id once, in the data's order of first occurrence, and warns of the rows dropped."""
    from nextvlad.cli import main as cli_main
    from nextvlad.data import iter_videos

    data = tmp_path / "data"
    data.mkdir()
    for source, copy in [("test0000", "test0000"), ("test0001", "test0001"), ("test0000", "test0002")]:
        shutil.copy(trained_run["root"] / "data" / f"{source}.tfrecord", data / f"{copy}.tfrecord")
    pattern = str(data / "test*.tfrecord")
    ids = [video["id"] for video in iter_videos(pattern, max_frames=30, num_classes=E2E_CLASSES)]
    first_ids = list(dict.fromkeys(ids))
    dropped = f"repeats {len(ids) - len(first_ids)} video ids; {len(ids) - len(first_ids)} repeated rows dropped"
    args = ["predict", "--config", trained_run["config"], "--config", str(REPO_ROOT / "configs" / "predict.yaml"),
            "--ckpt_path", trained_run["ckpt"], f"--data.init_args.predict_pattern={pattern}"]
    one_rank, two_ranks = tmp_path / "one_rank.csv", tmp_path / "two_ranks.csv"
    with pytest.warns(UserWarning, match=dropped):
        cli_main(args + [f"--trainer.callbacks.output_path={one_rank}"])
    result = subprocess.run([str(pathlib.Path(sys.executable).parent / "nextvlad"), *args,
                             f"--trainer.callbacks.output_path={two_ranks}", "--trainer.strategy", "ddp",
                             "--trainer.devices", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=380)
    assert result.returncode == 0, result.stderr[-3000:]
    assert dropped in result.stderr
    assert list(parse_submission(one_rank)) == list(parse_submission(two_ranks)) == first_ids


def test_parts_left_by_a_killed_run_are_removed_by_the_next(tmp_path):
    """A killed run (SIGKILL: no exception hook runs) leaves hidden parts; the next run, whatever its
    world size or names file, removes them, and leaves other hidden files alone."""
    output = tmp_path / "submission.csv"
    stale = [".submission.csv.tmp", ".submission.csv.rank1-of-2.part", ".submission_names.csv.tmp"]
    for name in stale + [".submission.csv.notes"]:
        (tmp_path / name).write_text("half a line")
    trainer(callbacks=[SubmissionWriter(str(output))]).predict(small_model(), loader(8, labelled=False),
                                                               return_predictions=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".submission.csv.notes", "submission.csv"]
    assert len(parse_submission(output)) == 8
