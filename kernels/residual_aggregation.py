"""Masked, group-attended residual aggregation: the core of NeXtVLAD (paper eq. 5, 8 and 18).

The public function :func:`residual_aggregation` validates its inputs and calls the registered op
``torch.ops.nextvlad.residual_aggregation`` (this module registers it), so that torch.compile and
torch.export see one op with a fake (shape) implementation and a registered backward instead of
opaque Python:

* implementation ``"triton"`` (CUDA; CPU only under ``TRITON_INTERPRET=1``): the kernels of
  ``residual_aggregation_triton.py``. Registered with ``torch.library.triton_op``, so that under
  torch.compile Inductor sees the Triton launches themselves; torch.export keeps the op whole.
* implementation ``"reference"`` (every other case, CPU included): the PyTorch formulas of
  ``residual_aggregation_reference.py``, forward and a hand-written backward.

The op, with ``a[b,i,g,k] = sigmoid(attention[b,i,g]) * softmax_k(logits[b,i,g,:])[k]`` for real
frames ``i < lengths[b]`` and 0 for padded ones::

    y[b,k,d] = sum_{i,g} a[b,i,g,k] * (x[b,i,g,d] - centroids[k,d])
             = (A_b^T X_b)[k,d] - a_sum[b,k] * centroids[k,d]

where ``A_b`` is ``a[b]`` viewed as ``(M*G, K)`` and ``X_b`` is ``x[b]`` viewed as ``(M*G, D)``
(SPEC 3.1 steps 5-7). Accumulation is in fp32 (fp64 for fp64 inputs). The op returns ``y`` (in
the requested dtype) and ``a_sum`` (B, K), both differentiable; the backward recomputes the
assignment from the inputs (flash-attention style) and saves nothing larger than ``a_sum``.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Literal

import torch
from torch import Tensor

from .residual_aggregation_reference import (
    compute_dtype,
    l2_normalize_clusters,
    residual_aggregation_einsum,
    residual_aggregation_reference,
    residual_aggregation_reference_backward,
    residual_aggregation_reference_forward,
)

#: Why the Triton kernels cannot run here (None: they can).
TRITON_UNAVAILABLE: str | None = None
try:  # Triton comes with torch's CUDA builds; the reference implementation works without it.
    from . import residual_aggregation_triton as triton_implementation
    from .residual_aggregation_triton import MAX_TRITON_CLUSTERS, triton_interpreter_enabled
except ImportError as error:
    TRITON_UNAVAILABLE = "the triton package is not installed"
    if not (isinstance(error, ModuleNotFoundError) and error.name == "triton"):
        # A torch or Triton too old for the kernels: the reference runs, but not in silence.
        TRITON_UNAVAILABLE = f"the Triton kernels cannot be imported ({type(error).__name__}: {error})"
        warnings.warn(f"{TRITON_UNAVAILABLE}; the PyTorch reference aggregation runs instead", stacklevel=2)
    triton_implementation = None
    MAX_TRITON_CLUSTERS = 0

    def triton_interpreter_enabled() -> bool:
        return False


Backend = Literal["auto", "triton", "reference", "einsum"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "reference", "einsum")
PRECISIONS: tuple[str, ...] = ("ieee", "tf32")
IMPLEMENTATIONS: tuple[str, ...] = ("triton", "reference")
# Integer dtypes whose comparisons every device implements (torch lacks them for uint16/32/64).
_LENGTHS_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# fp16's largest power of two below its maximum 65504: dL/dy is scaled under it for the fp16 dots.
_FLOAT16_SCALE_TARGET = 2.0**15


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
    if lengths.dtype not in _LENGTHS_DTYPES:
        raise ValueError(f"lengths must be an integer tensor (int8/16/32/64 or uint8), got dtype {lengths.dtype}")

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
# matches) and its version counter (an in-place change invalidates it). Inference tensors
# (torch.inference_mode, i.e. predict) have no version counter: for them the object alone decides,
# so an in-place change between two calls goes unchecked; the kernels and the reference mask clamp
# lengths to [0, M] anyway, so memory stays in bounds.
_checked_lengths: tuple[weakref.ref, int | None, int] | None = None


def _version(lengths: Tensor) -> int | None:
    return None if lengths.is_inference() else lengths._version


def _lengths_checked(lengths: Tensor, max_frames: int) -> bool:
    if _checked_lengths is None:
        return False
    reference, version, frames = _checked_lengths
    return reference() is lengths and version == _version(lengths) and frames == max_frames


def _remember_checked_lengths(lengths: Tensor, max_frames: int) -> None:
    global _checked_lengths
    _checked_lengths = (weakref.ref(lengths), _version(lengths), max_frames)


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
# The registered op
# ----------------------------------------------------------------------------------------------

# triton_op lets torch.compile trace through to the Triton launches (wrap_triton); it needs
# compiled Triton kernels. Under the interpreter (tests on a CPU) torch cannot trace interpreted
# kernels, so the op is a plain custom op there: opaque to compile and export, run eagerly.
_register = (
    torch.library.triton_op
    if triton_implementation is not None and not triton_interpreter_enabled()
    else torch.library.custom_op
)


@_register("nextvlad::residual_aggregation", mutates_args=())
def _residual_aggregation_op(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, centroids: Tensor,
    precision: str, out_dtype: torch.dtype, implementation: str,
) -> tuple[Tensor, Tensor]:
    """(y (B, K, D) in ``out_dtype``, a_sum (B, K) in the compute dtype); inputs as validated by
    :func:`residual_aggregation`, centroids of any floating dtype."""
    if implementation == "reference":
        return _reference_forward(x, logits, attention, lengths, centroids, precision, out_dtype, implementation)
    centroids = centroids.to(compute_dtype(x.dtype))
    # The kernels take x's strides (a mixture hands in a split of one wider GEMM output: copying
    # it would cost a read and a write of x); only the feature axis must be contiguous.
    x = x if x.stride(3) == 1 else x.contiguous()
    return triton_implementation.launch_forward(
        x, logits.contiguous(), attention.contiguous(), lengths.contiguous(), centroids.contiguous(),
        out_dtype, precision,
    )


@_residual_aggregation_op.register_fake
def _residual_aggregation_fake(x, logits, attention, lengths, centroids, precision, out_dtype, implementation):
    batch, _, _, dim = x.shape
    clusters = logits.shape[3]
    return (x.new_empty((batch, clusters, dim), dtype=out_dtype),
            x.new_empty((batch, clusters), dtype=compute_dtype(x.dtype)))


@_register("nextvlad::residual_aggregation_backward", mutates_args=())
def _residual_aggregation_backward_op(
    x: Tensor, logits: Tensor, attention: Tensor, lengths: Tensor, centroids: Tensor,
    assignment_sum: Tensor, grad_y: Tensor, grad_assignment_sum: Tensor | None,
    precision: str, implementation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, logits, attention and centroids, in their dtypes."""
    if implementation == "reference":
        return residual_aggregation_reference_backward(
            x, logits, attention, lengths, centroids, assignment_sum, grad_y, grad_assignment_sum
        )
    compute = assignment_sum.dtype
    scale = None
    if x.dtype == torch.float16 and grad_y.dtype != torch.float16 and grad_y.numel() > 0:
        # Under `normalize` dL/dy is fp32 and can exceed fp16's range (1/|y_k| for a cluster with
        # little assignment): rounded for the fp16 dots it became inf, the gradients NaN. It is
        # scaled by a power of two into range (exact, no host sync) and the gradients back.
        scale = _float16_scale(grad_y)
        grad_y = grad_y * scale
        grad_assignment_sum = grad_assignment_sum * scale if grad_assignment_sum is not None else None
    # dL/dy rounded to x's dtype (what the backward's dots take) and sum_d gy[b,k,d] c[k,d] minus
    # dL/da_sum: the part of dL/da shared by all of a video's rows, from the rounded gy like the
    # kernel's x gy^T it is subtracted from (with x ~ c a mismatch would be multiplied by the
    # features' mean); and dL/dc[k,d] = -sum_b a_sum[b,k] gy[b,k,d] from the exact gy (no kernel
    # term to cancel against), a deterministic reduction. One fused read of dL/dy.
    grad_y_rounded, row_constant, grad_centroids = triton_implementation.launch_grad_y_rounding_and_reductions(
        grad_y, centroids.to(compute), assignment_sum, grad_assignment_sum, x.dtype)
    grad_x, grad_logits, grad_attention = triton_implementation.launch_backward(
        x if x.stride(3) == 1 else x.contiguous(), logits.contiguous(), attention.contiguous(),
        lengths.contiguous(), grad_y_rounded, row_constant, precision,
    )
    if scale is not None:
        # a 0-d divisor keeps each gradient's dtype; dividing by a power of two is exact
        grad_x, grad_logits, grad_attention, grad_centroids = (
            grad / scale for grad in (grad_x, grad_logits, grad_attention, grad_centroids))
    grad_centroids = grad_centroids.to(centroids.dtype)
    return grad_x, grad_logits, grad_attention, grad_centroids


