"""Mid-epoch resume at every batch boundary, for small batch sizes: the resumed reader yields
exactly the batches the uninterrupted one still had to yield (the oracle: that same epoch read
without interruption)."""

from __future__ import annotations

import copy

import pytest
import torch

from nextvlad.data import YT8MDataLoader, YT8MFrameDataset, write_synthetic_dataset

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """13 short videos in 3 files (4, 4 and 5 records)."""
    out = tmp_path_factory.mktemp("resume")
    paths = write_synthetic_dataset(out, num_train=13, num_validate=0, num_test=0,
                                    num_classes=NUM_CLASSES, files_per_split=3, min_frames=2,
                                    max_frames=3, seed=5)
    return paths["train"]


def _dataset(files, batch_size, training=True, drop_last=True, shuffle_buffer=4):
    dataset = YT8MFrameDataset(files, batch_size=batch_size, max_frames=3, num_classes=NUM_CLASSES,
                               training=training, drop_last=drop_last, seed=2,
                               shuffle_buffer=shuffle_buffer)
    dataset.set_epoch(1)
    return dataset


def _summary(batch: dict) -> tuple:
    """What must match: the videos, in order, their frames, and the counters the batch carries."""
    return batch["id"], batch["rgb"].clone(), batch["lengths"].tolist(), batch["read_stats"].tolist()


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and torch.equal(x[1], y[1]) and x[2:] == y[2:] for x, y in zip(a, b))


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("training, drop_last, shuffle_buffer",
                         [(True, True, 4), (True, False, 4), (True, True, 0), (False, False, 4)])
def test_dataset_resumes_from_every_batch(files, batch_size, training, drop_last, shuffle_buffer):
    """The dataset's own state_dict, as a DataLoader worker saves it after each batch."""
    make = lambda: _dataset(files, batch_size, training, drop_last, shuffle_buffer)  # noqa: E731
    dataset = make()
    full, states = [], []
    for batch in dataset:
        full.append(_summary(batch))
        states.append(copy.deepcopy(dataset.state_dict()))
    assert all(len(ids) == batch_size for ids, *_ in full[:-1]) and len(full) == len(dataset)
    for taken, state in enumerate(states, 1):
        resumed = make()
        resumed.load_state_dict(state)
        rest = [_summary(batch) for batch in resumed]
        assert _same(rest, full[taken:]), (taken, [r[0] for r in rest], [f[0] for f in full[taken:]])


def _loader(files, batch_size, workers):
    return YT8MDataLoader(_dataset(files, batch_size), context=lambda: (1, 0, 1), num_workers=workers)


def _ids_after_resume(files, batch_size, workers, taken, tmp_path) -> list[list[str]]:
    loader = _loader(files, batch_size, workers)
    iterator = iter(loader)
    first = [next(iterator)["id"] for _ in range(taken)]
    torch.save(loader.state_dict(), tmp_path / "state.pt")  # as a checkpoint would
    del iterator
    resumed = _loader(files, batch_size, workers)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    return first + [batch["id"] for batch in resumed]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_loader_resumes_from_every_batch_without_workers(files, batch_size, tmp_path):
    full = [batch["id"] for batch in _loader(files, batch_size, 0)]
    assert [len(ids) for ids in full] == [batch_size] * (13 // batch_size)  # drop_last
    for taken in range(len(full) + 1):
        assert _ids_after_resume(files, batch_size, 0, taken, tmp_path) == full, taken


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2])
def test_loader_resumes_from_every_batch_with_workers(files, batch_size, workers, tmp_path):
    """Workers put each batch in a shared-memory slot of batch_size videos: a merged batch
    overflowed it (IndexError in the worker)."""
    full = [batch["id"] for batch in _loader(files, batch_size, workers)]
    for taken in range(1, len(full)):
        assert _ids_after_resume(files, batch_size, workers, taken, tmp_path) == full, taken


