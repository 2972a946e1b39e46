"""Lightning callbacks: checkpoints of long runs, the Kaggle submission and evaluation reports.

* :class:`SubmissionWriter` streams ``predict`` results to the challenge CSV (SPEC 6), and
  optionally a human-readable twin with label names from the YouTube-8M ``vocabulary.csv``.
* :class:`EvaluationReport` prints GAP@k, Hit@1, PERR, MAP (segment mAP for a segment model) and
  the loss after ``validate`` / ``test``, and writes them as JSON plus a PNG of per-class AP
  against class frequency.
* :class:`PeriodicCheckpoint` and :class:`ModelCheckpointWithBest` (the paper configs' checkpoints)
  keep a killed and resumed run the same as an uninterrupted one, and ``best.ckpt`` beside them.

The writers and the report are used from the command line by naming them in a config
(``configs/predict.yaml``) or with
``--trainer.callbacks+=nextvlad.callbacks.SubmissionWriter --trainer.callbacks.output_path=...``.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import math
import os
import re
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from nextvlad.data.records import is_url
from nextvlad.metrics import MeanAveragePrecision

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.figure import Figure

__all__ = ["SubmissionWriter", "EvaluationReport", "ModelCheckpointWithBest", "PeriodicCheckpoint", "read_vocabulary",
           "submission_rows"]

SUBMISSION_HEADER = "VideoId,LabelConfidencePairs\n"
#: What follows ``.<output name>`` in the hidden files of a SubmissionWriter: the ranks' parts
#: (:meth:`SubmissionWriter._part_path`) and the merged file before its rename (``.tmp``).
_PART_SUFFIX = re.compile(r"\.tmp|\.rank\d+-of-\d+\.part")
NAMES_HEADER = ("VideoId", "Labels")


# ------------------------------------------------------------------------------------ submission
def submission_rows(ids: Sequence[str], classes: torch.Tensor, scores: torch.Tensor) -> list[str]:
    """SPEC 6 lines ``id,c1 s1 c2 s2 ...`` (``"%i %g"``), pairs by descending score.

    Equal scores keep the lower class index first (a stable sort, deterministic whatever order
    ``topk`` returned them in). ``classes``/``scores`` are (B, k).
    """
    return _csv_lines(ids, *rank_by_score(classes, scores))


def rank_by_score(classes: torch.Tensor, scores: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's classes and scores as lists, by descending score, ties by ascending class index."""
    by_class = torch.argsort(classes, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_class), dim=1, descending=True, stable=True)
    order = by_class.gather(1, by_score)
    return classes.gather(1, order).tolist(), scores.gather(1, order).tolist()


def _csv_lines(ids: Sequence[str], classes: list[list[int]], scores: list[list[float]]) -> list[str]:
    """SPEC 6 lines of rows already ranked by :func:`rank_by_score`."""
    return [
        video_id + "," + " ".join("%i %g" % pair for pair in zip(row_classes, row_scores)) + "\n"
        for video_id, row_classes, row_scores in zip(ids, classes, scores)
    ]


