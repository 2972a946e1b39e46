"""The 2019 segment task's submission: the class whitelist, per-class segment ranking, the CSV.

`SegmentRanking` turns segment probabilities into the Kaggle ``Class,Segments`` file the way
Google's inference.py does (SPEC_SEGMENTS 4), with its quirks fixed where they are bugs:

* each segment's probabilities are masked with the 1000-class whitelist and its 20 best
  *whitelisted* classes are taken (Google can spend some of the 20 places on non-whitelisted
  classes that it drops later, 4.2); among equal probabilities the lower class index is taken;
* each of those scores is rounded to 6 significant digits as Google's ``"%g"`` text is, and the
  ranking per class uses the rounded value (as Google, 4.3);
* per class at most ``segment_max_pred`` (100,000) segments are kept, by descending rounded score;
  **ties** (equal rounded scores) are broken by ascending segment id, compared as (video id,
  start time as a number): deterministic whatever the order or sharding of the input (Google's
  order is that of its heapq array, 4.3);
* lines in ascending class id (Google: the order classes first appeared), header
  ``Class,Segments``, one space between ids, ``\\n`` line ends; a class that is in no segment's
  top 20 has no line.

Memory is bounded: entries (class, score, segment) are buffered in small numpy arrays, moved to
per-class arrays every few million entries, and a class's array is cut back to its best
``segment_max_pred`` when it grows past twice that; about 10 bytes per kept entry (see
benchmarks/bench_segment_submission.py for the full test partition).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.trainer.states import TrainerFn

from nextvlad.callbacks import check_prediction_task
from nextvlad.data.segments import VIDEO_FRAMES
from nextvlad.metrics import _top_k_mask

SUBMISSION_HEADER = "Class,Segments\n"
TOP_K = 20
SEGMENT_MAX_PRED = 100_000


def read_class_whitelist(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """The sorted class ids of a ``segment_label_ids.csv`` (header ``Index``, one id per line).

    Blank lines and a UTF-8 byte order mark (what editors leave) are ignored. Raises ValueError
    naming the file and line for a line that is not an integer, an id outside [0, num_classes), a
    repeated id or a file without ids (Google's reader skips any line int() refuses, so a typo
    would silently drop a class).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class whitelist {path} does not exist (segment_label_ids.csv of "
                                "Google's starter code; the package ships no copy)")
    ids: dict[int, int] = {}
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text or (line_number == 1 and text == "Index"):
                continue
            try:
                class_id = int(text)
            except ValueError:
                raise ValueError(f"{path}, line {line_number}: {text!r} is not a class id") from None
            if not 0 <= class_id < num_classes:
                raise ValueError(f"{path}, line {line_number}: class {class_id} is outside "
                                 f"[0, num_classes={num_classes})")
            if class_id in ids:
                raise ValueError(f"{path}, line {line_number}: class {class_id} repeats line "
                                 f"{ids[class_id]}")
            ids[class_id] = line_number
    if not ids:
        raise ValueError(f"{path}: no class ids")
    return np.array(sorted(ids), np.int64)


def round_significant(values: np.ndarray, digits: int = 6) -> np.ndarray:
    """``float("%g" % v)`` for every value (6 significant digits), vectorised, as float64.

    ``%g`` rounds the exact binary value half to even; scaling by a power of ten in float64 can
    move a value that lies within 1e-16 of a rounding boundary across it. float32 probabilities
    are never that close except at exact binary ties, where both round half to even (tested).
    """
    values = np.asarray(values, np.float64)
    out = np.zeros_like(values)
    nonzero = values != 0
    magnitude = np.floor(np.log10(np.abs(values[nonzero])))
    scale = 10.0 ** (digits - 1 - magnitude)
    out[nonzero] = np.round(values[nonzero] * scale) / scale
    return out


