"""Masked, group-attended residual aggregation: the core of NeXtVLAD (paper eq. 5, 8 and 18).

One file per op (Liger-Kernel layout): input validation, the two PyTorch references, the Triton
kernels, their launchers and the autograd Function.

The op, with ``a[b,i,g,k] = sigmoid(attention[b,i,g]) * softmax_k(logits[b,i,g,:])[k]`` for real
frames ``i < lengths[b]`` and 0 for padded ones::

    y[b,k,d] = sum_{i,g} a[b,i,g,k] * (x[b,i,g,d] - centroids[k,d])
             = (A_b^T X_b)[k,d] - a_sum[b,k] * centroids[k,d]

where ``A_b`` is ``a[b]`` viewed as ``(M*G, K)`` and ``X_b`` is ``x[b]`` viewed as ``(M*G, D)``
(SPEC 3.1 steps 5-7). Accumulation is in fp32 (fp64 for fp64 inputs); ``y`` has ``x``'s dtype.
"""

from __future__ import annotations

import functools
import os
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
    if min(max_frames, groups, dim, clusters) < 1:
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

    if batch > 0:
        # One host sync for both bounds; cheap next to the op itself.
        out_of_range = (lengths < 0) | (lengths > max_frames)
        if bool(out_of_range.any()):
            bad = lengths[out_of_range][:5].tolist()
            raise ValueError(f"lengths must lie in [0, M = {max_frames}], got values {bad}")


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
        backend: ``"auto"`` (Triton for CUDA tensors of fp32/fp16/bf16, the reference otherwise),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"reference"`` (matmul
            formulation) or ``"einsum"`` (literal equation 5, memory-hungry).
        normalize: also apply the intra-normalisation (L2 over D per cluster, SPEC 3.1 step 8).
        precision: Triton fp32 dot precision, ``"ieee"`` (exact fp32) or ``"tf32"``; by default
            ``"tf32"`` exactly when ``torch.backends.cuda.matmul.allow_tf32`` is set.

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
        backend = "triton" if _triton_supports(x) else "reference"
    if backend == "einsum":
        return residual_aggregation_einsum(x, logits, attention, lengths, centroids, normalize=normalize)
    if backend == "reference":
        return residual_aggregation_reference(x, logits, attention, lengths, centroids, normalize=normalize)
    return _residual_aggregation_triton(x, logits, attention, lengths, centroids, normalize, precision)


def _triton_supports(x: Tensor) -> bool:
    """Whether ``backend="auto"`` picks Triton: CUDA tensors of a dtype the kernels are tuned for."""
    return triton is not None and x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Triton kernels
#
# Per video b the (frame, group) pairs are the rows r = i*G + g of X_b (M*G, D), of the logits
# (M*G, K) and of the attention (M*G,); the real frames are exactly the first lengths[b]*G rows, so
# every loop below runs over real rows only. The kernels are plain functions here and wrapped by
# triton.jit on first use (see _kernels) so that TRITON_INTERPRET only matters at call time.
# ----------------------------------------------------------------------------------------------

