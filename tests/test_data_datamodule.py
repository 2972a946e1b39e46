"""YT8MDataModule with a real Trainer: configurable from a CLI, nothing dropped outside training."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

from nextvlad.data import YT8MDataModule, iter_videos
from nextvlad.data.transforms import BATCH_KEYS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's CPU/worker hints


class Recorder(L.LightningModule):
    """Records what every step receives; trains a linear layer on mean features."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(1152, num_classes)
        self.received: dict[str, list[dict]] = {"train": [], "val": [], "test": [], "predict": []}

    def _record(self, stage: str, batch: dict) -> torch.Tensor:
        self.received[stage].append({k: v for k, v in batch.items()})
        features = torch.cat([batch["rgb"], batch["audio"]], -1).sum(1) / batch["lengths"][:, None]
        return self.linear(features)

    def training_step(self, batch, batch_index):
        logits = self._record("train", batch)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])

    def validation_step(self, batch, batch_index):
        self._record("val", batch)

    def test_step(self, batch, batch_index):
        self._record("test", batch)

    def predict_step(self, batch, batch_index):
        return torch.sigmoid(self._record("predict", batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_fit_validate_test_predict(synthetic_data):
    datamodule = YT8MDataModule(train_pattern=synthetic_data["train"],
                                val_pattern=synthetic_data["validate"],
                                test_pattern=synthetic_data["test"],
                                predict_pattern=synthetic_data["test"], batch_size=16,
                                eval_batch_size=7, num_workers=2, max_frames=50, num_classes=10)
    model = Recorder(10)
    trainer(max_epochs=2, num_sanity_val_steps=0).fit(model, datamodule)
    train_ids = [[i for b in model.received["train"][e * 7:(e + 1) * 7] for i in b["id"]] for e in (0, 1)]
    assert len(model.received["train"]) == 14  # 120 // 16 = 7 full batches per epoch
    assert all(len(ids) == len(set(ids)) == 112 for ids in train_ids)
    assert train_ids[0] != train_ids[1]  # reshuffled per epoch
    all_validate = sorted(v["id"] for v in iter_videos(synthetic_data["validate"], num_classes=10))
    val_ids = [i for b in model.received["val"] for i in b["id"]]
    assert sorted(val_ids) == sorted(all_validate * 2)  # two validation passes, nothing dropped
    for batch in model.received["train"] + model.received["val"]:
        assert tuple(batch) == BATCH_KEYS  # exactly the contract, nothing else
        assert batch["rgb"].dtype == torch.float32 and batch["rgb"].shape[1:] == (50, 1024)
        assert batch["labels"].dtype == torch.float32 and batch["has_labels"].all()
    assert datamodule.read_stats["truncated_videos"] > 0  # 20-60 frame videos, max_frames 50

    trainer().test(model, datamodule)
    predictions = trainer().predict(model, datamodule)
    all_test = sorted(v["id"] for v in iter_videos(synthetic_data["test"], num_classes=10))
    for stage in ("test", "predict"):
        ids = [i for b in model.received[stage] for i in b["id"]]
        assert sorted(ids) == all_test  # label-less files, nothing dropped
        assert not any(b["has_labels"].any() or b["labels"].any() for b in model.received[stage])
    assert sum(len(p) for p in predictions) == len(all_test)


def test_configurable_from_the_command_line(synthetic_data, eigenvalues_path):
    parser = ArgumentParser()
    parser.add_class_arguments(YT8MDataModule, "data")
    config = parser.parse_args([
        "--data.train_pattern", f"{synthetic_data['dir']}/train*.tfrecord",
        "--data.val_pattern", "[a.tfrecord, b.tfrecord]", "--data.batch_size", "32",
        "--data.eigenvalues_path", eigenvalues_path, "--data.sample_frames", "20",
        "--data.on_error", "skip"])
    datamodule = parser.instantiate_classes(config).data
    assert isinstance(datamodule, YT8MDataModule)
    assert datamodule.batch_size == 32 and datamodule.sample_frames == 20
    assert datamodule.patterns["validate"] == ["a.tfrecord", "b.tfrecord"]
    assert datamodule.whitening is not None and datamodule.on_error == "skip"
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.on_error", "ignore"])


def test_missing_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="val_pattern is not set"):
        YT8MDataModule(train_pattern="x*").val_dataloader()


@pytest.mark.parametrize("arguments, message", [
    (dict(eval_batch_size=0), "^eval_batch_size must be an integer >= 1, got 0$"),
    (dict(eval_batch_size=-1), "^eval_batch_size must be an integer >= 1, got -1$"),
    (dict(batch_size=0), "^batch_size must be an integer >= 1, got 0$"),
    (dict(batch_size=-2, eval_batch_size=4), "^batch_size must be an integer >= 1, got -2$"),
    (dict(shuffle_buffer=-5), r"^shuffle_buffer must be an integer >= 0 .*got -5$"),
    (dict(max_frames=0), "^max_frames must be an integer >= 1, got 0$"),
    (dict(sample_frames=2.5), "^sample_frames must be an integer >= 1, got 2.5$"),
    (dict(compression="zip"), "^compression must be one of"),
])
def test_bad_arguments_are_named_at_construction(arguments, message):
    """Before any file is read; eval_batch_size 0 must not silently become batch_size."""
    with pytest.raises(ValueError, match=message):
        YT8MDataModule(train_pattern="unused*.tfrecord", **arguments)


def test_eval_batch_size_none_means_batch_size():
    assert YT8MDataModule(batch_size=5).eval_batch_size == 5
    assert YT8MDataModule(batch_size=5, eval_batch_size=3).eval_batch_size == 3
    assert YT8MDataModule(shuffle_buffer=0).shuffle_buffer == 0  # 0: no shuffle buffer


def test_numpy_integers_are_integers_and_bools_are_not():
    """A script's np.int64 (from a config array, a sweep) is an integer; True is not a batch size."""
    module = YT8MDataModule(batch_size=np.int64(8), eval_batch_size=np.int32(4), max_frames=np.int64(300),
                            shuffle_buffer=np.int64(0))
    assert (module.batch_size, module.eval_batch_size, module.max_frames) == (8, 4, 300)
    with pytest.raises(ValueError, match="^batch_size must be an integer >= 1, got True$"):
        YT8MDataModule(batch_size=True)


@pytest.mark.parametrize("arguments, message", [
    (dict(shuffle_buffer=-1), "^shuffle_buffer must be an integer >= 0"),
    (dict(batch_size=2.5), "^batch_size must be an integer >= 1, got 2.5$"),
    (dict(max_frames=30.0), "^max_frames must be an integer >= 1, got 30.0$"),
])
def test_dataset_refuses_bad_arguments_by_name(synthetic_data, arguments, message):
    """The dataset is public on its own: the same checks as the data module's."""
    from nextvlad.data import YT8MFrameDataset

    with pytest.raises(ValueError, match=message):
        YT8MFrameDataset(synthetic_data["train"], num_classes=10, **arguments)


def test_read_stats_are_counted_before_the_device_transfer(synthetic_data):
    """Counting read_stats after the transfer would read a device tensor back to the host:
    one GPU synchronisation per batch. They are consumed on the host, before the transfer."""
    dm = YT8MDataModule(val_pattern=synthetic_data["validate"], batch_size=8, num_workers=0,
                        max_frames=30, num_classes=10)
    dm.setup("validate")
    raw = next(iter(dm.val_dataloader()))
    truncated = int(raw["read_stats"][2])
    assert truncated > 0  # 20-60 frame videos, max_frames 30
    to_transfer = dm.on_before_batch_transfer(raw, 0)
    assert "read_stats" not in to_transfer and dm.read_stats["truncated_videos"] == truncated
    assert tuple(dm.on_after_batch_transfer(to_transfer, 0)) == BATCH_KEYS
    assert dm.read_stats["truncated_videos"] == truncated  # counted once
    assert tuple(dm.transform(next(iter(dm.val_dataloader())))) == BATCH_KEYS
    assert dm.read_stats["truncated_videos"] == 2 * truncated  # the same first batch again


def test_loader_length_follows_the_current_trainer(synthetic_data):
    """A Trainer stops evaluation after len(loader) batches, so a length computed for another
    world size (a datamodule set up earlier, or reused by a second Trainer) would drop records."""
    from types import SimpleNamespace

    dm = YT8MDataModule(val_pattern=synthetic_data["validate"], eval_batch_size=7, num_workers=0,
                        max_frames=30, num_classes=10)
    for rank, world_size in ((1, 2), (0, 1), (0, 3)):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, current_epoch=0)
        dm.setup("validate")
        loader = dm.val_dataloader()
        assert len(loader) == len(list(loader))


