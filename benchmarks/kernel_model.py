"""Static performance model of the residual-aggregation kernels, no GPU needed.

For each kernel (forward; the backward's dL/dy pass, grad_y; backward) and default tile at the
paper's shapes, compile for sm_90 with Triton's bundled ptxas (``kernel_compile.compile_for_gpu``),
read registers / spills / shared memory and the SASS (the bundled ``cuobjdump -sass``), count the
instructions of the main loop (row blocks; grad_y's steps over videos) by class, and predict the
time on an H100 and an H200 as

    predicted = max(issue floor, MUFU floor, tensor-core floor, DRAM floor) * wave quantisation
                + exposed latency

Every assumption is in ``ASSUMPTIONS`` (written into the results). When a CUDA GPU is present the
same script also times the op's kernels (``--measure``) and prints measured beside predicted, so
the model can be corrected; without one nothing is measured and no time is claimed.

    python benchmarks/kernel_model.py                      # all paper shapes, to the scratch folder
    python benchmarks/kernel_model.py --output-dir benchmarks/results   # update results/kernel_model.{md,json}
    python benchmarks/kernel_model.py --streams video --dtypes bf16 --lengths full --name kernel_model_video

Must run with Triton in compiled mode (not ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

# Triton 3.9 warns unless this is set; 1 keeps its (and Triton 3.6's) default, FMA fusion on.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SCRATCH_DIR, environment, markdown_table, write_results  # noqa: E402
from kernel_compile import compile_for_gpu, resource_usage  # noqa: E402

from nextvlad.kernels import residual_aggregation_triton as ops  # noqa: E402


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_hz: float
    dram_bytes_per_s: float
    # dense tensor-core multiply-adds per SM per cycle, by operand family
    tensor_fma_per_sm_cycle: dict


_TENSOR = {"half": 2048, "tf32": 1024, "ieee": 0}
GPUS = (
    Gpu("H100", 132, 1.755e9, 3.35e12, _TENSOR),
    Gpu("H200", 132, 1.755e9, 4.3e12, _TENSOR),
)

ASSUMPTIONS = [
    "H100 SXM and H200: 132 SMs at 1.755 GHz (the clock the issue's cycle figures use); DRAM 3.35 TB/s "
    "(H100 datasheet) and 4.3 TB/s (copy bandwidth measured on this workplace's H200; its datasheet "
    "says 4.8 TB/s).",
    "Issue floor: each SM issues at most 4 warp instructions per cycle (4 schedulers); all warp "
    "instructions of the kernel (static SASS counts x trip counts x warps x programs) spread evenly "
    "over the SMs.",
    "MUFU floor: 16 MUFU results per SM per cycle (ex2, rcp, ...): a warp MUFU instruction costs 2 "
    "SM-cycles of that pipe.",
    "Tensor floor: dense MMA multiply-adds per SM per cycle 2048 (bf16/fp16), 1024 (tf32), none for "
    "exact fp32 (its FFMA are in the issue floor); padded K counted.",
    "DRAM floor: the minimal bytes (each input element read once, real rows only; every output "
    "element written once, padded rows of the backward's row-wise outputs included) / bandwidth. L2 "
    "re-reads (logits per D block, grad_y per row block) are not modelled.",
    "Instructions per program: SASS outside loops + the main loop's body x its trip count. The main "
    "loop is the outermost one holding the MMA: the row-block loop (trips = the program's real rows / "
    "BLOCK_R) of the forward and of the backward (which walks runs of row blocks); a nested D loop "
    "counts D / BLOCK_D times per trip. "
    "Loops without MMA (the zero-fill of padded row blocks) are left out, while straight-line "
    "stores of that path are counted (small overestimate).",
    "Exposed latency: a program waits one DRAM round trip (1,000 cycles, loaded latency; a guess to "
    "be corrected by measurement) for its first loads, one per loop iteration whose body has a "
    "synchronous load (LDG, not the asynchronous LDGSTS/UTMALDG) less the cycles the CTA issues before "
    "the loaded register is first read (instructions in between x warps / 4; for a load in a nested D loop, "
    "once per trip of that loop, its distance counted within it), one for the lengths (in the "
    "backward the same one as its first loads, which do not wait for them), and one more "
    "when the dot operands' first asynchronous copy is issued after the first MUFU (the softmax: the "
    "logits, then x, are waited for in turn); with a nested D loop, one per row-block trip instead "
    "(its first copies are issued just before it), from L2 rather than DRAM (500 cycles, half a DRAM "
    "access: another guess) for every trip but a program's first where the trip before prefetched "
    "them into L2 (CCTL.E.PF2 in the loop); a backward program past its video's end waits "
    "only for the lengths. Another resident CTA hides it, so the sum is divided by the CTAs per SM. Added on top of the floors "
    "(pessimistic: no overlap with the throughput floors).",
    "Frame splits (forward: every video of a small batch such as audio's 160, or the videos of the "
    "last partial wave of a larger one) as launch_forward plans them; each split program writes its fp32 "
    "partial a^T x and a_sum and the last to arrive reads them all back (in the same kernel): both at "
    "DRAM bandwidth (pessimistic: they are written and read within microseconds, mostly in L2), added "
    "to the exposed time.",
    "Backward runs as launch_backward plans them: every video's head runs, then every video's tail "
    "runs; the tail's programs read each video's dL/dy once more from DRAM (pessimistic: its head "
    "runs' copy may still be in L2), and each program's first block is loaded whole up to the video's "
    "padded end (logits, attention, and x when D is one block), also past the real frames: both at "
    "DRAM bandwidth, added to the exposed time.",
    "The backward's dL/dy pass (grad_y: dL/dy rounded to x's dtype, the row constant and dL/dc) is a "
    "third kernel, run before the backward kernel: one program per cluster walking every video in "
    "steps of BLOCK_V (its 'tile': BLOCK_V x D_PAD x warps), no tensor cores, the same at any lengths. "
    "It is compiled with dL/da_sum read (the model layers have none: a few loads more than they run).",
    "Wave quantisation: the floors are multiplied by makespan / mean work per slot, for programs "
    "dispatched in order to the first free of SMs x CTAs-per-SM slots, each taking time in proportion "
    "to its row-block trips (for equal programs: ceil(waves) / waves). A slot keeps 1/CTAs-per-SM of "
    "its SM even when it runs alone (pessimistic for the last wave).",
    "CTAs per SM: limited by 65,536 registers (allocated per warp in units of 256), 233,472 bytes "
    "of shared memory (1 KiB reserved per CTA), 64 warps and 32 CTAs.",
]

LATENCY_CYCLES = 1000
# An L2 hit, for copies of lines prefetched into L2 (CCTL.E.PF2): a guess like LATENCY_CYCLES;
# public Hopper microbenchmarks put an L2 hit at a few hundred cycles, about half a DRAM access.
L2_LATENCY_CYCLES = 500
SMEM_PER_SM = 233_472
REGISTERS_PER_SM = 65_536


@dataclass(frozen=True)
class Stream:
    name: str
    clusters: tuple[int, ...]
    groups: int
    dim: int


# SPEC: video K=128/112, G=8, D = 2*1024/8; audio K/2 clusters, G/2 groups, D = 2*128/4.
STREAMS = (Stream("video", (128, 112), 8, 256), Stream("audio", (64, 56), 4, 64))
DTYPES = {"bf16": (torch.bfloat16, "ieee"), "fp32": (torch.float32, "tf32"), "fp32-ieee": (torch.float32, "ieee")}
BATCH, FRAMES = 160, 300
# the op's kernels in launch order: the forward; the backward's dL/dy pass, then its main kernel
KERNELS = ("forward", "grad_y", "backward")


def paper_lengths(kind: str, batch: int = BATCH, frames: int = FRAMES) -> list[int]:
    """"full": every video 300 frames; "120-300": lengths spread evenly over [120, 300], in a fixed
    shuffled order (a batch's videos come in no order of length; sorted, the longest programs would
    all be dispatched last, the worst case for the wave rule below)."""
    if kind == "full":
        return [frames] * batch
    low, high = (int(value) for value in kind.split("-"))
    lengths = [round(low + (high - low) * index / max(1, batch - 1)) for index in range(batch)]
    random.Random(0).shuffle(lengths)
    return lengths


# --------------------------------------------------------------------------------------------
# SASS
# --------------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:\{\s*)?(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"BR[AX]\s+(?:`\()?(0x[0-9a-f]+|\.L_x_\d+)")

CLASSES = {
    "FFMA/FMUL/FADD": ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK"),
    "MUFU": ("MUFU",),
    "HGMMA": ("HGMMA", "HMMA"),
    "LDG/STG": ("LDG", "STG", "LDGSTS", "UTMALDG", "UTMASTG", "LDGDEPBAR", "DEPBAR"),
    "LDS/STS": ("LDS", "STS", "LDSM", "STSM"),
    "SHFL": ("SHFL",),
    "BAR": ("BAR", "SYNCS", "WARPSYNC", "WARPGROUP"),
}
_MMA = ("HGMMA", "HMMA")
_ASYNC_COPY = ("LDGSTS", "UTMALDG")


def sass(compiled: Any) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([tool, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout


def parse_sass(text: str) -> tuple[list[tuple[int, str, str]], list[tuple[int, int]]]:
    """(address, opcode, operands) of every instruction, and the loops as (first, last) address
    ranges: the targets of backward branches."""
    instructions, labels, branches = [], {}, []
    pending_labels = []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending_labels.append(label.group(1))
            continue
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        address, opcode, operands = int(match.group(1), 16), match.group(3), match.group(5).strip()
        for name in pending_labels:
            labels[name] = address
        pending_labels = []
        target = _TARGET.search(line)
        if opcode in ("BRA", "BRX") and target:
            if target.group(1) == f"{address:#x}":
                continue  # ptxas' trap after the last EXIT (a branch to itself), never run
            branches.append((address, target.group(1)))
        instructions.append((address, opcode, operands))
    # cuobjdump prints a branch target as an address or as a label, depending on its version
    targets = [(int(target, 16) if target.startswith("0x") else labels.get(target), address)
               for address, target in branches]
    loops = sorted({(first, address) for first, address in targets if first is not None and first <= address})
    return instructions, loops


def classify(opcodes: list[str]) -> dict[str, int]:
    counts = Counter()
    for opcode in opcodes:
        for name, prefixes in CLASSES.items():
            if opcode in prefixes:
                counts[name] += 1
                break
        else:
            counts["other"] += 1
    counts["total"] = len(opcodes)
    return {name: counts.get(name, 0) for name in (*CLASSES, "other", "total")}


@dataclass
class KernelCode:
    """Static SASS of one compiled kernel split into the main loop's body and the rest."""

    loop_body: list[str]  # the outermost loop holding the MMA: row blocks (forward; backward walking runs)
    inner_body: list[str]  # a loop holding the MMA nested in it (the backward's D loop), or []
    outside: list[str]  # instructions in no loop
    # per synchronous load (LDG) in the loop, outside the nested one: instructions issued before
    # its value is first read, counted on through the loop's end into the next trip (a load for
    # the next trip hides more)
    sync_load_distances: list[int]
    # the same for the nested loop's synchronous loads, counted within its body (they stall every
    # trip of the nested loop: d_blocks per row block)
    inner_sync_load_distances: list[int]
    # the first asynchronous copy (LDGSTS/UTMALDG: the dot operands) comes after the first MUFU
    # (the softmax's exp): the program waits for the logits, computes, then waits for x again
    loads_after_softmax: bool
    # the main loop, outside its nested loop, prefetches lines into L2 (CCTL.E.PF2: the backward
    # asking for the next row block's x, change 17)
    prefetches_to_l2: bool = False

    def exposed_cycles_per_trip(self, warps: int, inner: bool = False) -> float:
        """Latency of the loop's (``inner``: the nested loop's) nearest-used synchronous load not
        covered by the CTA's own issue: each instruction between load and use is issued by every
        warp, warps / 4 cycles per SM."""
        distances = self.inner_sync_load_distances if inner else self.sync_load_distances
        if not distances:
            return 0.0
        return max(0.0, LATENCY_CYCLES - min(distances) * warps / 4)

    @classmethod
    def from_sass(cls, text: str) -> KernelCode:
        instructions, loops = parse_sass(text)
        in_loop = [(first, last, [entry for entry in instructions if first <= entry[0] <= last])
                   for first, last in loops]
        mma_loops = [loop for loop in in_loop if any(op in _MMA or op == "FFMA" for _, op, _ in loop[2])]
        if not mma_loops:
            raise RuntimeError("no loop with a dot product found in the SASS")
        # the outermost of them (nested loops would be inside it)
        first, last, body = max(mma_loops, key=lambda loop: loop[1] - loop[0])
        nested = [loop[2] for loop in mma_loops if first <= loop[0] and loop[1] <= last and loop[2] != body]
        inner_entries = max(nested, key=len) if nested else []
        inner = [op for _, op, _ in inner_entries]
        inner_addresses = {address for address, _, _ in inner_entries}
        outside = [op for address, op, _ in instructions if not any(f <= address <= l for f, l in loops)]
        first_mufu = next((address for address, op, _ in instructions if op == "MUFU"), None)
        first_copy = next((address for address, op, _ in instructions if op in _ASYNC_COPY), None)
        loads_after_softmax = first_mufu is not None and first_copy is not None and first_mufu < first_copy
        distances = [_use_distance(body, index) for index, (address, op, _) in enumerate(body)
                     if op == "LDG" and address not in inner_addresses]
        inner_distances = [_use_distance(inner_entries, index) for index, (_, op, _) in enumerate(inner_entries)
                           if op == "LDG"]
        prefetch_addresses = {int(match.group(1), 16) for match in map(_INSTRUCTION.search, text.splitlines())
                              if match and match.group(3) == "CCTL" and ".PF2" in match.group(4)}
        prefetches = any(address in prefetch_addresses and address not in inner_addresses for address, _, _ in body)
        return cls([op for _, op, _ in body], inner, outside, distances, inner_distances, loads_after_softmax,
                   prefetches)


