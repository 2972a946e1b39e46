"""VideoClassifier under real 2-process DDP (gloo, CPU): the LR schedule counts every rank's examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import lightning.pytorch as pl
    import torch
    from nextvlad import VideoClassifier
    from nextvlad._distributed import shutdown_process_group
    from nextvlad.data import YT8MDataModule

    class Record(pl.Callback):
        def on_train_end(self, trainer, module):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            with open(os.path.join(sys.argv[2], f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump({"examples_seen": module.examples_seen, "steps": trainer.global_step,
                           "lr": lr, "val_gap": float(trainer.callback_metrics["val/gap"]),
                           "world_size": trainer.world_size}, f)

    if __name__ == "__main__":
        pattern, out, num_classes, on_error = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
        data = YT8MDataModule(train_pattern=pattern + "/train*.tfrecord", val_pattern=pattern + "/validate*.tfrecord",
                              batch_size=8, num_workers=0, max_frames=60, num_classes=num_classes, on_error=on_error)
        model = VideoClassifier(num_classes=num_classes, clusters=4, groups=2, expansion=1, hidden_size=16,
                                gating_reduction=4, learning_rate=1e-2, lr_decay=0.5, lr_decay_examples=64)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[Record()])
        trainer.fit(model, data)
        shutdown_process_group()  # what the nextvlad command does after a run
''')


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_rank_training_counts_examples_over_ranks(synthetic_data, tmp_path):
    ranks = train_on_two_ranks(synthetic_data["dir"], tmp_path, synthetic_data["num_classes"])
    # 120 training videos over 2 ranks x batch 8: 7 steps, each of 2 x 8 examples
    assert ranks[0]["world_size"] == 2 and ranks[0]["steps"] == 7
    assert ranks[0]["examples_seen"] == 7 * 16
    assert ranks[0]["lr"] == pytest.approx(1e-2 * 0.5 ** (6 * 16 // 64))  # LR of the last step


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_batch_short_of_a_skipped_record_is_counted_alike_on_every_rank(tmp_path):
    """on_error skip: rank 0's last batch holds 7 videos, rank 1's 8. Counting each rank's batch
    times the world size gave 30 and 32 examples, so the ranks could take different learning rates."""
    from nextvlad.data import write_synthetic_dataset

    data = tmp_path / "data"
    train = write_synthetic_dataset(data, num_train=32, num_validate=4, num_test=0, num_classes=10,
                                    files_per_split=1, min_frames=5, max_frames=20, seed=1)["train"][0]
    raw = bytearray(open(train, "rb").read())
    start = 16 + int.from_bytes(raw[:8], "little")  # record 1, in rank 0's half (records 0-15)
    raw[start + 12 + 20] ^= 0xFF  # a byte of its data: its CRC no longer matches
    open(train, "wb").write(bytes(raw))
    ranks = train_on_two_ranks(str(data), tmp_path, 10, on_error="skip")
    assert ranks[0]["steps"] == 2 and ranks[0]["examples_seen"] == 31


def train_on_two_ranks(data_dir: str, out: Path, num_classes: int, on_error: str = "raise") -> list[dict]:
    """SCRIPT's record of each rank, which must be the same on both: step, examples, LR, validation GAP."""
    script = out / "train.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), data_dir, str(out), str(num_classes), on_error],
                            capture_output=True, text=True, timeout=170)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if any(word in line for word in ("Error", "error:", "Traceback", "Signal", "terminate"))]
    assert result.returncode == 0, f"exit {result.returncode}: {problems[:30]}\n{result.stderr[-1500:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    return ranks


