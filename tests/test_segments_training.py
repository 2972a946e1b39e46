"""Segment fine-tuning with VideoClassifier(task="segments"): loss on rated entries, init_from,
the three model families, validation metrics and prediction rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision
from toy_data import NUM_CLASSES, SMALL, loader, trainer
from torch.utils.data import DataLoader

from nextvlad.data import write_synthetic_dataset
from nextvlad.module import VideoClassifier

REPO = Path(__file__).resolve().parents[1]

FAMILIES = {
    "nextvlad": dict(SMALL),
    "netvlad": dict(SMALL, architecture="netvlad"),
    "mixture": dict(SMALL, num_branches=2, gate_input="all"),
}


def toy_segments(count: int, seed: int) -> list[dict]:
    """One-segment items: the rated class shifts the rgb frames; 1-5 real frames."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        length = int(torch.randint(1, 6, (1,), generator=g))
        label = int(torch.randint(0, NUM_CLASSES, (1,), generator=g))
        positive = bool(torch.rand(1, generator=g) < 0.6)
        rgb = torch.zeros(5, 32)
        rgb[:length] = torch.randn(length, 32, generator=g) * 0.3
        if positive:
            rgb[:length, label] += 2.0
        labels, weights = torch.zeros(NUM_CLASSES), torch.zeros(NUM_CLASSES)
        labels[label], weights[label] = float(positive), 1.0
        other = (label + 1) % NUM_CLASSES  # a rated negative too
        weights[other] = 1.0
        items.append({"id": f"v{i}:0", "rgb": rgb, "audio": torch.randn(5, 8, generator=g),
                      "lengths": torch.tensor(length), "labels": labels, "label_weights": weights,
                      "has_labels": torch.tensor(True)})
    return items


def collate_segments(items: list[dict]) -> dict:
    batch = {k: torch.stack([v[k] for v in items]) for k in items[0] if k != "id"}
    batch["id"] = [v["id"] for v in items]
    return batch


def segment_loader(count: int, seed: int = 0, batch_size: int = 16) -> DataLoader:
    return DataLoader(toy_segments(count, seed), batch_size=batch_size, collate_fn=collate_segments)


def test_loss_is_on_rated_entries_only_unless_unrated_negative():
    torch.manual_seed(0)
    batch = collate_segments(toy_segments(6, 1))
    for unrated in ("ignore", "negative"):
        module = VideoClassifier(**SMALL, task="segments", unrated=unrated).eval()
        losses, logits = module.compute_losses(batch)
        p = torch.sigmoid(logits.detach().double())
        y = batch["labels"].double()
        entry = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
        if unrated == "ignore":
            entry = entry * batch["label_weights"].double()
        assert losses["label_loss"].item() == pytest.approx(entry.sum(1).mean().item(), rel=1e-5)


def video_checkpoint(tmp_path, family: str, **overrides) -> str:
    module = VideoClassifier(**{**FAMILIES[family], **overrides})
    fit = trainer(max_epochs=1, limit_train_batches=2)
    fit.fit(module, loader(32))
    path = str(tmp_path / f"{family}.ckpt")
    fit.save_checkpoint(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tune_from_a_video_level_checkpoint(tmp_path, family):
    checkpoint = video_checkpoint(tmp_path, family)
    video_state = {k: v.clone() for k, v in torch.load(checkpoint, weights_only=False)["state_dict"].items()}
    module = VideoClassifier(**FAMILIES[family], task="segments", init_from=checkpoint, bn_momentum=0.1)
    module.setup("fit")
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, video_state[f"model.{key}"]), key
    fit = trainer(max_epochs=1)
    fit.fit(module, segment_loader(64), segment_loader(32, seed=5))
    assert 0.0 <= float(fit.callback_metrics["val/segment_map"]) <= 1.0
    assert {"val/gap", "val/map", "val/loss"} <= set(fit.callback_metrics)
    moved = any(not torch.equal(v, video_state[f"model.{k}"]) for k, v in module.model.state_dict().items())
    assert moved  # it trained from there


def test_init_from_with_other_shapes_is_a_clear_error(tmp_path):
    checkpoint = video_checkpoint(tmp_path, "nextvlad")
    module = VideoClassifier(**{**SMALL, "clusters": 8}, task="segments", init_from=checkpoint)
    with pytest.raises(ValueError, match=r"init_from .*nextvlad.ckpt: the checkpoint's model does not fit .*"
                                         r"another architecture \(clusters: checkpoint 4 vs config 8\)"):
        module.setup("fit")
    with pytest.raises(FileNotFoundError, match="init_from: checkpoint .*missing.ckpt does not exist"):
        VideoClassifier(**SMALL, task="segments", init_from=str(tmp_path / "missing.ckpt")).setup("fit")