def test_64_true_precision_gets_float64_batches_and_trains(synthetic_data):
    """Lightning converts a batch to the trainer's precision before the transfer hooks, while it is
    uint8: the float batch made on the device must be converted too (it was float32, and the
    float64 model's first layer raised a dtype mismatch)."""
    from nextvlad import VideoClassifier

    class Inputs(L.Callback):
        dtypes: list = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.dtypes.append((batch["rgb"].dtype, batch["audio"].dtype))

    data = YT8MDataModule(train_pattern=synthetic_data["dir"] + "/train*.tfrecord",
                          val_pattern=synthetic_data["dir"] + "/validate*.tfrecord", batch_size=8, num_workers=0,
                          max_frames=60, num_classes=10)
    model = VideoClassifier(num_classes=10, clusters=4, groups=2, hidden_size=16, gating_reduction=4)
    inputs = Inputs()
    L.Trainer(accelerator="cpu", precision="64-true", max_steps=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
              callbacks=[inputs]).fit(model, data)
    assert inputs.dtypes == [(torch.float64, torch.float64)] * 2
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("world_size", [1, 2])
def test_training_data_too_small_for_one_full_batch_is_an_error(tmp_path, monkeypatch, world_size):
    """7 training records, batch_size 4: one rank trains 1 batch; two ranks (4 and 3 records) none,
    with drop_last keeping ranks in step: Lightning ended fit at once with exit status 0."""
    from nextvlad.data import write_synthetic_dataset

    write_synthetic_dataset(tmp_path, num_train=7, num_validate=0, num_test=0, num_classes=10, files_per_split=1,
                            min_frames=2, max_frames=4, seed=0)
    monkeypatch.setattr(YT8MDataModule, "_rank_world", lambda self: (0, world_size))

    def train_batches(drop_last: bool) -> int:
        return len(YT8MDataModule(train_pattern=str(tmp_path / "train*.tfrecord"), batch_size=4, num_workers=0,
                                  max_frames=4, num_classes=10, drop_last=drop_last).train_dataloader())

    assert train_batches(drop_last=False) == (2 if world_size == 1 else 1)
    if world_size == 1:
        assert train_batches(drop_last=True) == 1
        return
    with pytest.raises(ValueError, match=r"^YT8MDataModule train_pattern: 7 records give no full batch of batch_size "
                                         r"4 on each of 2 rank\(s\) and drop_last drops the rest: lower batch_size or "
                                         r"set drop_last false$"):
        train_batches(drop_last=True)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_fewer_records_than_ranks_is_the_same_error_on_every_rank(tmp_path, monkeypatch, rank):
    """2 records on 3 ranks: a rank without a video would skip Lightning's epoch hooks and leave the
    others waiting in the metrics' collectives (or crash in Lightning's zero-length check): every
    rank, even one that has a video, stops with the same line."""
    from nextvlad.data import write_synthetic_dataset

    write_synthetic_dataset(tmp_path, num_train=0, num_validate=2, num_test=0, num_classes=10, files_per_split=1,
                            min_frames=2, max_frames=4, seed=0)
    data = YT8MDataModule(val_pattern=str(tmp_path / "validate*.tfrecord"), batch_size=4, num_workers=0,
                          max_frames=4, num_classes=10)
    monkeypatch.setattr(YT8MDataModule, "_rank_world", lambda self: (rank, 3))
    with pytest.raises(ValueError, match=r"^YT8MDataModule val_pattern: 2 records for 3 ranks: a rank would have no "
                                         r"video; use at most 2 devices$"):
        data.val_dataloader()
