"""Masked, group-attended residual aggregation: the core of NeXtVLAD (paper eq. 5, 8 and 18).

One file per op (Liger-Kernel layout): input validation, the two PyTorch references, the Triton
kernels, their launchers and the autograd Function.

The op, with ``a[b,i,g,k] = sigmoid(attention[b,i,g]) * softmax_k(logits[b,i,g,:])[k]`` for real
frames ``i < lengths[b]`` and 0 for padded ones::

    y[b,k,d] = sum_{i,g} a[b,i,g,k] * (x[b,i,g,d] - centroids[k,d])
             = (A_b^T X_b)[k,d] - a_sum[b,k] * centroids[k,d]

where ``A_b`` is ``a[b]`` viewed as ``(M*G, K)`` and ``X_b`` is ``x[b]`` viewed as ``(M*G, D)``
(SPEC 3.1 steps 5-7). Accumulation is in fp32 (fp64 for fp64 inputs); ``y`` has ``x``'s dtype.

Triton backend (``ResidualAggregationFunction``):

* forward: one program per (video, D block[, frame split]) loops over the video's real
  (frame, group) rows only, computes the soft assignment in registers and accumulates
  ``a^T x`` with ``tl.dot`` into fp32; it never writes the (B, M, G, K) assignment. It also
  returns ``a_sum`` (B, K), the only tensor saved besides the inputs.
* backward: one program per (video, row block) recomputes the assignment (flash-attention style)
  and writes the row-local gradients of x, logits and attention; the centroid gradient
  ``-sum_b a_sum[b,k] dy[b,k,d]`` is a plain reduction over the saved ``a_sum``. No atomics, so
  the result is deterministic for a given tile.
* tiles come from tables checked by compiling for sm_90 without a GPU (``compile_for_gpu``,
  ``resource_usage``); on a GPU they are autotuned unless ``NEXTVLAD_AUTOTUNE=0``.
* ``normalize=True`` applies the intra-normalisation after the kernel, in fp32 (not fused: fusing
  pays only if measured faster, and no GPU has measured it yet).
* CPU tensors run through the Triton interpreter when Triton was imported with
  ``TRITON_INTERPRET=1`` (tests only; slow).
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

try:  # Triton is a Linux-only dependency; the reference backends work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

Backend = Literal["auto", "triton", "reference", "einsum"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "reference", "einsum")
PRECISIONS: tuple[str, ...] = ("ieee", "tf32")

# SPEC 3.1 step 8: tf.nn.l2_normalize puts the epsilon on the *squared* norm.
L2_NORMALIZE_EPSILON = 1e-12


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_rank(name: str, tensor: Tensor, rank: int, layout: str) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}")
    if tensor.dim() != rank:
        raise ValueError(
            f"{name} must have rank {rank} {layout}, got shape {tuple(tensor.shape)}"
        )


def _check_size(name: str, tensor: Tensor, dim: int, expected: int, what: str) -> None:
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{name}.shape[{dim}] must equal {what} = {expected}, got shape {tuple(tensor.shape)}"
        )


def validate_inputs(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, centroids: Tensor
) -> None:
    """Raise a ValueError naming the offending argument if the inputs do not fit the contract.

    ``x``, ``logits`` and ``attention`` must share one floating dtype (``y`` takes it);
    ``centroids`` may have any floating dtype (it is usually an fp32 master parameter while the
    activations are bf16 under autocast). Lengths must be integers in ``[0, M]``.
    """
    _check_rank("x", x, 4, "(B, M, G, D)")
    _check_rank("logits", logits, 4, "(B, M, G, K)")
    _check_rank("attention", attention, 3, "(B, M, G)")
    _check_rank("lengths", lengths, 1, "(B,)")
    _check_rank("centroids", centroids, 2, "(K, D)")
    batch, max_frames, groups, dim = x.shape
    clusters = logits.shape[3]
    for axis, what in enumerate(("B = x.shape[0]", "M = x.shape[1]", "G = x.shape[2]")):
        _check_size("logits", logits, axis, x.shape[axis], what)
        _check_size("attention", attention, axis, x.shape[axis], what)
    _check_size("lengths", lengths, 0, batch, "B = x.shape[0]")
    _check_size("centroids", centroids, 0, clusters, "K = logits.shape[3]")
    _check_size("centroids", centroids, 1, dim, "D = x.shape[3]")
    # One comparison per size, not min(): under torch.export, min() of the symbolic frame count
    # and the constant sizes would guard M against them (e.g. M >= 5 for G = 4).
    if max_frames < 1 or groups < 1 or dim < 1 or clusters < 1:
        raise ValueError(
            f"x and logits need M, G, D, K >= 1, got x {tuple(x.shape)}, logits {tuple(logits.shape)}"
        )

    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")
    for name, tensor in (("logits", logits), ("attention", attention)):
        if tensor.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {tensor.dtype}")
    if not centroids.is_floating_point():
        raise ValueError(f"centroids must be a floating tensor, got dtype {centroids.dtype}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")

    for name, tensor in (
        ("logits", logits),
        ("attention", attention),
        ("lengths", lengths),
        ("centroids", centroids),
    ):
        if tensor.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {tensor.device}")

    if batch > 0 and not _tracing() and not _capturing_cuda_graph(lengths) and not _lengths_checked(lengths, max_frames):
        # One host sync for both bounds. A data-dependent branch cannot be traced, so
        # torch.compile / torch.export skip it (the graph accepts any lengths), and neither can a
        # CUDA graph capture (a sync while capturing is a CUDA error). Where the check is skipped,
        # the kernels and the reference's frame mask both clamp lengths to [0, M].
        out_of_range = (lengths < 0) | (lengths > max_frames)
        if bool(out_of_range.any()):
            bad = lengths[out_of_range][:5].tolist()
            raise ValueError(f"lengths must lie in [0, M = {max_frames}], got values {bad}")
        _remember_checked_lengths(lengths, max_frames)


# A model calls the op several times per step with one lengths tensor (video and audio streams,
# every mixture branch): the values are checked, with a host sync, only the first time. The entry
# is the tensor object itself (a weak reference, so a new tensor at a recycled address never
# matches) and its version counter (an in-place change invalidates it).
_checked_lengths: tuple[weakref.ref, int, int] | None = None


def _lengths_checked(lengths: Tensor, max_frames: int) -> bool:
    if _checked_lengths is None or lengths.is_inference():  # inference tensors have no version
        return False
    reference, version, frames = _checked_lengths
    return reference() is lengths and version == lengths._version and frames == max_frames


def _remember_checked_lengths(lengths: Tensor, max_frames: int) -> None:
    global _checked_lengths
    if lengths.is_inference():
        return
    _checked_lengths = (weakref.ref(lengths), lengths._version, max_frames)


def _capturing_cuda_graph(tensor: Tensor) -> bool:
    """True while the current CUDA stream is being captured into a CUDA graph (no syncs allowed)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _tracing() -> bool:
    """True while torch.compile (Dynamo) or torch.export traces the op."""
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    return bool(getattr(compiler, "is_compiling", lambda: False)()
                or getattr(compiler, "is_exporting", lambda: False)())


