"""A real 2-process DDP run (gloo, CPU) over uneven shards completes its epochs in step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nextvlad.data import write_records
from nextvlad.data.parsing import encode_frame_record

COUNTS = [7, 30, 1, 13, 4]  # 55 records; 2 ranks x batch 4 -> 6 batches per rank, 7 left out

SCRIPT = textwrap.dedent('''
    import faulthandler, json, os, sys
    faulthandler.dump_traceback_later(90, exit=True)  # a hang shows where each rank waits
    import lightning as L
    import torch
    from nextvlad._distributed import shutdown_process_group
    from nextvlad.data import YT8MDataModule

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(1152, 3)
            self.seen = []

        def training_step(self, batch, batch_index):
            assert batch["rgb"].dtype == torch.float32 and batch["rgb"].shape[1:] == (2, 1024)
            features = torch.cat([batch["rgb"], batch["audio"]], -1).mean(1)
            self.seen.append([self.current_epoch, batch["id"]])
            return torch.nn.functional.binary_cross_entropy_with_logits(
                self.linear(features), batch["labels"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_train_end(self):
            with open(os.path.join(sys.argv[2], f"rank{self.global_rank}.json"), "w") as f:
                json.dump({"seen": self.seen, "world_size": self.trainer.world_size}, f)

    if __name__ == "__main__":
        datamodule = YT8MDataModule(train_pattern=sys.argv[1], batch_size=4, num_workers=1,
                                    max_frames=2, num_classes=3, seed=11)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(Tiny(), datamodule)
        shutdown_process_group()  # what the nextvlad command does after a run
''')


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_process_ddp_epoch_on_uneven_shards(tmp_path):
    rgb, audio = np.zeros((2, 1024), np.uint8), np.zeros((2, 128), np.uint8)
    for f, count in enumerate(COUNTS):
        write_records(str(tmp_path / f"train{f:02d}.tfrecord"),
                      [encode_frame_record(f"f{f}r{r}", rgb, audio, [r % 3]) for r in range(count)])
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LOCAL_RANK", None)
    try:
        result = subprocess.run([sys.executable, str(script), str(tmp_path / "train*.tfrecord"),
                                 str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=110)
    except subprocess.TimeoutExpired as error:  # faulthandler's stacks of both ranks are in stderr
        pytest.fail(f"timed out; stderr:\n{_text(error.stderr)[-6000:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    all_ids = {f"f{f}r{r}" for f, count in enumerate(COUNTS) for r in range(count)}
    per_epoch = []
    for epoch in (0, 1):
        batches = [[ids for e, ids in r["seen"] if e == epoch] for r in ranks]
        assert [len(b) for b in batches] == [6, 6]  # same number of steps on both ranks
        ids = [i for rank_batches in batches for batch in rank_batches for i in batch]
        assert len(ids) == len(set(ids)) == 48 and set(ids) <= all_ids  # 7 = 55 - 2*6*4 left out
        per_epoch.append(ids)
    assert per_epoch[0] != per_epoch[1]  # reshuffled per epoch


SCAN_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch.distributed as dist
    from nextvlad.data import YT8MDataModule, dataset

    rank, directory, failing = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", store=dist.FileStore(directory + "/store", 2), rank=rank, world_size=2)
    scanned, scan_records = [], dataset.scan_records

    def counted(path, compression="auto"):
        scanned.append(path)
        if path.endswith(failing):
            raise PermissionError(f"cannot read {path}")
        return scan_records(path, compression)

    dataset.scan_records = counted
    data = YT8MDataModule(train_pattern=directory + "/train*.tfrecord", val_pattern=directory + "/validate*.tfrecord",
                          batch_size=4, num_classes=10)
    try:
        data.setup("fit")
        result = {"scanned": scanned, "counts": {split: data.datasets[split].counts for split in ("fit", "validate")}}
    except OSError as error:
        result = {"scanned": scanned, "error": f"{type(error).__name__}: {error}"}
    with open(f"{directory}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
''')


@pytest.mark.parametrize("failing", ["none", "train0002.tfrecord"])
def test_ranks_scan_the_files_once_between_them_and_fail_together(tmp_path, failing):
    """Counting records reads a remote file whole: each rank scans every other file and they
    share the counts, so a start reads the data once, not once per rank, and a later start not at
    all. A rank that cannot read its file does not leave the other waiting in the exchange: both
    stop with the error."""
    from nextvlad.data import YT8MFrameDataset, write_synthetic_dataset

    files = write_synthetic_dataset(tmp_path, num_train=30, num_validate=20, num_test=0, num_classes=10,
                                    files_per_split=3, min_frames=2, max_frames=5, seed=3)
    script = tmp_path / "scan.py"
    script.write_text(SCAN_SCRIPT)
    environment = dict(os.environ, NEXTVLAD_CACHE_DIR=str(tmp_path / "cache"))

    def start() -> list[dict]:
        (tmp_path / "store").unlink(missing_ok=True)
        ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path), failing], env=environment,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
        outputs = [_text(rank.communicate(timeout=120)[0]) for rank in ranks]
        assert [rank.returncode for rank in ranks] == [0, 0], outputs
        return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    results = start()
    scanned = sorted(results[0]["scanned"] + results[1]["scanned"])
    if failing == "none":
        assert scanned == sorted(files["train"] + files["validate"])  # each once
        expected = {split: YT8MFrameDataset(files[name], num_classes=10).counts
                    for split, name in (("fit", "train"), ("validate", "validate"))}
        assert results[0]["counts"] == results[1]["counts"] == expected
        # Each rank kept the counts of both: the next start (a resume) counts nothing.
        again = start()
        assert again[0]["scanned"] == again[1]["scanned"] == []
        assert again[0]["counts"] == again[1]["counts"] == expected
    else:  # the training files, each once; validation's are not reached
        assert scanned == sorted(files["train"])
        assert {result["error"] for result in results} == {
            f"PermissionError: cannot read {files['train'][2]}", f"PermissionError: rank 0: cannot read {files['train'][2]}"}


def test_a_ranks_scan_error_reaches_the_others_as_a_class_the_command_shows_in_one_line():
    from nextvlad.cli import USER_ERRORS
    from nextvlad.data.dataset import _as_seen_by_other_ranks
    from nextvlad.data.records import DataError

    seen = _as_seen_by_other_ranks(FileNotFoundError("no such file: a.tfrecord"), 1)
    assert type(seen) is FileNotFoundError and str(seen) == "rank 1: no such file: a.tfrecord"
    seen = _as_seen_by_other_ranks(DataError("a.tfrecord", 3, "bad"), 0)  # no one-message constructor
    assert isinstance(seen, USER_ERRORS) and str(seen) == "rank 0: a.tfrecord, record 3: bad"
    assert type(_as_seen_by_other_ranks(KeyError("x"), 0)) is RuntimeError  # not a user's error
