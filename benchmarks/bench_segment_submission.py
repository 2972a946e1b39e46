"""Host memory and time of the 2019 segment submission for the full test partition.

Feeds `SegmentRanking` (what `SegmentSubmissionWriter` runs) with about 2.8M segments of random
probabilities over 3862 classes, in batches as predict hands them over (60 segments per video),
masks them with a 1000-class whitelist, keeps each segment's top 20 and every class's best
100,000, then writes the CSV. Class popularity is skewed (a random offset of up to 0.05 per
class on uniform scores), so that popular classes reach the 100,000 cap and are cut while rare
ones keep everything.

Reports the process's peak resident memory (ru_maxrss: torch, one batch of probabilities and
the ranking state together) and its growth over the state before the first segment.

    python benchmarks/bench_segment_submission.py            # 2.8M segments
    python benchmarks/bench_segment_submission.py --tiny     # seconds (CI smoke run)
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from nextvlad.segments import SegmentRanking  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=2_800_000)
    parser.add_argument("--videos-per-batch", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="20,000 segments")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    segments = 20_000 if args.tiny else args.segments
    num_classes, batch_segments = 3862, args.videos_per_batch * 60
    rng = np.random.default_rng(0)
    whitelist = np.sort(rng.choice(np.arange(3, 1832), 1000, replace=False))
    popularity = torch.from_numpy(rng.random(num_classes, dtype=np.float32)) * 0.05
    generator = torch.Generator().manual_seed(0)
    ranking = SegmentRanking(whitelist)
    before = peak_rss_mib()
    start = time.perf_counter()
    done = 0
    while done < segments:
        count = min(batch_segments, segments - done)
        ids = [f"v{(done + i) // 60:07d}:{5 * ((done + i) % 60)}" for i in range(count)]
        ranking.add(ids, torch.rand(count, num_classes, generator=generator) + popularity)
        done += count
    ranked = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "segment_submission.csv"
        ranking.write(path)
        total = time.perf_counter() - start
        peak = peak_rss_mib()  # before this script reads the file back
        size_mb = path.stat().st_size / 1e6
        with path.open() as handle:
            next(handle)
            ids_per_class = [line.count(" ") + 1 for line in handle]
    row = {"segments": segments, "classes_listed": len(ids_per_class),
           "max_ids_per_class": max(ids_per_class), "classes_at_cap": sum(n == 100_000 for n in ids_per_class),
           "rank_s": round(ranked, 1), "total_s": round(total, 1), "csv_MB": round(size_mb, 1),
           "peak_rss_MiB": round(peak), "rss_growth_MiB": round(peak - before)}
    name = "bench_segment_submission" + ("_tiny" if args.tiny else "")
    meta = {**environment("cpu"), "segments": segments, "batch_segments": batch_segments}
    write_results(name, [row], meta, output_dir=args.output_dir)
    print(" ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
