"""Tiny in-memory videos in the batch contract, and a quiet CPU Trainer, for tests.

Import as ``from toy_data import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

NUM_CLASSES = 12
#: A VideoClassifier small enough to train in seconds on a CPU.
SMALL = dict(num_classes=NUM_CLASSES, rgb_size=32, audio_size=8, clusters=4, groups=4, hidden_size=16,
             gating_reduction=4)


def toy_videos(count: int, seed: int, max_frames: int = 10, labelled: bool = True) -> list[dict]:
    """Videos whose first label shifts the rgb frames: learnable, with varied lengths.

    ``labelled=False`` gives test-split videos: all-zero labels and ``has_labels`` False.
    """
    g = torch.Generator().manual_seed(seed)
    videos = []
    for i in range(count):
        length = int(torch.randint(1, max_frames + 1, (1,), generator=g))
        label = int(torch.randint(0, NUM_CLASSES, (1,), generator=g))
        rgb = torch.zeros(max_frames, 32)
        rgb[:length] = torch.randn(length, 32, generator=g) * 0.3
        rgb[:length, label] += 2.0
        audio = torch.zeros(max_frames, 8)
        audio[:length] = torch.randn(length, 8, generator=g)
        labels = torch.zeros(NUM_CLASSES)
        labels[label] = float(labelled)
        videos.append({"id": f"v{i}", "rgb": rgb, "audio": audio, "lengths": torch.tensor(length),
                       "labels": labels, "has_labels": torch.tensor(labelled)})
    return videos


def collate(videos: list[dict]) -> dict:
    batch = {k: torch.stack([v[k] for v in videos]) for k in ("rgb", "audio", "lengths", "labels", "has_labels")}
    batch["id"] = [v["id"] for v in videos]
    return batch


def loader(count: int, seed: int = 0, batch_size: int = 8, labelled: bool = True) -> DataLoader:
    return DataLoader(toy_videos(count, seed, labelled=labelled), batch_size=batch_size, collate_fn=collate)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    return pl.Trainer(**{**defaults, **kwargs})
