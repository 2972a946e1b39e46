"""Data-layer throughput: TFRecord file -> padded batch, nextvlad vs the `tfrecord` package.

Measures videos/s and MB/s (file bytes read per second) of the full decode, from a frame-level
TFRecord file (warm page cache) to a padded batch of `max_frames` frames:

* nextvlad, uint8 batch (what the DataModule ships; dequantized later on the device), CRC checked;
* nextvlad, float32 batch (dequantized and zero-padded on the CPU), CRC checked;
* nextvlad's on-device step (`finalize_batch`) run on the CPU, to show what the float path costs;
* the `tfrecord` package's own SequenceExample reader (`sequence_loader`, no CRC checks) feeding
  the same padded uint8 / float32 batches;

each single-process and with N DataLoader workers (tfrecord: files split over workers by hand,
since without index files each of its workers would read every record). Videos have 120-300
frames of random bytes (decode cost does not depend on the values).

    python benchmarks/bench_data.py                # 2000 videos, 1 and 2 workers
    python benchmarks/bench_data.py --tiny         # seconds (CI smoke run)

The numbers depend on the machine and on whatever else runs on it: compare rows of one run.
Results go to a scratch folder unless ``--output-dir`` (``benchmarks/results`` is the committed one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SCRATCH_DIR, environment, markdown_table, write_results  # noqa: E402

from nextvlad.data import YT8MDataLoader, YT8MFrameDataset, finalize_batch, write_records  # noqa: E402
from nextvlad.data.parsing import encode_frame_record  # noqa: E402
from nextvlad.data.transforms import DEQUANTIZE_BIAS, DEQUANTIZE_SCALE  # noqa: E402

NUM_CLASSES = 3862


def make_dataset(directory: Path, num_videos: int, num_files: int, min_frames: int,
                 max_frames: int, seed: int = 0) -> list[str]:
    """Frame-level TFRecords of random videos (reused if already there with the same settings)."""
    tag = f"v{num_videos}_f{num_files}_{min_frames}-{max_frames}_s{seed}"
    directory = directory / tag
    paths = [str(directory / f"train{i:04d}.tfrecord") for i in range(num_files)]
    if all(os.path.exists(p) for p in paths):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, path in enumerate(paths):
        records = []
        for v in range(i * num_videos // num_files, (i + 1) * num_videos // num_files):
            frames = int(rng.integers(min_frames, max_frames + 1))
            records.append(encode_frame_record(
                f"vid{v:07d}", rng.integers(0, 256, (frames, 1024), dtype=np.uint8),
                rng.integers(0, 256, (frames, 128), dtype=np.uint8),
                rng.choice(NUM_CLASSES, int(rng.integers(1, 6)), replace=False)))
        write_records(path + ".tmp", records)
        os.replace(path + ".tmp", path)
    return paths


# -- the tfrecord package, used the way its README shows, feeding the same padded batches --------
class TFRecordPackageDataset(IterableDataset):
    """`tfrecord.reader.sequence_loader` over a worker's share of the files -> padded batches."""

    def __init__(self, paths: list[str], batch_size: int, max_frames: int, to_float: bool):
        self.paths, self.batch_size, self.max_frames, self.to_float = paths, batch_size, max_frames, to_float

    def __iter__(self) -> Iterator[dict]:
        from tfrecord.reader import sequence_loader

        info = get_worker_info()
        paths = self.paths[info.id::info.num_workers] if info else self.paths
        pending: list = []
        for path in paths:
            for context, lists in sequence_loader(path, None, {"id": "byte", "labels": "int"},
                                                  {"rgb": "byte", "audio": "byte"}):
                # sequence_loader reuses its read buffer: join() copies the frames out of it
                rgb = np.frombuffer(b"".join(lists["rgb"]), np.uint8).reshape(-1, 1024)
                audio = np.frombuffer(b"".join(lists["audio"]), np.uint8).reshape(-1, 128)
                pending.append((bytes(context["id"]).decode(), rgb, audio, context["labels"]))
                if len(pending) == self.batch_size:
                    yield self._batch(pending)
                    pending = []
        if pending:
            yield self._batch(pending)

    def _batch(self, videos: list) -> dict:
        size, frames = len(videos), self.max_frames
        dtype = np.float32 if self.to_float else np.uint8
        rgb, audio = np.zeros((size, frames, 1024), dtype), np.zeros((size, frames, 128), dtype)
        lengths = np.empty(size, np.int64)
        labels = np.zeros((size, NUM_CLASSES), np.float32)
        for i, (_, r, a, lab) in enumerate(videos):
            n = min(len(r), len(a), frames)
            if self.to_float:
                rgb[i, :n] = r[:n] * DEQUANTIZE_SCALE + DEQUANTIZE_BIAS
                audio[i, :n] = a[:n] * DEQUANTIZE_SCALE + DEQUANTIZE_BIAS
            else:
                rgb[i, :n], audio[i, :n] = r[:n], a[:n]
            lengths[i] = n
            labels[i, lab] = 1
        return {"id": [v[0] for v in videos], "rgb": torch.from_numpy(rgb),
                "audio": torch.from_numpy(audio), "lengths": torch.from_numpy(lengths),
                "labels": torch.from_numpy(labels)}


def count_videos(batches: Iterable[dict], per_batch: Callable[[dict], Any] | None = None) -> int:
    videos = 0
    for batch in batches:
        if per_batch is not None:
            per_batch(batch)
        videos += len(batch["id"])
    return videos


