"""Triton kernels of the residual aggregation and their launchers: the CUDA implementation of the
registered op ``nextvlad::residual_aggregation`` (CPU tensors run here only through Triton's
interpreter, ``TRITON_INTERPRET=1`` set before Triton is first imported: tests only, slow).

* forward: one program per (video, D block[, frame split]) loops over the video's real
  (frame, group) rows only, computes the soft assignment in registers and accumulates
  ``a^T x`` with ``tl.dot`` into fp32; it never writes the (B, M, G, K) assignment. It also
  returns ``a_sum`` (B, K), the only tensor saved besides the inputs.
* backward: one program per run of a video's row blocks recomputes the assignment (flash-attention style)
  and writes the row-local gradients of x, logits and attention, with the next row block's logits
  loaded ahead and (on NVIDIA GPUs) its x asked of L2 ahead. No atomics, so the result is
  deterministic for a given tile.
* dL/dy pass, before the backward: one program per cluster rounds dL/dy to x's dtype and takes the
  row constant and the centroid gradient from it, every sum inside one program.
* tiles come from tables checked by compiling for sm_90 without a GPU
  (``benchmarks/kernel_compile.py``); autotuning only with ``NEXTVLAD_AUTOTUNE=1``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .residual_aggregation_reference import compute_dtype


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (then CPU tensors work, slowly).

    Triton fixes the mode when ``triton.language`` is first imported (its own library functions
    are wrapped then), so ``TRITON_INTERPRET=1`` must be in the environment before anything imports
    Triton (Lightning does). The mode is read off Triton itself, not off today's environment.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


# Triton kernels
#
# Per video b the (frame, group) pairs are the rows r = i*G + g of X_b (M*G, D), of the logits
# (M*G, K) and of the attention (M*G,); the real frames are exactly the first lengths[b]*G rows, so
# every loop below runs over real rows only.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _round_to_bfloat16(values):
    """fp32 values rounded to the nearest bf16 (ties to even), as fp32: the GPU's conversion for
    finite values, in integer arithmetic. Only for the interpreter, whose own fp32 -> bf16
    conversion truncates (and would make the tests check a rounding the GPU never does)."""
    bits = values.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp_minus_row_max(logits):
    """exp(logits - row max) as exp2(logits * log2(e) - row max * log2(e)): one FFMA and one MUFU
    per element, where exp's own lowering needs a subtraction, a multiplication and the MUFU."""
    log2_e: tl.constexpr = 1.4426950408889634
    return tl.exp2(logits * log2_e - (tl.max(logits, axis=1) * log2_e)[:, None])


@triton.jit
def _gate_over_row_sum(attention, row_sum, row_valid, ONE_DIVISION: tl.constexpr):
    """sigmoid(attention) / row_sum, 0 on rows past the video's end: the per-row scale that turns
    the softmax's exponentials into the gated assignment (NOTES.md, change 18).

    exp(-attention) as exp2 of a pre-scaled value: tl.sigmoid's exp negated, scaled and
    range-checked it, 4 instructions per value on sm_90. ONE_DIVISION (half-type operands) takes
    1 / (row_sum (1 + exp(-attention))), one division per row where there were two, each with its
    range checks: the bf16 video forward loses 33 of 624 instructions per row block under Triton
    3.6. The fp32 tiles keep two: there the single division made the compiler compute the gate
    once per (row, thread) instead of once per row, and the TF32 K_PAD 128, D = 512 forward spilled.
    Very negative attention makes exp(-attention) inf and the scale 0, the sigmoid's limit."""
    minus_log2_e: tl.constexpr = -1.4426950408889634
    if ONE_DIVISION:
        return tl.where(row_valid, 1.0 / (row_sum * (1.0 + tl.exp2(attention * minus_log2_e))), 0.0)
    gate = tl.where(row_valid, 1.0 / (1.0 + tl.exp2(attention * minus_log2_e)), 0.0)
    return gate / row_sum


