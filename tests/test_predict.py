"""SubmissionWriter: the SPEC 6 CSV, streamed and renamed atomically; names file; DDP merge; CLI."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch
from toy_data import NUM_CLASSES, SMALL, collate, loader, toy_videos, trainer

from nextvlad.callbacks import SubmissionWriter, read_vocabulary, submission_rows
from nextvlad.module import VideoClassifier

PAIR = re.compile(r"^(\d+) (\S+)$")


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


@pytest.mark.slow
def test_ddp_ranks_write_parts_and_rank_zero_merges_them(tmp_path):
    """Two gloo processes; the DistributedSampler pads 21 videos to 22 with a repeat, dropped."""
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
