"""AtomicCheckpointIO: a killed writer leaves the previous checkpoint whole; a cut file is refused."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from nextvlad import checkpoint_io
from nextvlad.checkpoint_io import (PARTIAL_MARK, AtomicCheckpointIO, IncompleteCheckpointError,
                                    UnloadableCheckpointError)

KILLED_WRITER = textwrap.dedent('''
    import os, signal, sys
    import torch
    from nextvlad.checkpoint_io import AtomicCheckpointIO

    class KilledWhileWriting(AtomicCheckpointIO):
        def _write(self, checkpoint, partial):
            with open(partial, "wb") as f:   # half of the bytes reach the disk, then the kill
                f.write(b"PK" + bytes(1000))
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    KilledWhileWriting().save_checkpoint({"step": 2, "w": torch.ones(1000)}, sys.argv[1])
''')


def test_save_load_round_trip_leaves_no_temporary_file(tmp_path):
    io = AtomicCheckpointIO()
    state = {"step": 3, "w": torch.randn(50, dtype=torch.float64)}
    io.save_checkpoint(state, tmp_path / "sub" / "last.ckpt")
    loaded = io.load_checkpoint(tmp_path / "sub" / "last.ckpt")
    assert loaded["step"] == 3 and torch.equal(loaded["w"], state["w"])
    assert os.listdir(tmp_path / "sub") == ["last.ckpt"]


@pytest.mark.timeout(60)
def test_writer_killed_mid_write_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.zeros(1000)}, path)
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    result = subprocess.run([sys.executable, str(script), str(path)], timeout=50)
    assert result.returncode == -signal.SIGKILL
    assert io.load_checkpoint(path)["step"] == 1  # the previous one, whole
    leftovers = [name for name in os.listdir(tmp_path) if ".partial-" in name]
    assert len(leftovers) == 1 and not leftovers[0].endswith(".ckpt")  # never taken for a checkpoint
    io.save_checkpoint({"step": 3, "w": torch.ones(1000)}, path)
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "writer.py"]  # the next save cleans up
    assert io.load_checkpoint(path)["step"] == 3


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_an_oserror_naming_the_checkpoint_and_the_previous_stays(tmp_path, monkeypatch):
    """/dev/full fails every write with ENOSPC, as a full disk does: the new checkpoint's bytes go
    there (torch.save, flush and fsync as written), the rest of the file system is untouched."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.zeros(1000)}, path)

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        return open("/dev/full" if PARTIAL_MARK in str(file) else file, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(OSError) as error:
        io.save_checkpoint({"step": 2, "w": torch.ones(100_000)}, path)
    assert type(error.value) is OSError and error.value.errno == errno.ENOSPC
    assert error.value.filename == str(path)
    assert str(error.value).startswith(f"[Errno {errno.ENOSPC}] No space left on device (the checkpoint was not written")
    assert str(error.value).endswith(f": '{path}'")
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1  # the previous one, whole
    assert os.listdir(tmp_path) == ["last.ckpt"]


@pytest.mark.parametrize("keep", [0, 10, 0.5, -3])
def test_truncated_checkpoint_is_refused_naming_the_previous(tmp_path, keep):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(2000)}, tmp_path / "step1.ckpt")
    io.save_checkpoint({"step": 2, "w": torch.ones(2000)}, tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(data) + keep
    (tmp_path / "last.ckpt").write_bytes(data[:cut])
    with pytest.raises(IncompleteCheckpointError) as error:
        io.load_checkpoint(tmp_path / "last.ckpt")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'last.ckpt'}: not a loadable checkpoint: cut short while being written")
    assert str(tmp_path / "step1.ckpt") in message
    assert io.load_checkpoint(tmp_path / "step1.ckpt")["step"] == 1


@pytest.mark.parametrize("content", [b"step,loss\n1,0.5\n", b"\x80\x02}q\x00.garbage"])
def test_a_file_that_is_not_a_checkpoint_is_called_corrupt_not_cut_short(tmp_path, content):
    """Only the start of a torch.save archive is a checkpoint cut short (and points to another
    checkpoint); any other file is named as corrupt, as `nextvlad export` and init_from say."""
    (tmp_path / "step1.ckpt").write_bytes(b"")
    (tmp_path / "last.ckpt").write_bytes(content)
    with pytest.raises(UnloadableCheckpointError) as error:
        AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert not isinstance(error.value, IncompleteCheckpointError)
    assert str(error.value).startswith(
        f"{tmp_path / 'last.ckpt'}: not a loadable checkpoint, corrupt or not written by torch.save (")
    assert "step1.ckpt" not in str(error.value) and "weights_only" not in str(error.value)


def test_missing_checkpoint_is_still_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "nothing.ckpt")


@pytest.mark.timeout(120)
def test_trainer_refuses_a_truncated_checkpoint_and_resumes_from_the_previous(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    def trainer(max_steps):
        return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                          callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2,
                                                     save_top_k=-1, filename="{step}")])

    trainer(4).fit(BoringModel())
    previous, newest = tmp_path / "step=2.ckpt", tmp_path / "step=4.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(IncompleteCheckpointError, match="step=4.ckpt: not a loadable checkpoint: cut short") as error:
        trainer(6).fit(BoringModel(), ckpt_path=newest)
    assert str(previous) in str(error.value)  # the newest other one, named
    resumed = trainer(6)
    resumed.fit(BoringModel(), ckpt_path=str(previous))
    assert resumed.global_step == 6