def read_vocabulary(path: str | os.PathLike) -> dict[int, str]:
    """Class index -> label name from a YouTube-8M ``vocabulary.csv`` (columns Index and Name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"Index", "Name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path}: a vocabulary needs the columns Index and Name; missing {sorted(missing)} "
                f"(header: {reader.fieldnames})"
            )
        names: dict[int, str] = {}
        for line_number, row in enumerate(reader, start=2):
            try:
                index = int(row["Index"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line_number}: Index {row['Index']!r} is not an integer") from None
            names[index] = row["Name"] or f"#{index}"
    return names


class SubmissionWriter(BasePredictionWriter):
    """Writes ``predict`` results as the Kaggle submission CSV of SPEC 6, batch by batch.

    Each line is ``VideoId,LabelConfidencePairs`` with the model's top-k (``top_k`` of the
    ``VideoClassifier``, 20 by default) ``"%i %g"`` class/probability pairs by descending score.
    Rows are streamed to a temporary file beside ``output_path`` and renamed over it only when
    prediction finishes, so an interrupted run never replaces a complete CSV. A path that cannot be
    written fails in ``setup``, before any prediction.

    Every rank streams its own part beside ``output_path`` (under DDP the directory must be on a
    filesystem all ranks share) and rank 0 concatenates the parts in rank order: the data's order
    for ``YT8MDataModule``, whose ranks read contiguous ranges of it. A submission lists each video
    id once, whatever the number of ranks: of an id the data repeats (a file matched twice, or the
    padding of a plain DataLoader's DistributedSampler) the first row is kept, and a warning counts
    the rows dropped.

    The LightningModule's ``predict_step`` must return ``{"id": list[str], "classes": (B, k) int,
    "scores": (B, k) float}``, as ``VideoClassifier.predict_step`` does.

    Args:
        output_path: the submission CSV to write.
        vocabulary_path: YouTube-8M ``vocabulary.csv`` (columns Index and Name); when set, a second
            CSV ``VideoId,Labels`` lists "Name (probability)" pairs for people to read.
        names_path: where that second file goes; default ``<output stem>_names.csv``.
    """

    def __init__(
        self,
        output_path: str = "submission.csv",
        vocabulary_path: str | None = None,
        names_path: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self.vocabulary_path = vocabulary_path
        if names_path is None and vocabulary_path is not None:
            names_path = str(self._default_names_path())
        self.names_path = Path(names_path) if names_path is not None else None
        self.vocabulary: dict[int, str] | None = None
        self._parts: dict[Path, IO[str]] = {}  # target -> this rank's open part file

    # -- paths ----------------------------------------------------------------------------------
    def _targets(self) -> list[Path]:
        return [self.output_path] + ([self.names_path] if self.names_path is not None else [])

    @staticmethod
    def _part_path(target: Path, rank: int, world_size: int) -> Path:
        return target.with_name(f".{target.name}.rank{rank}-of-{world_size}.part")

    # -- lifecycle ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != TrainerFn.PREDICTING.value:
            return
        check_prediction_task(self, pl_module, "video")
        if self.vocabulary_path is not None:
            self.vocabulary = read_vocabulary(self.vocabulary_path)
            self._check_vocabulary_covers(pl_module)
        if self.names_path is not None and self.names_path.resolve() == self.output_path.resolve():
            raise ValueError(f"SubmissionWriter: names_path and output_path are the same file ({self.output_path})")
        if trainer.global_rank == 0:
            self._remove_stale_parts(trainer.world_size)
        for target in self._targets():
            self._parts[target] = self._open_part(target, trainer.global_rank, trainer.world_size)

    def _check_vocabulary_covers(self, pl_module: pl.LightningModule) -> None:
        num_classes = getattr(pl_module, "hparams", {}).get("num_classes")
        if num_classes is None:
            return
        unnamed = [index for index in range(num_classes) if index not in self.vocabulary]
        if unnamed:
            raise ValueError(
                f"{self.vocabulary_path}: no Name for {len(unnamed)} of the model's {num_classes} "
                f"class indices (first: {unnamed[:5]})"
            )

    def _remove_stale_parts(self, world_size: int) -> None:
        """Delete the hidden parts a killed run left beside the outputs (any world size, with or
        without label names). This run's own parts are not touched: each rank truncates its own,
        so rank 0 never races another rank."""
        own = {self._part_path(target, rank, world_size) for target in self._targets() for rank in range(world_size)}
        names = self.names_path or self._default_names_path()
        for target in {self.output_path, names}:
            for stale in target.parent.glob(f".{glob.escape(target.name)}.*"):
                if stale not in own and _PART_SUFFIX.fullmatch(stale.name[len(target.name) + 1:]):
                    stale.unlink(missing_ok=True)

    def _default_names_path(self) -> Path:
        return self.output_path.with_name(f"{self.output_path.stem}_names{self.output_path.suffix or '.csv'}")

    def _open_part(self, target: Path, rank: int, world_size: int) -> IO[str]:
        if target.is_dir():
            raise IsADirectoryError(f"SubmissionWriter: {target} is a directory, expected a CSV file path")
        part = self._part_path(target, rank, world_size)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            return part.open("w", encoding="utf-8", newline="")
        except OSError as error:
            raise OSError(
                f"SubmissionWriter: cannot write {target} (creating {part} failed: {error.strerror or error})"
            ) from error

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, dict) or not {"id", "classes", "scores"} <= prediction.keys():
            raise TypeError(
                "SubmissionWriter needs predict_step to return a dict with 'id', 'classes' and 'scores', "
                f"got {type(prediction).__name__}"
                + (f" with keys {sorted(prediction)}" if isinstance(prediction, dict) else "")
            )
        ids = list(prediction["id"])
        # Ranked once for both files.
        classes, scores = rank_by_score(prediction["classes"].detach().cpu().long(),
                                        prediction["scores"].detach().cpu().float())
        self._parts[self.output_path].writelines(_csv_lines(ids, classes, scores))
        if self.names_path is not None:
            self._write_names(ids, classes, scores)

    def _write_names(self, ids: list[str], classes: list[list[int]], scores: list[list[float]]) -> None:
        writer = _names_writer(self._parts[self.names_path])
        for video_id, row_classes, row_scores in zip(ids, classes, scores):
            labels = "; ".join(f"{self.vocabulary.get(c, f'#{c}')} ({s:.4g})" for c, s in zip(row_classes, row_scores))
            writer.writerow((video_id, labels))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        self._close_parts()
        world_size = trainer.world_size
        if world_size > 1:
            trainer.strategy.barrier("SubmissionWriter: parts written")
        if trainer.global_rank != 0:
            return
        repeated = self._merge_parts(self.output_path, world_size, SUBMISSION_HEADER)
        if self.names_path is not None:
            self._merge_parts(self.names_path, world_size, ",".join(NAMES_HEADER) + "\n")
        if repeated:
            ids = sorted(set(repeated))
            rank_zero_warn(
                f"SubmissionWriter: the predicted data repeats {len(ids)} video ids; {len(repeated)} repeated rows "
                f"dropped from {self.output_path}, which lists each id once with its first row (repeated: "
                f"{', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})")

    def _merge_parts(self, target: Path, world_size: int, header: str) -> list[str]:
        """Concatenate the ranks' parts under ``header``, each id once (its first row); returns the
        ids of the rows dropped."""
        parts = [self._part_path(target, rank, world_size) for rank in range(world_size)]
        missing = [str(part) for part in parts if not part.is_file()]
        if missing:
            raise FileNotFoundError(
                f"SubmissionWriter: rank 0 cannot see the parts {missing}; under multi-node DDP the "
                f"output path ({target}) must be on a filesystem every node shares"
            )
        merged = target.with_name(f".{target.name}.tmp")
        seen: set[str] = set()
        repeated: list[str] = []
        with merged.open("w", encoding="utf-8", newline="") as out:
            out.write(header)
            for part in parts:
                with part.open(encoding="utf-8", newline="") as lines:
                    for line in lines:
                        video_id = line.split(",", 1)[0]
                        if video_id in seen:
                            repeated.append(video_id)
                        else:
                            seen.add(video_id)
                            out.write(line)
        os.replace(merged, target)
        for part in parts:
            part.unlink()
        return repeated

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Leave any existing output untouched and remove this rank's incomplete parts.
        self._close_parts()
        for target in self._targets():
            with contextlib.suppress(OSError):  # e.g. the part was never created; keep the original error
                self._part_path(target, trainer.global_rank, trainer.world_size).unlink()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_parts()

    def _close_parts(self) -> None:
        for handle in self._parts.values():
            handle.close()
        self._parts.clear()


#: The predict config whose writer takes each task's predictions.
_PREDICT_CONFIGS = {"video": "configs/predict.yaml", "segments": "configs/predict_segments.yaml"}


def check_prediction_task(writer: Callback, pl_module: pl.LightningModule, task: str) -> None:
    """A writer of ``task`` predictions (``"video"`` or ``"segments"``) refuses a model of the other
    task in its ``setup``, before any data is read: its ``predict_step`` returns another kind of
    result, which would otherwise fail with a TypeError only after the first batch."""
    model_task = (getattr(pl_module, "hparams", None) or {}).get("task", "video")
    if model_task != task:
        raise ValueError(
            f"{type(writer).__name__} writes the submission of task={task!r} models, but the model has "
            f"task={model_task!r}: predict with {_PREDICT_CONFIGS.get(model_task, 'a writer for that task')} "
            f"instead of {_PREDICT_CONFIGS[task]}")


def _names_writer(handle: IO[str]) -> Any:
    return csv.writer(handle, lineterminator="\n")


# ------------------------------------------------------------------------------------ checkpoints
class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for the checkpoint every N steps of a long run, with two changes
    that keep a killed and resumed run the same as an uninterrupted one. All arguments are Lightning's.

    * A step that also validates is saved after its validation, not before. Lightning saves in
      ``on_train_batch_end``, before that step's validation, and a run resumed from that checkpoint
      counts the validation as done: killed during it, the run never validated that step (no
      ``val/gap``, no top-k file). Saved after it, the checkpoint holds the validated state (and the
      random generators after validation, which the uninterrupted run continues with); killed
      during it, the run resumes from the previous checkpoint and validates again.
    * The final step saves ``last`` too (Lightning saves at the end only when nothing was saved
      during the whole run), so that ``last.ckpt`` holds the final weights (with ``save_last=True``;
      ``"link"`` keeps Lightning's meaning, a link to the newest checkpoint saved). A run stopped by
      ``max_steps`` saves at that step's end, as a periodic save, not at the end of training, where
      the loop counts the epoch as done: resumed with a larger ``max_steps``, it continues the epoch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._validation_follows = False  # inside on_train_batch_end of a step that validates next
        self._held: set[str] = set()  # that step's saves ("top_k", "last"), made after its validation

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning's own rules decide whether this step saves; its saves are held (see the _save_*
        # methods below) when the loop validates right after this batch, until Lightning's own save
        # after validation: on_validation_end, or the epoch's end for a once-per-epoch validation.
        epoch_loop = trainer.fit_loop.epoch_loop
        self._validation_follows = epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher) or (
            self._should_save_on_train_epoch_end(trainer) and epoch_loop.batch_progress.is_last_batch)
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if 0 <= trainer.max_steps <= trainer.global_step:
                self._save_final(trainer)
        finally:
            self._validation_follows = False

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self._validation_follows:
            self._held.add("top_k")
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self._validation_follows:
            self._held.add("last")
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Saving at the train epoch's end (save_on_train_epoch_end) waits only for the epoch's last
        # batch: a mid-epoch validation's held saves are due now, not steps later.
        mid_epoch = not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if mid_epoch or not self._should_save_on_train_epoch_end(trainer):
            self._save_held(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_held(trainer)

    def _save_held(self, trainer: pl.Trainer) -> None:
        held, self._held = self._held, set()
        if held and not self._should_skip_saving_checkpoint(trainer):  # skipped: saved at this step already
            monitor_candidates = self._monitor_candidates(trainer)
            if "top_k" in held:
                self._save_topk_checkpoint(trainer, monitor_candidates)
            if "last" in held:
                self._save_last_checkpoint(trainer, monitor_candidates)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_final(trainer)  # a run that ended otherwise than by max_steps (max_epochs, a stop)

    def _save_final(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) and not self._written_by_another(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _written_by_another(self, trainer: pl.Trainer) -> bool:
        """Whether another PeriodicCheckpoint already wrote this one's last checkpoint file at this step
        (the configs' two callbacks share ``last.ckpt``): one write of the final weights is enough. Not
        another kind of callback, which may have saved this step before its validation. The same
        answer on every rank, as saving needs."""
        path = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
        return any(other is not self and other._last_global_step_saved == trainer.global_step
                   and other.last_model_path == path
                   for other in trainer.checkpoint_callbacks if isinstance(other, PeriodicCheckpoint))


class ModelCheckpointWithBest(PeriodicCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also keeps ``best.ckpt`` in its directory: a link to the
    best checkpoint so far (a copy where links are not allowed), so that validate / predict / export
    can name it without looking up scores.

    Lightning links ``last.ckpt`` (``save_last="link"``) but has no such option for the best one, and
    a second ModelCheckpoint with ``filename: best`` is refused (two callbacks with the same monitor
    and mode share a state key), hence this subclass. Needs ``monitor``; all arguments are Lightning's.

    A resumed run keeps the scores of the run it resumed from. Lightning forgets them when the
    checkpoint folder changed, as it does for every resume into a new ``version_N``, so the first
    validation after a resume became "best". Here the saved top-k is restored, less the files that
    no longer exist; ``best.ckpt`` may then link to the earlier run's folder. Files of another folder
    leave the top-k when better ones come but are never deleted: they belong to the earlier run.
    Also :class:`PeriodicCheckpoint`'s save after validation and of the final weights.
    """

    BEST_NAME = "best"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restored_top_k: dict[str, torch.Tensor] | None = None  # checked for existence at train start

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restored_top_k = dict(state_dict.get("best_k_models") or {})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._restored_top_k is not None:
            paths = list(self._restored_top_k)
            # rank 0 looks, every rank follows: the top-k decisions must agree across ranks
            exists = [get_filesystem(path).exists(path) for path in paths] if trainer.is_global_zero else None
            exists = trainer.strategy.broadcast(exists)
            self._set_top_k({path: self._restored_top_k[path] for path, kept in zip(paths, exists) if kept})
            self._restored_top_k = None

    def _set_top_k(self, scores: dict[str, torch.Tensor]) -> None:
        """The top-k state Lightning derives from ``best_k_models``, from these scores (best first,
        at most ``save_top_k``)."""
        ranked = sorted(scores, key=lambda path: float(scores[path]), reverse=self.mode == "max")
        if self.save_top_k >= 0:
            ranked = ranked[:self.save_top_k]
        self.best_k_models = {path: scores[path] for path in ranked}
        self.best_model_path = ranked[0] if ranked else ""
        self.best_model_score = scores[ranked[0]] if ranked else None
        if ranked and len(ranked) == self.save_top_k:  # full: a new score must beat the k-th
            self.kth_best_model_path, self.kth_value = ranked[-1], scores[ranked[-1]]
        else:
            self.kth_best_model_path = ""

    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        # Lightning keeps files outside dirpath on local disks only; the same on any filesystem.
        in_folder = os.path.dirname(str(previous)) == str(self.dirpath).rstrip("/")
        return super()._should_remove_checkpoint(trainer, previous, current) and (
            _is_local_file_protocol(previous) or in_folder)

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if not self.best_model_path or self.dirpath is None or self.best_model_path == getattr(self, "_linked", None):
            return
        link = os.path.join(self.dirpath, self.BEST_NAME + self.FILE_EXTENSION)
        if trainer.is_global_zero:  # after a resume the best checkpoint may be in the previous run's directory
            self._fs.makedirs(self.dirpath, exist_ok=True)
        self._link_checkpoint(trainer, self.best_model_path, link)  # every rank: it ends in a barrier
        self._linked = self.best_model_path


# ------------------------------------------------------------------------------------ reports
_STAGES = {TrainerFn.VALIDATING: ("validate", "val/", "val_metrics"), TrainerFn.TESTING: ("test", "test/", "test_metrics")}


class EvaluationReport(Callback):
    """After ``validate`` / ``test``: a table of the challenge metrics, a JSON file and a plot.

    Prints GAP@k, Hit@1, PERR, MAP, the segment mAP (``segment_map``, a segment model's main
    metric) and the loss (as the LightningModule logged them under ``val/`` or ``test/``), writes
    them as ``<checkpoint stem>.<stage>.json`` next to the evaluated checkpoint (or
    ``<stage>_metrics.json`` in the log directory when there is none) together with the per-class
    AP and positive counts and the file the checkpoint named then (``checkpoint_file``: best.ckpt
    is a link that moves), and a PNG ``<...>.<stage>_class_ap.png`` of per-class AP
    against the number of positives of each class in the evaluated set.

    The per-class values are those of the model's main metric: for a segment model (``task:
    segments``) its ``SegmentMeanAveragePrecision`` (rated segments; positives are segments), else
    the ``MeanAveragePrecision`` of its ``val_metrics`` / ``test_metrics`` collection (positives
    are videos); the JSON's ``per_class.metric`` names which. They are read in ``on_*_epoch_end``
    before the module resets them: Lightning runs callback hooks before the LightningModule's.
    Only ``validate`` and ``test`` runs are reported, not the validation epochs inside ``fit``.

    Args:
        output_dir: write here instead of next to the checkpoint / in the log directory.
        plot: also write the PNG.
    """

    def __init__(self, output_dir: str | None = None, plot: bool = True) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.plot = plot
        self._per_class: tuple[np.ndarray, np.ndarray] | None = None
        self._per_class_metric = "map"  # the logged name of the metric they come from

    # -- hooks ----------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect_per_class(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect_per_class(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module)

    # -- work -----------------------------------------------------------------------------------
    @staticmethod
    def _stage(trainer: pl.Trainer) -> tuple[str, str, str] | None:
        if trainer.sanity_checking:
            return None
        return _STAGES.get(trainer.state.fn)

    def _collect_per_class(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._per_class = None
        stage = self._stage(trainer)
        if stage is None:
            return
        average_precision = self._main_average_precision(pl_module, stage)
        if average_precision is None:
            rank_zero_warn(f"EvaluationReport: {type(pl_module).__name__}.{stage[2]} has no MeanAveragePrecision; "
                           "no per-class AP in the report")
            return
        # Called on every rank, also one that saw no labelled video: it is a collective under DDP.
        per_class_ap, positives = average_precision.compute_per_class()
        self._per_class = (per_class_ap.cpu().numpy(), positives.cpu().numpy())

    def _main_average_precision(self, pl_module: pl.LightningModule, stage: tuple[str, str, str]):
        """The segment metric of a segment model, else the MAP of the stage's collection."""
        segment_map = getattr(pl_module, "segment_map", {})
        if stage[1].rstrip("/") in segment_map:
            self._per_class_metric = "segment_map"
            return segment_map[stage[1].rstrip("/")]
        self._per_class_metric = "map"
        collection = getattr(pl_module, stage[2], None)
        metrics = list(collection.values()) if hasattr(collection, "values") else []
        return next((m for m in metrics if isinstance(m, MeanAveragePrecision)), None)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage(trainer)
        if stage is None:
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks, rank 0 alone writes
        if not trainer.is_global_zero:
            return
        name, prefix, _ = stage
        top_k = getattr(pl_module, "hparams", {}).get("top_k", 20)
        labels = {"gap": f"GAP@{top_k}", "hit_at_one": "Hit@1", "perr": "PERR", "map": "MAP",
                  "segment_map": "segment mAP", "loss": "loss"}  # segment_map: task="segments" only
        logged = trainer.callback_metrics
        values = {key: float(logged[prefix + key]) for key in labels if prefix + key in logged}
        checkpoint = str(trainer.ckpt_path) if trainer.ckpt_path else None
        print(format_table(name, checkpoint, {labels[key]: value for key, value in values.items()}))

        json_path, plot_path = self._output_paths(log_dir or trainer.default_root_dir, name, checkpoint)
        # checkpoint_file: the file evaluated; best.ckpt / last.ckpt are links that move as a run goes on.
        checkpoint_file = str(Path(checkpoint).resolve()) if checkpoint and not is_url(checkpoint) else None
        report: dict[str, Any] = {"stage": name, "checkpoint": checkpoint, "checkpoint_file": checkpoint_file,
                                  "top_k": top_k, "map_classes": getattr(pl_module, "map_classes_used", None),
                                  "metrics": values}
        if self._per_class is not None:
            per_class_ap, positives = self._per_class
            report["per_class"] = {"metric": self._per_class_metric, "average_precision": per_class_ap.tolist(),
                                   "positives": positives.tolist()}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{name} metrics written to {json_path}")
        if self.plot and self._per_class is not None and self._per_class[1].any():
            plot_class_average_precision(*self._per_class, plot_path,
                                         title=f"{name}: {Path(checkpoint).name if checkpoint else 'no checkpoint'}",
                                         positives_of="segments" if self._per_class_metric == "segment_map" else "videos")
            print(f"per-class AP plot written to {plot_path}")

    def _output_paths(self, log_dir: str, stage: str, checkpoint: str | None) -> tuple[Path, Path]:
        if checkpoint is not None and not is_url(checkpoint):
            checkpoint_path = Path(checkpoint)
            directory = self.output_dir or checkpoint_path.parent
            stem = checkpoint_path.stem
            return directory / f"{stem}.{stage}.json", directory / f"{stem}.{stage}_class_ap.png"
        directory = self.output_dir or Path(log_dir)
        return directory / f"{stage}_metrics.json", directory / f"{stage}_class_ap.png"


def format_table(stage: str, checkpoint: str | None, values: dict[str, float]) -> str:
    """A two-column text table of metric values, titled with the stage and checkpoint."""
    title = f"{stage} ({checkpoint})" if checkpoint else stage
    width = max([len(label) for label in values] + [6])
    rule = "-" * (width + 12)
    rows = [f"{label:<{width}}  {value:>10.6f}" for label, value in values.items()]
    return "\n".join([title, rule, f"{'metric':<{width}}  {'value':>10}", rule, *rows, rule])


def plot_class_average_precision(
    average_precision: np.ndarray, positives: np.ndarray, path: str | os.PathLike, title: str = "",
    positives_of: str = "videos",
) -> Figure:
    """Scatter of per-class AP against the class's positive ``positives_of`` (videos, or rated
    segments for the segment metric; log x), with binned means.

    Classes without positives have no defined AP and are left out (their count is in the legend).
    Returns the saved figure.
    """
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    present = positives > 0
    counts, values = positives[present], average_precision[present]
    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(counts, values, s=10, alpha=0.5, linewidths=0, label=f"{present.sum()} classes")
    if counts.size:
        axes.axhline(values.mean(), color="C2", linestyle="--", linewidth=1,
                     label=f"mean AP of these classes: {values.mean():.4f}")
    if counts.size >= 50:  # enough classes for a trend line to mean something
        edges = np.unique(np.geomspace(counts.min(), counts.max() + 1, num=13).astype(int))
        which = np.digitize(counts, edges)
        centers, means = [], []
        for b in np.unique(which):
            in_bin = which == b
            centers.append(math.exp(np.log(counts[in_bin]).mean()))
            means.append(values[in_bin].mean())
        axes.plot(centers, means, color="C3", marker="o", markersize=3, label="mean AP per frequency bin")
    axes.set_xscale("log")
    # Counts are whole numbers: fractional ticks stay unlabelled.
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}" if value == round(value) else ""))
    axes.xaxis.set_minor_formatter(NullFormatter())
    # Powers of ten alone label a range of under three decades with one or two ticks (a 2-45
    # range showed only "10"): label 1-2-5 steps there, every integer step under one decade.
    span = counts.max() / counts.min() if counts.size else 1.0
    if span < 1000:
        subs = np.arange(1.0, 10.0) if span < 10 else (1.0, 2.0, 5.0)
        axes.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=30))
    if counts.size and span == 1:  # one count: matplotlib would widen the axis to two decades
        axes.set_xlim(counts.min() / 2, counts.max() * 2)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel(f"positive {positives_of} of the class in the evaluated set")
    axes.set_ylabel("average precision")
    absent = int((~present).sum())
    axes.set_title(title + (f"  ({absent} classes without positives left out)" if absent else ""), fontsize=9)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return figure