def test_shutdown_process_group_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from nextvlad._distributed import shutdown_process_group

    shutdown_process_group()  # no group: nothing to do, no error
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        shutdown_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_process_destroys_its_group_when_it_exits(tmp_path):
    """ddp_spawn workers end inside Lightning, which destroys a gloo group at exit only for NCCL;
    a gloo group left alive now and then aborted its rank in the destructor. The hook registered
    in VideoClassifier.setup destroys it; checked here by an exit hook that runs after it (atexit
    runs hooks last-registered first), and registering twice runs it once."""
    script = textwrap.dedent(f"""
        import atexit
        import torch.distributed as dist
        from nextvlad._distributed import destroy_process_group_at_exit

        atexit.register(lambda: print("alive at exit:", dist.is_initialized()))
        dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
        destroy_process_group_at_exit()
        destroy_process_group_at_exit()
        print("alive before exit:", dist.is_initialized())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["alive before exit: True", "alive at exit: False"]


# ------------------------------------------------------------------- a rank's error on the command line
GLOO_PEER_GONE = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                  "[127.0.0.1]:7325. This is typically caused by a remote worker crashing.")


def _raise_in_rank(rank: int, error: Exception) -> None:
    raise error


def error_of_spawned_rank(error: Exception) -> Exception:
    """What torch's spawn (ddp_spawn) raises in the launching process when a rank raises `error`."""
    import torch.multiprocessing

    with pytest.raises(torch.multiprocessing.ProcessRaisedException) as raised:
        torch.multiprocessing.start_processes(_raise_in_rank, args=(error,), nprocs=1, start_method="fork")
    return raised.value


def console_error(monkeypatch, error: Exception) -> str:
    """The exit message of `nextvlad validate` when its run raises `error` (no --debug)."""
    from nextvlad import cli

    def run_raising():
        raise error

    monkeypatch.delenv("NEXTVLAD_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["nextvlad", "validate"])
    monkeypatch.setattr(cli, "main", run_raising)
    with pytest.raises(SystemExit) as exited:
        cli.console_main()
    return exited.value.code


def test_a_spawned_ranks_user_error_is_one_line_and_other_errors_keep_their_traceback(monkeypatch):
    """ddp_spawn passes a rank's error on as ProcessRaisedException, its traceback as text."""
    from nextvlad.data.records import DataError

    bad_record = error_of_spawned_rank(DataError("data/validate0001.tfrecord", 2, "corrupted record data (CRC32C mismatch)"))
    assert console_error(monkeypatch, bad_record) == ("nextvlad validate: error: data/validate0001.tfrecord, record 2: "
                                                      "corrupted record data (CRC32C mismatch) (--debug shows the traceback)")
    assert console_error(monkeypatch, error_of_spawned_rank(FileNotFoundError("no such file: x.tfrecord"))) == (
        "nextvlad validate: error: no such file: x.tfrecord (--debug shows the traceback)")
    lost_peer = console_error(monkeypatch, error_of_spawned_rank(RuntimeError(GLOO_PEER_GONE)))
    assert lost_peer.startswith("nextvlad validate: error: another rank failed") and "\n" not in lost_peer
    for real_error in (ZeroDivisionError("division by zero"), RuntimeError("CUDA error: out of memory")):
        spawned = error_of_spawned_rank(real_error)
        with pytest.raises(type(spawned)):  # not a user error: the traceback, as before
            console_error(monkeypatch, spawned)


def test_a_full_dev_shm_in_torchs_own_allocation_is_one_line(monkeypatch):
    """A tensor outside the workers' buffer pool (a segment batch, labels) that finds /dev/shm full
    fails in torch's collate or pickler with a RuntimeError, passed on from the worker."""
    shm = RuntimeError("unable to allocate shared memory(shm) for file </torch_7_1_2>: No space left on device (28)")
    wrapped = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"worker.py\", line 1, in <module>\n" + f"RuntimeError: {shm}")
    for error in (shm, wrapped):
        assert console_error(monkeypatch, error) == (
            "nextvlad validate: error: /dev/shm is full: a DataLoader worker could not place a tensor of a batch there "
            "(each worker keeps up to 4 batches there): give it more (docker run --shm-size=4g, or --ipc=host) or set "
            "--data.init_args.num_workers 0 (batches made in the main process) (--debug shows the traceback)")


def test_a_rank_that_lost_its_peer_says_so_in_one_line(monkeypatch):
    from torch.distributed import DistBackendError

    from nextvlad import cli

    monkeypatch.setattr(cli, "has_process_group", lambda: True)  # a rank of a DDP run
    gloo_write = "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Write error [127.0.0.1]:2443: Broken pipe"
    for lost_peer in (RuntimeError(GLOO_PEER_GONE), RuntimeError(gloo_write),
                      DistBackendError("NCCL error: remote process exited or there was a network error")):
        message = console_error(monkeypatch, lost_peer)
        assert message.startswith("nextvlad validate: error: another rank failed or was killed (see its error")
    with pytest.raises(RuntimeError, match="Connection refused"):
        console_error(monkeypatch, RuntimeError("Connection refused by the store"))
    # Without a process group no other rank exists: a reset connection (say, to a bucket) keeps its traceback.
    monkeypatch.setattr(cli, "has_process_group", lambda: False)
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        console_error(monkeypatch, RuntimeError("Connection reset by peer"))


def test_debug_reaches_the_ranks_lightning_starts(monkeypatch):
    """Lightning's DDP launcher starts ranks 1..N-1 from sys.argv, from which --debug was removed:
    the environment it passes on says debug instead."""
    from nextvlad import cli

    seen = {}

    def run():
        seen["argv"], seen["env"] = list(sys.argv), os.environ.get("NEXTVLAD_DEBUG")
        raise ValueError("a user error")

    monkeypatch.delenv("NEXTVLAD_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["nextvlad", "validate", "--debug"])
    monkeypatch.setattr(cli, "main", run)
    with pytest.raises(ValueError, match="a user error"):  # the traceback, not the one line
        cli.console_main()
    assert seen == {"argv": ["nextvlad", "validate"], "env": "1"}
    assert "NEXTVLAD_DEBUG" not in os.environ  # only while the command runs (a test process goes on)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_bad_record_in_one_ranks_share_is_one_error_line(tmp_path):
    """`nextvlad validate` under 2-rank DDP, a corrupt record in rank 1's half (on_error raise): rank 1
    names file and record in one line, rank 0 (which lost rank 1 at the metric sync) says that
    another rank failed, and no process prints a traceback."""
    from nextvlad.data import write_synthetic_dataset

    validate = write_synthetic_dataset(tmp_path / "data", num_train=0, num_validate=13, num_test=0, num_classes=10,
                                       files_per_split=1, min_frames=5, max_frames=20, seed=1)["validate"][0]
    raw = bytearray(open(validate, "rb").read())
    start = 0
    for _ in range(10):  # records 0-6 are rank 0's, 7-12 rank 1's
        start += 16 + int.from_bytes(raw[start:start + 8], "little")
    raw[start + 12 + 20] ^= 0xFF  # a byte of record 10's data: its CRC no longer matches
    open(validate, "wb").write(bytes(raw))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "nextvlad"), "validate", "--seed_everything", "0",
         "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
         "--model", "nextvlad.VideoClassifier", "--model.num_classes", "10", "--model.clusters", "4", "--model.groups", "2",
         "--model.hidden_size", "16", "--model.gating_reduction", "4",
         "--data", "nextvlad.data.YT8MDataModule", "--data.val_pattern", validate, "--data.batch_size", "4",
         "--data.num_workers", "0", "--data.max_frames", "20", "--data.num_classes", "10"],
        cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("nextvlad validate: error:")]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sorted(errors) == sorted([
        f"nextvlad validate: error: {validate}, record 10: corrupted record data (CRC32C mismatch) (--debug shows the traceback)",
        "nextvlad validate: error: another rank failed or was killed (see its error; --debug shows this rank's traceback)",
    ]), result.stderr[-3000:]
