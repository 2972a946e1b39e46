"""PyTorch references of the residual aggregation: the CPU implementation of the registered op and
the oracles of the tests (no Triton here).

``y[b,k,d] = sum_{i < lengths[b], g} a[b,i,g,k] (x[b,i,g,d] - c[k,d])`` with
``a = sigmoid(attention) * softmax_K(logits)`` on real frames and 0 on padded ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

# SPEC 3.1 step 8: tf.nn.l2_normalize puts the epsilon on the *squared* norm.
L2_NORMALIZE_EPSILON = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for half types and fp32; fp64 stays fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def frame_mask(lengths: Tensor, max_frames: int) -> Tensor:
    """Boolean (B, M): True for real frames ``i < lengths[b]``."""
    return torch.arange(max_frames, device=lengths.device) < lengths[:, None]


def zero_padded_frames(frames: Tensor, lengths: Tensor) -> Tensor:
    """``frames`` (B, M, ...) with every frame ``i >= lengths[b]`` set to zero by selection, not by
    multiplying with a mask (NaN x 0 is NaN): padded frames contribute nothing whatever they hold,
    as in the Triton kernels, which never read them into their sums."""
    real = frame_mask(lengths, frames.shape[1])
    return torch.where(real.reshape(real.shape + (1,) * (frames.dim() - 2)), frames, 0)


def soft_assignment(logits: Tensor, attention: Tensor, lengths: Tensor) -> Tensor:
    """``a[b,i,g,k]`` (B, M, G, K) in the compute dtype, exactly zero on padded frames."""
    _, gate, probabilities = _gate_and_probabilities(logits, attention, lengths)
    return probabilities * gate[..., None]


def _gate_and_probabilities(logits: Tensor, attention: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``sigmoid(attention)``, the gate (the sigmoid, 0 on padded frames) and ``softmax_K(logits)``,
    in the compute dtype.

    Padded rows of ``logits``/``attention`` are selected away (:func:`zero_padded_frames`), so that
    non-finite garbage there cannot leak into the result or its gradient.
    """
    compute = compute_dtype(logits.dtype)
    sigmoid = torch.sigmoid(zero_padded_frames(attention.to(compute), lengths))
    gate = zero_padded_frames(sigmoid, lengths)
    probabilities = torch.softmax(zero_padded_frames(logits.to(compute), lengths), dim=-1)
    return sigmoid, gate, probabilities


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
    """The authors' matmul formulation ``A^T X - a_sum * C`` (SPEC 3.1 steps 6-7), differentiated by
    autograd: the oracle of the tests and ``backend="reference"``.

    Inputs are not validated here (the public :func:`residual_aggregation` does that).
    """
    y, _ = residual_aggregation_reference_forward(x, logits, attention, lengths, centroids,
                                                  compute_dtype(x.dtype))
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
    compute = compute_dtype(x.dtype)
    assignment = soft_assignment(logits, attention, lengths)
    residuals = zero_padded_frames(x.to(compute), lengths)[:, :, :, None, :] - centroids.to(compute)  # (B, M, G, K, D)
    y = torch.einsum("bmgk,bmgkd->bkd", assignment, residuals)
    if normalize:
        y = l2_normalize_clusters(y)
    return y.to(x.dtype)


def residual_aggregation_reference_forward(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, centroids: Tensor, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The op's forward on any device: ``y`` in ``out_dtype`` and ``a_sum[b,k] = sum_{i,g} a`` in the
    compute dtype (what the Triton forward returns too)."""
    batch, max_frames, groups, dim = x.shape
    compute = compute_dtype(x.dtype)
    assignment = soft_assignment(logits, attention, lengths).flatten(1, 2)  # (B, M * G, K)
    assignment_sum = assignment.sum(dim=1)
    features = zero_padded_frames(x.to(compute), lengths).reshape(batch, max_frames * groups, dim)
    y = assignment.transpose(1, 2) @ features
    y = y - assignment_sum[:, :, None] * centroids.to(compute)
    return y.to(out_dtype), assignment_sum


def residual_aggregation_reference_backward(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, centroids: Tensor,
    assignment_sum: Tensor, grad_y: Tensor, grad_assignment_sum: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's backward written out by hand (the same formulas as the Triton backward kernel), so
    that the registered op is differentiable on every device without autograd inside it.

    With s = sigmoid(attention), p = softmax(logits), a = s p (0 on padded rows), gy = dL/dy[b]:
      grad_x = a @ gy;  grad_a = x @ gy^T - sum_d gy c + dL/da_sum
      q = sum_k p grad_a;  grad_attention = q s (1 - s);  grad_logits = s p (grad_a - q)
      grad_centroids = -sum_b a_sum[b] gy[b]
    """
    batch, max_frames, groups, dim = x.shape
    clusters = logits.shape[3]
    compute = compute_dtype(x.dtype)
    sigmoid, gate, probabilities = _gate_and_probabilities(logits, attention, lengths)
    assignment = (probabilities * gate[..., None]).reshape(batch, max_frames * groups, clusters)
    grad_y = grad_y.to(compute)
    features = zero_padded_frames(x.to(compute), lengths).reshape(batch, max_frames * groups, dim)

    grad_x = (assignment @ grad_y).reshape(x.shape)
    row_constant = torch.einsum("bkd,kd->bk", grad_y, centroids.to(compute))
    if grad_assignment_sum is not None:
        row_constant = row_constant - grad_assignment_sum.to(compute)
    grad_assignment = (features @ grad_y.transpose(1, 2) - row_constant[:, None, :]).reshape(logits.shape)
    weighted = (probabilities * grad_assignment).sum(dim=-1)
    grad_attention = weighted * gate * (1.0 - sigmoid)  # 0 on padded rows, where the gate is
    grad_logits = gate[..., None] * probabilities * (grad_assignment - weighted[..., None])
    grad_centroids = -torch.einsum("bk,bkd->kd", assignment_sum.to(compute), grad_y)
    # Contiguous whatever the inputs' strides, as the Triton backward writes them and the op's fake says.
    return (grad_x.to(x.dtype).contiguous(), grad_logits.to(logits.dtype).contiguous(),
            grad_attention.to(attention.dtype).contiguous(), grad_centroids.to(centroids.dtype).contiguous())
