"""Exact mid-epoch resume: runs killed with SIGKILL at seeded random points (during a step, while a
checkpoint is written, during validation) and resumed from last.ckpt take exactly the steps of one
uninterrupted run: same videos per rank in the same order, same learning rate and examples count,
the same validations, bitwise equal final weights (CPU, deterministic algorithms, one thread per
process). The checkpoints are the paper configs' PeriodicCheckpoint."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import json, os, signal, sys
    import lightning.pytorch as pl
    import torch
    from nextvlad import VideoClassifier
    from nextvlad.callbacks import PeriodicCheckpoint
    from nextvlad._distributed import shutdown_process_group
    from nextvlad.checkpoint_io import AtomicCheckpointIO
    from nextvlad.data import YT8MDataModule

    data_dir, out, devices, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    kill = json.loads(sys.argv[5])  # {"at": "step" | "checkpoint" | "validation", "step": s} or {}
    run = sys.argv[6]

    def die():
        os.killpg(os.getpgid(0), signal.SIGKILL)  # every rank and DataLoader worker at once

    class KillableCheckpointIO(AtomicCheckpointIO):
        def _write(self, checkpoint, partial):
            if kill.get("at") == "checkpoint" and checkpoint["global_step"] >= kill["step"]:
                data = __import__("io").BytesIO()
                torch.save(checkpoint, data)
                with open(partial, "wb") as f:  # half of it is on disk when the process dies
                    f.write(data.getvalue()[: len(data.getvalue()) // 2])
                die()
            super()._write(checkpoint, partial)

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.ids = list(batch["id"])

        def on_before_optimizer_step(self, trainer, module, optimizer):
            if kill.get("at") == "step" and trainer.global_step == kill["step"]:
                die()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "ids": self.ids,
                    "lr": trainer.optimizers[0].param_groups[0]["lr"],
                    "examples": module.examples_seen}
            with open(os.path.join(out, f"rank{trainer.global_rank}-run{run}.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\\n")

        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, *args):
            if kill.get("at") == "validation" and trainer.global_step >= kill["step"] and batch_idx == 1:
                die()

        def on_validation_end(self, trainer, module):  # a validation that was not cut short
            with open(os.path.join(out, f"rank{trainer.global_rank}-validations.jsonl"), "a") as f:
                f.write(json.dumps(trainer.global_step) + "\\n")

        def on_train_end(self, trainer, module):
            if trainer.global_rank == 0:
                torch.save(module.state_dict(), os.path.join(out, "final.pt"))

    if __name__ == "__main__":
        torch.set_num_threads(1)
        pl.seed_everything(0)
        data = YT8MDataModule(train_pattern=data_dir + "/train*.tfrecord",
                              val_pattern=data_dir + "/validate*.tfrecord", batch_size=6,
                              num_workers=workers, max_frames=30, num_classes=10, shuffle_buffer=16,
                              sample_frames=12)  # frame sampling continues exactly, too
        model = VideoClassifier(num_classes=10, clusters=4, groups=2, expansion=1, hidden_size=16,
                                gating_reduction=4, learning_rate=1e-2, lr_decay=0.5,
                                lr_decay_examples=50)
        # every 4 steps: with 20 steps per epoch on one rank, some resumes start at an epoch's end
        checkpoints = PeriodicCheckpoint(dirpath=os.path.join(out, "checkpoints"), every_n_train_steps=4,
                                         save_top_k=0, save_last=True)
        trainer = pl.Trainer(accelerator="cpu", devices=devices,
                             strategy="ddp" if devices > 1 else "auto", max_epochs=2,
                             val_check_interval=7, check_val_every_n_epoch=None, limit_val_batches=3,
                             deterministic=True, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0,
                             callbacks=[Record(), checkpoints], plugins=[KillableCheckpointIO()])
        last = os.path.join(out, "checkpoints", "last.ckpt")
        trainer.fit(model, data, ckpt_path=last if os.path.exists(last) else None)
        shutdown_process_group()  # what the nextvlad command does after a run
''')


def _run(script: Path, data_dir: str, out: Path, devices: int, workers: int, kill: dict,
         run: int = 0) -> int:
    out.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, str(script), data_dir, str(out), str(devices),
                             str(workers), json.dumps(kill), str(run)], capture_output=True, text=True,
                            timeout=120, start_new_session=True)
    if kill:
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    return result.returncode


def _steps(out: Path, rank: int) -> tuple[dict[int, dict], list[int]]:
    """Step -> record, the last run's where steps were repeated; and each run's first step."""
    by_step, firsts = {}, []
    for run in range(len(list(out.glob(f"rank{rank}-run*.jsonl")))):
        records = [json.loads(line) for line in
                   (out / f"rank{rank}-run{run}.jsonl").read_text().splitlines()]
        firsts.append(records[0]["step"])
        by_step.update((record["step"], record) for record in records)
    return by_step, firsts


def _kill_points(seed: int, kinds: list[str], total_steps: int) -> list[dict]:
    """Increasing steps drawn at random (seeded), one per kind, each after a checkpoint."""
    rng = random.Random(seed)
    bounds = [4 + (total_steps - 8) * i // len(kinds) for i in range(len(kinds) + 1)]
    return [{"at": kind, "step": rng.randrange(bounds[i], bounds[i + 1])}
            for i, kind in enumerate(kinds)]


@pytest.fixture(scope="module")
def one_rank_uninterrupted(synthetic_data, tmp_path_factory) -> Path:
    """The uninterrupted run on 1 rank with 2 DataLoader workers (40 steps): the same script,
    data, seed and settings for every 1-rank comparison below, so run once for them all."""
    folder = tmp_path_factory.mktemp("resume-reference")
    script = folder / "train.py"
    script.write_text(SCRIPT)
    _run(script, synthetic_data["dir"], folder / "reference", 1, 2, {})
    return folder / "reference"


# 2 DataLoader workers per rank on 1 rank (every kind of kill, resumed positions across both
# workers, as the loader-alone tests below too), 1 per rank on 2 ranks (the ranks' positions
# gathered and each rank resumed with its own worker's state): 2 x 2 workers + 2 ranks would be
# 6 processes on this 2-core machine for nothing more.
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("devices, workers, kinds", [(1, 2, ["step", "checkpoint", "validation"]),
                                                     (2, 1, ["step"])], ids=["1rank", "ddp2"])
def test_killed_and_resumed_runs_equal_one_uninterrupted_run(synthetic_data, tmp_path, request, devices,
                                                             workers, kinds):
    total_steps = 2 * 120 // (6 * devices)  # 2 epochs of 120 videos in batches of 6 per rank
    kills = _kill_points(15 + devices, kinds, total_steps)
    reference = request.getfixturevalue("one_rank_uninterrupted") if devices == 1 else None
    firsts = _compare_interrupted_with_uninterrupted(synthetic_data, tmp_path, devices, workers, kills,
                                                     total_steps, reference)
    # each resumed run started right after the last checkpoint (every 4 steps) before its kill,
    # not from the start of the epoch
    assert all(first > 1 for first in firsts[1:]), (firsts, kills)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_validation_cut_short_on_a_checkpoint_step_is_run_again(synthetic_data, tmp_path,
                                                                  one_rank_uninterrupted):
    """Step 28 checkpoints (every 4) and validates (every 7). Killed during that validation, the run
    resumes from step 24 and validates step 28; killed at step 30, it resumes from the checkpoint
    written after that validation. Both take the uninterrupted run's steps and validations."""
    kills = [{"at": "validation", "step": 28}, {"at": "step", "step": 30}]
    firsts = _compare_interrupted_with_uninterrupted(synthetic_data, tmp_path, 1, 2, kills, 40,
                                                     one_rank_uninterrupted)
    assert firsts == [1, 25, 29]