# -- a mid-epoch position holds only under the files, seed and batching it was planned with -------
#: Each setting the epoch's plan depends on, changed (see YT8MFrameDataset.epoch_plan).
SAVED = {"seed": 2, "batch_size": 2, "shuffle_buffer": 4, "drop_last": True}
CHANGED = {"seed": 5, "batch_size": 3, "shuffle_buffer": 2, "drop_last": False}


def _planned(files, workers=0, **changed):
    settings = dict(max_frames=3, num_classes=NUM_CLASSES, training=True) | SAVED | changed
    dataset = YT8MFrameDataset(files, **settings)
    return YT8MDataLoader(dataset, context=lambda: (1, 0, 1), num_workers=workers)


def _state_after(loader, batches: int, tmp_path) -> tuple[list[list[str]], dict]:
    iterator = iter(loader)
    taken = [next(iterator)["id"] for _ in range(batches)]
    torch.save(loader.state_dict(), tmp_path / "state.pt")  # as a checkpoint would
    return taken, torch.load(tmp_path / "state.pt", weights_only=True)


def _fewer_files(files):
    return {"files": files[:2]}  # 8 of the 13 records (the files hold 4, 4 and 5)


def _named_change(changed: dict, who: str) -> list[str]:
    """What the error must say of the one changed setting: its saved and its new value."""
    name, value = next(iter(changed.items()))
    if name == "files":
        return ["saved with files=[3 files, 13 records, digest ",
                f"this {who} has files=[2 files, 8 records, digest "]
    return [f"saved with {name}={SAVED[name]}, this {who} has {name}={value}"]


@pytest.mark.parametrize("changed", [*({name: value} for name, value in CHANGED.items()),
                                     _fewer_files], ids=[*CHANGED, "files"])
def test_dataset_refuses_a_position_planned_with_other_settings(files, changed):
    """The reader state alone (as each DataLoader worker restores it): a position saved 2 batches
    into the epoch, loaded by a reader whose epoch is planned otherwise."""
    changed = changed(files) if callable(changed) else changed
    saved = _planned(files).dataset
    saved.set_epoch(1)
    batches = iter(saved)
    next(batches), next(batches)
    resumed = _planned(**({"files": files} | changed)).dataset
    resumed.set_epoch(1)
    resumed.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="cannot continue the saved data position") as error:
        next(iter(resumed))
    message = str(error.value)
    assert "\n" not in message
    assert all(part in message for part in _named_change(changed, "reader")), message


@pytest.mark.parametrize("changed", [*({name: value} for name, value in CHANGED.items()),
                                     _fewer_files], ids=[*CHANGED, "files"])
def test_loader_refuses_a_mid_epoch_resume_planned_with_other_settings(files, changed, tmp_path):
    """With DataLoader workers the refusal comes from the main process, as one line, before any
    worker reads: without it another seed gave videos twice and others never, one file fewer a
    KeyError in a worker, another batch size both and then a crash."""
    changed = changed(files) if callable(changed) else changed
    _, state = _state_after(_planned(files, workers=2), 3, tmp_path)
    resumed = _planned(**({"files": files} | changed), workers=2)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="cannot resume mid-epoch") as error:
        next(iter(resumed))
    message = str(error.value)
    assert "\n" not in message
    assert "(epoch 1, 3 of 6 batches, 1 ranks x 2 DataLoader workers)" in message
    assert all(part in message for part in _named_change(changed, "run")), message
    assert "resume with the saved values" in message.lower() and "epoch's end" in message


def test_the_refusal_names_every_changed_setting(files, tmp_path):
    _, state = _state_after(_planned(files), 2, tmp_path)
    resumed = _planned(files, seed=5, batch_size=3, max_frames=2)  # max_frames: not in the plan
    resumed.load_state_dict(state)
    with pytest.raises(ValueError) as error:
        next(iter(resumed))
    assert "saved with seed=2, batch_size=2, this run has seed=5, batch_size=3;" in str(error.value)