_REGISTER = re.compile(r"\bR(\d+)\b")


def _use_distance(body: list[tuple[int, str, str]], load: int) -> int:
    """Instructions after ``body[load]`` (an LDG) before one reads its destination register,
    cyclically through the loop body; the body's length if none does (the value is dead)."""
    destination = _REGISTER.match(body[load][2].split(",")[0].strip())
    if destination is None:
        return len(body)
    register = destination.group(1)
    for step in range(1, len(body)):
        _, _, operands = body[(load + step) % len(body)]
        first, _, rest = operands.partition(",")
        sources = operands if first.strip().startswith("[") else rest  # a store's address is read
        if register in _REGISTER.findall(sources):
            return step - 1
        if register in _REGISTER.findall(first) and not first.strip().startswith("["):
            return len(body)  # overwritten before any read
    return len(body)


# --------------------------------------------------------------------------------------------
# bytes, programs, floors
# --------------------------------------------------------------------------------------------


def minimal_bytes(kind: str, lengths: list[int], groups: int, clusters: int, dim: int, element: int,
                  frames: int = FRAMES) -> int:
    """Bytes a kernel must move at least: inputs read once over the real rows, outputs written once.

    forward reads x, logits, attention (real rows), lengths (int64), centroids (fp32) and writes y
    (x's dtype) and a_sum (fp32). grad_y (the dL/dy pass before the backward) reads dL/dy (B, K, D)
    in fp32 (y's dtype under `normalize`, the model layers' case), a_sum and the centroids, and
    writes dL/dy rounded to x's dtype (not for fp32 x), the (B, K) row constant and dL/dc (K, D),
    all fp32 but the copy. backward reads x, logits, attention (real rows), lengths, grad_y
    (B, K, D) in x's dtype and the (B, K) fp32 row constant, and writes grad_x, grad_logits and
    grad_attention for every row (padded rows get zeros).
    """
    batch = len(lengths)
    if kind == "grad_y":
        rounded_copy = batch * clusters * dim * element if element != 4 else 0
        return batch * clusters * dim * 4 + rounded_copy + 2 * batch * clusters * 4 + 2 * clusters * dim * 4
    real_rows = sum(lengths) * groups
    reads = real_rows * (dim + clusters + 1) * element + batch * 8
    if kind == "forward":
        return reads + clusters * dim * 4 + batch * clusters * dim * element + batch * clusters * 4
    all_rows = batch * frames * groups
    return reads + batch * clusters * dim * element + batch * clusters * 4 + all_rows * (dim + clusters + 1) * element


