"""Training throughput (videos/s) of a config's model: model only, end to end, and mix3 vs 3 x single.

* model only: random batches already on the device; forward, backward, per-tensor clipping and the
  Adam step, exactly what ``VideoClassifier`` does in ``training_step``;
* end to end: ``Trainer.fit`` reading synthetic frame-level TFRecords (40-100% of --frames per video)
  through ``YT8MDataModule`` with the config's data settings;
* mixture cost: the step time of the config's model with ``num_branches`` 3 against 3 x the step
  time of the same model with one branch (issue: the branches must not cost more than three models).

    python benchmarks/bench_train.py --config configs/nextvlad.yaml                 # GPU, bf16
    python benchmarks/bench_train.py --config configs/nextvlad_mix3.yaml --mixture
    python benchmarks/bench_train.py --tiny                                         # CPU smoke run
    python benchmarks/bench_train.py --ceilings benchmarks/results/ceilings_cuda.json --cost-split

MFU: the matmul FLOPs of one video's forward and backward (counted by ``FlopCounterMode`` on the
model with the reference aggregation, whose matmuls it can see) times videos/s, over the bf16
GEMM throughput measured by benchmarks/ceilings.py (``--ceilings``; else the data sheet's 990).

Frames per video and DataLoader workers default to the config's (workers at most the CPU cores).
Each model-only number is the median of per-step times after untimed warm-up steps. Compare rows
of one run only: numbers depend on the machine and whatever else runs on it. Results go to a
scratch folder unless ``--output-dir`` (``benchmarks/results`` is the committed one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SCRATCH_DIR, environment, markdown_table, print_targets, write_results  # noqa: E402

from nextvlad.data import write_synthetic_dataset  # noqa: E402
from nextvlad.models.nextvlad import NeXtVLAD  # noqa: E402
from nextvlad.module import VideoClassifier, clip_per_tensor_  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: --tiny: a model small enough for a CPU smoke run (seconds), same layers.
TINY_MODEL = {"num_classes": 100, "clusters": 8, "groups": 4, "hidden_size": 64, "gating_reduction": 4}


def config_init_args(config: Path, section: str) -> dict[str, Any]:
    """The ``init_args`` of a LightningCLI config's ``model`` or ``data`` section."""
    return (yaml.safe_load(config.read_text()).get(section) or {}).get("init_args") or {}