def test_init_from_another_activation_is_refused_although_every_shape_fits(tmp_path):
    checkpoint = video_checkpoint(tmp_path, "nextvlad")  # hidden_activation "relu" (the default)
    module = VideoClassifier(**SMALL, hidden_activation="none", task="segments", init_from=checkpoint)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        module.setup("fit")
    assert str(error.value) == (f"init_from {checkpoint}: the checkpoint is of another architecture "
                                "(hidden_activation: checkpoint 'relu' vs config 'none')")
    assert all(torch.equal(v, before[k]) for k, v in module.model.state_dict().items())  # nothing loaded


@pytest.mark.slow
def test_init_from_another_activation_is_one_line_through_the_console_script(tmp_path):
    """The README's fine-tuning command with a changed hidden_activation: every shape fits, but
    `fit` stops with one line naming both values, as --ckpt_path does."""
    script = Path(sys.executable).parent / "nextvlad"
    if not script.exists():
        pytest.skip(f"{script} is not installed")
    write_synthetic_dataset(tmp_path / "data" / "synthetic", num_train=0, num_validate=20, num_test=0,
                            num_classes=100, files_per_split=1, min_frames=5, max_frames=60, segments=True)
    video_model = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["model"]["init_args"]
    video = VideoClassifier(**video_model)  # configs/demo.yaml's model: hidden_activation relu
    checkpoint = tmp_path / "video.ckpt"
    torch.save({"state_dict": video.state_dict(), "hyper_parameters": dict(video.hparams)}, checkpoint)
    result = subprocess.run([str(script), "fit", "--config", str(REPO / "configs" / "demo_segments.yaml"),
                             f"--model.init_args.init_from={checkpoint}", "--model.init_args.hidden_activation=none",
                             "--trainer.fast_dev_run=1", "--trainer.logger=false"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"nextvlad fit: error: init_from {checkpoint}: the checkpoint is of another architecture "
        "(hidden_activation: checkpoint 'relu' vs config 'none')")


def test_fine_tuning_learns_the_rated_segments():
    module = VideoClassifier(**SMALL, task="segments", learning_rate=3e-3, bn_momentum=0.1)
    validation = segment_loader(64, seed=9, batch_size=64)
    fit = trainer(max_epochs=8)
    fit.fit(module, segment_loader(256), validation)
    # chance: a random ranking of each class's rated segments gives about its positive rate
    assert float(fit.callback_metrics["val/segment_map"]) > 0.9


def test_batches_of_fewer_than_two_segments_give_a_zero_loss_on_every_parameter():
    module = VideoClassifier(**SMALL, task="segments")
    for count in (0, 1):
        batch = collate_segments(toy_segments(2, 0))
        batch = {k: (v[:count] if k != "id" else v[:count]) for k, v in batch.items()}
        loss = module.training_step(batch, 0)
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_a_step_without_segments_leaves_the_weights_and_adam_state_as_they_were(precision):
    """Batches of 2 then 1 segments train exactly as the batch of 2 alone: the 1-segment step's
    zero loss must not let Adam move the weights along its moments (nor count a step); with fp16's
    GradScaler (here on the CPU) the step without gradients must not fail either."""
    def fit(count: int) -> tuple[VideoClassifier, torch.optim.Optimizer]:
        torch.manual_seed(0)
        module = VideoClassifier(**SMALL, task="segments", learning_rate=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0)  # small: the first step's gradients stay finite
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)] if precision == "16-mixed" else []
        run = trainer(max_epochs=1, plugins=plugins)
        run.fit(module, segment_loader(count, batch_size=2))
        return module, run.optimizers[0]

    (two, two_optimizer), (three, three_optimizer) = fit(2), fit(3)
    assert three.trainer.global_step == 2  # the empty step ran (closure, DDP all-reduce) ...
    for (name, expected), actual in zip(two.state_dict().items(), three.state_dict().values()):
        assert torch.equal(expected, actual), name  # ... and changed nothing
    two_state, three_state = two_optimizer.state_dict()["state"], three_optimizer.state_dict()["state"]
    assert two_state.keys() == three_state.keys() and len(three_state) > 0
    for key, state in three_state.items():
        assert all(torch.equal(torch.as_tensor(value), torch.as_tensor(two_state[key][name]))
                   for name, value in state.items()), key


def test_predict_returns_every_segments_probabilities_and_needs_segment_batches():
    module = VideoClassifier(**SMALL, task="segments").eval()
    batch = collate_segments(toy_segments(3, 0))
    out = module.predict_step(batch, 0)
    assert out["id"] == ["v0:0", "v1:0", "v2:0"] and out["probabilities"].shape == (3, NUM_CLASSES)
    del batch["label_weights"]
    with pytest.raises(ValueError, match="task='segments' needs segment batches with 'label_weights'"):
        module.compute_losses(batch)
    with pytest.raises(ValueError, match="gate_input='per_frame' over gate_frames=300"):
        VideoClassifier(**SMALL, task="segments", num_branches=2, gate_input="per_frame")