def ctas_per_sm(registers: int, shared: int, warps: int) -> int:
    registers_per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = REGISTERS_PER_SM // (registers_per_warp * warps)
    by_shared = SMEM_PER_SM // (shared + 1024)
    return max(0, min(by_registers, by_shared, 64 // warps, 32))


def programs_and_trips(kind: str, lengths: list[int], groups: int, dim: int, tile: tuple[int, int, int],
                       sms: int, frames: int = FRAMES) -> tuple[list[int], int, int]:
    """(the row-block loop's trips of each program in launch order, videos split, splits) of one
    launch, as launch_forward / launch_backward plan it on a GPU with ``sms`` SMs."""
    block_r, block_d, _ = tile
    if kind == "forward":
        d_blocks = math.ceil(dim / block_d)
        whole, splits = ops._forward_plan(len(lengths), frames * groups, d_blocks, sms)
        trips = []
        for index, length in enumerate(lengths):  # as the kernel shares a video's real rows out
            video_splits, rows = (1 if index < whole else splits), length * groups
            per_split = math.ceil(math.ceil(rows / video_splits) / block_r) * block_r
            trips += [math.ceil(max(0, min(rows - split * per_split, per_split)) / block_r)
                      for split in range(video_splits) for _ in range(d_blocks)]
        return trips, len(lengths) - whole, splits
    # backward: one program per run of a video's row blocks, looping over its real ones
    trips = [max(0, min(math.ceil(lengths[video] * groups / block_r), end) - first)
             for video, first, end in backward_runs(len(lengths), groups, dim, tile, sms, frames)]
    return trips, 0, 1


def backward_runs(batch: int, groups: int, dim: int, tile: tuple[int, int, int], sms: int,
                  frames: int = FRAMES) -> list[tuple[int, int, int]]:
    """(video, first row block, end row block) of each backward program in launch order, as
    launch_backward plans them: every video's head runs, then every video's tail runs."""
    block_r, block_d, _ = tile
    row_blocks = math.ceil(frames * groups / block_r)
    head_run, tail_blocks, tail_run = ops._backward_plan(batch, row_blocks, math.ceil(dim / block_d), sms)
    head_blocks = row_blocks - tail_blocks
    runs = [(video, first, min(first + head_run, head_blocks))
            for video in range(batch) for first in range(0, head_blocks, head_run)]
    return runs + [(video, first, min(first + tail_run, row_blocks))
                   for video in range(batch) for first in range(head_blocks, row_blocks, tail_run)]


def backward_first_block_padding(lengths: list[int], groups: int, dim: int, tile: tuple[int, int, int], sms: int,
                                 frames: int = FRAMES) -> int:
    """Rows past their video's end that the backward programs' first blocks load (bounded by the
    video's padded rows so as not to wait for the lengths; change 14): a whole block for a program
    wholly past the end, the rest of the block for the one the video ends in."""
    block_r = tile[0]
    rows_per_video = frames * groups
    padded = 0
    for video, first, _ in backward_runs(len(lengths), groups, dim, tile, sms, frames):
        block_rows = min(block_r, rows_per_video - first * block_r)
        padded += block_rows - min(block_rows, max(0, lengths[video] * groups - first * block_r))
    return padded


def wave_quantisation(trips: list[int], slots: int) -> float:
    """Makespan over mean work per slot of ``trips`` dispatched in order to the first free of
    ``slots`` (a program's time in proportion to its trips, at least one: it loads and stores)."""
    finish = [0] * slots
    for work in trips:
        heapq.heapreplace(finish, finish[0] + max(1, work))
    return max(finish) / (sum(max(1, work) for work in trips) / slots)


def model_case(kind: str, stream: Stream, clusters: int, dtype_name: str, lengths_kind: str,
               code: KernelCode, usage: dict[str, int], tile: tuple[int, int, int], family: str) -> dict[str, Any]:
    dtype, _ = DTYPES[dtype_name]
    element = torch.finfo(dtype).bits // 8
    block_r, block_d, warps = tile
    k_pad = ops._padded_clusters(clusters)
    lengths = paper_lengths(lengths_kind)
    nested = bool(code.inner_body)
    # the backward walks runs of row blocks (its D loop nested inside, or none when D fits one
    # block); results/kernel_model_before.md was made by this script's first version, for the
    # older one-block-per-program backward
    if kind == "grad_y":  # one program per cluster, ceil(B / BLOCK_V) steps each, the same at any lengths
        per_program, split_videos, splits = [math.ceil(len(lengths) / block_r)] * clusters, 0, 1
    else:
        per_program, split_videos, splits = programs_and_trips(kind, lengths, stream.groups, stream.dim, tile,
                                                               GPUS[0].sms)
    programs = len(per_program)
    d_blocks = math.ceil(stream.dim / block_d)
    inner = classify(code.inner_body)
    # a trip of the outer loop runs the nested D loop d_blocks times (its body is in the outer once)
    body = {name: count + (d_blocks - 1) * inner[name] if nested else count
            for name, count in classify(code.loop_body).items()}
    outside = classify(code.outside)
    loop_trips = sum(per_program)
    warp_instructions = warps * (programs * outside["total"] + loop_trips * body["total"])
    mufu_instructions = warps * (programs * outside["MUFU"] + loop_trips * body["MUFU"])
    # forward: one K_PAD x BLOCK_R x BLOCK_D dot per row block and D block; backward: two
    # BLOCK_R x K_PAD x BLOCK_D per D block (trips are D blocks, or row blocks of d_blocks each)
    dots = 0 if kind == "grad_y" else (
        loop_trips * (d_blocks if kind == "backward" else 1) * (1 if kind == "forward" else 2))
    mma_fma = dots * k_pad * block_r * block_d
    # lengths, then the first loads, [then x after the softmax], [then one per loop trip]; a
    # backward program past its video's end only stores (one round trip: the lengths)
    # nested: every row-block trip waits once more, for the D loop's first asynchronous copies
    # (issued right before it, nothing to do meanwhile): from DRAM, or from L2 where the trip
    # before prefetched them (change 17), so a program's first trip still waits for DRAM
    copy_wait = int(nested) * (L2_LATENCY_CYCLES / LATENCY_CYCLES if code.prefetches_to_l2 else 1)
    per_trip = (code.exposed_cycles_per_trip(warps) + d_blocks * code.exposed_cycles_per_trip(warps, inner=True)
                * nested) / LATENCY_CYCLES + copy_wait
    # the forward's first loads wait for the lengths (its loop bounds and masks), the backward's
    # are issued with them (change 14): one round trip for both; grad_y reads no lengths
    first_wait = 2 if kind == "forward" else 1
    round_trips = sum(first_wait + (code.loads_after_softmax and not nested) + trips * per_trip
                      + (int(nested) - copy_wait) if trips else 1 for trips in per_program)
    # a split program waits once more for its arrival (the atomic), the last one again for the partials
    round_trips += split_videos * d_blocks * (splits + 1)
    resident = ctas_per_sm(usage["registers"], usage["shared_memory_bytes"], warps)
    slots = GPUS[0].sms * max(1, resident)  # both GPUs have 132 SMs
    waves = programs / slots
    quantisation = wave_quantisation(per_program, slots)
    bytes_moved = minimal_bytes(kind, lengths, stream.groups, clusters, stream.dim, element)
    # frame splits: each split program's fp32 a^T x (K x its D block) and a_sum, written, then read
    # back by the video's last split program
    extra_bytes = 2 * split_videos * splits * clusters * (stream.dim + d_blocks) * 4
    if kind == "backward":
        # tail runs: every video's dL/dy read once more (its head runs' copy gone from L2)
        if ops._backward_plan(len(lengths), math.ceil(FRAMES * stream.groups / block_r), d_blocks, GPUS[0].sms)[1]:
            extra_bytes += len(lengths) * clusters * stream.dim * element
        # first blocks loaded past their video's end: logits and attention, and x when D is one block
        padded_rows = backward_first_block_padding(lengths, stream.groups, stream.dim, tile, GPUS[0].sms)
        extra_bytes += padded_rows * (clusters + 1 + (stream.dim if d_blocks == 1 else 0)) * element
    row = {
        "stream": stream.name, "K": clusters, "D": stream.dim, "G": stream.groups, "dtype": dtype_name,
        "lengths": lengths_kind, "kernel": kind, "tile": f"{block_r}x{block_d}x{warps}", **usage,
        "ctas_per_sm": resident, "programs": programs, "waves": round(waves, 2),
        "quantisation": round(quantisation, 4), "split_videos": split_videos,
        **{f"loop_{name}": count for name, count in body.items()},
        "outside_total": outside["total"],
        # a trip of the row-block loop; or (backward, one block per program) the program
        "instructions_per_row_block": body["total"],
        "loop": ("videos, BLOCK_V a step" if kind == "grad_y"
                 else "row blocks" + (f" (D loop nested, {d_blocks} trips)" if nested else "")),
        "sync_load_use_distance": min(code.sync_load_distances, default=None),
        "inner_sync_load_use_distance": min(code.inner_sync_load_distances, default=None), "loads_after_softmax": code.loads_after_softmax,
        "prefetches_to_l2": code.prefetches_to_l2,
        "splits": splits,
        "bytes_MB": bytes_moved / 1e6,
    }
    for gpu in GPUS:
        clock, sms = gpu.clock_hz, gpu.sms
        issue = warp_instructions / (4 * sms * clock)
        mufu = mufu_instructions * 2 / (sms * clock)
        tensor_rate = gpu.tensor_fma_per_sm_cycle[family]
        tensor = mma_fma / (tensor_rate * sms * clock) if tensor_rate else 0.0
        dram = bytes_moved / gpu.dram_bytes_per_s
        exposed = round_trips * LATENCY_CYCLES / (sms * max(1, resident) * clock)
        exposed += extra_bytes / gpu.dram_bytes_per_s
        floor = max(issue, mufu, tensor, dram)
        predicted = floor * quantisation + exposed
        prefix = gpu.name.lower()
        row.update({
            f"{prefix}_issue_us": issue * 1e6, f"{prefix}_mufu_us": mufu * 1e6, f"{prefix}_tensor_us": tensor * 1e6,
            f"{prefix}_dram_us": dram * 1e6, f"{prefix}_exposed_us": exposed * 1e6,
            f"{prefix}_predicted_us": predicted * 1e6, f"{prefix}_x_dram": predicted / dram,
        })
    return row


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = [
    "stream", "K", "dtype", "lengths", "kernel", "tile", "registers", "spill_stack_bytes", "shared_memory_bytes",
    "ctas_per_sm", "splits", "programs", "waves", "instructions_per_row_block", "loop_total", "loop_FFMA/FMUL/FADD", "loop_MUFU", "loop_HGMMA",
    "loop_LDG/STG", "loop_SHFL", "loop_BAR", "bytes_MB", "h100_issue_us", "h100_dram_us", "h100_predicted_us",
    "h200_issue_us", "h200_dram_us", "h200_exposed_us", "h200_predicted_us", "h200_x_dram",
]


def compile_case(kind: str, dtype_name: str, clusters: int, dim: int,
                 tile: tuple[int, int, int] | None = None) -> tuple[KernelCode, dict, tuple, str]:
    """Compile ``tile`` (default: the launcher's default tile) and read its SASS and resources."""
    dtype, precision = DTYPES[dtype_name]
    if kind == "grad_y":  # no dots, no tile table: the launcher's rule
        compiled = compile_for_gpu(kind, dtype, clusters, dim)
        tile = (ops.grad_y_block_videos(dim), ops._next_power_of_two(dim), ops.GRAD_Y_WARPS)
        return KernelCode.from_sass(sass(compiled)), resource_usage(compiled), tile, "ieee"
    family = ops._tile_family(dtype, precision)
    table = ops._FORWARD_TILES if kind == "forward" else ops._BACKWARD_TILES
    tile = tile or ops._tiles(table, family, ops._padded_clusters(clusters), dim)[0]
    compiled = compile_for_gpu(kind, dtype, clusters, dim, tile=tile, precision=precision)
    return KernelCode.from_sass(sass(compiled)), resource_usage(compiled), tile, family


def combined_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """forward + backward (the dL/dy pass and the backward kernel) per (stream, K, dtype, lengths):
    the figure the targets are stated in."""
    pairs = {}
    for row in rows:
        pairs.setdefault((row["stream"], row["K"], row["dtype"], row["lengths"]), {})[row["kernel"]] = row
    combined = []
    for (stream, clusters, dtype_name, lengths), kernels in pairs.items():
        if set(kernels) != set(KERNELS):
            continue
        entry = {"stream": stream, "K": clusters, "dtype": dtype_name, "lengths": lengths}
        for gpu in ("h100", "h200"):
            dram = sum(kernels[k][f"{gpu}_dram_us"] for k in kernels)
            predicted = sum(kernels[k][f"{gpu}_predicted_us"] for k in kernels)
            entry.update({f"{gpu}_dram_us": dram, f"{gpu}_predicted_us": predicted, f"{gpu}_x_dram": predicted / dram})
        entry["min_backward_ctas_per_sm"] = kernels["backward"]["ctas_per_sm"]
        entry["spill_bytes"] = sum(kernels[k]["spill_stack_bytes"] for k in kernels)
        combined.append(entry)
    return combined


def backward_plan_without_tail() -> Any:
    """The backward planned as before change 12 (head runs only), for a measurement side by side
    with the tail runs: a context in which the launcher's ``_backward_plan`` drops its tail."""
    plan = ops._backward_plan

    def head_runs_only(*args):
        head_run, _, _ = plan(*args)
        return head_run, 0, head_run

    return mock.patch.object(ops, "_backward_plan", head_runs_only)


def backward_without_prefetch() -> Any:
    """The backward without change 17's L2 prefetch of the next row block's x, for a measurement
    side by side with it: a context in which the launcher's ``_prefetches_next_x`` answers no."""
    return mock.patch.object(ops, "_prefetches_next_x", lambda one_d_block, k_pad: False)


def _kernel_launch(row: dict[str, Any], device: str = "cuda") -> Any:
    """A no-argument launch of ``row``'s kernel on tensors of its case (random values, the
    case's lengths), for timing: each kernel gets only its own inputs."""
    dtype, precision = DTYPES[row["dtype"]]
    batch_clusters_dim = (BATCH, row["K"], row["D"])
    centroids = torch.randn(row["K"], row["D"], device=device)
    if row["kernel"] == "grad_y":  # dL/dy in fp32, as under `normalize`
        grad_y = torch.randn(*batch_clusters_dim, device=device)
        assignment_sum = torch.rand(BATCH, row["K"], device=device) * FRAMES * row["G"] / row["K"]
        return lambda: ops.launch_grad_y_rounding_and_reductions(grad_y, centroids, assignment_sum, None, dtype)
    lengths = torch.tensor(paper_lengths(row["lengths"]), device=device)
    x = torch.randn(BATCH, FRAMES, row["G"], row["D"], device=device, dtype=dtype)
    logits = torch.randn(BATCH, FRAMES, row["G"], row["K"], device=device, dtype=dtype)
    attention = torch.randn(BATCH, FRAMES, row["G"], device=device, dtype=dtype)
    if row["kernel"] == "forward":
        return lambda: ops.launch_forward(x, logits, attention, lengths, centroids, dtype, precision)
    grad_y = torch.randn(*batch_clusters_dim, device=device, dtype=dtype)
    row_constant = torch.randn(BATCH, row["K"], device=device)
    return lambda: ops.launch_backward(x, logits, attention, lengths, grad_y, row_constant, precision)


def measure(rows: list[dict[str, Any]]) -> None:
    """With a CUDA GPU: time each case's kernel launch (triton.testing.do_bench) beside the model;
    the backward also without change 12's tail runs (``measured_no_tail_us``) and, where it loops
    over D blocks, without change 17's L2 prefetch (``measured_no_prefetch_us``), in the same run."""
    for row in rows:
        run = _kernel_launch(row)  # do_bench's first, untimed call compiles it
        row["measured_us"] = triton.testing.do_bench(run) * 1e3
        variants = ""
        if row["kernel"] == "backward":
            with backward_plan_without_tail():
                row["measured_no_tail_us"] = triton.testing.do_bench(run) * 1e3
            variants = f" (head runs only: {row['measured_no_tail_us']:.1f} us"
            if row["prefetches_to_l2"]:
                with backward_without_prefetch():
                    row["measured_no_prefetch_us"] = triton.testing.do_bench(run) * 1e3
                variants += f"; no L2 prefetch: {row['measured_no_prefetch_us']:.1f} us"
            variants += ")"
        print(f"{row['stream']} K={row['K']} {row['dtype']} {row['lengths']} {row['kernel']}: "
              f"measured {row['measured_us']:.1f} us{variants}, predicted H200 {row['h200_predicted_us']:.1f} us")


def run_model(streams: list[str], dtypes: list[str], lengths_kinds: list[str], clusters: list[int] | None,
              do_measure: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if ops.triton_interpreter_enabled():
        raise SystemExit("kernel_model.py needs Triton in compiled mode: unset TRITON_INTERPRET")
    rows = []
    for stream in (s for s in STREAMS if s.name in streams):
        for k in (k for k in stream.clusters if clusters is None or k in clusters):
            for dtype_name in dtypes:
                for kind in KERNELS:
                    code, usage, tile, family = compile_case(kind, dtype_name, k, stream.dim)
                    for lengths_kind in lengths_kinds:
                        rows.append(model_case(kind, stream, k, dtype_name, lengths_kind, code, usage, tile, family))
    if do_measure:
        measure(rows)
    return rows, combined_rows(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", choices=[s.name for s in STREAMS], default=[s.name for s in STREAMS])
    parser.add_argument("--clusters", nargs="+", type=int, default=None, help="only these K (default: the paper's)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"],
                        help="fp32 is the TF32 path (torch's default matmul precision off 'highest'); "
                             "fp32-ieee the exact one")
    parser.add_argument("--lengths", nargs="+", choices=["full", "120-300"], default=["full", "120-300"])
    parser.add_argument("--measure", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                        help="also time the kernels (default: when a CUDA GPU is present)")
    parser.add_argument("--output-dir", type=Path, default=SCRATCH_DIR,
                        help="default: a scratch folder, as for every benchmark (see _common)")
    parser.add_argument("--name", default="kernel_model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows, combined = run_model(args.streams, args.dtypes, args.lengths, args.clusters, args.measure)
    measured = ["measured_us", "measured_no_tail_us", "measured_no_prefetch_us"]
    columns = SUMMARY_COLUMNS + (measured if args.measure else [])
    meta = {**environment("cuda" if args.measure else "cpu"),
            "target": "sm_90, compiled with Triton's bundled ptxas; times are predictions"
                      + (" beside measurements" if args.measure else " (no GPU used)"),
            "batch": BATCH, "frames": FRAMES}
    paths = write_results(args.name, rows, meta, columns=columns, output_dir=args.output_dir)
    results = json.loads(paths["json"].read_text())
    results.update({"forward_plus_backward": combined, "assumptions": ASSUMPTIONS})
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    # the combined table and the assumptions, readable, after the per-kernel table
    with paths["md"].open("a") as markdown:
        markdown.write("\n## forward + backward\n\n" + markdown_table(combined))
        markdown.write("\n## assumptions\n\n" + "".join(f"- {line}\n" for line in ASSUMPTIONS))
    print(markdown_table(rows, columns))
    print(markdown_table(combined))
    print(f"wrote {paths['json']} and {paths['md']}")
    return rows


if __name__ == "__main__":
    main()