def _float16_scale(grad_y: Tensor) -> Tensor:
    """A power of two (a 0-d tensor on grad_y's device) that brings max |grad_y| under
    _FLOAT16_SCALE_TARGET; 1 when it is there already (the usual case: nothing changes)."""
    largest = grad_y.detach().abs().amax().to(torch.float32)
    exponent = torch.ceil(torch.log2(largest / _FLOAT16_SCALE_TARGET)).clamp(min=0)
    return torch.exp2(-exponent).to(grad_y.dtype)


@_residual_aggregation_backward_op.register_fake
def _residual_aggregation_backward_fake(x, logits, attention, lengths, centroids, assignment_sum, grad_y,
                                        grad_assignment_sum, precision, implementation):
    # Contiguous whatever the inputs' strides, as both implementations return them.
    return (x.new_empty(x.shape), logits.new_empty(logits.shape), attention.new_empty(attention.shape),
            centroids.new_empty(centroids.shape))


def _setup_context(ctx, inputs, output) -> None:
    x, logits, attention, lengths, centroids, precision, _, implementation = inputs
    ctx.save_for_backward(x, logits, attention, lengths, centroids, output[1])
    ctx.precision, ctx.implementation = precision, implementation


def _backward(ctx, grad_y: Tensor, grad_assignment_sum: Tensor | None):
    # No autograd is registered for the backward op, so second derivatives raise instead of
    # silently missing terms.
    x, logits, attention, lengths, centroids, assignment_sum = ctx.saved_tensors
    grads = torch.ops.nextvlad.residual_aggregation_backward(
        x, logits, attention, lengths, centroids, assignment_sum, grad_y, grad_assignment_sum,
        ctx.precision, ctx.implementation,
    )
    return (*grads[:3], None, grads[3], None, None, None)


