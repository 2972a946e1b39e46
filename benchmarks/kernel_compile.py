"""Ahead-of-time compilation of the residual-aggregation kernels for a GPU that is not there: the
registers, spills and shared memory of each tile for sm_90, read off the cubin (Triton's bundled
ptxas and cuobjdump). Tooling for the tile tables and the static performance model, not part of
the runtime op.

    from kernel_compile import compile_for_gpu, resource_usage
    resource_usage(compile_for_gpu("backward", torch.bfloat16, 128, 256))
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any

import torch
import triton

from nextvlad.kernels import residual_aggregation_triton as ops


_TRITON_POINTER_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
}


def compile_for_gpu(
    kind: str,
    dtype: torch.dtype,
    clusters: int,
    dim: int,
    *,
    tile: tuple[int, int, int] | None = None,
    precision: str = "ieee",
    arch: int = 90,
    strided_x: bool = False,
) -> Any:
    """Compile the forward, backward or grad_y kernel (``kind``) for an NVIDIA GPU of compute
    capability ``arch`` (90 = H100) without one: ``triton.compile`` down to a cubin with the
    bundled ptxas. The grad_y kernel (dL/dy's rounding and reductions) takes its BLOCK_V from the
    launcher's rule (no tile).

    It specialises like a real launch would (16-byte-aligned pointers; K and D marked divisible by
    16 when they are), so register use and spills read off the cubin (``resource_usage``) are those
    of the real kernel. ``strided_x`` compiles the variant for an x whose frames are not back to
    back (a split of a wider tensor). Needs Triton in compiled mode (not TRITON_INTERPRET=1: the
    interpreter patches triton.language itself, so tests run this in a subprocess).
    """
    if ops.triton_interpreter_enabled():
        raise RuntimeError("compile_for_gpu needs Triton in compiled mode (unset TRITON_INTERPRET)")
    kernel = ops._KERNELS[kind]
    k_pad = ops._padded_clusters(clusters)
    pointer = _TRITON_POINTER_TYPES[dtype]
    accumulator = "*fp64" if dtype == torch.float64 else "*fp32"
    if kind == "grad_y":  # dL/dy in the accumulator type (y under `normalize`), x in dtype
        in_accumulator_type = ("grad_y_ptr", "centroids_ptr", "assignment_sum_ptr", "grad_assignment_sum_ptr",
                               "row_constant_ptr", "grad_centroids_ptr")
        constants = {"BLOCK_V": ops.grad_y_block_videos(dim), "D_PAD": ops._next_power_of_two(dim),
                     "ACC_DTYPE": ops._accumulator_dtype(dtype), "STORE_ROUNDED": accumulator != pointer,
                     "ROUND_BY_BITS": False, "HAS_GRAD_ASSIGNMENT_SUM": True}
        return _compile(kernel, arch, ops.GRAD_Y_WARPS, dict.fromkeys(in_accumulator_type, accumulator),
                        pointer, {"batch": 160, "clusters": clusters, "dim": dim}, constants)
    table = ops._FORWARD_TILES if kind == "forward" else ops._BACKWARD_TILES
    rows, block_d, warps = tile or ops._tiles(table, ops._tile_family(dtype, precision), k_pad, dim)[0]
    special_pointers = {
        "lengths_ptr": "*i64", "centroids_ptr": "*fp32", "assignment_sum_ptr": accumulator,
        "grad_y_dot_centroids_ptr": accumulator, "partial_y_ptr": accumulator, "partial_sum_ptr": accumulator,
        "arrivals_ptr": "*i32",
    }
    # the forward as the paper's video batch runs it (B = 160 on 132 SMs: the last 28 videos in
    # halves), so that its split path is compiled and counted; the backward's video plan (head runs
    # of 10 row blocks, a tail of 9 in runs of 3)
    integers = {"max_frames": 300, "groups": 8, "clusters": clusters, "dim": dim, "whole_videos": 132, "splits": 2,
                "partial_d_blocks": 2, "batch": 160, "head_run": 10, "tail_blocks": 9, "tail_run": 3,
                "x_stride_video": (3 if strided_x else 1) * 300 * 8 * dim,
                "x_stride_frame": (3 if strided_x else 1) * 8 * dim, "x_stride_group": dim}
    constants = {
        "K_PAD": k_pad, "BLOCK_R": rows, "BLOCK_D": block_d,
        "ACC_DTYPE": ops._accumulator_dtype(dtype), "DOT_DTYPE": ops._dot_dtype(dtype, interpret=False),
        "INPUT_PRECISION": ops._dot_precision(dtype, precision), "UNIFORM_X_ROWS": not strided_x,
    }
    if kind == "backward":
        constants["ONE_D_BLOCK"] = dim <= block_d
        constants["PREFETCH_NEXT_X"] = ops._prefetches_next_x(constants["ONE_D_BLOCK"], k_pad)
    else:
        constants["EVEN_K"] = clusters == k_pad
        constants["K_ALIGN"] = ops._cluster_alignment(clusters)
    return _compile(kernel, arch, warps, special_pointers, pointer, integers, constants)


def _compile(kernel: Any, arch: int, warps: int, special_pointers: dict[str, str], pointer: str,
             integers: dict[str, int], constants: dict[str, Any]) -> Any:
    """``triton.compile`` of ``kernel`` for sm_``arch``: pointers 16-byte aligned, integers marked
    divisible by 16 when they are, as a real launch specialises them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attributes = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = special_pointers.get(name, pointer)
            attributes[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if integers[name] % 16 == 0:
                attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attributes)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def resource_usage(compiled: Any) -> dict[str, int]:
    """Registers, spill stack and shared memory of a kernel from :func:`compile_for_gpu`, read with
    the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                                check=True).stdout
    registers = int(re.search(r"REG:(\d+)", report).group(1))
    stack = int(re.search(r"STACK:(\d+)", report).group(1))
    return {"registers": registers, "spill_stack_bytes": stack, "shared_memory_bytes": compiled.metadata.shared}