# ----------------------------------------------------------------------------------------------
# PyTorch references (CPU path and test oracles)
# ----------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for half types and fp32; fp64 stays fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def frame_mask(lengths: Tensor, max_frames: int) -> Tensor:
    """Boolean (B, M): True for real frames ``i < lengths[b]``."""
    return torch.arange(max_frames, device=lengths.device) < lengths[:, None]


def soft_assignment(logits: Tensor, attention: Tensor, lengths: Tensor) -> Tensor:
    """``a[b,i,g,k]`` (B, M, G, K) in the compute dtype, exactly zero on padded frames.

    ``torch.where`` (not a multiplication) so that non-finite garbage in padded rows of
    ``logits``/``attention`` cannot leak into the result or its gradient.
    """
    compute = _compute_dtype(logits.dtype)
    real = frame_mask(lengths, logits.shape[1])[:, :, None]  # (B, M, 1)
    gate = torch.where(real, torch.sigmoid(attention.to(compute)), 0.0)
    probabilities = torch.softmax(torch.where(real[..., None], logits.to(compute), 0.0), dim=-1)
    return probabilities * gate[..., None]


def l2_normalize_clusters(y: Tensor) -> Tensor:
    """Intra-normalisation (SPEC 3.1 step 8): ``v / sqrt(max(sum_d v^2, 1e-12))`` per cluster."""
    squared_norm = y.pow(2).sum(dim=-1, keepdim=True)
    return y * torch.rsqrt(torch.clamp(squared_norm, min=L2_NORMALIZE_EPSILON))


def residual_aggregation_reference(
    x: Tensor,
    logits: Tensor,
    attention: Tensor,
    lengths: Tensor,
    centroids: Tensor,
    *,
    normalize: bool = False,
) -> Tensor:
    """The authors' matmul formulation ``A^T X - a_sum * C`` (SPEC 3.1 steps 6-7); the CPU path.

    Plain PyTorch ops, so autograd differentiates it. Inputs are not validated here (the public
    :func:`residual_aggregation` does that).
    """
    batch, max_frames, groups, dim = x.shape
    clusters = logits.shape[3]
    compute = _compute_dtype(x.dtype)
    assignment = soft_assignment(logits, attention, lengths).reshape(batch, max_frames * groups, clusters)
    features = x.to(compute).reshape(batch, max_frames * groups, dim)
    y = assignment.transpose(1, 2) @ features - assignment.sum(dim=1)[:, :, None] * centroids.to(compute)
    if normalize:
        y = l2_normalize_clusters(y)
    return y.to(x.dtype)