class _ClassEntries:
    """One class's kept (score, segment) entries in buffers grown by 1.25x: amortised appends,
    a few allocations per class instead of a small array per class per flush, at most 25% slack."""

    __slots__ = ("scores", "segments", "size")

    def __init__(self) -> None:
        self.scores = np.empty(0, np.float32)
        self.segments = np.empty(0, np.int32)
        self.size = 0

    def extend(self, scores: np.ndarray, segments: np.ndarray) -> None:
        need = self.size + len(scores)
        if need > len(self.scores):
            capacity = max(need, int(len(self.scores) * 1.25), 1024)
            for name in ("scores", "segments"):
                grown = np.empty(capacity, getattr(self, name).dtype)
                grown[: self.size] = getattr(self, name)[: self.size]
                setattr(self, name, grown)
        self.scores[self.size:need] = scores
        self.segments[self.size:need] = segments
        self.size = need

    def replace(self, scores: np.ndarray, segments: np.ndarray) -> None:
        self.size = 0
        self.extend(scores, segments)

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        return self.scores[: self.size], self.segments[: self.size]


class SegmentRanking:
    """Per-class rankings of segments, fed batch by batch (see the module docstring)."""

    def __init__(self, whitelist: np.ndarray, top_k: int = TOP_K,
                 segment_max_pred: int = SEGMENT_MAX_PRED, flush_entries: int = 4_000_000):
        if top_k < 1 or segment_max_pred < 1:
            raise ValueError(f"top_k and segment_max_pred must be >= 1, got {top_k}, {segment_max_pred}")
        self.whitelist = np.asarray(whitelist, np.int64)
        self.top_k = min(top_k, len(self.whitelist))
        self.segment_max_pred = segment_max_pred
        self.flush_entries = flush_entries
        self.video_ids: list[str] = []
        self._video_index: dict[str, int] = {}
        self._segment_video: list[np.ndarray] = []  # int32 per segment
        self._segment_start: list[np.ndarray] = []  # int16 per segment
        self.num_segments = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_entries = 0
        # per whitelist position: the (score, segment) entries kept so far
        self._kept = [_ClassEntries() for _ in self.whitelist]
        self._video_rank_cache: np.ndarray | None = None

    # -- input ----------------------------------------------------------------------------------
    def add(self, segment_ids: Sequence[str], probabilities: torch.Tensor | np.ndarray) -> None:
        """Add segments ``"<video id>:<start>"`` and their (S, C) class probabilities."""
        probabilities = torch.as_tensor(probabilities)
        if probabilities.ndim != 2 or probabilities.shape[0] != len(segment_ids):
            raise ValueError(f"probabilities must be (segments, classes) for {len(segment_ids)} "
                             f"segment ids, got shape {tuple(probabilities.shape)}")
        if probabilities.shape[1] <= int(self.whitelist[-1]):
            raise ValueError(f"probabilities have {probabilities.shape[1]} classes; the whitelist "
                             f"names class {int(self.whitelist[-1])}")
        if not len(segment_ids):
            return
        whitelisted = probabilities[:, torch.from_numpy(self.whitelist)].float()
        positions = self._top_positions(whitelisted)
        scores = round_significant(whitelisted.gather(1, positions).numpy().ravel()).astype(np.float32)
        first = self.num_segments
        self._add_segments(segment_ids)
        segments = np.repeat(np.arange(first, self.num_segments, dtype=np.int32), positions.shape[1])
        self._pending.append((positions.numpy().astype(np.int16).ravel(), scores, segments))
        self._pending_entries += len(scores)
        if self._pending_entries >= self.flush_entries:
            self._flush()

    def _top_positions(self, whitelisted: torch.Tensor) -> torch.Tensor:
        """(S, top_k) whitelist positions of each row's best scores; among scores tied at the
        k-th place the lower class index is taken (whatever order ``topk`` returns ties in)."""
        k = self.top_k
        if k == whitelisted.shape[1]:
            return torch.arange(k).expand(len(whitelisted), k).contiguous()
        values, positions = whitelisted.topk(k + 1, dim=1)
        positions = positions[:, :k].clone()
        ambiguous = (values[:, k - 1] == values[:, k]).nonzero(as_tuple=True)[0]
        if len(ambiguous):  # rare with real scores: the metrics' exact tie rule on those rows
            selected = _top_k_mask(whitelisted[ambiguous], torch.full((len(ambiguous), 1), k), k)
            positions[ambiguous] = selected.nonzero(as_tuple=True)[1].view(-1, k)
        return positions

    def _add_segments(self, segment_ids: Sequence[str]) -> None:
        videos = np.empty(len(segment_ids), np.int32)
        starts = np.empty(len(segment_ids), np.int16)
        for i, segment_id in enumerate(segment_ids):
            video_id, separator, start = segment_id.rpartition(":")
            if not separator or not start.isdigit() or int(start) >= VIDEO_FRAMES:
                raise ValueError(f"segment id {segment_id!r} is not '<video id>:<start>' with a start "
                                 f"in [0, {VIDEO_FRAMES})")
            index = self._video_index.get(video_id)
            if index is None:
                index = self._video_index[video_id] = len(self.video_ids)
                self.video_ids.append(video_id)
                self._video_rank_cache = None
            videos[i], starts[i] = index, int(start)
        self._segment_video.append(videos)
        self._segment_start.append(starts)
        self.num_segments += len(segment_ids)

    # -- bounded per-class state ----------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pending:
            return
        positions = np.concatenate([p[0] for p in self._pending])
        scores = np.concatenate([p[1] for p in self._pending])
        segments = np.concatenate([p[2] for p in self._pending])
        self._pending, self._pending_entries = [], 0
        by_class = np.argsort(positions, kind="stable")
        counts = np.bincount(positions, minlength=len(self.whitelist))
        bounds = np.concatenate(([0], np.cumsum(counts)))
        for position in np.flatnonzero(counts):
            take = by_class[bounds[position]:bounds[position + 1]]
            entries = self._kept[position]
            entries.extend(scores[take], segments[take])
            if entries.size > 2 * self.segment_max_pred:
                entries.replace(*self._best(position))

    def _segment_tables(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self._segment_video) != 1:  # one copy per flush, not per class
            self._segment_video = [np.concatenate(self._segment_video or [np.zeros(0, np.int32)])]
            self._segment_start = [np.concatenate(self._segment_start or [np.zeros(0, np.int16)])]
        return self._segment_video[0], self._segment_start[0]

    def _video_rank(self) -> np.ndarray:
        if self._video_rank_cache is None or len(self._video_rank_cache) != len(self.video_ids):
            order = sorted(range(len(self.video_ids)), key=self.video_ids.__getitem__)
            rank = np.empty(len(order), np.int64)
            rank[order] = np.arange(len(order))
            self._video_rank_cache = rank
        return self._video_rank_cache

    def _best(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """The class's kept entries in submission order, cut to segment_max_pred."""
        scores, segments = self._kept[position].view()
        video, start = self._segment_tables()
        tie = self._video_rank()[video[segments]] * VIDEO_FRAMES + start[segments]
        order = np.lexsort((tie, -scores))[: self.segment_max_pred]
        return scores[order], segments[order]

    # -- DDP: every rank ranks its own segments, rank 0 merges the parts -----------------------
    def save_state(self, path: str | os.PathLike) -> None:
        """This ranking's kept entries (already cut per class) as an .npz file."""
        self._flush()
        video, start = self._segment_tables()
        chunks = [(position, *self._best(position)) for position, entries in enumerate(self._kept) if entries.size]
        with open(path, "wb") as handle:
            np.savez(handle, video_ids=np.array(self.video_ids, dtype=str), video=video, start=start,
                     position=np.concatenate([np.full(len(c[1]), c[0], np.int16) for c in chunks] or [np.zeros(0, np.int16)]),
                     score=np.concatenate([c[1] for c in chunks] or [np.zeros(0, np.float32)]),
                     segment=np.concatenate([c[2] for c in chunks] or [np.zeros(0, np.int32)]))

    def merge_state(self, path: str | os.PathLike) -> None:
        """Add the entries of another rank's `save_state` file."""
        with np.load(path) as part:
            ids = part["video_ids"].tolist()
            self._add_segment_table(ids, part["video"], part["start"])
            offset = self.num_segments - len(part["video"])
            self._pending.append((part["position"], part["score"], (part["segment"] + offset).astype(np.int32)))
            self._pending_entries += len(part["score"])
        self._flush()

    def _add_segment_table(self, video_ids: list[str], video: np.ndarray, start: np.ndarray) -> None:
        remap = np.empty(len(video_ids), np.int32)
        for i, video_id in enumerate(video_ids):
            index = self._video_index.get(video_id)
            if index is None:
                index = self._video_index[video_id] = len(self.video_ids)
                self.video_ids.append(video_id)
                self._video_rank_cache = None
            remap[i] = index
        self._segment_video.append(remap[video] if len(video) else video.astype(np.int32))
        self._segment_start.append(start.astype(np.int16))
        self.num_segments += len(video)

    # -- output ---------------------------------------------------------------------------------
    def lines(self):
        """The submission's lines (header first), classes in ascending id."""
        self._flush()
        yield SUBMISSION_HEADER
        video, start = self._segment_tables()
        for position, class_id in enumerate(self.whitelist.tolist()):
            if not self._kept[position].size:
                continue
            _, segments = self._best(position)
            ids = [f"{self.video_ids[v]}:{s}" for v, s in zip(video[segments].tolist(), start[segments].tolist())]
            yield f"{class_id},{' '.join(ids)}\n"

    def write(self, path: str | os.PathLike) -> None:
        """Write the submission atomically: a temporary file beside ``path``, then a rename."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            with temporary.open("w", encoding="utf-8", newline="") as handle:
                handle.writelines(self.lines())
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()


class SegmentSubmissionWriter(BasePredictionWriter):
    """Writes ``predict`` results of a ``task="segments"`` model as the 2019 Kaggle submission.

    ``predict_step`` must return ``{"id": segment ids, "probabilities": (S, C)}`` (as
    ``VideoClassifier`` does for segments); the ranking is `SegmentRanking` (module docstring).
    The file appears only when prediction finishes (temporary file + rename), so an interrupted
    run never replaces a complete submission. Under DDP every rank ranks its own segments and
    saves them beside ``output_path`` (a filesystem every rank sees); rank 0 merges and writes.

    Args:
        whitelist_path: ``segment_label_ids.csv`` of Google's starter code (1000 class ids).
        output_path: the submission CSV.
        top_k: classes kept per segment (Google: 20).
        segment_max_pred: segments kept per class (Google and Kaggle: 100,000).
    """

    def __init__(self, whitelist_path: str, output_path: str = "segment_submission.csv",
                 top_k: int = TOP_K, segment_max_pred: int = SEGMENT_MAX_PRED) -> None:
        super().__init__(write_interval="batch")
        self.whitelist_path = whitelist_path
        self.output_path = Path(output_path)
        self.top_k = top_k
        self.segment_max_pred = segment_max_pred
        self.ranking: SegmentRanking | None = None

    def _part_path(self, rank: int, world_size: int) -> Path:
        return self.output_path.with_name(f".{self.output_path.name}.rank{rank}-of-{world_size}.npz")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != TrainerFn.PREDICTING.value:
            return
        check_prediction_task(self, pl_module, "segments")
        num_classes = getattr(pl_module, "hparams", {}).get("num_classes", 3862)
        whitelist = read_class_whitelist(self.whitelist_path, num_classes)
        if self.output_path.is_dir():
            raise IsADirectoryError(f"SegmentSubmissionWriter: {self.output_path} is a directory")
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        self.ranking = SegmentRanking(whitelist, self.top_k, self.segment_max_pred)

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if not isinstance(prediction, dict) or not {"id", "probabilities"} <= prediction.keys():
            raise TypeError("SegmentSubmissionWriter needs predict_step to return a dict with 'id' and "
                            "'probabilities' (a VideoClassifier with task='segments'), got "
                            + (f"keys {sorted(prediction)}" if isinstance(prediction, dict) else type(prediction).__name__))
        self.ranking.add(list(prediction["id"]), prediction["probabilities"].detach().cpu())

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        world_size = trainer.world_size
        if world_size == 1:
            self.ranking.write(self.output_path)
            return
        self.ranking.save_state(self._part_path(trainer.global_rank, world_size))
        trainer.strategy.barrier("SegmentSubmissionWriter: parts written")
        if trainer.global_rank == 0:
            merged = SegmentRanking(self.ranking.whitelist, self.top_k, self.segment_max_pred)
            for rank in range(world_size):
                merged.merge_state(self._part_path(rank, world_size))
            merged.write(self.output_path)
            for rank in range(world_size):
                self._part_path(rank, world_size).unlink()