@pytest.mark.parametrize("name", ["seed", "batch_size", "drop_last"])
def test_settings_may_change_at_an_epoch_boundary(files, name, tmp_path):
    """A position at an epoch's end holds nothing of the next epoch: it starts as planned anew."""
    loader = _planned(files)
    _, state = _state_after(loader, len(loader), tmp_path)
    changed = {name: CHANGED[name]}
    resumed = YT8MDataLoader(_planned(files, **changed).dataset, context=lambda: (2, 0, 1))
    resumed.load_state_dict(state)
    fresh = YT8MDataLoader(_planned(files, **changed).dataset, context=lambda: (2, 0, 1))
    assert [b["id"] for b in resumed] == [b["id"] for b in fresh]


def _without_plan(state):
    """A checkpoint's loader state as written before the plan was recorded (by the loader for
    each rank, by the dataset in each worker's snapshot)."""
    if isinstance(state, dict):
        return {key: _without_plan(value) for key, value in state.items() if key != "plan"}
    if isinstance(state, list):
        return [_without_plan(value) for value in state]
    return state


@pytest.mark.parametrize("workers", [0, 2])
def test_a_position_saved_before_the_plan_was_recorded_still_resumes(files, workers, tmp_path,
                                                                      caplog):
    """Taken as planned with the same settings (the usual resume, and exact before this check):
    it continues, with a warning that the settings could not be compared."""
    full = [batch["id"] for batch in _planned(files, workers)]
    taken, state = _state_after(_planned(files, workers), 3, tmp_path)
    old = _without_plan(state)
    assert "plan" not in repr(old)
    resumed = _planned(files, workers)
    resumed.load_state_dict(old)
    assert taken + [batch["id"] for batch in resumed] == full
    assert "predates the record of the files, seed and batching" in caplog.text


#: `lightning fit` on 24 videos in batches of 4 (6 steps per epoch), last.ckpt every 2 steps.
TINY_FIT = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_epochs: 2
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 1
  logger: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: checkpoints, every_n_train_steps: 2, save_top_k: 0, save_last: true}
model:
  class_path: nextvlad.VideoClassifier
  init_args: {num_classes: 5, clusters: 4, groups: 2, expansion: 1, hidden_size: 8,
              gating_reduction: 4}
data:
  class_path: nextvlad.data.YT8MDataModule
  init_args: {train_pattern: data/train*.tfrecord, val_pattern: data/validate*.tfrecord,
              batch_size: 4, num_workers: 1, max_frames: 4, num_classes: 5}
"""


@pytest.mark.slow
def test_lightning_fit_refuses_a_mid_epoch_resume_with_another_seed(tmp_path):
    """The README's resume (`--ckpt_path .../last.ckpt`) with another data seed: one error line,
    not a run that reads some of the epoch's videos twice and others never."""
    from test_cli_commands import error_line, run

    write_synthetic_dataset(tmp_path / "data", num_train=24, num_validate=4, num_test=0,
                            num_classes=NUM_CLASSES, files_per_split=2, min_frames=2, max_frames=4,
                            seed=1)
    (tmp_path / "tiny.yaml").write_text(TINY_FIT)
    fit = ("lightning", "fit", "--config", "tiny.yaml")
    first = run(*fit, "--trainer.max_steps", "3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    position = checkpoint["YT8MDataModule"]["train_position"]["ranks"][0]
    assert 0 < position["batches"] < position["total"] == 6  # inside epoch 0
    resumed = run(*fit, "--ckpt_path", "checkpoints/last.ckpt", "--trainer.max_steps", "6",
                  "--data.init_args.seed", "5", cwd=tmp_path)
    message = error_line(resumed)
    assert message.startswith("lightning fit: error: cannot resume mid-epoch: the checkpoint's "
                              f"data position (epoch 0, {position['batches']} of 6 batches"), message
    assert "saved with seed=0, this run has seed=5;" in message
    assert "Resume with the saved values" in message and "epoch's end" in message
