"""``make demo``: write the synthetic YouTube-8M-format dataset if absent, then train on it.

Equivalent to::

    nextvlad-synthetic --out-dir data/synthetic --max-frames 60 --prototype-scale 0.6
    lightning fit --config configs/demo.yaml

It prints the chance-level GAP (random scores) beside the trained model's validation GAP, and where
the TensorBoard logs and the checkpoint are.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch

from nextvlad.data import iter_videos, write_synthetic_dataset
from nextvlad.metrics import GlobalAveragePrecision

SPLITS = ("train", "validate", "test")
#: Videos of 20-60 frames (configs/demo.yaml pads to 60): long enough to pool evidence over time,
#: short enough for 2 CPU cores; the difficulty is pinned so the demo does not drift with the
#: generator's defaults.
DEMO_DATA = {"min_frames": 20, "max_frames": 60, "prototype_scale": 0.6}


def ensure_synthetic_data(out_dir: str, num_classes: int) -> None:
    if all(glob.glob(os.path.join(out_dir, f"{split}*.tfrecord")) for split in SPLITS):
        print(f"synthetic data: reusing {out_dir}")
        return
    print(f"synthetic data: writing {out_dir} ...", flush=True)
    write_synthetic_dataset(out_dir, num_classes=num_classes, **DEMO_DATA)


def chance_gap(pattern: str, num_classes: int, seed: int = 0) -> float:
    """GAP@20 of uniformly random scores on the labelled videos of ``pattern``."""
    metric = GlobalAveragePrecision(top_k=20)
    generator = torch.Generator().manual_seed(seed)
    for video in iter_videos(pattern, max_frames=1, num_classes=num_classes):
        labels = torch.as_tensor(video["labels"], dtype=torch.float32).reshape(1, -1)
        metric.update(torch.rand(1, num_classes, generator=generator), labels)
    return float(metric.compute())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--data-dir", default="data/synthetic")
    parser.add_argument("--num-classes", type=int, default=100, help="must match the config")
    args, lightning_args = parser.parse_known_args(argv)
    if not os.path.isfile(args.config):  # before writing 4,000 videos for nothing
        parser.error(f"--config {args.config}: no such file (the demo runs from the repository's root)")

    from nextvlad.cli import main as cli_main  # imports Lightning: after the data step

    start = time.perf_counter()
    ensure_synthetic_data(args.data_dir, args.num_classes)
    chance = chance_gap(os.path.join(args.data_dir, "validate*.tfrecord"), args.num_classes)
    cli = cli_main(["fit", "--config", args.config, *lightning_args])
    trainer = cli.trainer
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_score if checkpoint is not None else None
    final_gap = float(trainer.callback_metrics.get("val/gap", float("nan")))
    print()
    print(f"validation GAP@20: {final_gap:.4f} (last epoch)"
          + (f", best {float(best):.4f}" if best is not None else "")
          + f"; chance level (random scores): {chance:.4f}")
    print(f"TensorBoard logs: {trainer.logger.log_dir}   (tensorboard --logdir {trainer.logger.save_dir})")
    if checkpoint is not None:
        # best.ckpt (ModelCheckpointWithBest's link), the name the README's next commands use
        best_link = os.path.join(checkpoint.dirpath, "best.ckpt")
        shown = best_link if os.path.exists(best_link) else checkpoint.best_model_path
        print(f"best checkpoint:  {shown}  ({os.path.basename(checkpoint.best_model_path)})")
        print(f"last checkpoint:  {checkpoint.last_model_path}")
    print(f"total time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
