"""`YT8MDataModule`: the LightningDataModule for frame-level YouTube-8M TFRecords."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from nextvlad._distributed import gather_per_rank, rank_and_world_size
from nextvlad._validation import check_choice, check_positive_int
from nextvlad.data.dataset import (STAT_NAMES, OnError, YT8MDataLoader, YT8MFrameDataset,
                                   check_shuffle_buffer, share_scans)
from nextvlad.data.records import Compression, expand_paths
from nextvlad.data.shm_pool import SHARED_MEMORY, SHARED_MEMORY_ADVICE, mebibytes, shared_memory_free
from nextvlad.data.transforms import ReverseWhitening, finalize_batch


Stage = Literal["fit", "validate", "test", "predict"]


class YT8MDataModule(L.LightningDataModule):
    """Frame-level YouTube-8M (SPEC 1.1) for Lightning: sharded, shuffled, CRC-checked.

    What a LightningModule receives (after `on_after_batch_transfer`, on its device): a dict with
    ``id`` list[str], ``rgb`` float32 (B, M, 1024), ``audio`` float32 (B, M, 128) dequantized and
    zero-padded to M = max_frames (reverse-whitened when `eigenvalues_path` is set), ``lengths``
    int64 (B,) counting rgb frames (audio is zero-padded at its own length, SPEC 1.1 step 6),
    ``labels`` float32 (B, num_classes) multi-hot (zeros without labels) and
    ``has_labels`` bool (B,). With `sample_frames`, M = sample_frames and lengths = sample_frames.

    A checkpoint holds the training data's position in the epoch (see `state_dict`). Resuming
    inside an epoch needs the settings that epoch was planned with: the same ranks, num_workers,
    train files (names and record counts), seed, batch_size, drop_last and shuffle_buffer; another
    value is refused with an error naming it. At an epoch's end any of them may change.

    Batches travel from the workers as uint8 and are dequantized on the device: a quarter of the
    bytes to copy and pin, and the float work moves off the CPU (see benchmarks/bench_data.py).

    Args:
        train_pattern: training TFRecords (glob, comma-separated globs, or a list).
        val_pattern: validation TFRecords; never shuffled, nothing dropped.
        test_pattern: test TFRecords (may lack labels); never shuffled, nothing dropped.
        predict_pattern: TFRecords to predict on (may lack labels); in file order per rank.
        batch_size: training batch size per rank (the authors: 160 a step = 2 GPUs x 80).
        eval_batch_size: batch size for val/test/predict (None: batch_size).
        num_workers: DataLoader worker processes per rank (each reads its own share of records).
        max_frames: frames per video after padding/truncation (the authors: 300).
        num_classes: label vocabulary size (YouTube-8M 2018: 3862).
        eigenvalues_path: PCA `eigenvals.npy` for reverse whitening (SPEC 2); None: off.
        sample_frames: draw this many frames per video uniformly with replacement (NetVLAD_random,
            Table 1), in every stage; None: use all frames (the NeXtVLAD default).
        seed: file order / shuffle buffer / frame sampling seed (combined with the epoch).
        on_error: "raise": a bad record stops with an error naming file and record index;
            "skip": it is skipped, counted and logged.
        drop_last: training drops the last incomplete batch (per rank); evaluation never drops.
        shuffle_buffer: records per reader held for shuffling during training (>= 0; 0 or 1:
            no shuffling within files, whose order is still shuffled per epoch).
        compression: "auto" detects GZIP files by their magic bytes.
        dequantize_in_workers: ship float32 batches from the workers instead of uint8 (slower; for
            comparison or CPU-only setups that prefer it).
    """

    def __init__(self, train_pattern: str | list[str] | None = None,
                 val_pattern: str | list[str] | None = None,
                 test_pattern: str | list[str] | None = None,
                 predict_pattern: str | list[str] | None = None,
                 batch_size: int = 160, eval_batch_size: int | None = None, num_workers: int = 2,
                 max_frames: int = 300, num_classes: int = 3862,
                 eigenvalues_path: str | None = None, sample_frames: int | None = None,
                 seed: int = 0, on_error: OnError = "raise", drop_last: bool = True,
                 shuffle_buffer: int = 512, compression: Compression = "auto",
                 dequantize_in_workers: bool = False):
        super().__init__()
        # Checked here, each under its own name: the datasets are made later (setup), and a
        # falsy eval_batch_size must not silently become batch_size (None does, by design).
        check_positive_int(batch_size=batch_size, max_frames=max_frames, num_classes=num_classes)
        if eval_batch_size is not None:
            check_positive_int(eval_batch_size=eval_batch_size)
        if sample_frames is not None:
            check_positive_int(sample_frames=sample_frames)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        check_shuffle_buffer(shuffle_buffer)
        check_choice("on_error", on_error, ("raise", "skip"))
        check_choice("compression", compression, ("auto", "none", "gzip"))
        self.save_hyperparameters()
        self.patterns = {"fit": train_pattern, "validate": val_pattern, "test": test_pattern,
                         "predict": predict_pattern}
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.max_frames = max_frames
        self.num_classes = num_classes
        self.sample_frames = sample_frames
        self.seed = seed
        self.on_error = on_error
        self.drop_last = drop_last
        self.shuffle_buffer = shuffle_buffer
        self.compression = compression
        self.dequantize_in_workers = dequantize_in_workers
        self.whitening = ReverseWhitening(eigenvalues_path) if eigenvalues_path else None
        self.datasets: dict[str, YT8MFrameDataset] = {}
        self.read_stats = dict.fromkeys(STAT_NAMES, 0)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._saved_generators: dict[str, torch.Tensor] = {}  # from a checkpoint, by device
        self._train_loader: YT8MDataLoader | None = None
        self._train_position: dict | None = None  # from a checkpoint, for the next train loader
        self._iterations: dict[str, int] = {}

    # -- datasets -----------------------------------------------------------------------------
    def _dataset(self, split: Stage) -> YT8MFrameDataset:
        if split not in self.datasets:
            pattern = self.patterns[split]
            module = type(self).__name__  # the class the user configured: the segment module too
            name = {"fit": "train_pattern", "validate": "val_pattern"}.get(split, f"{split}_pattern")
            if not pattern:
                raise ValueError(f"{module}: {name} is not set, needed for {split}")
            try:
                share_scans(expand_paths(pattern), self.compression)  # the ranks scan in parallel
                dataset = self._make_dataset(split, pattern)
            except FileNotFoundError as error:  # name the option the user has to fix
                raise FileNotFoundError(f"{module} {name}: {error}") from error
            rank, world_size = self._rank_world()
            if dataset.num_records < world_size:  # the same on every rank: all raise alike
                # A rank without a video would skip Lightning's epoch hooks and leave the others
                # waiting in the metrics' and the writers' collectives.
                raise ValueError(f"{module} {name}: {dataset.num_records} records for {world_size} ranks: a "
                                 f"rank would have no video; use at most {dataset.num_records} devices")
            dataset.set_distributed(rank, world_size)
            if len(dataset) == 0:  # drop_last (ranks kept in step): Lightning would end fit at once, exit 0
                raise ValueError(f"{module} {name}: {dataset.num_records} records give no full batch of "
                                 f"batch_size {dataset.batch_size} on each of {world_size} rank(s) and drop_last "
                                 "drops the rest: lower batch_size or set drop_last false")
            self.datasets[split] = dataset
            dropped = dataset.records_dropped_per_epoch()
            # Shown once (rank 0), next to Lightning's own start-up messages.
            rank_zero_info(f"{module} {split}: {dataset.num_records} records in "
                           f"{len(dataset.files)} files; {len(dataset)} batches per epoch and rank "
                           f"(world size {world_size}); {dropped} records per epoch not read "
                           f"({'drop_last, ranks kept in step' if dropped else 'none dropped'})")
        return self.datasets[split]

    def _make_dataset(self, split: Stage, pattern: str | list[str]) -> YT8MFrameDataset:
        """The dataset of one split (a hook: the segment data module reads segments)."""
        training = split == "fit"
        return YT8MFrameDataset(
            pattern, batch_size=self.batch_size if training else self.eval_batch_size,
            max_frames=self.max_frames, num_classes=self.num_classes, training=training,
            drop_last=self.drop_last, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
            on_error=self.on_error, compression=self.compression,
            dequantize_in_workers=self.dequantize_in_workers)

    def setup(self, stage: str) -> None:
        """Scan the stage's files (record counts, framing checks) on every rank."""
        splits = {"fit": ("fit", "validate"), "validate": ("validate",), "test": ("test",),
                  "predict": ("predict",)}[stage]
        for split in splits:
            if self.patterns[split] or split == stage:
                self._dataset(split)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return rank_and_world_size()

    def _loader(self, split: Stage) -> YT8MDataLoader:
        dataset = self._dataset(split)
        # The dataset may have been made for another Trainer (or none): len(loader), which
        # Lightning uses as the number of batches to take, must be this rank's count.
        dataset.set_distributed(*self._rank_world())

        def context() -> tuple[int, int, int]:
            # Lightning knows the epoch (also after a restart); without a Trainer count iterations.
            iteration = self._iterations.get(split, 0)
            self._iterations[split] = iteration + 1
            trainer = self.trainer
            epoch = trainer.current_epoch if trainer is not None else iteration
            return (epoch, *self._rank_world())

        loader = YT8MDataLoader(dataset, context=context, num_workers=self.num_workers,
                                on_unreported_read_stats=self._add_read_stats)
        if split == "fit":
            self._warn_if_shared_memory_is_short()
            self._train_loader = loader
            if self._train_position is not None:
                loader.load_state_dict(self._train_position)
                self._train_position = None
        return loader

    def _warn_if_shared_memory_is_short(self) -> None:
        """At the start of fit: the training and the validation workers of every rank on this
        machine hold batches in its /dev/shm at once, so one too small for all of them stops the
        run at its first validation, hours in."""
        free = shared_memory_free()
        ranks = self.trainer.num_devices if self.trainer is not None else 1  # the ranks on this machine
        datasets = [self.datasets[split] for split in ("fit", "validate") if split in self.datasets]
        needed = ranks * self.num_workers * sum(dataset.shared_memory_per_worker() for dataset in datasets)
        if free is not None and needed > free:
            rank_zero_warn(f"{SHARED_MEMORY} has {mebibytes(free)} free and the DataLoader workers may keep up to "
                           f"{mebibytes(needed)} there ({self.num_workers} per loader and rank, training's and "
                           f"validation's at once, {ranks} rank(s) on this machine); a full {SHARED_MEMORY} stops "
                           f"the run: {SHARED_MEMORY_ADVICE}")

    def train_dataloader(self) -> YT8MDataLoader:
        return self._loader("fit")

    def val_dataloader(self) -> YT8MDataLoader:
        return self._loader("validate")

    def test_dataloader(self) -> YT8MDataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> YT8MDataLoader:
        return self._loader("predict")

    # -- on the host, then on the device ----------------------------------------------------------
    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count the batch's read_stats while they are on the host (after the transfer, reading
        them back would synchronise the GPU once per batch) and leave them behind."""
        batch = dict(batch)
        stats = batch.pop("read_stats", None)
        if stats is not None:
            self._add_read_stats(stats)
        return batch

    def _add_read_stats(self, stats: torch.Tensor) -> None:
        for name, value in zip(STAT_NAMES, stats.tolist()):
            self.read_stats[name] += value

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Quantized batch on the device -> the float batch contract (see class docstring)."""
        if "read_stats" in batch:  # called without on_before_batch_transfer
            batch = self.on_before_batch_transfer(batch, dataloader_idx)
        generator = self._generator(batch["lengths"].device) if self.sample_frames else None
        batch = finalize_batch(batch, self.whitening, self.sample_frames, generator)
        # Lightning converts a batch to the trainer's precision (64-true: float64) before the
        # transfer hooks, while it is still uint8: the floats made here are converted now.
        return batch if self.trainer is None else self.trainer.precision_plugin.convert_input(batch)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            rank, _ = self._rank_world()
            generator = torch.Generator(device=device).manual_seed(self.seed * 1000003 + rank)
            if str(device) in self._saved_generators:
                generator.set_state(self._saved_generators.pop(str(device)))
            self._generators[device] = generator
        return self._generators[device]

    # -- in checkpoints: the epoch's data and frame sampling continue exactly after a resume ------
    def state_dict(self) -> dict:
        """Every rank's training-data position and frame-sampling generators (call on all ranks
        together, as Lightning's checkpointing does).

        Lightning also keeps the loader's state in its fit loop's state, but restores it only when
        it counts the epoch as unfinished, and after a resume from a checkpoint taken at an
        epoch's last batch (lightning 2.6) it counts the next epoch as finished: a second resume
        in that epoch would start it again. The datamodule's state is restored on every resume.
        """
        local = {str(device): g.get_state() for device, g in self._generators.items()}
        state = {"frame_sampling": gather_per_rank(local)}
        if self._train_loader is not None:
            state["train_position"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._train_position = state.get("train_position")
        states = state.get("frame_sampling") or []
        rank, world_size = self._rank_world()
        if len(states) == world_size:
            self._saved_generators = dict(states[rank])
            self._generators.clear()

    def transform(self, batch: dict) -> dict:
        """Apply what the batch transfer hooks do, without a Trainer (e.g. on the CPU)."""
        return self.on_after_batch_transfer(self.on_before_batch_transfer(batch, 0), 0)
