"""VideoClassifier under real 2-process DDP (gloo, CPU): the LR schedule counts every rank's examples."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
        pattern, out, num_classes = sys.argv[1], sys.argv[2], int(sys.argv[3])
        data = YT8MDataModule(train_pattern=pattern + "/train*.tfrecord", val_pattern=pattern + "/validate*.tfrecord",
                              batch_size=8, num_workers=0, max_frames=60, num_classes=num_classes)
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
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), synthetic_data["dir"], str(tmp_path),
                             str(synthetic_data["num_classes"])], capture_output=True, text=True, timeout=170)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if any(word in line for word in ("Error", "error:", "Traceback", "Signal", "terminate"))]
    assert result.returncode == 0, f"exit {result.returncode}: {problems[:30]}\n{result.stderr[-1500:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # same step, examples, LR and (synced) validation GAP on both ranks
    # 120 training videos over 2 ranks x batch 8: 7 steps, each of 2 x 8 examples
    assert ranks[0]["world_size"] == 2 and ranks[0]["steps"] == 7
    assert ranks[0]["examples_seen"] == 7 * 16
    assert ranks[0]["lr"] == pytest.approx(1e-2 * 0.5 ** (6 * 16 // 64))  # LR of the last step


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
