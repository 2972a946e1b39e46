"""Benchmark of the NeXtVLAD residual aggregation: literal einsum, matmul reference,
torch.compile(matmul reference) and the fused Triton kernel, forward and forward+backward.

Every provider runs in the regime a user would compare with: bf16 rows take bf16 inputs under
``torch.autocast(bfloat16)`` (the training regime, bf16-mixed), fp32 rows take fp32 inputs with
TF32 matmuls on (``torch.set_float32_matmul_precision("high")``, recorded per row). On a GPU the
issue's targets for the bf16 video stream are printed as PASS/FAIL lines and stored in the JSON.

On a CUDA GPU it times with ``triton.testing.do_bench`` at the paper's shapes (B=160, M=300) and
reports milliseconds, achieved GB/s over the minimal bytes the op must move, percent of the GPU's
peak bandwidth and peak extra memory. On a CPU it still runs (reference providers, a smaller batch,
a plain timer) so that CI exercises it. Writes ``aggregation_<device>.{json,md,png}`` to a scratch
folder, or to ``--output-dir benchmarks/results`` to update the committed results.

    python benchmarks/bench_aggregation.py            # full run on the available device
    python benchmarks/bench_aggregation.py --quick    # tiny shapes, seconds (CI)
    python benchmarks/bench_aggregation.py --compile-report  # sm_90 registers/spills, no GPU needed
    python benchmarks/bench_aggregation.py --roofline        # minimal bytes/FLOPs, H200 roofline times
    python benchmarks/bench_aggregation.py --ceilings benchmarks/results/ceilings_cuda.json  # targets
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SCRATCH_DIR, environment, markdown_table, print_targets, write_results  # noqa: E402

from nextvlad.kernels import (  # noqa: E402
    residual_aggregation,
    residual_aggregation_einsum,
    residual_aggregation_reference,
)

PROVIDERS = ("einsum", "reference", "compiled", "triton")
MODES = ("forward", "forward+backward")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Peak HBM bandwidth in GB/s by marketing name (vendor data sheets); --peak-gbps overrides.
PEAK_BANDWIDTH_GBPS = {
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 80GB HBM3": 3350.0,  # SXM
    "H100 PCIe": 2000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100-SXM4-40GB": 1555.0,
    "A100-PCIE-40GB": 1555.0,
    "L40S": 864.0,
    "A10G": 600.0,
}

# torch.compile runs only where the issue sets a target against it (compiling every shape, dtype and
# mode costs minutes of a short GPU lease); --compiled-shapes all compiles every workload.
COMPILED_SHAPES = ("video K128 (paper)",)

#: Dense bf16 tensor-core peak of an H200 (data sheet, without sparsity); TF32 is half of it.
H200_BF16_TFLOPS = 990.0

# The einsum materialises (B, M, G, K, D) fp32 residuals; skip it where that would not fit.
EINSUM_MEMORY_LIMIT_BYTES = {"cuda": 40 * 2**30, "cpu": 2 * 2**30}


@dataclass(frozen=True)
class Workload:
    """One aggregation problem: a NeXtVLAD stream at a batch size, with its frame lengths."""

    name: str
    batch: int
    frames: int
    groups: int
    clusters: int
    dim: int
    lengths: str  # "full" (every video 300 frames) or "uniform" (uniform in [0.4 M, M])


def workloads(batch: int, frames: int, quick: bool) -> list[Workload]:
    if quick:
        return [Workload("tiny", 4, 30, 4, 16, 32, lengths) for lengths in ("full", "uniform")]
    streams = [
        ("video K128 (paper)", 8, 128, 256),
        ("audio K64 (paper)", 4, 64, 64),
        ("video K112 (final)", 8, 112, 256),
        ("audio K56 (final)", 4, 56, 64),
    ]
    return [
        Workload(name, batch, frames, groups, clusters, dim, lengths)
        for name, groups, clusters, dim in streams
        for lengths in ("full", "uniform")
    ]


def make_inputs(workload: Workload, dtype: torch.dtype, device: torch.device, requires_grad: bool):
    # drawn on the device: on a CPU, 100M normals for x take seconds per case of a short GPU lease
    generator = torch.Generator(device=device).manual_seed(0)
    b, m, g, k, d = workload.batch, workload.frames, workload.groups, workload.clusters, workload.dim

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator, device=device).to(dtype).requires_grad_(requires_grad)

    centroids = (0.1 * torch.randn(k, d, generator=generator, device=device)).requires_grad_(requires_grad)
    return randn(b, m, g, d), randn(b, m, g, k), randn(b, m, g), frame_lengths(workload).to(device), centroids


def frame_lengths(workload: Workload) -> torch.Tensor:
    """(B,) real frames per video, from a generator of their own (the roofline needs them alone)."""
    b, m = workload.batch, workload.frames
    if workload.lengths == "full":
        return torch.full((b,), m, dtype=torch.int64)
    # the paper's videos are 120-300 s long: lengths uniform in [0.4 M, M]
    return torch.randint(int(0.4 * m), m + 1, (b,), generator=torch.Generator().manual_seed(1))


def minimal_flops(workload: Workload, real_frames: int, mode: str) -> int:
    """Matmul FLOPs on real frames: A^T X forward (2 R G K D); the backward adds A gy (grad x) and
    X gy^T (grad assignment), recomputing A elementwise, so forward+backward is 3 times that."""
    forward = 2 * real_frames * workload.groups * workload.clusters * workload.dim
    return forward if mode == "forward" else 3 * forward


def roofline(batch: int, frames: int, copy_gbps: float, bf16_tflops: float) -> list[dict[str, Any]]:
    """Per workload, dtype and mode: minimal bytes and FLOPs and the time a kernel moving exactly
    those bytes at ``copy_gbps`` and computing at ``bf16_tflops`` (TF32: half) could not beat."""
    rows = []
    for workload in workloads(batch, frames, quick=False):
        real_frames = int(frame_lengths(workload).sum())
        for dtype_name, dtype in DTYPES.items():
            tflops = bf16_tflops if dtype_name == "bf16" else bf16_tflops / 2  # TF32 tensor cores
            for mode in MODES:
                moved, flops = minimal_bytes(workload, dtype, real_frames, mode), minimal_flops(workload, real_frames, mode)
                memory_us, compute_us = moved / copy_gbps / 1e3, flops / tflops / 1e6
                rows.append({"shape": workload.name, "lengths": workload.lengths,
                             "real_frames": real_frames / (workload.batch * workload.frames), "dtype": dtype_name,
                             "mode": mode, "MB": moved / 1e6, "GFLOP": flops / 1e9, "memory_us": memory_us,
                             "compute_us": compute_us, "roofline_us": max(memory_us, compute_us),
                             "bound": "memory" if memory_us >= compute_us else "compute"})
    return rows


def minimal_bytes(workload: Workload, dtype: torch.dtype, real_frames: int, mode: str) -> int:
    """Bytes the op cannot avoid moving: inputs of real frames once, outputs once.

    Forward reads x, logits and attention of the real frames, lengths and centroids, and writes y.
    Backward then reads them again plus dL/dy, and writes all four gradients (the input gradients
    in full, zeros on padded frames included).
    """
    element = torch.finfo(dtype).bits // 8
    b, m, g, k, d = workload.batch, workload.frames, workload.groups, workload.clusters, workload.dim
    centroid_bytes = 4 * k * d
    real_rows = real_frames * g
    inputs = element * real_rows * (d + k + 1) + 8 * b + centroid_bytes
    output = element * b * k * d
    total = inputs + output
    if mode == "forward+backward":
        total += inputs + output + element * b * m * g * (d + k + 1) + centroid_bytes
    return total


def provider_function(provider: str) -> Callable[..., torch.Tensor]:
    if provider == "einsum":
        return residual_aggregation_einsum
    if provider == "reference":
        return residual_aggregation_reference
    if provider == "compiled":
        # One compilation per shape, dtype and mode; lengths are values, so "uniform" reuses "full"'s
        # graph. The limit is raised so that Dynamo never silently falls back to eager.
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(config, limit, max(64, getattr(config, limit)))
        return torch.compile(residual_aggregation_reference, dynamic=False)
    if provider == "triton":
        return lambda *inputs: residual_aggregation(*inputs, backend="triton")
    raise ValueError(f"unknown provider {provider!r}")


def regime(dtype_name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16: autocast to bfloat16, as bf16-mixed training runs the op; fp32: plain (TF32 matmuls
    follow the process-wide ``torch.get_float32_matmul_precision()``)."""
    if dtype_name == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(function: Callable, inputs: tuple, mode: str, dtype_name: str) -> Callable[[], Any]:
    x, logits, attention, lengths, centroids = inputs
    if mode == "forward":
        def forward() -> Any:
            with torch.no_grad(), regime(dtype_name, x.device):
                return function(x, logits, attention, lengths, centroids)
        return forward
    upstream = torch.randn(x.shape[0], logits.shape[3], x.shape[3], device=x.device, dtype=x.dtype)

    def forward_backward() -> Any:
        with regime(dtype_name, x.device):
            y = function(x, logits, attention, lengths, centroids)
        return torch.autograd.grad(y, (x, logits, attention, centroids), upstream)

    return forward_backward