def _compare_interrupted_with_uninterrupted(synthetic_data, tmp_path, devices: int, workers: int,
                                            kills: list[dict], total_steps: int,
                                            reference: Path | None = None) -> list[int]:
    """One uninterrupted run (``reference``: its folder, when already run with these devices and
    workers) and one killed at each of ``kills`` and resumed each time, compared; returns the
    interrupted runs' first steps (rank 0)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    data_dir = synthetic_data["dir"]
    if reference is None:
        reference = tmp_path / "reference"
        _run(script, data_dir, reference, devices, workers, {})
    interrupted = tmp_path / "interrupted"
    for run, kill in enumerate(kills):
        _run(script, data_dir, interrupted, devices, workers, kill, run)
    _run(script, data_dir, interrupted, devices, workers, {}, len(kills))

    for rank in range(devices):
        reference_steps, _ = _steps(reference, rank)
        resumed, firsts = _steps(interrupted, rank)
        assert sorted(reference_steps) == list(range(1, total_steps + 1))
        assert firsts[0] == 1 and len(firsts) == len(kills) + 1
        assert all((first - 1) % 4 == 0 for first in firsts)  # each run resumed from a checkpoint
        assert resumed == reference_steps  # videos in order, LR, examples count, epoch: every step
        epoch_ids = [i for r in reference_steps.values() if r["epoch"] == 0 for i in r["ids"]]
        assert len(epoch_ids) == len(set(epoch_ids))  # no video twice within an epoch
        # every validation of the uninterrupted run ran to its end, none skipped (a run resumed
        # from before a finished validation validates again)
        assert sorted(set(_validations(interrupted, rank))) == _validations(reference, rank)
    final = torch.load(reference / "final.pt")
    resumed_final = torch.load(interrupted / "final.pt")
    assert final.keys() == resumed_final.keys()
    for name, value in final.items():
        assert torch.equal(value, resumed_final[name]), name  # bitwise
    names = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert names[0] == "last.ckpt" and all(".partial-" not in n for n in names[1:]), names
    return _steps(interrupted, 0)[1]


def _validations(out: Path, rank: int) -> list[int]:
    """The steps of the validations that ran to their end, in order of the runs."""
    return [json.loads(line) for line in (out / f"rank{rank}-validations.jsonl").read_text().splitlines()]


# -- the loader alone: every position of an epoch, changed ranks or workers ----------------------
def _loader(files, workers, epoch=1, rank=0, world_size=1):
    from nextvlad.data import YT8MDataLoader, YT8MFrameDataset

    dataset = YT8MFrameDataset(files, batch_size=7, max_frames=20, num_classes=10, training=True,
                               shuffle_buffer=16, seed=3)
    return YT8MDataLoader(dataset, context=lambda: (epoch, rank, world_size), num_workers=workers)


def _saved(loader, batches: int, tmp_path) -> tuple[list, dict]:
    iterator = iter(loader)
    taken = [next(iterator)["id"] for _ in range(batches)]
    torch.save(loader.state_dict(), tmp_path / "state.pt")  # as Lightning would, weights-only
    return taken, torch.load(tmp_path / "state.pt", weights_only=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly_from_every_batch_of_an_epoch(synthetic_data, tmp_path, workers):
    files = synthetic_data["train"]
    full = [batch["id"] for batch in _loader(files, workers)]
    # 120 videos / batch 7 = 17 batches; the shuffle buffer (16) drains over the last 2-3
    positions = range(len(full) + 1) if workers == 0 else (1, 8, 16, 17)
    for batches in positions:
        taken, state = _saved(_loader(files, workers), batches, tmp_path)
        resumed = _loader(files, workers)
        resumed.load_state_dict(state)
        assert taken + [batch["id"] for batch in resumed] == full, batches


def test_resumed_loader_resumes_again(synthetic_data, tmp_path):
    files = synthetic_data["train"]
    full = [batch["id"] for batch in _loader(files, 2)]
    first, state = _saved(_loader(files, 2), 5, tmp_path)
    again = _loader(files, 2)
    again.load_state_dict(state)
    second, state = _saved(again, 12, tmp_path)  # to the epoch's end: 17 of 17 batches
    assert [(r["batches"], r["total"]) for r in state["ranks"]] == [(17, 17)]
    last = _loader(files, 2)
    last.load_state_dict(state)
    assert first + second + [batch["id"] for batch in last] == full


@pytest.mark.parametrize(("workers", "after"), [(1, 1), (2, 1), (2, 2)])
def test_a_position_saved_right_after_a_resume_resumes_again(synthetic_data, tmp_path, workers, after):
    """Saved while a worker's last batch is its first since the resume: torchdata diffs each
    worker's state against the one it was loaded with, which the reader changed in place (the
    shuffle buffer), so the saved buffer was stale and the next resume read videos twice."""
    files = synthetic_data["train"]
    full = [batch["id"] for batch in _loader(files, workers)]
    first, state = _saved(_loader(files, workers), 5, tmp_path)
    again = _loader(files, workers)
    again.load_state_dict(state)
    second, state = _saved(again, after, tmp_path)
    last = _loader(files, workers)
    last.load_state_dict(state)
    assert first + second + [batch["id"] for batch in last] == full


@pytest.mark.parametrize("workers", [0, 1])
def test_a_skipped_record_among_the_held_ones_is_passed_over_again_on_resume(tmp_path, workers):
    """on_error "skip", a record with a bad CRC inside the shuffle buffer's range: the uninterrupted
    run skipped and counted it once; a resume from any batch reads the held records again around
    it, and continues exactly, counting it once in all (resumes raised the DataError)."""
    from nextvlad.data import YT8MDataLoader, YT8MFrameDataset
    from nextvlad.data.records import frame_record
    from test_data_bad_input import good_record

    records = [bytearray(frame_record(good_record(i, frames=2))) for i in range(10)]
    records[4][40] ^= 0xFF  # in record 4's data: its CRC no longer matches
    path = tmp_path / "bad.tfrecord"
    path.write_bytes(b"".join(records))

    def loader():
        dataset = YT8MFrameDataset(str(path), batch_size=1, max_frames=4, num_classes=10, training=True,
                                   shuffle_buffer=4, on_error="skip")
        return YT8MDataLoader(dataset, context=lambda: (0, 0, 1), num_workers=workers)

    full = [(batch["id"][0], int(batch["read_stats"][0])) for batch in loader()]
    assert len(full) == 9 and sum(skips for _, skips in full) == 1
    for batches in range(1, 9):
        first = loader()
        iterator = iter(first)
        taken = [next(iterator) for _ in range(batches)]
        state = first.state_dict()
        del iterator
        resumed = loader()
        resumed.load_state_dict(state)
        ids = [(b["id"][0], int(b["read_stats"][0])) for b in taken] + [
            (b["id"][0], int(b["read_stats"][0])) for b in resumed]
        assert ids == full, batches


def test_a_finished_epoch_resumes_into_the_next_one_afresh(synthetic_data, tmp_path):
    files = synthetic_data["train"]
    _, state = _saved(_loader(files, 0, epoch=1), 17, tmp_path)
    resumed = _loader(files, 0, epoch=2)
    resumed.load_state_dict(state)
    assert [b["id"] for b in resumed] == [b["id"] for b in _loader(files, 0, epoch=2)]


def test_mid_epoch_resume_with_other_ranks_or_workers_is_refused(synthetic_data, tmp_path):
    files = synthetic_data["train"]
    ranks = [_saved(_loader(files, 0, rank=r, world_size=2), 3, tmp_path)[1]["ranks"][0]
             for r in range(2)]
    two_ranks = {"ranks": ranks}  # what rank 0 writes after gathering both
    for workers, world_size in ((0, 1), (2, 2)):
        loader = _loader(files, workers, world_size=world_size)
        loader.load_state_dict(two_ranks)
        with pytest.raises(ValueError, match="cannot resume mid-epoch") as error:
            next(iter(loader))
        assert "epoch 1, 3 of 8 batches, 2 ranks x 0 DataLoader workers" in str(error.value)
    # the same ranks continue, each with its own share
    for rank in range(2):
        loader = _loader(files, 0, rank=rank, world_size=2)
        loader.load_state_dict(two_ranks)
        assert len(list(loader)) == 8 - 3


def test_dataset_refuses_a_position_saved_by_another_reader(synthetic_data):
    from nextvlad.data import YT8MFrameDataset

    dataset = YT8MFrameDataset(synthetic_data["train"], batch_size=7, max_frames=20,
                               num_classes=10, training=True)
    batches = iter(dataset)
    next(batches)
    state = dataset.state_dict()
    assert state["batches"] == 1 and state["worker"] == 0
    dataset.set_epoch(1)
    dataset.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with epoch=0, this reader has epoch=1"):
        next(iter(dataset))