def model_hparams(config: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    return {**config_init_args(config, "model"), **overrides}


def random_batch(hp: dict[str, Any], batch: int, frames: int, device: torch.device) -> dict[str, Any]:
    num_classes = hp.get("num_classes", 3862)
    generator = torch.Generator(device="cpu").manual_seed(0)
    labels = (torch.rand(batch, num_classes, generator=generator) < 3.0 / num_classes).float()
    return {
        "id": [f"v{i}" for i in range(batch)],
        "rgb": torch.randn(batch, frames, hp.get("rgb_size", 1024), generator=generator).to(device),
        "audio": torch.randn(batch, frames, hp.get("audio_size", 128), generator=generator).to(device),
        "lengths": torch.randint(frames // 2, frames + 1, (batch,), generator=generator).to(device),
        "labels": labels.to(device),
        "has_labels": torch.ones(batch, dtype=torch.bool, device=device),
    }


def autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model_steps(hp: dict[str, Any], batch: dict[str, Any], device: torch.device, precision: str,
                     warmup: int, steps: int) -> float:
    """Seconds per training step (forward, backward, per-tensor clip, Adam) on a fixed batch."""
    module = VideoClassifier(**hp).to(device).train()
    optimizer = module.configure_optimizers()
    def step() -> None:
        with autocast(device, precision):
            losses, _ = module.compute_losses(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        clip_per_tensor_([p for p in module.parameters() if p.grad is not None], hp.get("gradient_clip_norm", 1.0))
        optimizer.step()
    return median_step_seconds(step, warmup, steps, lambda: synchronize(device))


def median_step_seconds(step: Callable[[], None], warmup: int, steps: int, synchronize: Callable[[], None],
                        clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of ``steps`` timed calls after ``warmup`` untimed ones.

    Each step is timed on its own (synchronised), and the median is reported, so that first-call
    costs that outlast the warm-up (allocator growth, lazy initialisation) or a burst of load from
    other processes do not end up in the number, as they would in a mean over the whole run.
    """
    for _ in range(warmup):
        step()
    synchronize()
    seconds = []
    for _ in range(steps):
        start = clock()
        step()
        synchronize()
        seconds.append(clock() - start)
    return statistics.median(seconds)


#: H200 data sheet, dense bf16 (used for MFU only when no measured ceiling is given).
DATASHEET_BF16_TFLOPS = 990.0
#: The issue's model-only targets (videos/s, bf16-mixed, B=160, one H200) by config stem; end to end
#: must reach END_TO_END_FRACTION of model only.
MODEL_ONLY_TARGETS = {"nextvlad": 40_000, "nextvlad_mix3": 12_000}
END_TO_END_FRACTION = 0.9


def training_flops_per_video(hp: dict[str, Any], frames: int, device: torch.device) -> float:
    """Matmul FLOPs of one training step's forward and backward, per video.

    Counted on the model with ``aggregation_backend="reference"``: the registered op is opaque to
    ``FlopCounterMode``, its reference is made of matmuls it counts. Every frame is counted (padded
    frames go through the FCs too)."""
    from torch.utils.flop_counter import FlopCounterMode

    videos = 2
    module = VideoClassifier(**{**hp, "aggregation_backend": "reference"}).to(device).train()
    batch = random_batch(hp, videos, frames, device)
    with FlopCounterMode(display=False) as counter:
        losses, _ = module.compute_losses(batch)
        losses["total"].backward()
    return counter.get_total_flops() / videos


def time_stream_fcs(hp: dict[str, Any], batch: dict[str, Any], device: torch.device, precision: str,
                    warmup: int, steps: int) -> float:
    """Seconds per forward+backward of the NeXtVLAD streams' expansion, attention and cluster FCs
    alone (the GEMMs before the aggregation), on the batch's frames: the floor under the model."""
    module = VideoClassifier(**hp).to(device).train()
    streams = [m for m in module.modules() if isinstance(m, NeXtVLAD)]
    frames = {m.feature_size: batch["rgb"] if m.feature_size == batch["rgb"].shape[-1] else batch["audio"]
              for m in streams}

    def step() -> None:
        with autocast(device, precision):
            total = 0
            for stream in streams:
                expanded = stream.expansion_fc(frames[stream.feature_size])
                total = total + stream.group_attention(expanded).float().sum()
                total = total + stream.cluster_logits(expanded).float().sum()
        total.backward()

    return median_step_seconds(step, warmup, steps, lambda: synchronize(device))


def add_mfu(rows: list[dict[str, Any]], flops_per_video: float, peak_tflops: float) -> None:
    """TFLOP/s and MFU of each row from its own "GFLOP/video" (a model-only row of another branch
    count than the config's has its own), else from ``flops_per_video`` (the config's model)."""
    for row in rows:
        if row.get("videos_per_s") and "FCs alone" not in row["workload"]:
            row.setdefault("GFLOP/video", flops_per_video / 1e9)
            row["TFLOP/s"] = row["GFLOP/video"] * row["videos_per_s"] / 1e3
            row["MFU"] = row["TFLOP/s"] / peak_tflops


def training_targets(config_stem: str, rows: list[dict[str, Any]], judged: bool) -> list[dict[str, Any]]:
    """The issue's throughput targets that apply to this config's rows; ``passed`` is None (N/A)
    unless ``judged`` (the targets are for the full model on a GPU)."""
    model_only = next((r["videos_per_s"] for r in rows if r["workload"].startswith("model only (")), None)
    end_to_end = next((r["videos_per_s"] for r in rows if r["workload"].startswith("end to end")), None)
    targets = []
    if config_stem in MODEL_ONLY_TARGETS:
        bound = MODEL_ONLY_TARGETS[config_stem]
        targets.append({"target": f"{config_stem} model only videos/s", "value": model_only, "relation": ">=",
                        "bound": bound, "passed": model_only >= bound if model_only and judged else None})
    fraction = end_to_end / model_only if end_to_end and model_only else None
    targets.append({"target": f"{config_stem} end to end / model only", "value": fraction, "relation": ">=",
                    "bound": END_TO_END_FRACTION,
                    "passed": fraction >= END_TO_END_FRACTION if fraction and judged else None})
    return targets


class StepTimer(pl.Callback):
    """Wall time of the training batches after ``warmup`` (data loading included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.videos = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.videos += len(batch["lengths"])
        self.end = time.perf_counter()

    def videos_per_second(self) -> float:
        return self.videos / (self.end - self.start)


def end_to_end(hp: dict[str, Any], config: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    data_args = config_init_args(config, "data")
    num_videos = args.batch * (args.warmup + args.steps + 1)
    with tempfile.TemporaryDirectory() as directory:
        write_synthetic_dataset(directory, num_train=num_videos, num_validate=0, num_test=0,
                                num_classes=hp.get("num_classes", 3862), min_frames=max(1, args.frames * 2 // 5),
                                max_frames=args.frames,
                                files_per_split=max(2, args.workers))
        from nextvlad.data import YT8MDataModule

        datamodule = YT8MDataModule(
            train_pattern=str(Path(directory) / "train*.tfrecord"), batch_size=args.batch,
            num_workers=args.workers, max_frames=args.frames, num_classes=hp.get("num_classes", 3862),
            eigenvalues_path=args.eigenvalues or None, sample_frames=data_args.get("sample_frames"),
        )
        timer = StepTimer(args.warmup)
        trainer = pl.Trainer(accelerator=device.type, devices=1, precision=args.precision, max_epochs=1,
                             limit_train_batches=args.warmup + args.steps, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[timer], limit_val_batches=0)
        trainer.fit(VideoClassifier(**hp), datamodule=datamodule)
    return {"workload": f"end to end ({args.workers} workers)", "videos_per_s": timer.videos_per_second(),
            "ms_per_step": 1000 * args.batch / timer.videos_per_second()}


def model_only_rows(hp: dict[str, Any], batch: dict[str, Any], device: torch.device, args: argparse.Namespace,
                    common: dict[str, Any]) -> list[dict[str, Any]]:
    """The config's model, and with ``--mixture`` also 1 and 3 branches: each measured once."""
    branch_counts = [hp.get("num_branches", 1)]
    if args.mixture:
        branch_counts += [count for count in (1, 3) if count not in branch_counts]
    seconds = {count: time_model_steps({**hp, "num_branches": count}, batch, device, args.precision,
                                       args.warmup, args.steps) for count in branch_counts}
    rows = []
    for count in branch_counts:
        row = {"workload": f"model only ({count} branch{'es' if count > 1 else ''})", **common,
               "ms_per_step": 1000 * seconds[count], "videos_per_s": args.batch / seconds[count],
               "GFLOP/video": training_flops_per_video({**hp, "num_branches": count}, args.frames, device) / 1e9}
        if args.mixture and count == 3:
            row["mix3 / (3 x single)"] = seconds[3] / (3 * seconds[1])
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "nextvlad.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["bf16-mixed", "32-true"],
                        help="default: bf16-mixed on GPU, 32-true on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 160 on GPU, 8 on CPU")
    parser.add_argument("--frames", type=int, default=None, help="default: the config's max_frames")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the end-to-end run (default: the config's num_workers, "
                             "at most the CPU cores available)")
    parser.add_argument("--eigenvalues", default=str(REPO.parent / "shared" / "yt8m_pca" / "eigenvals.npy"),
                        help="eigenvals.npy for reverse whitening in the end-to-end run ('' for none)")
    parser.add_argument("--mixture", action="store_true", help="also time num_branches 3 against 1")
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny model, batch 4, 20 frames (CI smoke run)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"results directory (default {SCRATCH_DIR}; benchmarks/results is the committed one)")
    parser.add_argument("--ceilings", type=Path, default=None,
                        help="ceilings JSON from benchmarks/ceilings.py: MFU over its measured bf16 TFLOP/s")
    parser.add_argument("--flops", action="store_true",
                        help="only print the training FLOPs per video of the config's model (no timing)")
    parser.add_argument("--cost-split", action="store_true",
                        help="also time the model with the reference aggregation and the stream FCs alone")
    parser.add_argument("--name", default=None, help="result file stem (default train_<config>_<device>)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    if args.tiny:
        args.batch, args.frames, args.warmup, args.steps, args.workers = 4, 20, 1, 2, 1
    args.batch = args.batch or (160 if cuda else 8)
    data = config_init_args(args.config, "data")
    args.frames = args.frames or data.get("max_frames", 300)
    if args.workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        args.workers = min(data.get("num_workers", 0), cores)
    if args.eigenvalues and not Path(args.eigenvalues).is_file():
        args.eigenvalues = ""
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    hp = model_hparams(args.config, {**(TINY_MODEL if args.tiny else {}), "aggregation_backend": "auto"})
    if args.flops:
        flops = training_flops_per_video(hp, args.frames, device)
        print(f"{args.config.name}: {flops / 1e9:.3f} GFLOP per video (forward + backward, matmuls, {args.frames} frames)")
        return [{"config": args.config.name, "GFLOP_per_video": flops / 1e9}]
    batch = random_batch(hp, args.batch, args.frames, device)
    common = {"config": args.config.name, "precision": args.precision, "batch": args.batch, "frames": args.frames}
    rows = model_only_rows(hp, batch, device, args, common)
    if args.cost_split:
        reference = time_model_steps({**hp, "aggregation_backend": "reference"}, batch, device, args.precision,
                                     args.warmup, args.steps)
        rows.append({"workload": "model only, reference aggregation", **common, "ms_per_step": 1000 * reference,
                     "videos_per_s": args.batch / reference})
        fcs = time_stream_fcs(hp, batch, device, args.precision, args.warmup, args.steps)
        rows.append({"workload": "stream FCs alone (expansion, attention, cluster)", **common,
                     "ms_per_step": 1000 * fcs, "videos_per_s": args.batch / fcs})
    ceilings = json.loads(args.ceilings.read_text())["meta"]["ceilings"] if args.ceilings else {}
    peak_tflops = ceilings.get("bf16_TFLOPs") or DATASHEET_BF16_TFLOPS
    flops_per_video = training_flops_per_video(hp, args.frames, device)
    meta = {**environment(device), "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO)
                                                 else args.config), "tiny": args.tiny, "warmup": args.warmup,
            "steps": args.steps, "training_GFLOP_per_video": flops_per_video / 1e9,
            "MFU_peak_TFLOPs": peak_tflops,
            "MFU_peak_source": "measured bf16 GEMM (--ceilings)" if ceilings else "H200 data sheet"}
    columns = ["workload", "config", "precision", "batch", "frames", "ms_per_step", "videos_per_s",
               "GFLOP/video", "TFLOP/s", "MFU", "mix3 / (3 x single)"]
    name = args.name or f"train_{args.config.stem}_{device.type}{'_tiny' if args.tiny else ''}"

    def report(complete: bool) -> None:
        add_mfu(rows, flops_per_video, peak_tflops)
        meta["targets"] = training_targets(args.config.stem, rows, judged=device.type == "cuda" and not args.tiny)
        print(markdown_table(rows, columns), flush=True)
        write_results(name, rows, {**meta, "complete": complete}, columns=columns, output_dir=args.output_dir)

    if not args.no_end_to_end:
        report(complete=False)  # end to end is the slowest part: a run stopped there keeps the rest
        rows.append({**end_to_end(hp, args.config, args, device), **common})
    report(complete=True)
    print(f"training FLOPs per video (forward + backward, matmuls): {flops_per_video / 1e9:.3f} GFLOP; "
          f"MFU over {peak_tflops:.3g} TFLOP/s ({meta['MFU_peak_source']})")
    print_targets(meta["targets"])
    return rows


if __name__ == "__main__":
    main()