@triton.jit
def _x_row_offsets(rows, groups, x_stride_frame, x_stride_group, UNIFORM_X_ROWS: tl.constexpr):
    """Offsets of x's rows r = i*G + g within a video (see _uniform_x_rows)."""
    if UNIFORM_X_ROWS:
        return rows * x_stride_group
    return (rows // groups) * x_stride_frame + (rows % groups) * x_stride_group


@triton.jit
def _cluster_mask(offs_k, clusters, K_ALIGN: tl.constexpr):
    """offs_k < K. For K % 16 != 0 tested in blocks of K_ALIGN columns (see _cluster_alignment),
    the same values, so that the compiler sees the mask constant over each vector."""
    if K_ALIGN < 16:
        return (offs_k // K_ALIGN) < (clusters // K_ALIGN)
    return offs_k < clusters


@triton.jit
def _cluster_tile(base_ptr, video, rows_per_video, rows, clusters, offs_k, K_ALIGN: tl.constexpr):
    """Pointers to the (rows, K_PAD) tile of a video's (B, M, G, K) logits.

    Triton specialises an integer argument as divisible by 16 or not at all, so with K = 56 it
    cannot prove a bf16 row (112 bytes) 16-byte aligned and loaded the logits one 2-byte element at
    a time, synchronously, in every row-block trip of the forward. For K % 16 != 0 the row offsets
    are declared multiples of K_ALIGN; otherwise the address is computed exactly as before. (The
    backward keeps its scalar loads: vectorised, its loop shortens so that ptxas issues the next
    block's prefetch later and the model predicts a loss; NOTES.md, change 13.)"""
    if K_ALIGN < 16:
        return base_ptr + (tl.multiple_of((video * rows_per_video + rows) * clusters, K_ALIGN)[:, None]
                           + offs_k[None, :])
    return base_ptr + video * rows_per_video * clusters + rows[:, None] * clusters + offs_k[None, :]


@triton.jit
def _backward_d_block(features, grad_y, grad_y_t, assignment, grad_assignment, grad_x_ptrs, grad_x_mask,
                      DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One D block of the backward: stores grad_x = a gy for it and returns grad_a += x gy^T.
    ``grad_y_t`` is gy^T (BLOCK_D, K_PAD): tl.trans(grad_y), or gy loaded a second time, transposed
    (see the D loop)."""
    grad_assignment = tl.dot(features.to(DOT_DTYPE), grad_y_t.to(DOT_DTYPE), grad_assignment,
                             input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    grad_features = tl.dot(assignment.to(DOT_DTYPE), grad_y.to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                           out_dtype=ACC_DTYPE)
    tl.store(grad_x_ptrs, grad_features.to(grad_x_ptrs.dtype.element_ty), mask=grad_x_mask)
    return grad_assignment


@triton.jit
def residual_aggregation_forward_kernel(
    x_ptr, logits_ptr, attention_ptr, lengths_ptr, centroids_ptr, y_ptr, assignment_sum_ptr,
    partial_y_ptr, partial_sum_ptr, arrivals_ptr,
    max_frames, groups, clusters, dim, whole_videos, splits, partial_d_blocks,
    x_stride_video, x_stride_frame, x_stride_group,
    K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UNIFORM_X_ROWS: tl.constexpr,
    EVEN_K: tl.constexpr, K_ALIGN: tl.constexpr,
):
    """One program per (D block, video) of the first ``whole_videos`` videos, then one per (D block,
    frame split, video) of the others: y[b, :, d-block] and, from the first D block, a_sum[b, :].
    The later videos' frames are split over ``splits`` programs when the launcher has more SMs than
    whole waves of programs would keep busy (the last wave's videos, or every video of a small
    batch); their programs add up in this kernel, not in another launch (see the end).

    acc (K_PAD, BLOCK_D) += a^T (K_PAD, BLOCK_R) @ x (BLOCK_R, BLOCK_D) over the program's real
    rows; the soft assignment lives only in registers.

    Arguments (r = i*G + g indexes a video's (frame, group) rows):
      x_ptr: (B, M, G, D) features, any strides with a contiguous D axis (x_stride_*).
      logits_ptr: (B, M, G, K) contiguous cluster logits; attention_ptr: (B, M, G) contiguous
        attention logits (before the sigmoid); both in x's dtype.
      lengths_ptr: (B,) int64 real frames, clamped to [0, M] here.
      centroids_ptr: (K, D) contiguous centroids in the accumulator type.
      y_ptr: (B, K, D) output in its dtype; assignment_sum_ptr: (B, K) a_sum, accumulator type.
      partial_y_ptr: (B - whole_videos, splits, K, D) and partial_sum_ptr: (B - whole_videos,
        splits, partial_d_blocks, K): the split programs' a^T x and a_sum, accumulator type.
      arrivals_ptr: (B - whole_videos, partial_d_blocks) int32 zeros: split programs finished.
      max_frames, groups, clusters, dim: M, G, K, D; whole_videos, splits: see above;
        partial_d_blocks: D blocks the partial buffers have room for (>= cdiv(D, BLOCK_D)).
      K_PAD: K rounded up to a power of two >= 16; BLOCK_R x BLOCK_D: the row and feature tile.
      ACC_DTYPE: accumulator (fp32, fp64 for fp64 inputs); DOT_DTYPE: tl.dot operand type;
      INPUT_PRECISION: fp32 dot precision ("ieee"/"tf32", None for half types);
      UNIFORM_X_ROWS: x's rows have one stride (see _uniform_x_rows).
      EVEN_K: K == K_PAD. Then the cluster masks are compile-time true and vanish (NOTES.md, change
        9), and there are no padded columns to read as copies and weigh out of the row sum (change 18).
      K_ALIGN: the largest power of two dividing K, at most 16 (_cluster_alignment); below 16 the
        logits rows are declared aligned to it so that they load as vectors (_cluster_tile).
    """
    # Axis 0 enumerates (video[, split], D block), D blocks fastest: a video's D blocks run side by
    # side and share its logits in L2, and the batch is not limited to 65535 (CUDA's limit on axes
    # 1 and 2). The split videos come last, so that their shorter programs fill the last wave.
    d_blocks = tl.cdiv(dim, BLOCK_D)
    pid = tl.program_id(0)
    pid_d = pid % d_blocks  # whole_videos * d_blocks programs come first: a multiple of d_blocks
    in_tail = pid >= whole_videos * d_blocks
    tail_pid = tl.maximum(pid - whole_videos * d_blocks, 0) // d_blocks
    video = tl.where(in_tail, whole_videos + tail_pid // splits, pid // d_blocks).to(tl.int64)
    split = tl.where(in_tail, tail_pid % splits, 0)
    video_splits = tl.where(in_tail, splits, 1)
    rows_per_video = max_frames * groups
    # Clamped to [0, M] so memory stays in bounds even where validation was skipped (tracing).
    real_rows = tl.minimum(tl.maximum(tl.load(lengths_ptr + video), 0), max_frames).to(tl.int32) * groups
    # A split video's real rows (not its M*G) are shared out in whole row blocks.
    rows_per_split = tl.cdiv(tl.cdiv(real_rows, video_splits), BLOCK_R) * BLOCK_R
    row_begin = split * rows_per_split
    row_end = tl.minimum(real_rows, row_begin + rows_per_split)

    offs_k = tl.arange(0, K_PAD)
    if EVEN_K:
        k_valid = tl.full((K_PAD,), 1, tl.int1)
        logit_columns = offs_k
    else:
        k_valid = _cluster_mask(offs_k, clusters, K_ALIGN)
        # Padded columns read a copy of a real one (k mod K, in runs of K_ALIGN as the real columns):
        # the row max is unchanged and the loop needs no -inf select per element (see the row sum).
        logit_columns = tl.max_contiguous(tl.multiple_of(offs_k % clusters, K_ALIGN), K_ALIGN)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = offs_d < dim
    offs_r = tl.arange(0, BLOCK_R)

    x_video = x_ptr + video * x_stride_video
    attention_video = attention_ptr + video * rows_per_video

    acc = tl.zeros((K_PAD, BLOCK_D), dtype=ACC_DTYPE)
    # With half-type operands (no fp32 precision to choose) a_sum = a^T 1 is one more small MMA per
    # row block, as the first column of a^T [1 0 ... 0], instead of a column reduction across
    # threads that took a quarter of the loop's instructions (NOTES.md, change 10). Its operand is
    # the main dot's, so a_sum is exactly as rounded as the a that multiplies x. Not for fp32/fp64:
    # exact dots are FMAs, and under TF32 it saved no instructions but cost registers (a second CTA
    # per SM for the audio stream under Triton 3.6).
    TENSOR_CORE_SUM: tl.constexpr = INPUT_PRECISION != "ieee" and INPUT_PRECISION != "tf32"
    if TENSOR_CORE_SUM:
        assignment_sum_acc = tl.zeros((K_PAD, 16), dtype=ACC_DTYPE)
        first_column = tl.broadcast_to((tl.arange(0, 16) == 0)[None, :], (BLOCK_R, 16))
        ones_column = tl.where(first_column, 1.0, 0.0).to(DOT_DTYPE)
    else:
        assignment_sum = tl.zeros((K_PAD,), dtype=ACC_DTYPE)
    # The attention is loaded one row block ahead: Triton's pipeliner copies the logits and x
    # asynchronously, but not this (BLOCK_R,) vector, whose synchronous load would otherwise stall
    # every trip (benchmarks/NOTES.md).
    next_attention = tl.load(attention_video + row_begin + offs_r, mask=row_begin + offs_r < row_end, other=0.0)
    for row_start in range(row_begin, row_end, BLOCK_R):
        rows = row_start + offs_r
        row_valid = rows < row_end
        attention = next_attention
        next_attention = tl.load(attention_video + rows + BLOCK_R, mask=rows + BLOCK_R < row_end, other=0.0)
        # Soft assignment a = sigmoid(attention) * softmax_K(logits); rows past the video's end
        # get gate 0. Padded K columns hold copies of real ones: they leave the row max as it is,
        # are left out of the row sum by a 0 weight (an FFMA where the sum had an FADD), and their
        # a (non-zero) reaches only a^T x's and a_sum's padded rows, which are never stored.
        logits = tl.load(_cluster_tile(logits_ptr, video, rows_per_video, rows, clusters, logit_columns, K_ALIGN),
                         mask=row_valid[:, None], other=0.0).to(ACC_DTYPE)
        unnormalised = _exp_minus_row_max(logits)
        if EVEN_K:
            row_sum = tl.sum(unnormalised, axis=1)
        else:
            row_sum = tl.sum(unnormalised * k_valid.to(ACC_DTYPE)[None, :], axis=1)
        scale = _gate_over_row_sum(attention.to(ACC_DTYPE), row_sum, row_valid, ONE_DIVISION=TENSOR_CORE_SUM)
        assignment = unnormalised * scale[:, None]

        x_rows = _x_row_offsets(rows, groups, x_stride_frame, x_stride_group, UNIFORM_X_ROWS)
        features = tl.load(
            x_video + x_rows[:, None] + offs_d[None, :],
            mask=row_valid[:, None] & d_valid[None, :], other=0.0,
        )
        # a_sum from the assignment as the dot sees it (rounded to x's dtype): y subtracts
        # a_sum * c from a^T x, and with features of a large mean (x ~ c) any mismatch between
        # the two is not cancelled (2e-2 relative error in bf16 instead of 1e-3: see
        # test_triton_interpreter_assignment_sum_matches_the_rounded_dot).
        if x_ptr.dtype.element_ty == tl.bfloat16 and DOT_DTYPE == tl.float32:  # the interpreter: _dot_dtype
            assignment = _round_to_bfloat16(assignment)
        assignment_t = tl.trans(assignment.to(DOT_DTYPE))
        # out_dtype as the accumulator's: Triton 3.6 (the GPU image's) defaults it to fp32 and
        # rejects an fp64 accumulator (3.9 infers it).
        acc = tl.dot(assignment_t, features.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if TENSOR_CORE_SUM:
            assignment_sum_acc = tl.dot(assignment_t, ones_column, assignment_sum_acc, input_precision=INPUT_PRECISION)
        else:
            assignment_sum += tl.sum(assignment, axis=0)

    if TENSOR_CORE_SUM:
        assignment_sum = tl.sum(assignment_sum_acc, axis=1)  # the other columns are exact zeros

    tile_mask = k_valid[:, None] & d_valid[None, :]
    y_offsets = offs_k[:, None] * dim + offs_d[None, :]
    if video_splits == 1:
        _store_output(acc, assignment_sum, centroids_ptr, y_ptr, assignment_sum_ptr, video, pid_d, clusters, dim,
                      y_offsets, tile_mask, offs_k, k_valid, ACC_DTYPE)
    else:
        _add_up_splits(acc, assignment_sum, partial_y_ptr, partial_sum_ptr, arrivals_ptr, centroids_ptr, y_ptr,
                       assignment_sum_ptr, video, whole_videos, split, video_splits, pid_d, partial_d_blocks, clusters,
                       dim, y_offsets, tile_mask, offs_k, k_valid, ACC_DTYPE)


@triton.jit
def _store_output(acc, assignment_sum, centroids_ptr, y_ptr, assignment_sum_ptr, video, pid_d, clusters, dim,
                  y_offsets, tile_mask, offs_k, k_valid, ACC_DTYPE: tl.constexpr):
    """y[video, :, d-block] = a^T x - a_sum c, and a_sum[video] from the first D block."""
    centroids = tl.load(centroids_ptr + y_offsets, mask=tile_mask, other=0.0).to(ACC_DTYPE)
    y = acc - assignment_sum[:, None] * centroids
    tl.store(y_ptr + video * clusters * dim + y_offsets, y.to(y_ptr.dtype.element_ty), mask=tile_mask)
    if pid_d == 0:
        tl.store(assignment_sum_ptr + video * clusters + offs_k, assignment_sum, mask=k_valid)


@triton.jit
def _add_up_splits(acc, assignment_sum, partial_y_ptr, partial_sum_ptr, arrivals_ptr, centroids_ptr, y_ptr,
                   assignment_sum_ptr, video, whole_videos, split, splits, pid_d, partial_d_blocks, clusters, dim,
                   y_offsets, tile_mask, offs_k, k_valid, ACC_DTYPE: tl.constexpr):
    """A split program's end: it stores its a^T x and a_sum, and the last of the video's splits to
    arrive (for this D block) adds them all up and alone writes y.

    In place of a separate reduction launch (two, with the cast to y's dtype, and a read of every
    partial by another kernel). The sum runs in split order whoever arrives last, so the result is
    deterministic. Ordering: every thread's stores, then a CTA barrier, then one acq_rel atomic at
    GPU scope (Triton issues a scalar atomic from one thread and broadcasts its result); the last
    program's loads come after that atomic and bypass L1 (.cg), which is not coherent across SMs.
    """
    tail_video = video - whole_videos
    partial_y = partial_y_ptr + tail_video * splits * clusters * dim + y_offsets
    partial_sum = partial_sum_ptr + (tail_video * splits * partial_d_blocks + pid_d) * clusters + offs_k
    tl.store(partial_y + split * clusters * dim, acc, mask=tile_mask)
    tl.store(partial_sum + split * partial_d_blocks * clusters, assignment_sum, mask=k_valid)
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + tail_video * partial_d_blocks + pid_d, 1, sem="acq_rel", scope="gpu")
    if arrived == splits - 1:
        # The first split's partials start the sums: 6 registers fewer than zeros plus every split
        # in the bf16 video forward on sm_90.
        acc = tl.load(partial_y, mask=tile_mask, other=0.0, cache_modifier=".cg")
        assignment_sum = tl.load(partial_sum, mask=k_valid, other=0.0, cache_modifier=".cg")
        for index in range(1, splits):
            acc += tl.load(partial_y + index * clusters * dim, mask=tile_mask, other=0.0, cache_modifier=".cg")
            assignment_sum += tl.load(partial_sum + index * partial_d_blocks * clusters, mask=k_valid, other=0.0,
                                      cache_modifier=".cg")
        _store_output(acc, assignment_sum, centroids_ptr, y_ptr, assignment_sum_ptr, video, pid_d, clusters, dim,
                      y_offsets, tile_mask, offs_k, k_valid, ACC_DTYPE)


@triton.jit
def _prefetch_rows_to_l2(row_ptrs, dim, LINE: tl.constexpr):
    """Asks L2 for every 128-byte line of the rows starting at ``row_ptrs`` (``dim`` elements each),
    without waiting or holding a register: PTX ``prefetch.global.L2``, ``LINE`` elements apart. A
    hint: it changes no value (a row that does not start on a line boundary may miss its last
    line), and only the compiled kernels issue it (the interpreter has no inline PTX)."""
    for start in range(0, dim, LINE):
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [row_ptrs + start],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def residual_aggregation_backward_kernel(
    x_ptr, logits_ptr, attention_ptr, lengths_ptr, grad_y_ptr, grad_y_dot_centroids_ptr,
    grad_x_ptr, grad_logits_ptr, grad_attention_ptr,
    max_frames, groups, clusters, dim, batch, head_run, tail_blocks, tail_run,
    x_stride_video, x_stride_frame, x_stride_group,
    K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UNIFORM_X_ROWS: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr, PREFETCH_NEXT_X: tl.constexpr,
):
    """One program per (video, run of row blocks), on axis 0 (any batch fits CUDA's grid); the
    program walks its row blocks in order. Every gradient here is local to a (frame, group) row.
    Each video's row blocks are cut into head runs of ``head_run`` blocks and, over its last
    ``tail_blocks``, shorter tail runs of ``tail_run``: every video's head runs come first (a
    video's side by side, so they share its dL/dy in L2), then every video's tail runs, so the
    GPU's last programs are short ones that even out the waves (see _backward_plan).

    With s = sigmoid(attention), p = softmax(logits), a = s p and gy = dL/dy[b]:
      grad_x = a @ gy
      grad_a[r,k] = (x @ gy^T)[r,k] - sum_d gy[k,d] c[k,d]      (the last term is precomputed)
      q = sum_k p grad_a;  grad_attention = q s (1 - s);  grad_logits = s p (grad_a - q)
    The assignment is recomputed from the logits (flash-attention style), never stored.
    Row blocks wholly past the video's end only write zeros.

    Arguments as in the forward kernel, plus:
      batch: B; head_run, tail_blocks, tail_run: the runs above, in BLOCK_R-row blocks (a
        video's last head or tail run may be shorter; tail_blocks is clamped to the video's row
        blocks, 0: head runs only).
      ONE_D_BLOCK: D <= BLOCK_D. Then dL/dy[b] is loaded once per program and kept on chip, and
        x is loaded a row block ahead with the logits, so no trip waits for memory.
      PREFETCH_NEXT_X: (D loop only) ask L2 for the next row block's x while this one is
        computed (_prefetch_rows_to_l2), so that the D loop's first copies, which each row block
        waits for, come from L2 rather than DRAM (benchmarks/NOTES.md, change 17).
      grad_y_ptr: (B, K, D) contiguous dL/dy in x's dtype.
      grad_y_dot_centroids_ptr: (B, K) in the accumulator type, subtracted from every row's
        grad_a: sum_d gy[k,d] c[k,d] minus dL/da_sum[b,k] (zero unless a_sum itself has a gradient).
      grad_x_ptr (B, M, G, D) contiguous, grad_logits_ptr (B, M, G, K), grad_attention_ptr
        (B, M, G): outputs in x's dtype, every row written (zeros past the video's end).
    """
    rows_per_video = max_frames * groups
    row_blocks = tl.cdiv(rows_per_video, BLOCK_R)
    tail_blocks = tl.minimum(tail_blocks, row_blocks)
    head_blocks = row_blocks - tail_blocks
    head_programs = batch * tl.cdiv(head_blocks, head_run)
    in_tail = tl.program_id(0) >= head_programs
    index = tl.where(in_tail, tl.program_id(0) - head_programs, tl.program_id(0))
    runs_per_video = tl.where(in_tail, tl.cdiv(tail_blocks, tail_run), tl.cdiv(head_blocks, head_run))
    run_length = tl.where(in_tail, tail_run, head_run)
    first_block = tl.where(in_tail, head_blocks, 0) + (index % runs_per_video) * run_length
    end_block = tl.minimum(first_block + run_length, tl.where(in_tail, row_blocks, head_blocks))
    video = (index // runs_per_video).to(tl.int64)
    # Clamped to [0, M] so memory stays in bounds even where validation was skipped (tracing).
    real_rows = tl.minimum(tl.maximum(tl.load(lengths_ptr + video), 0), max_frames).to(tl.int32) * groups
    # this program's blocks holding real rows come first, then those wholly past the video's end
    real_end_block = tl.maximum(first_block, tl.minimum(end_block, tl.cdiv(real_rows, BLOCK_R)))

    offs_k = tl.arange(0, K_PAD)
    k_valid = offs_k < clusters
    offs_r = tl.arange(0, BLOCK_R)
    x_video = x_ptr + video * x_stride_video
    grad_x_video = grad_x_ptr + video * rows_per_video * dim
    logits_video = video * rows_per_video * clusters
    attention_video = video * rows_per_video
    grad_y_video = grad_y_ptr + video * clusters * dim
    grad_y_dot_centroids = tl.load(grad_y_dot_centroids_ptr + video * clusters + offs_k,
                                   mask=k_valid, other=0.0).to(ACC_DTYPE)

    # The logits and attention of the next row block are loaded while this one is computed, so
    # only the first block of a program waits for them (benchmarks/NOTES.md, change 4). The first
    # block's loads are bounded by the video's padded rows, not its real ones, so that they do not
    # wait for the lengths: one round trip brings both (change 14). Their values past the video's
    # end, whatever they are (NaN in padding), are replaced in the loop before any arithmetic.
    rows = first_block * BLOCK_R + offs_r
    in_video = rows < rows_per_video
    next_logits = tl.load(logits_ptr + logits_video + rows[:, None] * clusters + offs_k[None, :],
                          mask=in_video[:, None] & k_valid[None, :], other=0.0)
    next_attention = tl.load(attention_ptr + attention_video + rows, mask=in_video, other=0.0)
    if ONE_D_BLOCK:
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < dim
        grad_y_block = tl.load(grad_y_video + offs_k[:, None] * dim + offs_d[None, :],
                               mask=k_valid[:, None] & d_valid[None, :], other=0.0)
        x_rows = _x_row_offsets(rows, groups, x_stride_frame, x_stride_group, UNIFORM_X_ROWS)
        next_features = tl.load(x_video + x_rows[:, None] + offs_d[None, :],
                                mask=in_video[:, None] & d_valid[None, :], other=0.0)
    for block in range(first_block, real_end_block):
        rows = block * BLOCK_R + offs_r
        row_in_video = rows < rows_per_video
        row_valid = rows < real_rows
        logits = tl.where(k_valid[None, :], tl.where(row_valid[:, None], next_logits.to(ACC_DTYPE), 0.0),
                          float("-inf"))
        sigmoid = tl.sigmoid(next_attention.to(ACC_DTYPE))
        next_rows = rows + BLOCK_R
        next_valid = next_rows < real_rows
        next_logits = tl.load(logits_ptr + logits_video + next_rows[:, None] * clusters + offs_k[None, :],
                              mask=next_valid[:, None] & k_valid[None, :], other=0.0)
        next_attention = tl.load(attention_ptr + attention_video + next_rows, mask=next_valid, other=0.0)
        if PREFETCH_NEXT_X:
            # rows past the video's end ask for its last real row again (already there)
            prefetch_rows = tl.minimum(next_rows, tl.maximum(real_rows - 1, 0))
            _prefetch_rows_to_l2(x_video + _x_row_offsets(prefetch_rows, groups, x_stride_frame, x_stride_group,
                                                          UNIFORM_X_ROWS),
                                 dim, 1024 // x_ptr.dtype.element_ty.primitive_bitwidth)

        if ONE_D_BLOCK:
            features = tl.where(row_valid[:, None], next_features, 0.0)
            x_rows = _x_row_offsets(next_rows, groups, x_stride_frame, x_stride_group, UNIFORM_X_ROWS)
            next_features = tl.load(x_video + x_rows[:, None] + offs_d[None, :],
                                    mask=next_valid[:, None] & d_valid[None, :], other=0.0)

        unnormalised = _exp_minus_row_max(logits)
        probabilities = unnormalised * (1.0 / tl.sum(unnormalised, axis=1))[:, None]
        gate = tl.where(row_valid, sigmoid, 0.0)
        assignment = probabilities * gate[:, None]

        grad_assignment = tl.zeros((BLOCK_R, K_PAD), dtype=ACC_DTYPE)
        if ONE_D_BLOCK:
            grad_assignment = _backward_d_block(
                features, grad_y_block, tl.trans(grad_y_block), assignment, grad_assignment, grad_x_video + rows[:, None] * dim + offs_d[None, :],
                row_in_video[:, None] & d_valid[None, :], DOT_DTYPE, INPUT_PRECISION, ACC_DTYPE)
        else:
            x_rows = _x_row_offsets(rows, groups, x_stride_frame, x_stride_group, UNIFORM_X_ROWS)
            for d_start in range(0, dim, BLOCK_D):
                offs_d = d_start + tl.arange(0, BLOCK_D)
                d_valid = offs_d < dim
                features = tl.load(x_video + x_rows[:, None] + offs_d[None, :],
                                   mask=row_valid[:, None] & d_valid[None, :], other=0.0)
                grad_y = tl.load(grad_y_video + offs_k[:, None] * dim + offs_d[None, :],
                                 mask=k_valid[:, None] & d_valid[None, :], other=0.0)
                if DOT_DTYPE == tl.float32 and INPUT_PRECISION != "ieee" and K_PAD * BLOCK_D <= 8192:
                    # TF32: dL/dy once more, transposed (from L2). TF32 tensor-core operands cannot
                    # be read transposed from shared memory, so with tl.trans(grad_y) Triton's
                    # pipeliner loaded dL/dy synchronously, a stall in every trip; two tiles of one
                    # use each are copied asynchronously (benchmarks/NOTES.md, change 7). Not for
                    # half types (one shared copy is asynchronous already), exact fp32 (FMA dots
                    # read registers) or tiles whose copies would not fit shared memory (K = 512).
                    # The interpreter (fp32 dots for bf16, no precision) runs this branch.
                    grad_y_t = tl.load(grad_y_video + offs_k[None, :] * dim + offs_d[:, None],
                                       mask=k_valid[None, :] & d_valid[:, None], other=0.0)
                else:
                    grad_y_t = tl.trans(grad_y)
                grad_assignment = _backward_d_block(
                    features, grad_y, grad_y_t, assignment, grad_assignment, grad_x_video + rows[:, None] * dim + offs_d[None, :],
                    row_in_video[:, None] & d_valid[None, :], DOT_DTYPE, INPUT_PRECISION, ACC_DTYPE)

        grad_assignment -= grad_y_dot_centroids[None, :]
        weighted = tl.sum(probabilities * grad_assignment, axis=1)
        grad_attention = tl.where(row_valid, weighted * sigmoid * (1.0 - sigmoid), 0.0)
        grad_logits = gate[:, None] * probabilities * (grad_assignment - weighted[:, None])
        tl.store(grad_logits_ptr + logits_video + rows[:, None] * clusters + offs_k[None, :],
                 grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=row_in_video[:, None] & k_valid[None, :])
        tl.store(grad_attention_ptr + attention_video + rows,
                 grad_attention.to(grad_attention_ptr.dtype.element_ty), mask=row_in_video)

    for block in range(real_end_block, end_block):  # wholly past the video's end: zeros
        rows = block * BLOCK_R + offs_r
        row_in_video = rows < rows_per_video
        for d_start in range(0, dim, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D)
            tl.store(grad_x_video + rows[:, None] * dim + offs_d[None, :],
                     tl.zeros((BLOCK_R, BLOCK_D), dtype=grad_x_ptr.dtype.element_ty),
                     mask=row_in_video[:, None] & (offs_d < dim)[None, :])
        tl.store(grad_logits_ptr + logits_video + rows[:, None] * clusters + offs_k[None, :],
                 tl.zeros((BLOCK_R, K_PAD), dtype=grad_logits_ptr.dtype.element_ty),
                 mask=row_in_video[:, None] & k_valid[None, :])
        tl.store(grad_attention_ptr + attention_video + rows,
                 tl.zeros((BLOCK_R,), dtype=grad_attention_ptr.dtype.element_ty), mask=row_in_video)


@triton.jit
def _grad_y_step_rows(video_start, batch, clusters, cluster, BLOCK_V: tl.constexpr):
    """The (b, k) rows of the (B, K) tensors for the BLOCK_V videos from ``video_start``, and
    which of them are in the batch."""
    videos = video_start + tl.arange(0, BLOCK_V)
    return videos.to(tl.int64) * clusters + cluster, videos < batch


@triton.jit
def _grad_y_step_loads(grad_y_ptr, assignment_sum_ptr, grad_assignment_sum_ptr, video_start, batch, clusters, dim,
                       cluster, offs_d, d_valid, BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       HAS_GRAD_ASSIGNMENT_SUM: tl.constexpr):
    """dL/dy[b, k, :], a_sum[b, k] and dL/da_sum[b, k] (zero without it) of the BLOCK_V videos from
    ``video_start``, in the accumulator type; zeros past the batch."""
    rows, v_valid = _grad_y_step_rows(video_start, batch, clusters, cluster, BLOCK_V)
    mask = v_valid[:, None] & d_valid[None, :]
    grad_y = tl.load(grad_y_ptr + rows[:, None] * dim + offs_d[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    assignment_sum = tl.load(assignment_sum_ptr + rows, mask=v_valid, other=0.0).to(ACC_DTYPE)
    if HAS_GRAD_ASSIGNMENT_SUM:
        grad_assignment_sum = tl.load(grad_assignment_sum_ptr + rows, mask=v_valid, other=0.0).to(ACC_DTYPE)
    else:
        grad_assignment_sum = tl.zeros((BLOCK_V,), dtype=ACC_DTYPE)
    return grad_y, assignment_sum, grad_assignment_sum


@triton.jit
def grad_y_rounding_and_reductions_kernel(
    grad_y_ptr, centroids_ptr, assignment_sum_ptr, grad_assignment_sum_ptr,
    grad_y_rounded_ptr, row_constant_ptr, grad_centroids_ptr,
    batch, clusters, dim,
    BLOCK_V: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, STORE_ROUNDED: tl.constexpr,
    ROUND_BY_BITS: tl.constexpr, HAS_GRAD_ASSIGNMENT_SUM: tl.constexpr,
):
    """One program per cluster k, before the backward kernel, in one read of dL/dy: dL/dy rounded
    to x's dtype (the operand of the backward's dots), the row constant
    sum_d gy_r[b,k,d] c[k,d] - dL/da_sum[b,k] from those rounded values, and the centroid
    gradient dL/dc[k,:] = -sum_b a_sum[b,k] gy[b,k,:] from the exact dL/dy.

    A program owns all of cluster k's (b, :) rows, so both reductions end inside it: the row
    constant sums over D within a row, the centroid gradient over the videos in program order. No
    atomics, no partial sums, deterministic. In PyTorch the rounding and the row constant took a
    cast, a second cast back to fp32 and an einsum, and the centroid gradient one more einsum over
    dL/dy: five launches and more than three times the bytes of this one (NOTES.md, changes 8 and
    19).

    Arguments:
      grad_y_ptr: (B, K, D) contiguous dL/dy (y's dtype); centroids_ptr: (K, D) contiguous, in the
        accumulator type; assignment_sum_ptr: (B, K) a_sum from the forward, accumulator type;
        grad_assignment_sum_ptr: (B, K) dL/da_sum (read only when HAS_GRAD_ASSIGNMENT_SUM).
      grad_y_rounded_ptr: (B, K, D) output in x's dtype, written only when STORE_ROUNDED (dL/dy
        is not in x's dtype already); row_constant_ptr: (B, K) and grad_centroids_ptr: (K, D)
        outputs in the accumulator type.
      batch, clusters, dim: B, K, D. BLOCK_V: videos per step; D_PAD: D rounded up to a power of
        two (a step's tile is (BLOCK_V, D_PAD): every row whole).
      ROUND_BY_BITS: round to bf16 with _round_to_bfloat16 (the interpreter, whose own conversion
        truncates; the GPU's rounds to nearest even, as torch does).
    """
    cluster = tl.program_id(0)
    offs_d = tl.arange(0, D_PAD)
    d_valid = offs_d < dim
    centroids = tl.load(centroids_ptr + cluster * dim + offs_d, mask=d_valid, other=0.0).to(ACC_DTYPE)
    # Per (video slot, d) sums, added up over the slots once at the end: no reduction across warps
    # inside the loop.
    grad_centroids = tl.zeros((BLOCK_V, D_PAD), dtype=ACC_DTYPE)
    # Each step's loads are issued two steps ahead (the rows after next load while these are
    # reduced), so that a step waits for less than a round trip (where ptxas puts them decides
    # how much less: NOTES.md, change 19).
    grad_y, assignment_sum, grad_assignment_sum = _grad_y_step_loads(
        grad_y_ptr, assignment_sum_ptr, grad_assignment_sum_ptr, 0, batch, clusters, dim, cluster, offs_d, d_valid,
        BLOCK_V, ACC_DTYPE, HAS_GRAD_ASSIGNMENT_SUM)
    next_grad_y, next_assignment_sum, next_grad_assignment_sum = _grad_y_step_loads(
        grad_y_ptr, assignment_sum_ptr, grad_assignment_sum_ptr, BLOCK_V, batch, clusters, dim, cluster, offs_d,
        d_valid, BLOCK_V, ACC_DTYPE, HAS_GRAD_ASSIGNMENT_SUM)
    for video_start in range(0, batch, BLOCK_V):
        rows, v_valid = _grad_y_step_rows(video_start, batch, clusters, cluster, BLOCK_V)
        offsets = rows[:, None] * dim + offs_d[None, :]
        mask = v_valid[:, None] & d_valid[None, :]
        later_grad_y, later_assignment_sum, later_grad_assignment_sum = _grad_y_step_loads(
            grad_y_ptr, assignment_sum_ptr, grad_assignment_sum_ptr, video_start + 2 * BLOCK_V, batch, clusters, dim,
            cluster, offs_d, d_valid, BLOCK_V, ACC_DTYPE, HAS_GRAD_ASSIGNMENT_SUM)
        if ROUND_BY_BITS:
            rounded = _round_to_bfloat16(grad_y.to(tl.float32)).to(ACC_DTYPE)
        else:
            rounded = grad_y.to(grad_y_rounded_ptr.dtype.element_ty).to(ACC_DTYPE)
        if STORE_ROUNDED:
            tl.store(grad_y_rounded_ptr + offsets, rounded.to(grad_y_rounded_ptr.dtype.element_ty), mask=mask)
        tl.store(row_constant_ptr + rows, tl.sum(rounded * centroids[None, :], axis=1) - grad_assignment_sum,
                 mask=v_valid)
        grad_centroids -= assignment_sum[:, None] * grad_y
        grad_y, assignment_sum, grad_assignment_sum = next_grad_y, next_assignment_sum, next_grad_assignment_sum
        next_grad_y, next_assignment_sum, next_grad_assignment_sum = (
            later_grad_y, later_assignment_sum, later_grad_assignment_sum)
    tl.store(grad_centroids_ptr + cluster * dim + offs_d, tl.sum(grad_centroids, axis=0), mask=d_valid)


# (BLOCK_R, BLOCK_D, num_warps) candidates by K_PAD and operand family. Every one compiles for
# sm_90 without register spills under Triton 3.9, except where noted (checked offline:
# triton.compile for GPUTarget("cuda", 90, 32) with 16-divisible strides, then `cuobjdump
# --dump-resource-usage`: benchmarks/kernel_compile.py). Under Triton 3.6 (the GPU image's) the
# defaults spill only where noted for 3.9 as well; three other backward candidates spill there
# (half K_PAD 128 (64, 128, 8) 72 bytes, half 256 (32, 64, 8) 16, exact fp32 64 (64, 32, 8) 16):
# with autotuning they are timed and lose. The first is the default; with NEXTVLAD_AUTOTUNE=1 all
# of them are autotuned once per (K, D, dtype). Every tl.dot dimension is at least 16.
_Tile = tuple[int, int, int]
_FORWARD_TILES: dict[str, dict[int, list[_Tile]]] = {
    "half": {
        16: [(64, 128, 4), (128, 128, 8), (64, 64, 4), (128, 64, 4)],
        64: [(64, 128, 8), (64, 64, 4), (128, 64, 8), (32, 128, 8), (128, 128, 8)],
        128: [(64, 128, 8), (64, 64, 8), (32, 128, 8), (128, 64, 8), (128, 128, 8)],
        256: [(32, 64, 8), (64, 32, 8), (64, 64, 8), (32, 32, 8)],
        512: [(16, 32, 16), (16, 32, 8), (16, 16, 16)],
    },
    "tf32": {
        16: [(64, 64, 4), (64, 128, 4)],
        64: [(64, 64, 8), (64, 64, 4), (64, 128, 8)],
        128: [(64, 64, 8), (32, 64, 8), (32, 128, 8)],
        256: [(32, 32, 8), (32, 64, 8)],
        512: [(16, 32, 8), (16, 16, 8)],
    },
    "ieee": {  # exact fp32 (FMA, no tensor cores): mostly for tests
        16: [(64, 64, 4), (32, 64, 4), (64, 128, 8)],
        64: [(64, 64, 8), (128, 32, 8), (64, 128, 8)],
        128: [(32, 64, 8), (64, 32, 8)],  # (64, 64, 8) spills 16 bytes
        # with the split sums (change 11) (16, 64, 8) spills 24 bytes under Triton 3.9, (32, 32, 4) 40
        # under 3.6; under 3.6 the 512 tile (16, 32, 8) spills 8
        256: [(16, 32, 8)],
        512: [(16, 16, 16)],
    },
}
_BACKWARD_TILES: dict[str, dict[int, list[_Tile]]] = {
    "half": {
        16: [(64, 64, 8), (128, 64, 8), (64, 128, 8), (64, 32, 8)],
        64: [(64, 64, 8), (128, 32, 8), (64, 128, 8), (128, 64, 8)],  # (32, 64, 8) spills 8 bytes
        128: [(64, 64, 8), (32, 64, 8), (64, 32, 8), (64, 128, 8)],
        256: [(16, 64, 8), (32, 64, 8)],
        512: [(16, 32, 8)],  # (16, 32, 16) spills 16 bytes since the backward walks row blocks
    },
    "tf32": {
        16: [(64, 64, 4)],  # (32, 64, 8) spills 8 bytes
        64: [(64, 64, 8), (32, 64, 8)],
        128: [(32, 64, 8)],  # (64, 64, 8) spills 96 bytes
        256: [(16, 64, 8), (16, 32, 8)],
        512: [(16, 32, 8)],  # spills 64-80 bytes on sm_90 (184 under Triton 3.6; 8 when a program had one row block)
    },
    "ieee": {
        16: [(32, 64, 8), (64, 32, 8)],
        64: [(32, 64, 8), (64, 32, 8), (32, 32, 8)],
        128: [(32, 32, 8), (32, 64, 8)],
        # spill-free under Triton 3.9 and 3.6 at K = 130, 200 and 256; (16, 32, 8) spills 16 bytes at
        # K = 130 / 200 under 3.9 and (16, 16, 8) 56 at K = 256 under 3.6
        256: [(16, 16, 16)],
        512: [(16, 16, 8), (16, 32, 8)],  # spill 24 / 48-80 bytes on sm_90 (16 / 24 when a program had one row block)
    },
}


def _whole_d_blocks(tile: _Tile, dim: int) -> bool:
    return dim % tile[1] == 0


def _one_d_block(tile: _Tile, dim: int) -> bool:
    return tile[1] // 2 < dim <= tile[1]


# Forward tiles that come first for some D only (the tables' order holds otherwise), with the
# test that admits them (checked offline under Triton 3.9 and 3.6):
# * TF32 K_PAD 128 (64, 128, 8) when D is a whole number of 128-wide blocks: the video stream's
#   D = 256 in two blocks instead of four, so the issue-bound TF32 forward computes each row's
#   softmax half as often. With a masked last D block it spills (about 150 bytes at D = 200);
#   spill-free at K = 65-128, D = 128-1024, strided x too (NOTES.md, change 15).
# * half K_PAD 64 (32, 64, 4) when D is one block of 64 (the audio stream): at most 128
#   registers, four CTAs per SM, under both Triton versions at K = 33-64, D = 33-64 (the 8-warp
#   default runs two or three), so the 480 programs of 160 videos in 3 frame splits fit one wave
#   of 528 slots instead of 1.21 or 1.82 waves (change 16). Narrower D is left to the table
#   (238-255 registers under 3.6 at K = 33).
_FORWARD_TILES_FOR_D: dict[str, dict[int, tuple[_Tile, Callable[[_Tile, int], bool]]]] = {
    "tf32": {128: ((64, 128, 8), _whole_d_blocks)},
    "half": {64: ((32, 64, 4), _one_d_block)},
}
# For K_PAD = 1024 no backward tile tried compiled for sm_90 without spills (the best bf16 one
# spills 240 bytes; BLOCK_R is already tl.dot's minimum of 16), so beyond 512 clusters "auto" runs
# the reference.
MAX_TRITON_CLUSTERS = 512
# At most one frame split per this many of a video's padded rows (the splits themselves share out
# its real rows in whole row blocks).
_SPLIT_ROW_ALIGNMENT = 128


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _padded_clusters(clusters: int) -> int:
    return max(16, _next_power_of_two(clusters))


def _cluster_alignment(clusters: int) -> int:
    """The largest power of two dividing K, at most 16 (K = 56 -> 8, 7 -> 1, 64 -> 16): the forward
    kernel's K_ALIGN."""
    return min(16, clusters & -clusters)


def _tile_family(dtype: torch.dtype, precision: str) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "ieee" if dtype == torch.float64 else precision


def _tiles(table: dict[str, dict[int, list[_Tile]]], family: str, k_pad: int, dim: int) -> list[_Tile]:
    """The candidate tiles for this K_PAD (the next listed size up), BLOCK_D clamped to D; first
    the forward's tile for this D where there is one (_FORWARD_TILES_FOR_D).

    With K_PAD >= 128 the backward kernel's BLOCK_D is clamped no lower than 64: for sm_90 its
    tensor-core tiles with BLOCK_D 16 or 32 there spill hundreds of bytes of registers (e.g. bf16
    K=256, D=16 with (16, 16, 8): 808 bytes), while the masked (BLOCK_R, 64) tiles compile
    spill-free. (With fewer clusters it is the other way round, e.g. K=7, D=24.)
    """
    by_k_pad = table[family]
    size = min(size for size in by_k_pad if size >= k_pad)
    candidates = by_k_pad[size]
    for_d = _FORWARD_TILES_FOR_D.get(family, {}).get(size) if table is _FORWARD_TILES else None
    if for_d is not None and for_d[1](for_d[0], dim):
        candidates = [for_d[0], *candidates]
    d_cap = max(64 if table is _BACKWARD_TILES and k_pad >= 128 else 16, _next_power_of_two(dim))
    return list(dict.fromkeys((rows, min(block_d, d_cap), warps) for rows, block_d, warps in candidates))


def _autotune_enabled(interpret: bool) -> bool:
    """Autotuning only on request (NEXTVLAD_AUTOTUNE=1): by default the first tile of each table
    runs, so every DDP rank and every rerun executes the same kernel and gets bitwise the same
    result. The interpreter has no timer, so it never autotunes."""
    return not interpret and os.environ.get("NEXTVLAD_AUTOTUNE", "0") == "1"


# Timer for the autotuner; None means Triton's own (CUDA events). Tests swap in a fake one.
_AUTOTUNE_TIMER: Any = None


_KERNELS = {"forward": residual_aggregation_forward_kernel, "backward": residual_aggregation_backward_kernel,
            "grad_y": grad_y_rounding_and_reductions_kernel}


@functools.cache
def _autotuned(kind: str, family: str, tiles: tuple[_Tile, ...]) -> Any:
    """One autotuner per kernel, operand family and candidate list (its cache is keyed on K, D and
    the tensors' dtypes)."""
    configs = [triton.Config({"BLOCK_R": rows, "BLOCK_D": block_d}, num_warps=warps) for rows, block_d, warps in tiles]
    timer = {} if _AUTOTUNE_TIMER is None else {"do_bench": _AUTOTUNE_TIMER}
    # The forward's split programs count their arrivals: each timed run must start from zeros, or
    # the chosen tile's own launch finds the counters full and no program writes y.
    reset = {"reset_to_zero": ["arrivals_ptr"]} if kind == "forward" else {}
    return triton.autotune(configs=configs, key=["clusters", "dim"], **timer, **reset)(_KERNELS[kind])


def _on_device(device: torch.device) -> Any:
    """Context for a launch on ``device``. Triton launches on the *current* CUDA device and stream,
    not on the tensors' device: without this, x on cuda:1 while cuda:0 is current (no
    torch.cuda.set_device) reads foreign addresses."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(kind: str, family: str, tiles: list[_Tile], grid: Any, *args: Any, **constexprs: Any) -> None:
    """Run ``kind`` ("forward"/"backward") with the default tile, or autotuned on request.

    ``grid`` maps the tile's meta-parameters (BLOCK_R, BLOCK_D) to the launch grid. The kernels go
    through ``torch.library.wrap_triton``, so that torch.compile (inside the registered op) traces
    the launch into its graph instead of breaking it.
    """
    interpret = triton_interpreter_enabled()
    with _on_device(args[0].device):
        if _autotune_enabled(interpret) and len(tiles) > 1:
            wrap_triton(_autotuned(kind, family, tuple(tiles)))[grid](*args, **constexprs)
        else:
            rows, block_d, warps = tiles[0]
            meta = {"BLOCK_R": rows, "BLOCK_D": block_d}
            wrap_triton(_KERNELS[kind])[grid(meta)](*args, **constexprs, **meta, num_warps=warps)


def _multiprocessors(device: torch.device) -> int | None:
    """The GPU's SM count; None off CUDA (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _forward_plan(batch: int, rows_per_video: int, d_blocks: int, multiprocessors: int | None) -> tuple[int, int]:
    """(whole_videos, splits): the forward runs the first ``whole_videos`` videos one program per D
    block and splits the frames of the others over ``splits`` programs each, so that the SMs are
    not left idle by a last, partial wave (the kernel adds the splits up itself).

    * small batches (fewer programs than two per SM, e.g. audio's 160 or inference): every video
      is split, the count chosen among those that give two programs per SM up to twice that as the
      one whose programs come closest to whole waves of 2 per SM (ties: fewer splits). 160 audio
      videos on 132 SMs take 3 (1.82 waves), not 2 (1.21 waves, 39% idle): NOTES.md, change 6.
    * larger batches: only the videos of the last, partial wave of SMs are split, as many ways as
      keep their programs within one wave of SMs. 160 video streams (320 programs, 2.42 waves on
      132 SMs) run 264 whole programs and 28 videos in halves: 2.5 waves of work instead of 3
      (NOTES.md, change 11).

    At most one split per _SPLIT_ROW_ALIGNMENT padded rows of a video.
    """
    if multiprocessors is None or batch == 0:  # B = 0: no programs to divide by
        return batch, 1
    programs = batch * d_blocks
    most = max(1, triton.cdiv(rows_per_video, _SPLIT_ROW_ALIGNMENT))
    slots = 2 * multiprocessors
    if programs < slots:
        fewest = triton.cdiv(slots, programs)
        candidates = range(min(fewest, most), min(2 * fewest, most) + 1)

        def idle_share(splits: int) -> float:
            waves = programs * splits / slots
            return 1 - waves / math.ceil(waves)

        tail, splits = batch, min(candidates, key=idle_share)
    else:
        tail = triton.cdiv(programs % multiprocessors, d_blocks)  # the last, partial wave's videos
        splits = min(most, multiprocessors // (tail * d_blocks)) if tail else 1
    return (batch - tail, splits) if splits > 1 else (batch, 1)


# Programs of the backward per SM that the head runs of _backward_plan aim at: enough for whole-ish
# waves, few enough that each program's first (unprefetched) row block is a small share of its work.
_BACKWARD_PROGRAMS_PER_SM = 4
# Head runs per tail run's length: tail runs a quarter as long end the launch with programs short
# enough to even out the waves, at one more round trip each (NOTES.md, change 12).
_TAIL_RUN_DIVISOR = 4
# Runs in the interpreter (no SMs to count): heads of three blocks and a tail of two single
# blocks, so that the tests walk the prefetching loop, both kinds of run, a video's short last
# run and runs wholly past a video's end.
_INTERPRETER_HEAD_RUN = 3
_INTERPRETER_TAIL_BLOCKS = 2


def _backward_plan(batch: int, row_blocks: int, d_blocks: int, multiprocessors: int | None) -> tuple[int, int, int]:
    """(head_run, tail_blocks, tail_run) of the backward, in row blocks of a video.

    Head runs keep about _BACKWARD_PROGRAMS_PER_SM programs per SM (160 videos of 38 blocks on
    132 SMs: runs of 10). Launched alone they end raggedly: 640 equal programs are 4.85 waves, and
    with videos of unequal lengths (unknown here: no host sync) runs range from 0 to 10 blocks of
    work. So each video's last blocks become tail runs a quarter as long, launched after every
    head run: as many blocks as give each SM one head run's worth of them to even the waves out
    with (132 x 10 / 160 -> 9 blocks, in runs of 3). No tail where a run is a single block, nor
    where D fits one block (``d_blocks`` 1, the audio stream): there a row block's work is about two
    DRAM round trips, and the tail's extra programs cost more than they even out (NOTES.md,
    change 12).
    """
    if batch == 0:
        return 1, 0, 1
    if multiprocessors is None:
        head_run, wanted_tail = min(row_blocks, _INTERPRETER_HEAD_RUN), _INTERPRETER_TAIL_BLOCKS
    else:
        programs_per_video = max(1, min(row_blocks, triton.cdiv(_BACKWARD_PROGRAMS_PER_SM * multiprocessors, batch)))
        head_run = triton.cdiv(row_blocks, programs_per_video)
        wanted_tail = triton.cdiv(multiprocessors * head_run, batch)
    tail_run = triton.cdiv(head_run, _TAIL_RUN_DIVISOR)
    tail_blocks = min(row_blocks - head_run, tail_run * triton.cdiv(wanted_tail, tail_run))
    if tail_run == head_run or tail_blocks <= 0 or d_blocks == 1:
        return head_run, 0, head_run
    return head_run, tail_blocks, tail_run


def _backward_programs(batch: int, row_blocks: int, plan: tuple[int, int, int]) -> int:
    """Programs of a backward launch by ``plan``, as the kernel maps them (tail clamped to the video)."""
    head_run, tail_blocks, tail_run = plan
    tail_blocks = min(tail_blocks, row_blocks)
    return batch * (triton.cdiv(row_blocks - tail_blocks, head_run) + triton.cdiv(tail_blocks, tail_run))


def _prefetches_next_x(one_d_block: bool, k_pad: int) -> bool:
    """Whether the backward asks L2 for the next row block's x (PREFETCH_NEXT_X): where it loops
    over D blocks (with one D block, x comes a block ahead in registers instead), not at K_PAD 512
    (its 16-row blocks' tiles are out of registers: the prefetch made the bf16 one spill 16 bytes
    under Triton 3.9), and only where Triton emits PTX: not in the interpreter, nor on ROCm (whose
    tensors also say is_cuda)."""
    return not one_d_block and k_pad < 512 and not triton_interpreter_enabled() and torch.version.hip is None


def _accumulator_dtype(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_dtype(dtype: torch.dtype, interpret: bool) -> Any:
    """Operand dtype of the tl.dot calls: the input dtype (tensor cores for fp16/bf16), except that
    the interpreter multiplies bf16 as raw uint16 bit patterns, so there bf16 is widened to fp32."""
    if interpret and dtype == torch.bfloat16:
        return tl.float32
    return getattr(tl, str(dtype).removeprefix("torch."))


def _dot_precision(dtype: torch.dtype, precision: str) -> str | None:
    """input_precision only means something for fp32 operands; fp64 dots are exact, and fp16/bf16
    keep Triton's default (tensor cores)."""
    if dtype == torch.float32:
        return precision
    return "ieee" if dtype == torch.float64 else None


def _x_strides(x: Tensor) -> tuple[int, int, int]:
    """x's (video, frame, group) strides, the group stride made the row stride when G = 1 (a size-1
    dimension's stride is arbitrary)."""
    stride_video, stride_frame, stride_group, _ = x.stride()
    return stride_video, stride_frame, stride_frame if x.shape[2] == 1 else stride_group


def _uniform_x_rows(x: Tensor) -> bool:
    """Whether x[b] viewed as (M*G, D) rows r = i*G + g has one row stride (x's frames hold their
    G*D features back to back, as in any contiguous x). Then the kernels address row r at
    r * stride without the division by G that the general case (a split of a wider GEMM output)
    needs, and compile exactly as for a contiguous x (the division costs registers: spills in a
    few tiles)."""
    _, stride_frame, stride_group = _x_strides(x)
    return stride_frame == x.shape[2] * stride_group


def _kernel_constants(x: Tensor, clusters: int, precision: str) -> dict[str, Any]:
    return {
        "UNIFORM_X_ROWS": _uniform_x_rows(x),
        "K_PAD": _padded_clusters(clusters),
        "ACC_DTYPE": _accumulator_dtype(x.dtype),
        "DOT_DTYPE": _dot_dtype(x.dtype, triton_interpreter_enabled()),
        "INPUT_PRECISION": _dot_precision(x.dtype, precision),
    }


def launch_forward(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, centroids: Tensor,
    out_dtype: torch.dtype, precision: str,
) -> tuple[Tensor, Tensor]:
    """y (B, K, D) in ``out_dtype`` and a_sum (B, K) in the compute dtype. x needs a contiguous
    feature axis; the other tensors must be contiguous, the centroids in the compute dtype."""
    batch, max_frames, groups, dim = x.shape
    clusters = logits.shape[3]
    compute = compute_dtype(x.dtype)
    family = _tile_family(x.dtype, precision)
    tiles = _tiles(_FORWARD_TILES, family, _padded_clusters(clusters), dim)
    d_blocks = [triton.cdiv(dim, block_d) for _, block_d, _ in tiles]  # the default's first
    whole_videos, splits = _forward_plan(batch, max_frames * groups, d_blocks[0], _multiprocessors(x.device))
    # y is allocated as (B, K, D) itself, never a view of a bigger buffer: autograd forbids in-place
    # ops on a custom Function's output that is a view.
    y = torch.empty((batch, clusters, dim), dtype=out_dtype, device=x.device)
    assignment_sum = torch.empty((batch, clusters), dtype=compute, device=x.device)
    # The split videos' partial sums (none when nothing is split), with room for any candidate
    # tile's D blocks (autotuning).
    split_videos, partial_d_blocks = batch - whole_videos, max(d_blocks)
    partial_y = torch.empty((split_videos, splits, clusters, dim), dtype=compute, device=x.device)
    partial_sum = torch.empty((split_videos, splits, partial_d_blocks, clusters), dtype=compute, device=x.device)
    arrivals = torch.zeros((split_videos, partial_d_blocks), dtype=torch.int32, device=x.device)
    if batch > 0:
        _launch(
            "forward", family, tiles,
            lambda meta: (triton.cdiv(dim, meta["BLOCK_D"]) * (whole_videos + split_videos * splits),),
            x, logits, attention, lengths, centroids, y, assignment_sum, partial_y, partial_sum, arrivals,
            max_frames, groups, clusters, dim, whole_videos, splits, partial_d_blocks, *_x_strides(x),
            **_kernel_constants(x, clusters, precision), EVEN_K=clusters == _padded_clusters(clusters),
            K_ALIGN=_cluster_alignment(clusters),
        )
    return y, assignment_sum


def launch_backward(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, grad_y: Tensor,
    grad_y_dot_centroids: Tensor, precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_x, grad_logits, grad_attention in x's dtype (see the backward kernel's arguments)."""
    batch, max_frames, groups, dim = x.shape
    clusters = logits.shape[3]
    # Every row is written by the kernel (zeros past each video's end), so no memset is needed.
    # grad_x is contiguous whatever x's strides (empty_like would copy a dense x's permutation).
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_logits = torch.empty_like(logits)
    grad_attention = torch.empty_like(attention)
    if batch > 0:
        family = _tile_family(x.dtype, precision)
        tiles = _tiles(_BACKWARD_TILES, family, _padded_clusters(clusters), dim)
        launched = tiles if _autotune_enabled(triton_interpreter_enabled()) else tiles[:1]
        # Planned for the default tile; an autotuned tile walks as many of its own blocks.
        plan = _backward_plan(batch, triton.cdiv(max_frames * groups, tiles[0][0]), triton.cdiv(dim, tiles[0][1]),
                              _multiprocessors(x.device))
        one_d_block = dim <= min(block_d for _, block_d, _ in launched)
        _launch(
            "backward", family, tiles,
            lambda meta: (_backward_programs(batch, triton.cdiv(max_frames * groups, meta["BLOCK_R"]), plan),),
            x, logits, attention, lengths, grad_y, grad_y_dot_centroids,
            grad_x, grad_logits, grad_attention,
            max_frames, groups, clusters, dim, batch, *plan, *_x_strides(x),
            **_kernel_constants(x, clusters, precision), ONE_D_BLOCK=one_d_block,
            PREFETCH_NEXT_X=_prefetches_next_x(one_d_block, _padded_clusters(clusters)),
        )
    return grad_x, grad_logits, grad_attention


# grad_y_rounding_and_reductions_kernel's warps and the elements of a step's (BLOCK_V, D_PAD)
# tile: 32 per thread, 32 KB of fp32 dL/dy a step and two steps' loads in flight per program,
# which with about one program per SM (K of them) is more than HBM needs in flight (NOTES.md,
# change 19).
GRAD_Y_WARPS = 8
_GRAD_Y_TILE = 8192


def grad_y_block_videos(dim: int) -> int:
    """BLOCK_V of grad_y_rounding_and_reductions_kernel: whole rows of D, as many as fill a tile
    (one when D_PAD alone exceeds it: that tile is D_PAD)."""
    return max(1, _GRAD_Y_TILE // _next_power_of_two(dim))


def launch_grad_y_rounding_and_reductions(
    grad_y: Tensor, centroids: Tensor, assignment_sum: Tensor, grad_assignment_sum: Tensor | None,
    x_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dy rounded to ``x_dtype``, contiguous; the (B, K) row constant; dL/dc (K, D)), the last
    two in the centroids' dtype, the accumulator type: see grad_y_rounding_and_reductions_kernel.
    dL/dy already in x's dtype is returned as is (made contiguous)."""
    grad_y, centroids = grad_y.contiguous(), centroids.contiguous()
    batch, clusters, dim = grad_y.shape
    store_rounded = grad_y.dtype != x_dtype
    grad_y_rounded = torch.empty(grad_y.shape, dtype=x_dtype, device=grad_y.device) if store_rounded else grad_y
    row_constant = torch.empty((batch, clusters), dtype=centroids.dtype, device=grad_y.device)
    grad_centroids = torch.empty_like(centroids)
    interpret = triton_interpreter_enabled()
    with _on_device(grad_y.device):
        wrap_triton(grad_y_rounding_and_reductions_kernel)[(clusters,)](
            grad_y, centroids, assignment_sum.contiguous(),
            # the centroids: also the unread pointer when there is no dL/da_sum
            grad_assignment_sum.contiguous() if grad_assignment_sum is not None else centroids,
            grad_y_rounded, row_constant, grad_centroids, batch, clusters, dim,
            BLOCK_V=grad_y_block_videos(dim), D_PAD=_next_power_of_two(dim),
            ACC_DTYPE=_accumulator_dtype(centroids.dtype),
            STORE_ROUNDED=store_rounded, ROUND_BY_BITS=interpret and x_dtype == torch.bfloat16,
            HAS_GRAD_ASSIGNMENT_SUM=grad_assignment_sum is not None, num_warps=GRAD_Y_WARPS,
        )
    return grad_y_rounded, row_constant, grad_centroids
