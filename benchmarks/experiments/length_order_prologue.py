"""Prototype, not part of the op (benchmarks/NOTES.md, "Considered, not built: the forward's programs
in order of decreasing video length"): the prologue a forward program would need to find its video
if programs ran videos longest first, as its own kernel. ``--check`` runs it in Triton's interpreter
against Python's sort; without it, it compiles for sm_90 and prints registers and SASS counts.

    TRITON_INTERPRET=1 python benchmarks/experiments/length_order_prologue.py --check
    python benchmarks/experiments/length_order_prologue.py
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def length_order_kernel(lengths_ptr, out_ptr, batch, max_frames, B_PAD: tl.constexpr, BUCKETS: tl.constexpr):
    """out[slot] = the video the forward program of ``slot`` would take: videos by length bucket,
    longest first, stable by index."""
    slot = tl.program_id(0)
    offs_b = tl.arange(0, B_PAD)
    lengths = tl.load(lengths_ptr + offs_b, mask=offs_b < batch, other=-1)
    lengths = tl.minimum(lengths, max_frames).to(tl.int32)
    bucket = tl.where(lengths >= 0, (BUCKETS - 1) - (lengths * BUCKETS) // (max_frames + 1), BUCKETS)
    one_hot = (bucket[:, None] == tl.arange(0, BUCKETS)[None, :]).to(tl.int32)
    before_in_bucket = tl.cumsum(one_hot, axis=0) - one_hot
    counts = tl.sum(one_hot, axis=0)
    starts = tl.cumsum(counts, axis=0) - counts
    position = tl.sum(one_hot * (before_in_bucket + starts[None, :]), axis=1)
    tl.store(out_ptr + slot, tl.sum(tl.where((position == slot) & (offs_b < batch), offs_b, 0), axis=0))


def check() -> None:
    lengths = [7, 300, 120, 300, 0, 250, 251, 119, 299]
    frames, buckets = 300, 16
    out = torch.empty(len(lengths), dtype=torch.int32)
    length_order_kernel[(len(lengths),)](torch.tensor(lengths), out, len(lengths), frames, B_PAD=16, BUCKETS=buckets)
    expected = sorted(range(len(lengths)), key=lambda v: ((buckets - 1) - lengths[v] * buckets // (frames + 1), v))
    assert out.tolist() == expected, (out.tolist(), expected)
    print("order", out.tolist(), "as expected")


def compile_report() -> None:
    from kernel_compile import _compile, resource_usage
    from kernel_model import sass

    for b_pad in (256, 1024):
        compiled = _compile(length_order_kernel, 90, 8, {"out_ptr": "*i32", "lengths_ptr": "*i64"}, "*i64",
                            {"batch": 160, "max_frames": 300}, {"B_PAD": b_pad, "BUCKETS": 16})
        opcodes = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", sass(compiled))
        heads = collections.Counter(opcodes)
        print(f"B_PAD {b_pad}, 8 warps, Triton {triton.__version__}: {resource_usage(compiled)}, "
              f"{len(opcodes)} instructions per thread, "
              + ", ".join(f"{name} {heads[name]}" for name in ("BAR", "SHFL", "LDS", "STS")))


if __name__ == "__main__":
    check() if "--check" in sys.argv else compile_report()