def release_buffers(batch: dict) -> None:
    lease = batch.get("buffer_lease")
    if lease is not None:
        lease.release()


def measure(name: str, run: Callable[[], int], total_bytes: int, processes: int,
            repeats: int) -> dict[str, Any]:
    times, videos = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        videos = run()
        times.append(time.perf_counter() - start)
    best, median = min(times), statistics.median(times)
    return {"reader": name, "processes": processes, "videos": videos,
            "videos_per_s": videos / best, "videos_per_s_median": videos / median,
            "videos_per_s_per_process": videos / best / processes,
            "MB_per_s": total_bytes / best / 1e6}


def run_benchmarks(paths: list[str], batch_size: int, max_frames: int, workers: list[int],
                   repeats: int) -> list[dict[str, Any]]:
    total_bytes = sum(os.path.getsize(p) for p in paths)
    for path in paths:  # warm the page cache
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass

    def ours(num_workers: int, to_float: bool) -> Callable[[], int]:
        def run() -> int:
            dataset = YT8MFrameDataset(paths, batch_size=batch_size, max_frames=max_frames,
                                       num_classes=NUM_CLASSES, dequantize_in_workers=to_float)
            if num_workers == 0:
                return count_videos(dataset)
            # Hand the workers' shared-memory buffers back, as finalize_batch does after the
            # copy to the device (see nextvlad/data/shm_pool.py).
            return count_videos(YT8MDataLoader(dataset, num_workers=num_workers, pin_memory=False),
                                release_buffers)
        return run

    def theirs(num_workers: int, to_float: bool) -> Callable[[], int]:
        def run() -> int:
            dataset = TFRecordPackageDataset(paths, batch_size, max_frames, to_float)
            if num_workers == 0:
                return count_videos(dataset)
            return count_videos(DataLoader(dataset, batch_size=None, num_workers=num_workers))
        return run

    def ours_then_cpu_finalize() -> int:
        dataset = YT8MFrameDataset(paths, batch_size=batch_size, max_frames=max_frames,
                                   num_classes=NUM_CLASSES)
        return count_videos(dataset, finalize_batch)

    rows = []
    for num_workers in workers:
        processes = max(num_workers, 1)
        mode = "1 process" if num_workers == 0 else f"{num_workers} workers"
        rows.append(measure(f"nextvlad -> uint8 batch ({mode})", ours(num_workers, False),
                            total_bytes, processes, repeats))
        rows.append(measure(f"nextvlad -> float32 batch ({mode})", ours(num_workers, True),
                            total_bytes, processes, repeats))
        if num_workers == 0:
            rows.append(measure("nextvlad -> uint8 batch -> finalize_batch on CPU (1 process)",
                                ours_then_cpu_finalize, total_bytes, 1, repeats))
        rows.append(measure(f"tfrecord package -> uint8 batch ({mode})", theirs(num_workers, False),
                            total_bytes, processes, repeats))
        rows.append(measure(f"tfrecord package -> float32 batch ({mode})",
                            theirs(num_workers, True), total_bytes, processes, repeats))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a few videos, one repeat (CI smoke)")
    parser.add_argument("--videos", type=int, default=2000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=160)
    parser.add_argument("--max-frames", type=int, default=300)
    parser.add_argument("--min-video-frames", type=int, default=120)
    parser.add_argument("--max-video-frames", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts to measure (0: in-process)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "nextvlad_bench_data"))
    parser.add_argument("--output-dir", default=None,
                        help=f"results directory (default {SCRATCH_DIR}; benchmarks/results is the committed one)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.videos, args.files, args.repeats, args.batch_size = 48, 2, 1, 16
        args.workers = [0, 2]
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    paths = make_dataset(Path(args.data_dir), args.videos, args.files, args.min_video_frames,
                         args.max_video_frames)
    rows = run_benchmarks(paths, args.batch_size, args.max_frames, args.workers, args.repeats)
    by_name = {row["reader"]: row for row in rows}
    single_ours = by_name["nextvlad -> uint8 batch (1 process)"]["videos_per_s"]
    single_theirs = by_name["tfrecord package -> uint8 batch (1 process)"]["videos_per_s"]
    meta = {**environment("cpu"), "videos": args.videos, "files": args.files,
            "video_frames": f"{args.min_video_frames}-{args.max_video_frames}",
            "batch_size": args.batch_size, "max_frames": args.max_frames,
            "repeats (best reported)": args.repeats, "tiny": args.tiny,
            "speedup vs tfrecord package (uint8, 1 process)": single_ours / single_theirs,
            "speedup vs tfrecord package (float32, 1 process)":
                by_name["nextvlad -> float32 batch (1 process)"]["videos_per_s"]
                / by_name["tfrecord package -> float32 batch (1 process)"]["videos_per_s"]}
    columns = ["reader", "processes", "videos", "videos_per_s", "videos_per_s_median",
               "videos_per_s_per_process", "MB_per_s"]
    print(markdown_table(rows, columns))
    for key in ("speedup vs tfrecord package (uint8, 1 process)",
                "speedup vs tfrecord package (float32, 1 process)"):
        print(f"{key}: {meta[key]:.2f}x")
    name = "bench_data_tiny" if args.tiny else "bench_data"
    written = write_results(name, rows, meta, columns=columns, output_dir=args.output_dir)
    print(f"wrote {written['json']} and {written['md']}")
    return rows


if __name__ == "__main__":
    main()
