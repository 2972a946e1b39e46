"""`YT8MSegmentDataModule`: the 2019 segment task for Lightning (SPEC_SEGMENTS 2, 3)."""

from __future__ import annotations

import torch

from nextvlad.data.datamodule import Stage, YT8MDataModule
from nextvlad.data.segments import (SEGMENT_SIZE, FoldSelection, SegmentFrames,
                                    YT8MSegmentDataset)


class YT8MSegmentDataModule(YT8MDataModule):
    """Segment batches (see `nextvlad.data.segments`): rated segments to train and validate on,
    every candidate segment of every video to predict on.

    Only the validation partition is segment-rated, so training and validation usually read the
    same files, split by video id: with ``num_folds`` set, a video is in fold
    ``hash(fold_seed, id) % num_folds``; validation reads fold ``val_fold`` and training the others
    (the same split on every machine and run). With ``num_folds: null`` the patterns are used as
    they are.

    What a LightningModule receives: the `YT8MDataModule` batch contract with M = 5 frames, one row
    per segment (``id`` = ``"<video id>:<start>"``), ``labels`` the rated scores, plus
    ``label_weights`` float32 (S, C), 1 on the rated entries. ``batch_size`` / ``eval_batch_size``
    count videos; a batch holds all of their segments.

    Args (beyond `YT8MDataModule`'s, whose ``max_frames`` and ``sample_frames`` do not apply):
        num_folds, val_fold, fold_seed: the split by video id (see above).
        segment_frames: "real": a segment's length is its real frames, ``min(5, n - start)``;
            5: always 5, the rows past the video being 0.0 frames (Google's reader).
        predict_rated: predict on the rated segments of ``predict_pattern`` instead of every
            candidate segment (e.g. to inspect a model on validation ratings).
    """

    def __init__(self, *args, num_folds: int | None = 5, val_fold: int = 0, fold_seed: int = 0,
                 segment_frames: SegmentFrames = "real", predict_rated: bool = False, **kwargs):
        if kwargs.get("sample_frames") is not None:
            raise ValueError("sample_frames does not apply to 5-frame segments")
        if segment_frames not in ("real", SEGMENT_SIZE):
            raise ValueError(f"segment_frames must be 'real' or {SEGMENT_SIZE}, got {segment_frames!r}")
        if kwargs.get("dequantize_in_workers"):
            raise ValueError("dequantize_in_workers is not supported for segment batches")
        kwargs["max_frames"] = SEGMENT_SIZE
        super().__init__(*args, **kwargs)
        if num_folds is not None:
            FoldSelection(num_folds, val_fold, fold_seed, validation=True)  # checks the arguments
        self.num_folds, self.val_fold, self.fold_seed = num_folds, val_fold, fold_seed
        self.segment_frames = segment_frames
        self.predict_rated = predict_rated

    def _make_dataset(self, split: Stage, pattern) -> YT8MSegmentDataset:
        training = split == "fit"
        rated = split != "predict" or self.predict_rated
        folds = None
        if self.num_folds is not None and split in ("fit", "validate"):
            folds = FoldSelection(self.num_folds, self.val_fold, self.fold_seed,
                                  validation=split == "validate")
        return YT8MSegmentDataset(
            pattern, mode="rated" if rated else "candidates", folds=folds,
            batch_size=self.batch_size if training else self.eval_batch_size,
            num_classes=self.num_classes, training=training, drop_last=self.drop_last,
            seed=self.seed, shuffle_buffer=self.shuffle_buffer, on_error=self.on_error,
            compression=self.compression)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        weights = batch["label_weights"]
        out = super().on_after_batch_transfer(batch, dataloader_idx)
        out["label_weights"] = weights
        if self.segment_frames == SEGMENT_SIZE:  # the zero rows past the video count as frames
            out["lengths"] = torch.full_like(out["lengths"], SEGMENT_SIZE)
        return out