def _aggregation_forward_kernel(
    x_ptr, logits_ptr, attention_ptr, lengths_ptr, centroids_ptr, y_ptr, assignment_sum_ptr,
    max_frames, groups, clusters, dim,
    K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program per (D block, video): y[b, :, d-block] and, from the first D block, a_sum[b, :].

    acc (K_PAD, BLOCK_D) += a^T (K_PAD, BLOCK_R) @ x (BLOCK_R, BLOCK_D) over the real rows; the
    soft assignment lives only in registers.
    """
    pid_d = tl.program_id(0)
    video = tl.program_id(1).to(tl.int64)
    rows_per_video = max_frames * groups
    real_rows = tl.load(lengths_ptr + video).to(tl.int32) * groups

    offs_k = tl.arange(0, K_PAD)
    k_valid = offs_k < clusters
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = offs_d < dim
    offs_r = tl.arange(0, BLOCK_R)

    x_video = x_ptr + video * rows_per_video * dim
    logits_video = logits_ptr + video * rows_per_video * clusters
    attention_video = attention_ptr + video * rows_per_video

    acc = tl.zeros((K_PAD, BLOCK_D), dtype=ACC_DTYPE)
    assignment_sum = tl.zeros((K_PAD,), dtype=ACC_DTYPE)
    for row_start in range(0, real_rows, BLOCK_R):
        rows = row_start + offs_r
        row_valid = rows < real_rows
        # Soft assignment a = sigmoid(attention) * softmax_K(logits); padded K columns get -inf
        # (probability 0), rows past the video's end get gate 0.
        logits = tl.load(
            logits_video + rows[:, None] * clusters + offs_k[None, :],
            mask=row_valid[:, None] & k_valid[None, :], other=0.0,
        ).to(ACC_DTYPE)
        logits = tl.where(k_valid[None, :], logits, float("-inf"))
        unnormalised = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probabilities = unnormalised / tl.sum(unnormalised, axis=1)[:, None]
        gate = tl.sigmoid(tl.load(attention_video + rows, mask=row_valid, other=0.0).to(ACC_DTYPE))
        gate = tl.where(row_valid, gate, 0.0)
        assignment = probabilities * gate[:, None]

        features = tl.load(
            x_video + rows[:, None] * dim + offs_d[None, :],
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
        y_ptr + video * clusters * dim + offs_k[:, None] * dim + offs_d[None, :],
        y.to(y_ptr.dtype.element_ty), mask=k_valid[:, None] & d_valid[None, :],
    )
    if pid_d == 0:
        tl.store(assignment_sum_ptr + video * clusters + offs_k, assignment_sum, mask=k_valid)


def _aggregation_backward_kernel(
    x_ptr, logits_ptr, attention_ptr, lengths_ptr, grad_y_ptr, grad_y_dot_centroids_ptr,
    grad_x_ptr, grad_logits_ptr, grad_attention_ptr,
    max_frames, groups, clusters, dim,
    K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program per (row block, video); every gradient here is local to a (frame, group) row.

    With s = sigmoid(attention), p = softmax(logits), a = s p and gy = dL/dy[b]:
      grad_x = a @ gy
      grad_a[r,k] = (x @ gy^T)[r,k] - sum_d gy[k,d] c[k,d]      (the last term is precomputed)
      q = sum_k p grad_a;  grad_attention = q s (1 - s);  grad_logits = s p (grad_a - q)
    The assignment is recomputed from the logits (flash-attention style), never stored.
    Row blocks wholly past the video's end only write zeros.
    """
    pid_r = tl.program_id(0)
    video = tl.program_id(1).to(tl.int64)
    rows_per_video = max_frames * groups
    real_rows = tl.load(lengths_ptr + video).to(tl.int32) * groups

    offs_k = tl.arange(0, K_PAD)
    k_valid = offs_k < clusters
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in_video = rows < rows_per_video
    row_valid = rows < real_rows

    x_video = x_ptr + video * rows_per_video * dim
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
        probabilities = unnormalised / tl.sum(unnormalised, axis=1)[:, None]
        sigmoid = tl.sigmoid(tl.load(attention_ptr + attention_offsets, mask=row_valid,
                                     other=0.0).to(ACC_DTYPE))
        gate = tl.where(row_valid, sigmoid, 0.0)
        assignment = probabilities * gate[:, None]

        grad_assignment = tl.zeros((BLOCK_R, K_PAD), dtype=ACC_DTYPE)
        for d_start in range(0, dim, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D)
            d_valid = offs_d < dim
            features = tl.load(x_video + rows[:, None] * dim + offs_d[None, :],
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
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        return _Kernels(
            forward=triton.jit(_aggregation_forward_kernel),
            backward=triton.jit(_aggregation_backward_kernel),
        )


@dataclass(frozen=True)
class _LaunchConfig:
    k_pad: int
    block_r: int
    block_d: int
    num_warps: int


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _forward_config(clusters: int, dim: int) -> _LaunchConfig:
    """Block sizes for the forward pass; every tl.dot dimension is at least 16.

    The fp32 accumulator (K_PAD, BLOCK_D) is capped at 16K elements (64 registers a thread with
    8 warps): K=128 gives BLOCK_D=128, so the video stream (D=256) recomputes the softmax twice.
    """
    k_pad = max(16, _next_power_of_two(clusters))
    block_d = max(16, min(_next_power_of_two(dim), 128, 16384 // k_pad))
    block_r = 64 if k_pad <= 128 else 32
    num_warps = 8 if k_pad * block_d >= 8192 else 4
    return _LaunchConfig(k_pad, block_r, block_d, num_warps)


def _backward_config(clusters: int, dim: int) -> _LaunchConfig:
    """Block sizes for the backward pass: probabilities and grad_assignment (BLOCK_R, K_PAD) stay
    in registers for the whole D loop."""
    k_pad = max(16, _next_power_of_two(clusters))
    block_r = 64 if k_pad <= 128 else 32
    block_d = max(16, min(_next_power_of_two(dim), 64))
    num_warps = 8 if block_r * k_pad >= 8192 else 4
    return _LaunchConfig(k_pad, block_r, block_d, num_warps)


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


def _launch_forward(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, centroids: Tensor,
    out_dtype: torch.dtype, precision: str,
) -> tuple[Tensor, Tensor]:
    batch, max_frames, groups, dim = x.shape
    clusters = logits.shape[3]
    compute = _compute_dtype(x.dtype)
    y = torch.empty((batch, clusters, dim), dtype=out_dtype, device=x.device)
    assignment_sum = torch.empty((batch, clusters), dtype=compute, device=x.device)
    if batch == 0:
        return y, assignment_sum
    config = _forward_config(clusters, dim)
    grid = (triton.cdiv(dim, config.block_d), batch)
    interpret = triton_interpreter_enabled()
    _kernels(interpret).forward[grid](
        x, logits, attention, lengths, centroids, y, assignment_sum,
        max_frames, groups, clusters, dim,
        K_PAD=config.k_pad, BLOCK_R=config.block_r, BLOCK_D=config.block_d,
        ACC_DTYPE=_accumulator_dtype(x.dtype), DOT_DTYPE=_dot_dtype(x.dtype, interpret),
        INPUT_PRECISION=_dot_precision(x.dtype, precision),
        num_warps=config.num_warps,
    )
    return y, assignment_sum


def _launch_backward(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, grad_y: Tensor,
    grad_y_dot_centroids: Tensor, precision: str,
) -> tuple[Tensor, Tensor, Tensor]:
    batch, max_frames, groups, dim = x.shape
    clusters = logits.shape[3]
    # Every row is written by the kernel (zeros past each video's end), so no memset is needed.
    grad_x = torch.empty_like(x)
    grad_logits = torch.empty_like(logits)
    grad_attention = torch.empty_like(attention)
    if batch == 0:
        return grad_x, grad_logits, grad_attention
    config = _backward_config(clusters, dim)
    grid = (triton.cdiv(max_frames * groups, config.block_r), batch)
    interpret = triton_interpreter_enabled()
    _kernels(interpret).backward[grid](
        x, logits, attention, lengths, grad_y, grad_y_dot_centroids,
        grad_x, grad_logits, grad_attention,
        max_frames, groups, clusters, dim,
        K_PAD=config.k_pad, BLOCK_R=config.block_r, BLOCK_D=config.block_d,
        ACC_DTYPE=_accumulator_dtype(x.dtype), DOT_DTYPE=_dot_dtype(x.dtype, interpret),
        INPUT_PRECISION=_dot_precision(x.dtype, precision),
        num_warps=config.num_warps,
    )
    return grad_x, grad_logits, grad_attention


class ResidualAggregationFunction(torch.autograd.Function):
    """Triton forward and backward. Saves only the inputs and a_sum (B, K)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, centroids: Tensor,
        precision: str = "ieee", out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        x, logits, attention, lengths, centroids = (
            t.contiguous() for t in (x, logits, attention, lengths, centroids)
        )
        y, assignment_sum = _launch_forward(
            x, logits, attention, lengths, centroids, out_dtype or x.dtype, precision
        )
        ctx.save_for_backward(x, logits, attention, lengths, centroids, assignment_sum)
        ctx.precision = precision
        return y

    @staticmethod
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