def residual_aggregation_einsum(
    x: Tensor,
    logits: Tensor,
    attention: Tensor,
    lengths: Tensor,
    centroids: Tensor,
    *,
    normalize: bool = False,
) -> Tensor:
    """The literal paper equation 5: materialises the (B, M, G, K, D) residuals ``x - c``.

    Memory-hungry on purpose (it is the naive baseline of the benchmark).
    """
    compute = _compute_dtype(x.dtype)
    assignment = soft_assignment(logits, attention, lengths)
    residuals = x.to(compute)[:, :, :, None, :] - centroids.to(compute)  # (B, M, G, K, D)
    y = torch.einsum("bmgk,bmgkd->bkd", assignment, residuals)
    if normalize:
        y = l2_normalize_clusters(y)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (then CPU tensors work, slowly).

    Triton fixes the mode when ``triton.language`` is first imported (its own library functions
    are wrapped then), so ``TRITON_INTERPRET=1`` must be in the environment before anything imports
    Triton (Lightning does). The mode is read off Triton itself, not off today's environment.
    """
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def residual_aggregation(
    x: Tensor,
    logits: Tensor,
    attention: Tensor,
    lengths: Tensor,
    centroids: Tensor,
    *,
    backend: Backend = "auto",
    normalize: bool = False,
    precision: str | None = None,
) -> Tensor:
    """NeXtVLAD residual aggregation ``y[b,k,d] = sum_{i<lengths[b], g} a[b,i,g,k] (x[b,i,g,d] - c[k,d])``.

    Args:
        x: (B, M, G, D) expanded frame features split into G groups (a view of (B, M, G*D)).
        logits: (B, M, G, K) cluster logits (after the cluster batch norm); softmax over K inside.
        attention: (B, M, G) group-attention logits, before the sigmoid.
        lengths: (B,) integer count of real frames; frames ``i >= lengths[b]`` contribute nothing.
        centroids: (K, D) cluster centres (any floating dtype).
        backend: ``"auto"`` (Triton for CUDA tensors of fp32/fp16/bf16 with K <= 512, the
            reference otherwise),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"reference"`` (matmul
            formulation) or ``"einsum"`` (literal equation 5, memory-hungry).
        normalize: also apply the intra-normalisation (L2 over D per cluster, SPEC 3.1 step 8).
        precision: Triton fp32 dot precision, ``"ieee"`` (exact fp32) or ``"tf32"``; by default
            ``"tf32"`` exactly when PyTorch's own fp32 matmuls may use it
            (``torch.get_float32_matmul_precision() != "highest"``). Ignored for fp16/bf16.

    Returns:
        (B, K, D) in ``x``'s dtype, accumulated in fp32. Differentiable in x, logits, attention and
        centroids.

    Raises:
        ValueError: naming the argument whose rank, shape, dtype, device or values are wrong.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    validate_inputs(x, logits, attention, lengths, centroids)

    if backend == "auto":
        backend = "triton" if _triton_supports(x, logits.shape[3]) else "reference"
    if backend == "einsum":
        return residual_aggregation_einsum(x, logits, attention, lengths, centroids, normalize=normalize)
    if backend == "reference":
        return residual_aggregation_reference(x, logits, attention, lengths, centroids, normalize=normalize)
    return _residual_aggregation_triton(x, logits, attention, lengths, centroids, normalize, precision)


def _triton_supports(x: Tensor, clusters: int) -> bool:
    """Whether ``backend="auto"`` picks Triton: CUDA tensors of a dtype and K the kernels are tuned for."""
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and clusters <= MAX_TRITON_CLUSTERS
    )


# ----------------------------------------------------------------------------------------------
# Triton kernels
#
# Per video b the (frame, group) pairs are the rows r = i*G + g of X_b (M*G, D), of the logits
# (M*G, K) and of the attention (M*G,); the real frames are exactly the first lengths[b]*G rows, so
# every loop below runs over real rows only. The kernels are plain functions here, wrapped by
# triton.jit on first use in the mode Triton itself was imported in (see _kernels).
# ----------------------------------------------------------------------------------------------

