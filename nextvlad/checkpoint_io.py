"""`AtomicCheckpointIO`: checkpoints that a crash cannot leave half-written.

Lightning's `TorchCheckpointIO` saves through an fsspec transaction whose temporary file lives in
the system temp folder: the final move is then a copy across file systems (not atomic), nothing is
fsynced, and the whole checkpoint is first held in memory. No library offers the POSIX recipe, so
it is written here: serialise into a temporary file *in the checkpoint's folder*, flush and fsync
it, ``os.replace`` it over the target (atomic on POSIX) and fsync the folder, so that a process
killed at any point leaves either the previous file or the new one, never a mix. The temporary
name (``.last.ckpt.partial-<pid>``) does not end in ``.ckpt``, so ``--ckpt_path last`` and
``ModelCheckpoint`` never pick up a leftover; one left by a killed writer is removed by the next
save of the same checkpoint. A write that fails (a full disk) raises its OSError naming the
checkpoint; the previous file stays. Object stores (``gs://``, ``s3://``) make an upload visible only
when it is complete, so remote paths keep Lightning's own upload.

Loading refuses a local file that is not a whole checkpoint with an error naming it: one cut short
(by a writer without this plugin, or a full disk) also names the newest other checkpoint beside it.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL_MARK = ".partial-"


class UnloadableCheckpointError(ValueError):
    """A local checkpoint file that torch.load cannot read: corrupt, or not written by torch.save."""


class IncompleteCheckpointError(UnloadableCheckpointError):
    """A checkpoint cut short while being written or copied (the start of a torch.save archive)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes are atomic (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f".{target.name}{PARTIAL_MARK}*"):
            leftover.unlink(missing_ok=True)  # from a writer that was killed
        partial = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}"
        try:
            self._write(checkpoint, partial)
            os.replace(partial, target)
        except BaseException as error:
            partial.unlink(missing_ok=True)
            if isinstance(error, OSError) and error.errno is not None:
                raise failed_write_error(error, target) from error
            raise
        _fsync_folder(target.parent)

    def _write(self, checkpoint: dict[str, Any], partial: Path) -> None:
        """Serialise into `partial` and make it durable before it is renamed."""
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as error:  # unpickling errors have many types
            if not _is_local(path) or _is_whole_zip(Path(path)):
                raise  # remote, or a whole archive refused for another reason: torch's error says which
            raise unloadable_checkpoint_error(Path(path), error) from error


def failed_write_error(error: OSError, target: Path) -> OSError:
    """``error`` (same class and errno) naming the checkpoint it failed to write, not the temporary
    file or none: a full disk is reported by the write of a file object, which knows no name."""
    reason = f"{error.strerror} (the checkpoint was not written; a previous file of that name is unchanged)"
    return type(error)(error.errno, reason, str(target))


def _is_local(path) -> bool:
    return type(get_filesystem(str(path))).__name__ == "LocalFileSystem"


def _is_whole_zip(path: Path) -> bool:
    """torch.save writes a zip archive: a cut-short one lacks its directory or fails a CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


#: How torch.save's zip archive starts.
ZIP_MAGIC = b"PK\x03\x04"


def is_cut_short(path: Path) -> bool:
    """The start of a torch.save archive (or an empty file) that is not a whole archive; a file of
    other bytes is not a cut-short checkpoint but some other file."""
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    return ZIP_MAGIC.startswith(head) and not _is_whole_zip(path)


def unloadable_checkpoint_error(path: Path | str, error: Exception) -> UnloadableCheckpointError:
    """The error for a file that torch.load failed on, naming it: a local one (a ``Path``) cut
    short says so and names the newest other checkpoint beside it (what to use instead); any other
    is corrupt (a URL's is not looked into again: that would download it twice)."""
    detail = _load_error_detail(error)
    if isinstance(path, Path) and is_cut_short(path):
        return IncompleteCheckpointError(f"{path}: not a loadable checkpoint: cut short while being written or "
                                         f"copied ({detail}). {newest_other_note(path)}")
    return UnloadableCheckpointError(f"{path}: not a loadable checkpoint, corrupt or not written by torch.save "
                                     f"({detail})")


def _load_error_detail(error: Exception) -> str:
    """torch.load's reason without its advice to retry with weights_only=False: these checkpoints
    hold only tensors and plain containers, so that advice would only open the door to pickled code."""
    text = str(error)
    reason = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", text, re.S)
    if reason:
        return f"{type(error).__name__}: {reason.group(1).strip()}"
    return f"{type(error).__name__}: {text.strip().splitlines()[0] if text.strip() else 'no message'}"


def newest_other_note(path: Path) -> str:
    """A sentence naming the newest other checkpoint beside ``path``, to use instead of it."""
    # By resolved path: best.ckpt / last.ckpt may be links to the very file that is cut short.
    others = sorted((p for p in path.parent.glob("*.ckpt") if p.is_file() and p.resolve() != path.resolve()),
                    key=lambda p: p.stat().st_mtime_ns, reverse=True)
    if not others:
        return "No other checkpoint is in its folder."
    return f"Use the newest other checkpoint in its folder instead: {others[0]}"


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
