"""Record counts kept across runs, so that a start or a resume does not count the data again.

A TFRecord file has no index: its records are counted by walking its headers, which reads the
whole of a remote or GZIP file (YouTube-8M's frame-level training set is about 1.4 TB) and one page
per record of a local one (millions of small reads on a network file system). The counts are
kept in ``$NEXTVLAD_CACHE_DIR/record_counts.json`` (default ``~/.cache/nextvlad``, or
``$XDG_CACHE_HOME/nextvlad``), one entry per file *version*: its path, size, modification and
change times and inode, or for a remote file its store's version tags (a GCS generation, an S3
ETag, ...). A file rewritten, grown, cut or copied over has another key and is counted again; a
file whose store gives no version tag, or whose count stopped at a damaged record, is never kept;
a count that reading finds wrong is dropped (`forget`). A cache that cannot be read or
written is a warning, never an error: it only saves time.

No library keeps such a cache (tf.data never counts; torchdata and webdataset leave it to the
user), hence this small module.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path

logger = logging.getLogger("nextvlad.data")

CACHE_DIR_VARIABLE = "NEXTVLAD_CACHE_DIR"
FILE_NAME = "record_counts.json"
FORMAT = 1
#: Entries kept, the newest: about 100 bytes each; YouTube-8M's frame-level files are 7,688.
MAX_ENTRIES = 100_000

_warned: set[tuple[str, str]] = set()  # one warning per cache file and problem, not one per dataset


def cache_path() -> Path:
    """The cache file. Raises RuntimeError without a home folder (no HOME and a user unknown to the
    system, as in a container run with --user) unless NEXTVLAD_CACHE_DIR or XDG_CACHE_HOME is set."""
    folder = os.environ.get(CACHE_DIR_VARIABLE)
    if not folder:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nextvlad"
    return Path(folder) / FILE_NAME


def _usable_cache_path() -> Path | None:
    try:
        return cache_path()
    except (RuntimeError, KeyError) as error:  # Path.home(): no HOME, no passwd entry
        _warn("(no home folder)", "find", error)
        return None


def _entry_name(key: Hashable) -> str:
    return json.dumps(key)


def _read(path: Path) -> dict[str, int]:
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") != FORMAT or not isinstance(saved.get("counts"), dict):
            raise ValueError(f"not a format-{FORMAT} record-count cache")
        return {name: count for name, count in saved["counts"].items()
                if type(count) is int and count > 0}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, RecursionError) as error:  # JSON of another shape
        _warn(str(path), "read", error)
        return {}


def load(keys: list[Hashable]) -> dict[Hashable, int]:
    """The saved counts of those of `keys` that the cache holds."""
    path = _usable_cache_path() if keys else None
    if path is None:
        return {}
    saved = _read(path)
    return {key: saved[_entry_name(key)] for key in keys if _entry_name(key) in saved}


def store(counts: Mapping[Hashable, int]) -> None:
    """Add `counts` to the cache file. Writers replace the file whole (os.replace), so a reader
    never sees half of one; two processes storing at once may lose one's new entries, which are
    then counted again at their next start (DDP ranks each store the counts of all ranks'
    files they see as the same)."""
    path = _usable_cache_path() if counts else None
    if path is None:
        return
    entries = _read(path)
    for key, count in counts.items():
        entries.pop(_entry_name(key), None)  # moved to the end: the newest are kept
        entries[_entry_name(key)] = count
    _write(path, dict(list(entries.items())[-MAX_ENTRIES:]))


def forget(name: str) -> None:
    """Drop the counts of the file `name` (its absolute path or URL, as in the keys): it changed
    in a way its key did not show, and the next start has to count it anew."""
    path = _usable_cache_path()
    if path is None:
        return
    entries = _read(path)
    kept = {entry: count for entry, count in entries.items() if json.loads(entry)[0] != name}
    if len(kept) < len(entries):
        _write(path, kept)


def _write(path: Path, entries: dict[str, int]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w") as out:
                json.dump({"format": FORMAT, "counts": entries}, out)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:
        _warn(str(path), "write", error)


def _warn(where: str, action: str, error: Exception) -> None:
    if (where, action) in _warned:
        return
    _warned.add((where, action))
    consequence = ("it is left aside and written anew" if action == "read" else
                   f"records are counted again at each start; set {CACHE_DIR_VARIABLE} to a writable folder")
    logger.warning("could not %s the record-count cache %s (%s): %s", action, where, error, consequence)
