"""The two ceilings every other GPU number is judged against, measured on the machine itself:
device-to-device copy bandwidth (GB/s, bytes read plus bytes written) and dense bf16 matrix-product
throughput (TFLOP/s). Data sheets overstate both (H200: 4.8 TB/s and 990 TFLOP/s on paper); the
kernel benchmark's %peak and the training benchmark's MFU use these instead (``--ceilings``).

    python benchmarks/ceilings.py                  # GPU: 2 GiB copy, 8192^3 bf16 GEMM
    python benchmarks/ceilings.py --device cpu     # CPU fallback: small sizes, plain timer (CI)

Writes ``ceilings_<device>.json`` and ``.md`` to a scratch folder, or ``--output-dir`` (e.g. benchmarks/results).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_results  # noqa: E402


def median_seconds(step: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds per call: ``triton.testing.do_bench`` on CUDA (L2 flushed between calls),
    a plain timer on a CPU."""
    step()
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize(device)
        return float(triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")) / 1e3
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mebibytes: int, repeats: int) -> dict[str, Any]:
    source = torch.empty(mebibytes * 2**20, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, repeats)
    moved = 2 * source.numel()  # read once, written once
    return {"ceiling": "device-to-device copy", "size": f"{mebibytes} MiB", "seconds": seconds,
            "value": moved / seconds / 1e9, "unit": "GB/s"}


def gemm_throughput(device: torch.device, size: int, repeats: int) -> dict[str, Any]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, torch.bfloat16) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, device, repeats)
    return {"ceiling": "bf16 GEMM (random data)", "size": f"{size}^3", "seconds": seconds,
            "value": 2 * size**3 / seconds / 1e12, "unit": "TFLOP/s"}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--copy-mib", type=int, default=None, help="default 2048 on GPU, 64 on CPU")
    parser.add_argument("--gemm-size", type=int, default=None, help="default 8192 on GPU, 512 on CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls on a CPU")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a scratch folder (see _common)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    rows = [
        copy_bandwidth(device, args.copy_mib or (2048 if on_gpu else 64), args.repeats),
        gemm_throughput(device, args.gemm_size or (8192 if on_gpu else 512), args.repeats),
    ]
    ceilings = {"copy_GBps": rows[0]["value"], "bf16_TFLOPs": rows[1]["value"]}
    print(markdown_table(rows))
    write_results(f"ceilings_{device.type}", rows, {**environment(device), "ceilings": ceilings},
                  output_dir=args.output_dir)
    return ceilings


if __name__ == "__main__":
    main()