def _aggregation_forward_kernel(
    x_ptr, logits_ptr, attention_ptr, lengths_ptr, centroids_ptr, y_ptr, assignment_sum_ptr,
    max_frames, groups, clusters, dim, rows_per_split, x_stride_video, x_stride_frame, x_stride_group,
    K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UNIFORM_X_ROWS: tl.constexpr,
):
    """One program per (D block, video; frame split): y[split, b, :, d-block] and, from the first
    D block, a_sum[split, b, :]. The launcher sums the splits (there is one unless the batch is too
    small to fill the GPU); the result is linear in the rows, so each split subtracts its own share
    of the centroid term.

    acc (K_PAD, BLOCK_D) += a^T (K_PAD, BLOCK_R) @ x (BLOCK_R, BLOCK_D) over the split's real rows;
    the soft assignment lives only in registers.
    """
    # Axis 0 enumerates (video, D block), D blocks fastest: a video's D blocks run side by side and
    # share its logits in L2, and the batch is not limited to 65535 (CUDA's limit on axes 1 and 2).
    d_blocks = tl.cdiv(dim, BLOCK_D)
    pid_d = tl.program_id(0) % d_blocks
    video = (tl.program_id(0) // d_blocks).to(tl.int64)
    output_index = tl.program_id(1).to(tl.int64) * (tl.num_programs(0) // d_blocks) + video
    rows_per_video = max_frames * groups
    # Clamped to [0, M] so memory stays in bounds even where validation was skipped (tracing).
    real_rows = tl.minimum(tl.maximum(tl.load(lengths_ptr + video), 0), max_frames).to(tl.int32) * groups
    row_begin = tl.program_id(1) * rows_per_split
    row_end = tl.minimum(real_rows, row_begin + rows_per_split)

    offs_k = tl.arange(0, K_PAD)
    k_valid = offs_k < clusters
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = offs_d < dim
    offs_r = tl.arange(0, BLOCK_R)

    x_video = x_ptr + video * x_stride_video
    logits_video = logits_ptr + video * rows_per_video * clusters
    attention_video = attention_ptr + video * rows_per_video

    acc = tl.zeros((K_PAD, BLOCK_D), dtype=ACC_DTYPE)
    assignment_sum = tl.zeros((K_PAD,), dtype=ACC_DTYPE)
    for row_start in range(row_begin, row_end, BLOCK_R):
        rows = row_start + offs_r
        row_valid = rows < row_end
        # Soft assignment a = sigmoid(attention) * softmax_K(logits); padded K columns get -inf
        # (probability 0), rows past the video's end get gate 0.
        logits = tl.load(
            logits_video + rows[:, None] * clusters + offs_k[None, :],
            mask=row_valid[:, None] & k_valid[None, :], other=0.0,
        ).to(ACC_DTYPE)
        logits = tl.where(k_valid[None, :], logits, float("-inf"))
        unnormalised = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        gate = tl.sigmoid(tl.load(attention_video + rows, mask=row_valid, other=0.0).to(ACC_DTYPE))
        gate = tl.where(row_valid, gate, 0.0)
        # One per-row scale folds the softmax normalisation and the gate.
        assignment = unnormalised * (gate / tl.sum(unnormalised, axis=1))[:, None]

        if UNIFORM_X_ROWS:  # see _uniform_x_rows
            x_rows = rows * x_stride_group
        else:
            x_rows = (rows // groups) * x_stride_frame + (rows % groups) * x_stride_group
        features = tl.load(
            x_video + x_rows[:, None] + offs_d[None, :],
            mask=row_valid[:, None] & d_valid[None, :], other=0.0,
        )
        acc = tl.dot(tl.trans(assignment.to(DOT_DTYPE)), features.to(DOT_DTYPE), acc,
                     input_precision=INPUT_PRECISION)
        assignment_sum += tl.sum(assignment, axis=0)

    centroids = tl.load(
        centroids_ptr + offs_k[:, None] * dim + offs_d[None, :],
        mask=k_valid[:, None] & d_valid[None, :], other=0.0,
    ).to(ACC_DTYPE)
    y = acc - assignment_sum[:, None] * centroids
    tl.store(
        y_ptr + output_index * clusters * dim + offs_k[:, None] * dim + offs_d[None, :],
        y.to(y_ptr.dtype.element_ty), mask=k_valid[:, None] & d_valid[None, :],
    )
    if pid_d == 0:
        tl.store(assignment_sum_ptr + output_index * clusters + offs_k, assignment_sum, mask=k_valid)


def _aggregation_backward_kernel(
    x_ptr, logits_ptr, attention_ptr, lengths_ptr, grad_y_ptr, grad_y_dot_centroids_ptr,
    grad_x_ptr, grad_logits_ptr, grad_attention_ptr,
    max_frames, groups, clusters, dim, x_stride_video, x_stride_frame, x_stride_group,
    K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UNIFORM_X_ROWS: tl.constexpr,
):
    """One program per (row block, video), both on axis 0 (row blocks fastest, so a video's blocks
    share its dL/dy in L2; any batch fits CUDA's grid); every gradient here is local to a
    (frame, group) row.

    With s = sigmoid(attention), p = softmax(logits), a = s p and gy = dL/dy[b]:
      grad_x = a @ gy
      grad_a[r,k] = (x @ gy^T)[r,k] - sum_d gy[k,d] c[k,d]      (the last term is precomputed)
      q = sum_k p grad_a;  grad_attention = q s (1 - s);  grad_logits = s p (grad_a - q)
    The assignment is recomputed from the logits (flash-attention style), never stored.
    Row blocks wholly past the video's end only write zeros.
    """
    rows_per_video = max_frames * groups
    row_blocks = tl.cdiv(rows_per_video, BLOCK_R)
    pid_r = tl.program_id(0) % row_blocks
    video = (tl.program_id(0) // row_blocks).to(tl.int64)
    # Clamped to [0, M] so memory stays in bounds even where validation was skipped (tracing).
    real_rows = tl.minimum(tl.maximum(tl.load(lengths_ptr + video), 0), max_frames).to(tl.int32) * groups

    offs_k = tl.arange(0, K_PAD)
    k_valid = offs_k < clusters
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in_video = rows < rows_per_video
    row_valid = rows < real_rows

    x_video = x_ptr + video * x_stride_video
    if UNIFORM_X_ROWS:  # see _uniform_x_rows
        x_rows = rows * x_stride_group
    else:
        x_rows = (rows // groups) * x_stride_frame + (rows % groups) * x_stride_group
    grad_x_video = grad_x_ptr + video * rows_per_video * dim
    logits_offsets = video * rows_per_video * clusters + rows[:, None] * clusters + offs_k[None, :]
    logits_store_mask = row_in_video[:, None] & k_valid[None, :]
    attention_offsets = video * rows_per_video + rows
    grad_y_video = grad_y_ptr + video * clusters * dim

    if pid_r * BLOCK_R >= real_rows:
        for d_start in range(0, dim, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D)
            tl.store(grad_x_video + rows[:, None] * dim + offs_d[None, :],
                     tl.zeros((BLOCK_R, BLOCK_D), dtype=grad_x_ptr.dtype.element_ty),
                     mask=row_in_video[:, None] & (offs_d < dim)[None, :])
        tl.store(grad_logits_ptr + logits_offsets,
                 tl.zeros((BLOCK_R, K_PAD), dtype=grad_logits_ptr.dtype.element_ty),
                 mask=logits_store_mask)
        tl.store(grad_attention_ptr + attention_offsets,
                 tl.zeros((BLOCK_R,), dtype=grad_attention_ptr.dtype.element_ty),
                 mask=row_in_video)
    else:
        logits = tl.load(logits_ptr + logits_offsets, mask=row_valid[:, None] & k_valid[None, :],
                         other=0.0).to(ACC_DTYPE)
        logits = tl.where(k_valid[None, :], logits, float("-inf"))
        unnormalised = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probabilities = unnormalised * (1.0 / tl.sum(unnormalised, axis=1))[:, None]
        sigmoid = tl.sigmoid(tl.load(attention_ptr + attention_offsets, mask=row_valid,
                                     other=0.0).to(ACC_DTYPE))
        gate = tl.where(row_valid, sigmoid, 0.0)
        assignment = probabilities * gate[:, None]

        grad_assignment = tl.zeros((BLOCK_R, K_PAD), dtype=ACC_DTYPE)
        for d_start in range(0, dim, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D)
            d_valid = offs_d < dim
            features = tl.load(x_video + x_rows[:, None] + offs_d[None, :],
                               mask=row_valid[:, None] & d_valid[None, :], other=0.0)
            grad_y = tl.load(grad_y_video + offs_k[:, None] * dim + offs_d[None, :],
                             mask=k_valid[:, None] & d_valid[None, :], other=0.0)
            features = features.to(DOT_DTYPE)
            grad_y = grad_y.to(DOT_DTYPE)
            grad_assignment = tl.dot(features, tl.trans(grad_y), grad_assignment,
                                     input_precision=INPUT_PRECISION)
            grad_features = tl.dot(assignment.to(DOT_DTYPE), grad_y,
                                   input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            tl.store(grad_x_video + rows[:, None] * dim + offs_d[None, :],
                     grad_features.to(grad_x_ptr.dtype.element_ty),
                     mask=row_in_video[:, None] & d_valid[None, :])

        grad_y_dot_centroids = tl.load(grad_y_dot_centroids_ptr + video * clusters + offs_k,
                                       mask=k_valid, other=0.0).to(ACC_DTYPE)
        grad_assignment -= grad_y_dot_centroids[None, :]
        weighted = tl.sum(probabilities * grad_assignment, axis=1)
        grad_attention = tl.where(row_valid, weighted * sigmoid * (1.0 - sigmoid), 0.0)
        grad_logits = gate[:, None] * probabilities * (grad_assignment - weighted[:, None])
        tl.store(grad_logits_ptr + logits_offsets, grad_logits.to(grad_logits_ptr.dtype.element_ty),
                 mask=logits_store_mask)
        tl.store(grad_attention_ptr + attention_offsets,
                 grad_attention.to(grad_attention_ptr.dtype.element_ty), mask=row_in_video)


@dataclass(frozen=True)
class _Kernels:
    forward: Any
    backward: Any


@functools.cache
def _kernels(interpret: bool) -> _Kernels:
    """The kernels wrapped by ``triton.jit`` in the given mode, which must be Triton's own mode
    (see :func:`triton_interpreter_enabled`), whatever ``TRITON_INTERPRET`` says now."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the environment
    scope = knobs.runtime.scope() if knobs is not None else contextlib.nullcontext()
    with scope:
        if knobs is not None:
            knobs.runtime.interpret = interpret
        return _Kernels(
            forward=triton.jit(_aggregation_forward_kernel),
            backward=triton.jit(_aggregation_backward_kernel),
        )


# (BLOCK_R, BLOCK_D, num_warps) candidates by K_PAD and operand family. Every one compiles for
# sm_90 without register spills (checked offline: triton.compile for GPUTarget("cuda", 90, 32) with
# 16-divisible strides, then `cuobjdump --dump-resource-usage`). The first is the default; on a GPU
# all of them are autotuned once per (K, D, dtype). Every tl.dot dimension is at least 16.
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
        256: [(16, 32, 8), (16, 64, 8), (32, 32, 4)],
        512: [(16, 32, 8), (16, 16, 16)],
    },
}
_BACKWARD_TILES: dict[str, dict[int, list[_Tile]]] = {
    "half": {
        16: [(64, 64, 8), (128, 64, 8), (64, 128, 8), (64, 32, 8)],
        64: [(64, 64, 8), (32, 64, 8), (128, 32, 8), (64, 128, 8), (128, 64, 8)],
        128: [(64, 64, 8), (32, 64, 8), (64, 32, 8), (64, 128, 8)],
        256: [(16, 64, 8), (32, 64, 8)],
        512: [(16, 32, 16), (16, 32, 8)],
    },
    "tf32": {
        16: [(64, 64, 4), (32, 64, 8)],
        64: [(64, 64, 8), (32, 64, 8)],
        128: [(32, 64, 8), (64, 64, 8)],
        256: [(16, 64, 8), (16, 32, 8)],
        512: [(16, 32, 8)],  # spills 8 bytes on sm_90, the least of the tiles tried
    },
    "ieee": {
        16: [(32, 64, 8), (64, 32, 8)],
        64: [(32, 64, 8), (64, 32, 8), (32, 32, 8)],
        128: [(32, 32, 8), (32, 64, 8)],
        256: [(16, 16, 8), (16, 32, 8)],
        512: [(16, 16, 8), (16, 32, 8)],  # spill 16 / 24 bytes on sm_90, the least of the tiles tried
    },
}
# For K_PAD = 1024 no backward tile tried compiled for sm_90 without spills (the best bf16 one
# spills 240 bytes; BLOCK_R is already tl.dot's minimum of 16), so beyond 512 clusters "auto" runs
# the reference.
MAX_TRITON_CLUSTERS = 512
# Frame splits start at multiples of every BLOCK_R above.
_SPLIT_ROW_ALIGNMENT = 128


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _padded_clusters(clusters: int) -> int:
    return max(16, _next_power_of_two(clusters))


def _tile_family(dtype: torch.dtype, precision: str) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "ieee" if dtype == torch.float64 else precision


def _tiles(table: dict[str, dict[int, list[_Tile]]], family: str, k_pad: int, dim: int) -> list[_Tile]:
    """The candidate tiles for this K_PAD (the next listed size up), BLOCK_D clamped to D.

    With K_PAD >= 128 the backward kernel's BLOCK_D is clamped no lower than 64: for sm_90 its
    tensor-core tiles with BLOCK_D 16 or 32 there spill hundreds of bytes of registers (e.g. bf16
    K=256, D=16 with (16, 16, 8): 808 bytes), while the masked (BLOCK_R, 64) tiles compile
    spill-free. (With fewer clusters it is the other way round, e.g. K=7, D=24.)
    """
    by_k_pad = table[family]
    candidates = by_k_pad[min(size for size in by_k_pad if size >= k_pad)]
    d_cap = max(64 if table is _BACKWARD_TILES and k_pad >= 128 else 16, _next_power_of_two(dim))
    return list(dict.fromkeys((rows, min(block_d, d_cap), warps) for rows, block_d, warps in candidates))


def _autotune_enabled(interpret: bool) -> bool:
    """Autotuning is on for compiled kernels unless NEXTVLAD_AUTOTUNE=0 (then the first tile always
    runs, so results are bitwise reproducible across processes too). The interpreter has no timer."""
    return not interpret and os.environ.get("NEXTVLAD_AUTOTUNE", "1") != "0"


# Timer for the autotuner; None means Triton's own (CUDA events). Tests swap in a fake one.
_AUTOTUNE_TIMER: Any = None


@functools.cache
def _autotuned(kind: str, family: str, tiles: tuple[_Tile, ...], interpret: bool) -> Any:
    """One autotuner per kernel, operand family and candidate list (its cache is keyed on K, D and
    the tensors' dtypes)."""
    kernel = getattr(_kernels(interpret), kind)
    configs = [triton.Config({"BLOCK_R": rows, "BLOCK_D": block_d}, num_warps=warps) for rows, block_d, warps in tiles]
    timer = {} if _AUTOTUNE_TIMER is None else {"do_bench": _AUTOTUNE_TIMER}
    return triton.autotune(configs=configs, key=["clusters", "dim"], **timer)(kernel)


def _launch(kind: str, family: str, tiles: list[_Tile], grid: Any, *args: Any, **constexprs: Any) -> None:
    """Run ``kind`` ("forward"/"backward") with the default tile, or autotuned on a GPU.

    ``grid`` maps the tile's meta-parameters (BLOCK_R, BLOCK_D) to the launch grid.
    """
    interpret = triton_interpreter_enabled()
    # Triton launches on the *current* CUDA device and stream, not on the tensors' device: without
    # this, x on cuda:1 while cuda:0 is current (no torch.cuda.set_device) reads foreign addresses.
    device = args[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if _autotune_enabled(interpret) and len(tiles) > 1:
            _autotuned(kind, family, tuple(tiles), interpret)[grid](*args, **constexprs)
        else:
            rows, block_d, warps = tiles[0]
            meta = {"BLOCK_R": rows, "BLOCK_D": block_d}
            getattr(_kernels(interpret), kind)[grid(meta)](*args, **constexprs, **meta, num_warps=warps)


def _forward_splits(batch: int, rows_per_video: int, d_blocks: int, device: torch.device) -> int:
    """Frame splits per video so that small batches (inference) still fill the GPU's SMs."""
    if device.type != "cuda" or batch == 0:  # B = 0: no programs to divide by
        return 1
    programs = batch * d_blocks
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(rows_per_video, _SPLIT_ROW_ALIGNMENT)))


def _accumulator_dtype(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_dtype(dtype: torch.dtype, interpret: bool) -> Any:
    """Operand dtype of the tl.dot calls: the input dtype (tensor cores for fp16/bf16), except that
    the interpreter multiplies bf16 as raw uint16 bit patterns, so there bf16 is widened to fp32."""
    if interpret and dtype == torch.bfloat16:
        return tl.float32
    return getattr(tl, str(dtype).removeprefix("torch."))


def _default_precision() -> str:
    """Follow PyTorch's own switch for TF32 matmuls (``torch.set_float32_matmul_precision``)."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


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


def _launch_forward(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, centroids: Tensor,
    out_dtype: torch.dtype, precision: str,
) -> tuple[Tensor, Tensor]:
    batch, max_frames, groups, dim = x.shape
    clusters = logits.shape[3]
    compute = _compute_dtype(x.dtype)
    family = _tile_family(x.dtype, precision)
    tiles = _tiles(_FORWARD_TILES, family, _padded_clusters(clusters), dim)
    rows_per_video = max_frames * groups
    splits = _forward_splits(batch, rows_per_video, triton.cdiv(dim, tiles[0][1]), x.device)
    rows_per_split = _SPLIT_ROW_ALIGNMENT * triton.cdiv(triton.cdiv(rows_per_video, splits), _SPLIT_ROW_ALIGNMENT)
    splits = triton.cdiv(rows_per_video, rows_per_split)
    # With several splits each writes fp32 partial sums; with one, y is written directly. y is then
    # allocated as (B, K, D) itself, not as a view y[0] of a (1, B, K, D) buffer: autograd forbids
    # in-place ops on a custom Function's output that is a view.
    if splits == 1:
        y = torch.empty((batch, clusters, dim), dtype=out_dtype, device=x.device)
        assignment_sum = torch.empty((batch, clusters), dtype=compute, device=x.device)
    else:
        y = torch.empty((splits, batch, clusters, dim), dtype=compute, device=x.device)
        assignment_sum = torch.empty((splits, batch, clusters), dtype=compute, device=x.device)
    if batch > 0:
        _launch(
            "forward", family, tiles, lambda meta: (triton.cdiv(dim, meta["BLOCK_D"]) * batch, splits),
            x, logits, attention, lengths, centroids, y, assignment_sum,
            max_frames, groups, clusters, dim, rows_per_split, *_x_strides(x),
            **_kernel_constants(x, clusters, precision),
        )
    if splits == 1:
        return y, assignment_sum
    return y.sum(dim=0).to(out_dtype), assignment_sum.sum(dim=0)


def _launch_backward(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, grad_y: Tensor,
    grad_y_dot_centroids: Tensor, precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
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
        _launch(
            "backward", family, tiles, lambda meta: (triton.cdiv(max_frames * groups, meta["BLOCK_R"]) * batch,),
            x, logits, attention, lengths, grad_y, grad_y_dot_centroids,
            grad_x, grad_logits, grad_attention,
            max_frames, groups, clusters, dim, *_x_strides(x),
            **_kernel_constants(x, clusters, precision),
        )
    return grad_x, grad_logits, grad_attention


class ResidualAggregationFunction(torch.autograd.Function):
    """Triton forward and backward. Saves only the inputs and a_sum (B, K)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, centroids: Tensor,
        precision: str = "ieee", out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        # The kernels take x's strides (a mixture hands in a split of one wider GEMM output: copying
        # it would cost a read and a write of x and keep the copy alive for the backward); only
        # the feature axis must be contiguous.
        x = x if x.stride(3) == 1 else x.contiguous()
        logits, attention, lengths, centroids = (t.contiguous() for t in (logits, attention, lengths, centroids))
        y, assignment_sum = _launch_forward(
            x, logits, attention, lengths, centroids, out_dtype or x.dtype, precision
        )
        ctx.save_for_backward(x, logits, attention, lengths, centroids, assignment_sum)
        ctx.precision = precision
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels have no backward themselves
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, logits, attention, lengths, centroids, assignment_sum = ctx.saved_tensors
        compute = assignment_sum.dtype
        grad_y_compute = grad_y.to(compute)
        centroids_compute = centroids.to(compute)
        grad_x = grad_logits = grad_attention = grad_centroids = None
        needs_x, needs_logits, needs_attention, _, needs_centroids = ctx.needs_input_grad[:5]
        if needs_x or needs_logits or needs_attention:
            # sum_d gy[b,k,d] c[k,d], the centroid part of dL/da (O(B*K), shared by all rows).
            grad_y_dot_centroids = torch.einsum("bkd,kd->bk", grad_y_compute, centroids_compute)
            grad_x, grad_logits, grad_attention = _launch_backward(
                x, logits, attention, lengths, grad_y.to(x.dtype).contiguous(),
                grad_y_dot_centroids.contiguous(), ctx.precision,
            )
        if needs_centroids:
            # dL/dc[k,d] = -sum_b a_sum[b,k] gy[b,k,d]: a deterministic reduction, no atomics.
            grad_centroids = (-torch.einsum("bk,bkd->kd", assignment_sum, grad_y_compute)).to(centroids.dtype)
        return (
            grad_x if needs_x else None,
            grad_logits if needs_logits else None,
            grad_attention if needs_attention else None,
            None,
            grad_centroids,
            None,
            None,
        )


def _residual_aggregation_triton(
    x: Tensor,
    logits: Tensor,
    attention: Tensor,
    lengths: Tensor,
    centroids: Tensor,
    normalize: bool,
    precision: str | None,
) -> Tensor:
    if triton is None:
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    if not x.is_cuda and not triton_interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (x is on {x.device}); CPU tensors run only under "
            "TRITON_INTERPRET=1, set before Triton is first imported"
        )
    if logits.shape[3] > MAX_TRITON_CLUSTERS:
        raise ValueError(
            f"backend='triton' takes at most K = {MAX_TRITON_CLUSTERS} clusters (logits.shape[3] = "
            f"{logits.shape[3]}); backend='reference' has no limit"
        )
    if x.is_cuda and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"backend='triton' on CUDA takes float32, float16 or bfloat16 x, got {x.dtype} "
            "(float64 runs only under TRITON_INTERPRET=1, for gradcheck)"
        )
    precision = precision or _default_precision()
    if not normalize:
        return ResidualAggregationFunction.apply(x, logits, attention, lengths, centroids, precision)
    # The intra-normalisation runs on the fp32 result, then casts (not fused: see README).
    y = ResidualAggregationFunction.apply(
        x, logits, attention, lengths, centroids, precision, _compute_dtype(x.dtype)
    )
    return l2_normalize_clusters(y).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU that is not there (CI checks and tile tuning)
# ----------------------------------------------------------------------------------------------

_TRITON_POINTER_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
}


def compile_for_gpu(
    kind: str,
    dtype: torch.dtype,
    clusters: int,
    dim: int,
    *,
    tile: _Tile | None = None,
    precision: str = "ieee",
    arch: int = 90,
    strided_x: bool = False,
) -> Any:
    """Compile the forward or backward kernel for an NVIDIA GPU of compute capability ``arch``
    (90 = H100) without one: ``triton.compile`` down to a cubin with the bundled ptxas.

    It specialises like a real launch would (16-byte-aligned pointers; K and D marked divisible by
    16 when they are), so register use and spills read off the cubin (``resource_usage``) are those
    of the real kernel. ``strided_x`` compiles the variant for an x whose frames are not back to
    back (a split of a wider tensor). Needs Triton in compiled mode (not TRITON_INTERPRET=1).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton_interpreter_enabled():
        raise RuntimeError("compile_for_gpu needs Triton in compiled mode (unset TRITON_INTERPRET)")
    kernel = getattr(_kernels(False), kind)
    table = _FORWARD_TILES if kind == "forward" else _BACKWARD_TILES
    k_pad = _padded_clusters(clusters)
    rows, block_d, warps = tile or _tiles(table, _tile_family(dtype, precision), k_pad, dim)[0]
    pointer = _TRITON_POINTER_TYPES[dtype]
    accumulator = "*fp64" if dtype == torch.float64 else "*fp32"
    special_pointers = {
        "lengths_ptr": "*i64", "centroids_ptr": "*fp32", "assignment_sum_ptr": accumulator,
        "grad_y_dot_centroids_ptr": accumulator,
    }
    integers = {"max_frames": 300, "groups": 8, "clusters": clusters, "dim": dim, "rows_per_split": 128,
                "x_stride_video": (3 if strided_x else 1) * 300 * 8 * dim,
                "x_stride_frame": (3 if strided_x else 1) * 8 * dim, "x_stride_group": dim}
    constants = {
        "K_PAD": k_pad, "BLOCK_R": rows, "BLOCK_D": block_d,
        "ACC_DTYPE": _accumulator_dtype(dtype), "DOT_DTYPE": _dot_dtype(dtype, interpret=False),
        "INPUT_PRECISION": _dot_precision(dtype, precision), "UNIFORM_X_ROWS": not strided_x,
    }
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
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                                check=True).stdout
    registers = int(re.search(r"REG:(\d+)", report).group(1))
    stack = int(re.search(r"STACK:(\d+)", report).group(1))
    return {"registers": registers, "spill_stack_bytes": stack, "shared_memory_bytes": compiled.metadata.shared}