def time_step(step: Callable[[], Any], device: torch.device, warmup_ms: int, rep_ms: int) -> float:
    """Median milliseconds per call."""
    if device.type == "cuda":
        import triton.testing

        step()  # compilation and autotuning happen here, outside do_bench's estimate
        torch.cuda.synchronize(device)
        return float(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    step()  # warm-up (and compilation for torch.compile)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def peak_extra_memory(step: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated on top of the inputs at the step's peak (CUDA caching allocator only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = step()
    torch.cuda.synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - baseline


def peak_bandwidth(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [gbps for key, gbps in PEAK_BANDWIDTH_GBPS.items() if key in name]
    return matches[0] if matches else None


def run_case(
    workload: Workload, dtype_name: str, mode: str, provider: str, device: torch.device,
    args: argparse.Namespace, peak_gbps: float | None,
) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(workload, dtype, device, requires_grad=(mode != "forward"))
    real_frames = int(inputs[3].sum())
    row: dict[str, Any] = {
        "shape": workload.name, "B": workload.batch, "M": workload.frames, "G": workload.groups,
        "K": workload.clusters, "D": workload.dim, "lengths": workload.lengths,
        "real_frames": real_frames / (workload.batch * workload.frames),
        "dtype": dtype_name, "mode": mode, "provider": provider,
        "regime": "autocast bf16" if dtype_name == "bf16" else f"matmul {torch.get_float32_matmul_precision()}",
        "ms": None, "GB/s": None, "%peak": None, "extra_MiB": None, "note": "",
    }
    einsum_bytes = 4 * workload.batch * workload.frames * workload.groups * workload.clusters * workload.dim
    if provider == "einsum" and einsum_bytes * (3 if mode != "forward" else 1) > EINSUM_MEMORY_LIMIT_BYTES[device.type]:
        row["note"] = "skipped: (B,M,G,K,D) residuals too large"
        return row
    if provider == "compiled" and "all" not in args.compiled_shapes and workload.name not in args.compiled_shapes:
        row["note"] = "skipped: not in --compiled-shapes"
        return row
    try:
        step = make_step(provider_function(provider), inputs, mode, dtype_name)
        milliseconds = time_step(step, device, args.warmup_ms, args.rep_ms)
        extra = peak_extra_memory(step, device)
    except Exception as error:  # one failing provider must not hide the others' numbers
        row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return row
    gbps = minimal_bytes(workload, dtype, real_frames, mode) / (milliseconds * 1e-3) / 1e9
    row.update({
        "ms": milliseconds, "GB/s": gbps,
        "%peak": 100.0 * gbps / peak_gbps if peak_gbps else None,
        "extra_MiB": extra / 2**20 if extra is not None else None,
    })
    return row


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``x_ref``: the matmul reference's time over this row's, per (shape, lengths, dtype, mode)."""
    key = lambda row: (row["shape"], row["lengths"], row["dtype"], row["mode"])  # noqa: E731
    reference = {key(row): row["ms"] for row in rows if row["provider"] == "reference" and row["ms"]}
    for row in rows:
        base = reference.get(key(row))
        row["x_ref"] = base / row["ms"] if base and row["ms"] else None


#: The issue's targets for the bf16 video stream (paper shape), forward+backward, against the
#: baselines a user would otherwise run.
TARGET_CASE = {"shape": "video K128 (paper)", "dtype": "bf16", "mode": "forward+backward"}


def evaluate_targets(rows: list[dict[str, Any]], copy_gbps: float | None) -> list[dict[str, Any]]:
    """One dict per target: measured value, bound, and ``passed`` (None where a number is missing)."""
    def find(provider: str, lengths: str = "full") -> dict[str, Any]:
        match = [r for r in rows if r["provider"] == provider and r["lengths"] == lengths
                 and all(r[key] == value for key, value in TARGET_CASE.items())]
        return match[0] if match else {}

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return numerator / denominator if numerator and denominator else None

    triton, uniform = find("triton"), find("triton", "uniform")
    reference, compiled = find("reference"), find("compiled")
    frames = ratio(uniform.get("real_frames"), triton.get("real_frames"))
    proportionality = ratio(ratio(uniform.get("ms"), triton.get("ms")), frames)
    targets = [
        ("speed-up over eager reference (autocast bf16)", ratio(reference.get("ms"), triton.get("ms")), ">=", 3.0),
        ("speed-up over torch.compile(reference)", ratio(compiled.get("ms"), triton.get("ms")), ">=", 1.5),
        ("fraction of measured copy bandwidth over minimal bytes", ratio(triton.get("GB/s"), copy_gbps), ">=", 0.6),
        ("extra peak memory / reference's", ratio(triton.get("extra_MiB"), reference.get("extra_MiB")), "<=", 0.25),
        ("(uniform/full time) / (uniform/full real frames)", proportionality, "within 10% of", 1.0),
    ]
    results = []
    for name, value, relation, bound in targets:
        if value is None:
            passed = None
        elif relation == ">=":
            passed = value >= bound
        elif relation == "<=":
            passed = value <= bound
        else:
            passed = abs(value - bound) <= 0.1 * bound
        results.append({"target": name, "value": value, "relation": relation, "bound": bound, "passed": passed})
    return results


def read_ceilings(path: Path | None) -> dict[str, Any]:
    """The measured ceilings (benchmarks/ceilings.py's JSON), or {} when none was given."""
    if path is None:
        return {}
    if not path.is_file():
        raise SystemExit(f"--ceilings {path}: no such file (run benchmarks/ceilings.py first)")
    return json.loads(path.read_text())["meta"]["ceilings"]


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """One panel per (mode, dtype); grouped bars of milliseconds per workload and provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    cases = list(dict.fromkeys((r["shape"], r["lengths"]) for r in rows))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    width = 0.8 / max(1, len(providers))
    figure, axes = plt.subplots(len(modes), len(dtypes), squeeze=False,
                                figsize=(max(6.0, 1.1 * len(cases)) * len(dtypes), 3.6 * len(modes)))
    for (mode, dtype), axis in zip([(m, d) for m in modes for d in dtypes], axes.flat):
        for index, provider in enumerate(providers):
            values = []
            for shape, lengths in cases:
                match = [r["ms"] for r in rows if (r["shape"], r["lengths"], r["mode"], r["dtype"], r["provider"])
                         == (shape, lengths, mode, dtype, provider)]
                values.append(match[0] if match and match[0] else float("nan"))
            axis.bar([i + index * width for i in range(len(cases))], values, width, label=provider)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        axis.set_xticklabels([f"{shape}\n{lengths}" for shape, lengths in cases], fontsize=7)
        axis.set_yscale("log")
        axis.set_ylabel("ms (median)")
        axis.set_title(f"{mode}, {dtype}", fontsize=9)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def compile_report(args: argparse.Namespace) -> list[dict[str, Any]]:
    """No GPU needed: compile each default tile for sm_90 (H100) and report registers, spills and
    shared memory per workload, kernel and operand family. Facts about the binaries, not timings."""
    from kernel_compile import compile_for_gpu, resource_usage

    from nextvlad.kernels.residual_aggregation_triton import (
        _BACKWARD_TILES, _FORWARD_TILES, GRAD_Y_WARPS, _padded_clusters, _tile_family, _tiles, grad_y_block_videos,
    )

    rows = []
    shapes = dict.fromkeys((w.clusters, w.dim) for w in workloads(160, 300, quick=False))
    for clusters, dim in shapes:
        for dtype_name, dtype, precision in (("bf16", torch.bfloat16, "ieee"), ("fp32", torch.float32, "tf32"),
                                             ("fp32", torch.float32, "ieee")):
            for kind, table in (("forward", _FORWARD_TILES), ("backward", _BACKWARD_TILES)):
                family = _tile_family(dtype, precision)
                tile = _tiles(table, family, _padded_clusters(clusters), dim)[0]
                usage = resource_usage(compile_for_gpu(kind, dtype, clusters, dim, tile=tile, precision=precision))
                rows.append({"K": clusters, "D": dim, "dtype": dtype_name, "family": family, "kernel": kind,
                             "BLOCK_R": tile[0], "BLOCK_D": tile[1], "warps": tile[2], **usage})
        for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):  # no dots: one per dtype
            usage = resource_usage(compile_for_gpu("grad_y", dtype, clusters, dim))
            rows.append({"K": clusters, "D": dim, "dtype": dtype_name, "family": "-", "kernel": "grad_y",
                         "BLOCK_R": f"{grad_y_block_videos(dim)} videos", "BLOCK_D": "all", "warps": GRAD_Y_WARPS,
                         **usage})
    columns = list(rows[0])
    print(markdown_table(rows, columns))
    meta = {**environment("cpu"), "target": "sm_90 (compiled with Triton's bundled ptxas; no GPU used)"}
    name = args.name or "aggregation_sm90_compile"
    paths = write_results(name, rows, meta, columns=columns, output_dir=args.output_dir)
    print(f"wrote {paths['json']} and {paths['md']}")
    return rows


def roofline_report(args: argparse.Namespace) -> list[dict[str, Any]]:
    """No GPU needed: the roofline table of every workload for the given (or measured) ceilings."""
    ceilings = read_ceilings(args.ceilings)
    copy_gbps = args.peak_gbps or ceilings.get("copy_GBps") or PEAK_BANDWIDTH_GBPS["H200"]
    bf16_tflops = ceilings.get("bf16_TFLOPs") or H200_BF16_TFLOPS
    rows = roofline(args.batch or 160, args.frames, copy_gbps, bf16_tflops)
    print(markdown_table(rows))
    meta = {"copy_GBps": copy_gbps, "bf16_TFLOPs": bf16_tflops, "tf32_TFLOPs": bf16_tflops / 2,
            "source": "measured (--ceilings)" if ceilings else "H200 data sheet",
            "bytes": "minimal_bytes", "flops": "minimal_flops (matmuls on real frames)"}
    name = args.name or "aggregation_roofline"
    paths = write_results(name, rows, meta, output_dir=args.output_dir)
    print(f"wrote {paths['json']} and {paths['md']}")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and short timings (CI smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 160 on GPU, 8 on CPU)")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None,
                        help="default: all on GPU; einsum and reference on CPU")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help="default: bf16 and fp32 (fp32 only with --quick)")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth of the device")
    parser.add_argument("--ceilings", type=Path, default=None,
                        help="ceilings JSON from benchmarks/ceilings.py: %%peak and the targets use its measured "
                             "copy bandwidth instead of the data sheet's")
    parser.add_argument("--matmul-precision", default="high", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision for the fp32 rows (high: TF32 on, as users run)")
    parser.add_argument("--compiled-shapes", nargs="+", default=list(COMPILED_SHAPES),
                        help="workloads timed under torch.compile ('all' for every one)")
    parser.add_argument("--output-dir", type=Path, default=SCRATCH_DIR,
                        help=f"results directory (default {SCRATCH_DIR}; benchmarks/results is the committed one)")
    parser.add_argument("--name", default=None, help="result file stem (default aggregation_<device type>)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a loaded shared machine 1 is far steadier)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--roofline", action="store_true",
                        help="instead of timing: minimal bytes, FLOPs and roofline time of every workload "
                             "(H200 data sheet, or the measured --ceilings)")
    parser.add_argument("--compile-report", action="store_true",
                        help="instead of timing: compile the default tiles for sm_90 and report registers/"
                             "spills/shared memory (needs Triton in compiled mode, no GPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.compile_report:
        return compile_report(args)
    if args.roofline:
        return roofline_report(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    providers = args.providers or (list(PROVIDERS) if on_gpu else ["einsum", "reference"])
    dtypes = args.dtypes or (["fp32"] if args.quick else ["bf16", "fp32"])
    batch = args.batch or (160 if on_gpu else 8)
    if args.quick:
        args.warmup_ms, args.rep_ms = min(args.warmup_ms, 5), min(args.rep_ms, 20)
    ceilings = read_ceilings(args.ceilings)
    peak_gbps = peak_bandwidth(device, args.peak_gbps or ceilings.get("copy_GBps"))

    columns = ["shape", "lengths", "real_frames", "dtype", "mode", "provider", "regime", "ms", "x_ref", "GB/s", "%peak",
               "extra_MiB", "note"]
    meta = {
        **environment(device),
        "timer": "triton.testing.do_bench (median)" if on_gpu else "time.perf_counter (median)",
        "peak_GBps": peak_gbps,
        "peak_source": ("--peak-gbps" if args.peak_gbps else "measured copy (--ceilings)" if ceilings
                        else "data sheet" if peak_gbps else None),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "bf16_regime": "bf16 inputs under torch.autocast(bfloat16)",
        "compiled_shapes": args.compiled_shapes,
        "ceilings": ceilings or None,
        "quick": args.quick,
        "workloads": [asdict(w) for w in workloads(batch, args.frames, args.quick)],
        "bytes": "minimal bytes: real-frame inputs read once, outputs written once (see minimal_bytes)",
    }
    name = args.name or f"aggregation_{device.type}{'_quick' if args.quick else ''}"
    rows: list[dict[str, Any]] = []
    for workload in workloads(batch, args.frames, args.quick):
        for dtype_name in dtypes:
            for mode in args.modes:
                for provider in providers:
                    rows.append(run_case(workload, dtype_name, mode, provider, device, args, peak_gbps))
                    gc.collect()
                    if on_gpu:
                        torch.cuda.empty_cache()
        add_speedups(rows)
        print(markdown_table([row for row in rows if row["shape"] == workload.name
                              and row["lengths"] == workload.lengths], columns), flush=True)
        # after every workload, so that a run stopped by its time budget keeps what it measured
        meta["targets"] = evaluate_targets(rows, ceilings.get("copy_GBps"))
        paths = write_results(name, rows, {**meta, "complete": False}, columns=columns, output_dir=args.output_dir)
    paths = write_results(name, rows, {**meta, "complete": True}, columns=columns, output_dir=args.output_dir)
    if not args.no_plot:
        threads = "" if on_gpu else f", {torch.get_num_threads()} CPU thread(s)"
        plot(rows, args.output_dir / f"{name}.png", f"residual aggregation on {meta['device']}, B={batch}{threads}")
    print(f"wrote {paths['json']} and {paths['md']}")
    if on_gpu or args.quick:  # the quick run prints them (N/A) so that CI exercises the path
        print_targets(meta["targets"], ", ".join(f"{key}={value}" for key, value in TARGET_CASE.items()))
    return rows


if __name__ == "__main__":
    main()
