"""The paper configs checkpoint every N steps and at validation, atomically, keeping the top-k."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# The video-level paper configs (days of training); the segment fine-tuning validates every epoch.
PAPER_CONFIGS = sorted(p for p in (REPO / "configs").glob("n*vlad*.yaml") if "segments" not in p.name)
CHECKPOINT_CALLBACKS = ("lightning.pytorch.callbacks.ModelCheckpoint", "nextvlad.callbacks.ModelCheckpointWithBest")


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_configs_checkpoint_periodically_and_atomically(config):
    trainer = yaml.safe_load(config.read_text())["trainer"]
    assert [p["class_path"] for p in trainer["plugins"]] == ["nextvlad.checkpoint_io.AtomicCheckpointIO"]
    top_k, periodic = (c["init_args"] for c in trainer["callbacks"] if c["class_path"] in CHECKPOINT_CALLBACKS)
    assert (top_k["monitor"], top_k["mode"], top_k["save_top_k"]) == ("val/gap", "max", 3)
    assert periodic["every_n_train_steps"] == 1000 and periodic["save_last"]
    # validation (every 10k steps) falls on a periodic save: last.ckpt is never older than 1000 steps
    assert trainer["val_check_interval"] % periodic["every_n_train_steps"] == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_nextvlad_config_saves_last_every_n_steps_and_top_k_at_validation(synthetic_data, tmp_path):
    config = yaml.safe_load((REPO / "configs" / "nextvlad.yaml").read_text())
    config["trainer"].update(accelerator="cpu", precision="32-true", logger=False, max_steps=7,
                             default_root_dir=str(tmp_path), val_check_interval=5,
                             enable_progress_bar=False)
    config["trainer"]["callbacks"][1]["init_args"]["every_n_train_steps"] = 3
    config["model"]["init_args"].update(num_classes=10, clusters=4, groups=2, hidden_size=16,
                                        gating_reduction=4)
    config["data"]["init_args"].update(
        train_pattern=synthetic_data["dir"] + "/train*.tfrecord", test_pattern=None,
        val_pattern=synthetic_data["dir"] + "/validate*.tfrecord", predict_pattern=None,
        batch_size=8, eval_batch_size=8, num_workers=0, max_frames=60, num_classes=10,
        eigenvalues_path=None)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = Path(sys.executable).parent / "lightning"
    result = subprocess.run([str(command), "fit", "--config", str(path)], capture_output=True,
                            text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    # steps 3 and 6 periodic (last.ckpt, the newest kept), step 5 validated: in the top 3, and
    # best.ckpt links to it
    assert len(names) == 3 and names[:2] == ["best.ckpt", "last.ckpt"] and names[2].startswith("step5-gap"), names
    assert (folder / "best.ckpt").resolve() == (folder / names[2]).resolve()
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 6
