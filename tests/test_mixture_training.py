"""Issue 5 end to end: a distilled mixture trained on synthetic YouTube-8M data beats its branches."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from nextvlad.data import YT8MDataModule
from nextvlad.module import VideoClassifier


@pytest.mark.slow
def test_mixture_validation_gap_is_above_each_branch(synthetic_data, tmp_path):
    pl.seed_everything(0)
    data = YT8MDataModule(
        train_pattern=synthetic_data["train"], val_pattern=synthetic_data["validate"], batch_size=20,
        num_workers=0, max_frames=60, num_classes=synthetic_data["num_classes"],
    )
    model = VideoClassifier(
        num_classes=synthetic_data["num_classes"], clusters=4, groups=2, expansion=1, hidden_size=32,
        gating_reduction=4, num_branches=3, temperature=3.0, cl_lambda=9.0, learning_rate=3e-3,
        bn_momentum=0.1,
    )
    # 2 epochs: the mixture leads each branch by the widest margin early (seed 0: mixture 0.971,
    # branches 0.943, 0.938, 0.928), the branches close in as all saturate (6 epochs: 0.998 vs
    # 0.993); max_frames stays 60, as fewer frames hide labels shown late in a video (at 20 or 30
    # the task is not learned to 0.9 and the mixture falls behind a branch)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if "gap" in name}
    branches = [metrics[f"val/branch_{m}/gap"] for m in range(3)]
    print(f"validation GAP: mixture {metrics['val/gap']:.4f}, branches " + ", ".join(f"{g:.4f}" for g in branches))
    assert metrics["val/gap"] > 0.9  # the task was learned, so the comparison means something
    # strictly: a mixture that only passed on its best branch's logits would tie with it
    assert all(metrics["val/gap"] > gap for gap in branches)