_residual_aggregation_op.register_autograd(_backward, setup_context=_setup_context)


def _reference_forward(x, logits, attention, lengths, centroids, precision, out_dtype, implementation):
    """The op's reference implementation, whatever ``implementation`` asked for (same signature)."""
    centroids = centroids.to(compute_dtype(x.dtype))
    return residual_aggregation_reference_forward(x, logits, attention, lengths, centroids, out_dtype)


def reference_decompositions() -> dict:
    """A ``run_decompositions`` table for ``torch.export`` programs that replaces the op by its
    PyTorch reference (forward only: exported programs are for inference), so that they run
    without nextvlad and without Triton (ONNX, a .pt2 served elsewhere)."""
    return {torch.ops.nextvlad.residual_aggregation.default: _reference_forward}


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


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
        lengths: (B,) integer count of real frames; frames ``i >= lengths[b]`` contribute nothing,
            whatever they hold (NaN included), on every backend, to y and to the gradients.
        centroids: (K, D) cluster centres (any floating dtype).
        backend: ``"auto"``: the registered op ``torch.ops.nextvlad.residual_aggregation``, whose
            implementation is Triton for CUDA tensors of fp32/fp16/bf16 with K <= 512 and the
            PyTorch reference otherwise; ``"triton"``: the op with the Triton implementation
            (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``"reference"``: the matmul formulation
            differentiated by autograd (the tests' oracle, not the op); ``"einsum"``: literal
            equation 5 (memory-hungry).
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
    if not isinstance(normalize, bool):  # "no" or a tensor would be truthy and normalise
        raise ValueError(f"normalize must be a bool, got {normalize!r}")
    validate_inputs(x, logits, attention, lengths, centroids)

    if backend == "einsum":
        return residual_aggregation_einsum(x, logits, attention, lengths, centroids, normalize=normalize)
    if backend == "reference":
        return residual_aggregation_reference(x, logits, attention, lengths, centroids, normalize=normalize)
    if backend == "triton":
        _check_triton_supports(x, logits.shape[3])
        implementation = "triton"
    else:
        implementation = "triton" if _triton_supports(x, logits.shape[3]) else "reference"
    # With normalize the op returns the fp32 sums, normalised before the cast (not fused: see README).
    out_dtype = compute_dtype(x.dtype) if normalize else x.dtype
    y, _ = torch.ops.nextvlad.residual_aggregation(
        x, logits, attention, lengths, centroids, precision or _default_precision(), out_dtype, implementation
    )
    return l2_normalize_clusters(y).to(x.dtype) if normalize else y


def _triton_supports(x: Tensor, clusters: int) -> bool:
    """Whether ``backend="auto"`` picks Triton: CUDA tensors of a dtype and K the kernels are tuned for."""
    return (
        triton_implementation is not None
        and x.is_cuda
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and clusters <= MAX_TRITON_CLUSTERS
    )


def _check_triton_supports(x: Tensor, clusters: int) -> None:
    """ValueError unless ``backend="triton"`` can run these inputs."""
    if triton_implementation is None:
        raise ValueError(f"backend='triton' cannot run: {TRITON_UNAVAILABLE}")
    if not x.is_cuda and not triton_interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (x is on {x.device}); CPU tensors run only under "
            "TRITON_INTERPRET=1, set before Triton is first imported"
        )
    if clusters > MAX_TRITON_CLUSTERS:
        raise ValueError(
            f"backend='triton' takes at most K = {MAX_TRITON_CLUSTERS} clusters (logits.shape[3] = "
            f"{clusters}); backend='reference' has no limit"
        )
    if x.is_cuda and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"backend='triton' on CUDA takes float32, float16 or bfloat16 x, got {x.dtype} "
            "(float64 runs only under TRITON_INTERPRET=1, for gradcheck)"
        )


@torch.compiler.assume_constant_result  # a str from torch.* would break Dynamo's graph
def _default_precision() -> str:
    """Follow PyTorch's own switch for TF32 matmuls (``torch.set_float32_matmul_precision``); read
    when a graph is traced, like every Python setting."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
