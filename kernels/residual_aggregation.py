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

import os
from typing import Literal

import torch
from torch import Tensor

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
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    """Whether ``backend="auto"`` should pick Triton for these inputs."""
    if not x.is_cuda or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return False  # until the Triton kernels land
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _residual_aggregation_triton(
    x: Tensor,
    logits: Tensor,
    attention: Tensor,
    lengths: Tensor,
    centroids: Tensor,
    normalize: bool,
    precision: str | None,
) -> Tensor:
    raise NotImplementedError("the Triton backend is being written; use backend='reference'")
