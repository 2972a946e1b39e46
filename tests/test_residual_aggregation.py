"""residual_aggregation: references vs a float64 numpy oracle, Triton (interpreter on CPU, compiled
on a GPU) vs the reference, gradients, and input validation."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import pathlib
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from nextvlad.kernels import (
    residual_aggregation,
    residual_aggregation_einsum,
    residual_aggregation_reference,
)
from nextvlad.kernels import triton_interpreter_enabled

# The package re-exports the function under the module's name, so fetch the modules themselves.
residual_aggregation_module = importlib.import_module("nextvlad.kernels.residual_aggregation")
triton_module = residual_aggregation_module.triton_implementation  # None without Triton

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(triton_module is None, reason="needs triton")


@dataclass(frozen=True)
class Shape:
    batch: int
    frames: int
    groups: int
    clusters: int
    dim: int
    lengths: tuple[int, ...]

    def __str__(self) -> str:
        return (f"B{self.batch}-M{self.frames}-G{self.groups}-K{self.clusters}-D{self.dim}"
                f"-len{','.join(map(str, self.lengths))}")


# Small on purpose: the Triton interpreter runs every program in numpy.
INTERPRETER_SHAPES = [
    Shape(3, 5, 2, 7, 16, (0, 1, 5)),  # lengths 0, 1 and M; K not a power of two; D = 16
    Shape(2, 9, 1, 16, 64, (9, 4)),  # G = 1; D = 64
    Shape(1, 33, 4, 5, 40, (33,)),  # K < 16 (padded), several row blocks, D not a power of two
    Shape(2, 40, 2, 130, 24, (3, 40)),  # K > 128; whole backward row blocks past the end
    Shape(2, 6, 2, 300, 16, (6, 2)),  # K > 256: the K_PAD = 512 tiles
]


def make_inputs(shape: Shape, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*size, generator=generator, dtype=torch.float64)).to(device, dtype)

    b, m, g, k, d = shape.batch, shape.frames, shape.groups, shape.clusters, shape.dim
    x = randn(b, m, g, d)
    logits = randn(b, m, g, k, scale=2.0)
    attention = randn(b, m, g, scale=2.0)
    centroids = randn(k, d, scale=0.5)
    lengths = torch.tensor(shape.lengths, dtype=torch.int64, device=device)
    return x, logits, attention, lengths, centroids


def numpy_oracle(x, logits, attention, lengths, centroids, normalize: bool = False) -> np.ndarray:
    """float64 loop over videos and real frames, straight from the formula in the docstring."""
    x, logits, attention, centroids = (t.detach().double().cpu().numpy() for t in (x, logits, attention, centroids))
    batch, clusters, dim = x.shape[0], centroids.shape[0], centroids.shape[1]
    y = np.zeros((batch, clusters, dim))
    for b in range(batch):
        for i in range(int(lengths[b])):
            for g in range(x.shape[2]):
                exp = np.exp(logits[b, i, g] - logits[b, i, g].max())
                assignment = exp / exp.sum() / (1.0 + np.exp(-attention[b, i, g]))
                y[b] += assignment[:, None] * (x[b, i, g][None, :] - centroids)
    if normalize:
        y = y / np.sqrt(np.maximum((y**2).sum(-1, keepdims=True), 1e-12))
    return y


def gradients(y: torch.Tensor, inputs, upstream: torch.Tensor):
    return torch.autograd.grad(y, inputs, upstream)


def with_grad(*tensors: torch.Tensor):
    """Fresh leaves; integer tensors (lengths) pass through."""
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def padded_with(value: float, lengths, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies of (B, M, ...) ``tensors`` holding ``value`` in every frame past ``lengths[b]``."""
    copies = [t.clone() for t in tensors]
    for video, length in enumerate(lengths):
        for tensor in copies:
            tensor[video, length:] = value
    return copies


@pytest.fixture
def interpreter() -> None:
    """Skips unless Triton runs in interpreter mode (tests/conftest.py sets TRITON_INTERPRET=1 on
    machines without CUDA, before Triton is imported); on a GPU the compiled tests cover the same."""
    if not triton_interpreter_enabled():
        pytest.skip("Triton is not in interpreter mode (TRITON_INTERPRET=1 before importing triton)")


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", INTERPRETER_SHAPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
def test_references_match_numpy_oracle(shape: Shape, normalize: bool) -> None:
    inputs = make_inputs(shape, torch.float64)
    expected = numpy_oracle(*inputs, normalize=normalize)
    for reference in (residual_aggregation_reference, residual_aggregation_einsum):
        y = reference(*inputs, normalize=normalize)
        assert y.dtype == torch.float64 and y.shape == (shape.batch, shape.clusters, shape.dim)
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_hand_computed_single_frame() -> None:
    # One frame, one group, K = 2: a = sigmoid(0) * softmax([0, ln 3]) = 0.5 * [1/4, 3/4].
    x = torch.tensor([[[[2.0, 4.0]]]])
    logits = torch.tensor([[[[0.0, float(np.log(3.0))]]]])
    attention = torch.zeros(1, 1, 1)
    centroids = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    y = residual_aggregation(x, logits, attention, torch.tensor([1]), centroids)
    expected = torch.tensor([[[0.125 * 1.0, 0.125 * 4.0], [0.375 * 2.0, 0.375 * 0.0]]])
    torch.testing.assert_close(y, expected)


def test_einsum_and_matmul_references_agree_with_gradients() -> None:
    shape = Shape(3, 6, 2, 5, 8, (6, 0, 2))
    inputs = make_inputs(shape)
    lengths = inputs[3]
    differentiable = [0, 1, 2, 4]
    upstream = torch.randn(shape.batch, shape.clusters, shape.dim, generator=torch.Generator().manual_seed(1))
    results = []
    for reference in (residual_aggregation_reference, residual_aggregation_einsum):
        x, logits, attention, centroids = with_grad(*(inputs[i] for i in differentiable))
        y = reference(x, logits, attention, lengths, centroids)
        results.append((y, *gradients(y, (x, logits, attention, centroids), upstream)))
    for matmul_value, einsum_value in zip(*results):
        torch.testing.assert_close(matmul_value, einsum_value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_registered_op_gradcheck_float64(normalize: bool) -> None:
    """The op's hand-written backward ("auto" on a CPU: the registered op's reference implementation,
    what CPU training runs) against finite differences; autograd of the matmul reference would check
    only torch's own derivatives."""
    x, logits, attention, lengths, centroids = with_grad(*make_inputs(Shape(2, 4, 2, 3, 5, (4, 1)), torch.float64))

    def op(x, logits, attention, centroids):
        return residual_aggregation(x, logits, attention, lengths, centroids, backend="auto", normalize=normalize)

    assert torch.autograd.gradcheck(op, (x, logits, attention, centroids))


@pytest.mark.parametrize("padding", [1e4, float("nan"), float("inf")], ids=["1e4", "nan", "inf"])
@pytest.mark.parametrize("backend", ["auto", "reference", "einsum"])
def test_padded_frames_contribute_nothing(backend: str, padding: float) -> None:
    # Whatever the padded frames of x, logits and attention hold, NaN included (NaN x 0 is NaN, so
    # the references select, not multiply): the output and every gradient are those of zero
    # padding, and the padded rows' gradients are exactly zero. "auto" on a CPU is the op's
    # reference implementation (the hand-written backward); the Triton path has its own test.
    shape = Shape(3, 6, 2, 4, 3, (2, 5, 0))
    x, logits, attention, lengths, centroids = make_inputs(shape)
    upstream = torch.randn(shape.batch, shape.clusters, shape.dim, generator=torch.Generator().manual_seed(1))
    results = []
    for value in (0.0, padding):
        leaves = with_grad(*padded_with(value, shape.lengths, x, logits, attention), centroids)
        y = residual_aggregation(*leaves[:3], lengths, leaves[3], backend=backend)
        results.append((y, *gradients(y, leaves, upstream)))
    for name, clean, dirty in zip(NAMES, *results):
        assert torch.isfinite(dirty).all(), f"{backend}, padding {padding}: {name} not finite"
        torch.testing.assert_close(dirty, clean, msg=lambda m: f"{backend}, padding {padding}: {name}: {m}")
    for name, grad in zip(NAMES[1:4], results[1][1:4]):
        for b, length in enumerate(shape.lengths):
            assert torch.all(grad[b, length:] == 0), f"{backend}: {name} of padded frames"


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend", ["auto", "reference", "einsum", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_empty_batch_gives_empty_output_and_gradients(backend: str, normalize: bool, dtype: torch.dtype) -> None:
    """B = 0 (an empty last shard, a filtered batch): a (0, K, D) output and zero-size gradients
    on every backend, as for any other batch size (fp16: its dL/dy scaling has no maximum to take)."""
    if backend == "triton" and not triton_interpreter_enabled():
        pytest.skip("the Triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    shape = Shape(0, 5, 2, 3, 4, ())
    inputs = make_inputs(shape)
    inputs = [t.to(dtype) if i < 3 else t for i, t in enumerate(inputs)]  # fp32 centroids, as the models
    x, logits, attention, lengths, centroids = with_grad(*inputs)
    y = residual_aggregation(x, logits, attention, lengths, centroids, backend=backend, normalize=normalize)
    assert y.shape == (0, 3, 4) and y.dtype == dtype
    grads = gradients(y, (x, logits, attention, centroids), torch.ones_like(y))
    assert [tuple(g.shape) for g in grads] == [(0, 5, 2, 4), (0, 5, 2, 3), (0, 5, 2), (3, 4)]
    assert torch.equal(grads[3], torch.zeros(3, 4))  # no video: nothing flows to the centroids


def test_half_precision_output_dtype_and_fp32_accumulation() -> None:
    shape = Shape(2, 300, 2, 8, 16, (300, 150))
    inputs = make_inputs(shape)
    expected = residual_aggregation(*inputs)
    half = [t.bfloat16() if t.is_floating_point() else t for t in inputs[:4]] + [inputs[4]]
    y = residual_aggregation(*half)
    assert y.dtype == torch.bfloat16
    # 600 terms summed in bf16 would be off by several percent; fp32 accumulation is not.
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=5e-2)


# ----------------------------------------------------------------------------------------------
# Triton through the interpreter
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def poisoned_allocations():
    """NaN in every floating tensor the op allocates through torch.empty/empty_like (its outputs and
    split partial sums), so that an element no kernel program writes shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
        patch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))
        yield


def triton_and_reference(shape: Shape, dtype: torch.dtype, device: str = "cpu", normalize: bool = False,
                         precision: str | None = "ieee", seed: int = 0, triton_padding: float | None = None):
    """Outputs and the four gradients from both backends for one upstream gradient; the Triton run's
    allocations are poisoned with NaN. With ``triton_padding``, the Triton run's x, logits and
    attention hold that value in every frame past a video's length (the reference's keep theirs)."""
    inputs = make_inputs(shape, dtype, device, seed=seed)
    lengths = inputs[3]
    upstream = torch.randn(shape.batch, shape.clusters, shape.dim, generator=torch.Generator().manual_seed(seed + 2))
    upstream = upstream.to(device, dtype)
    triton_inputs = inputs[:3] if triton_padding is None else padded_with(triton_padding, shape.lengths, *inputs[:3])
    results = []
    for backend, frames in (("triton", triton_inputs), ("reference", inputs[:3])):
        x, logits, attention, centroids = with_grad(*frames, inputs[4])
        with poisoned_allocations() if backend == "triton" else contextlib.nullcontext():
            y = residual_aggregation(x, logits, attention, lengths, centroids, backend=backend,
                                     normalize=normalize, precision=precision)
            results.append((y, *gradients(y, (x, logits, attention, centroids), upstream)))
    return results


NAMES = ("y", "grad_x", "grad_logits", "grad_attention", "grad_centroids")


@pytest.mark.parametrize("shape", INTERPRETER_SHAPES, ids=str)
def test_triton_interpreter_matches_reference_fp32(interpreter, shape: Shape) -> None:
    triton_results, reference_results = triton_and_reference(shape, torch.float32)
    for name, got, expected in zip(NAMES, triton_results, reference_results):
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_triton_interpreter_normalize_and_half_precision(interpreter) -> None:
    shape = Shape(2, 7, 2, 6, 16, (7, 3))
    for name, got, expected in zip(NAMES, *triton_and_reference(shape, torch.float32, normalize=True)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # Half-precision loads, fp32 accumulation, half stores (the interpreter widens bf16 dot operands).
    for dtype in (torch.bfloat16, torch.float16):
        for name, got, expected in zip(NAMES, *triton_and_reference(shape, dtype)):
            assert got.dtype == dtype, name
            torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2,
                                       msg=lambda m: f"{dtype} {name}: {m}")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(-attention) = inf, meant
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_interpreter_saturated_gates_and_padded_clusters(interpreter, dtype: torch.dtype) -> None:
    """The forward's per-row scale sigmoid(attention) / row sum is one division of exp2 values
    (half types) or two (fp32), and padded cluster columns hold copies of real ones (change 18):
    attention far past where exp(-attention) overflows must give gate 0 (not NaN) or 1, and the
    copies must leave the softmax as it is, at K = 20 (K_PAD 32, rows aligned to 4) and K = 12.
    Oracle: the reference in float64 on the same (rounded) inputs."""
    for shape in (Shape(2, 9, 2, 20, 16, (9, 4)), Shape(1, 33, 2, 12, 24, (33,))):
        x, logits, attention, lengths, centroids = make_inputs(shape, seed=4)
        levels = torch.tensor([-1e4, -200.0, -90.0, -30.0, 0.0, 30.0, 90.0, 200.0, 1e4])
        attention = levels[torch.arange(attention.numel()) % len(levels)].reshape(attention.shape)
        logits = logits * 30  # softmax rows dominated by one cluster, real or copied
        inputs = [t.to(dtype) for t in (x, logits, attention)]
        upstream = torch.randn(shape.batch, shape.clusters, shape.dim, generator=torch.Generator().manual_seed(6))
        leaves = with_grad(*inputs, centroids)
        y = residual_aggregation(leaves[0], leaves[1], leaves[2], lengths, leaves[3], backend="triton")
        got = (y, *gradients(y, leaves, upstream.to(y.dtype)))
        exact = with_grad(*(t.double() for t in inputs), centroids.double())
        y64 = residual_aggregation_reference(exact[0], exact[1], exact[2], lengths, exact[3])
        expected = (y64, *gradients(y64, exact, upstream.to(y.dtype).double()))
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        for name, got_value, expected_value in zip(NAMES, got, expected):
            assert torch.isfinite(got_value).all(), f"{shape}: {name} not finite"
            torch.testing.assert_close(got_value.double(), expected_value, rtol=tolerance, atol=tolerance,
                                       msg=lambda m: f"{shape} {dtype}: {name}: {m}")


def _large_mean_bfloat16_inputs(mean: float = 20.0):
    """bf16 features of a large mean with centroids near it (x ~ c: y and dL/da are small
    differences of large sums), the other inputs as usual; centroids stay fp32."""
    x, logits, attention, lengths, centroids = make_inputs(Shape(2, 40, 2, 16, 32, (40, 25)))
    return (x + mean).bfloat16(), logits.bfloat16(), attention.bfloat16(), lengths, centroids + mean


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def test_triton_interpreter_assignment_sum_matches_the_rounded_dot(interpreter) -> None:
    """The kernel's dot sees the bf16-rounded assignment; a_sum must be summed from the same
    rounded values, or y = a^T x - a_sum c keeps a rounding error times the features' mean: about
    2e-2 relative (1e-3 from the rounding itself). fp32 output, so y's own rounding stays out."""
    x, logits, attention, lengths, centroids = _large_mean_bfloat16_inputs()
    y, _ = torch.ops.nextvlad.residual_aggregation(x, logits, attention, lengths, centroids, "ieee",
                                                   torch.float32, "triton")
    oracle = torch.from_numpy(numpy_oracle(x, logits, attention, lengths, centroids))
    assert _relative_error(y, oracle) < 1.5e-3
    # and it is the GPU's arithmetic: the assignment rounded to nearest bf16 in both terms, sums exact
    frames = (torch.arange(40)[None, :] < lengths[:, None]).double()[:, :, None, None]
    assignment = torch.softmax(logits.double(), -1) * torch.sigmoid(attention.double())[..., None] * frames
    rounded = assignment.float().bfloat16().double()
    emulated = (torch.einsum("bmgk,bmgd->bkd", rounded, x.double())
                - rounded.sum((1, 2))[..., None] * centroids.double())
    assert _relative_error(y, emulated) < 2e-5


def test_triton_interpreter_grad_y_sums_use_the_rounded_grad_y(interpreter) -> None:
    """dL/da = x gy^T - sum_d gy c: the kernel's dot takes gy rounded to x's dtype (bf16), so the
    centroid term must too, or the features' large mean multiplies the rounding error (about
    3e-2 relative in dL/dlogits). The oracle: float64 autograd of the reference."""
    x, logits, attention, lengths, centroids = _large_mean_bfloat16_inputs()
    upstream = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))  # fp32, as after normalize
    leaves = with_grad(x, logits, attention, centroids)
    y, _ = torch.ops.nextvlad.residual_aggregation(leaves[0], leaves[1], leaves[2], lengths, leaves[3], "ieee",
                                                   torch.float32, "triton")
    got = gradients(y, leaves, upstream)
    exact = with_grad(x.double(), logits.double(), attention.double(), centroids.double())
    y64 = residual_aggregation_reference(exact[0], exact[1], exact[2], lengths, exact[3])
    expected = gradients(y64, exact, upstream.double())
    for name, got_grad, expected_grad in zip(NAMES[1:], got, expected):
        assert _relative_error(got_grad, expected_grad) < 1e-2, name


@pytest.mark.parametrize("x_dtype, batch, clusters, dim, with_grad_assignment_sum, steps", [
    (torch.bfloat16, 2, 9, 40, True, 1),  # 128 videos a step, two real; dL/dy rounded and stored
    (torch.bfloat16, 5, 3, 3000, False, 3),  # D_PAD 4096: two videos a step, one in the last
    (torch.float32, 3, 300, 40, True, 1),  # dL/dy already in x's dtype: used as is, nothing stored
    (torch.float64, 13, 5, 2000, True, 4),  # D_PAD 2048: four videos a step, one in the last
])
def test_triton_interpreter_grad_y_rounding_and_reductions(interpreter, x_dtype, batch, clusters, dim,
                                                           with_grad_assignment_sum, steps) -> None:
    """The backward's fused prologue against float64: dL/dy rounded to x's dtype exactly as torch
    rounds (to nearest even), the row constant sum_d round(gy)[b,k,d] c[k,d] - dL/da_sum[b,k], and
    the centroid gradient -sum_b a_sum[b,k] gy[b,k,d] from the exact dL/dy."""
    generator = torch.Generator().manual_seed(5)
    accumulator = torch.float64 if x_dtype == torch.float64 else torch.float32
    grad_y = (torch.randn(batch, clusters, dim, generator=generator) * 3).to(accumulator)  # as after normalize
    centroids = (torch.randn(clusters, dim, generator=generator) + 20).to(accumulator)  # a large mean
    assignment_sum = (torch.rand(batch, clusters, generator=generator) * 300).to(accumulator)  # sums of M*G rows
    grad_assignment_sum = torch.randn(batch, clusters, generator=generator) if with_grad_assignment_sum else None
    assert math.ceil(batch / triton_module.grad_y_block_videos(dim)) == steps
    rounded, row_constant, grad_centroids = triton_module.launch_grad_y_rounding_and_reductions(
        grad_y, centroids, assignment_sum, grad_assignment_sum, x_dtype)
    assert rounded.dtype == x_dtype and torch.equal(rounded, grad_y.to(x_dtype))
    if x_dtype == grad_y.dtype:
        assert rounded.data_ptr() == grad_y.data_ptr()  # no copy
    expected = (grad_y.to(x_dtype).double() * centroids.double()).sum(-1)
    if grad_assignment_sum is not None:
        expected -= grad_assignment_sum.double()
    assert row_constant.dtype == grad_centroids.dtype == accumulator
    torch.testing.assert_close(row_constant.double(), expected, rtol=1e-5, atol=1e-3)
    expected_centroids = -torch.einsum("bk,bkd->kd", assignment_sum.double(), grad_y.double())
    torch.testing.assert_close(grad_centroids.double(), expected_centroids, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("plan", [(0, 3), (1, 3), (2, 2)], ids=["every-video", "last-two", "last-one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_interpreter_frame_splits_match_reference(interpreter, monkeypatch: pytest.MonkeyPatch,
                                                         plan: tuple[int, int], dtype: torch.dtype) -> None:
    # On a GPU the forward splits the frames of a small batch's videos, or of the last wave's
    # videos, over several programs whose last to finish adds them up (the interpreter has no SMs
    # to count: force it). (whole videos, splits): 150, 100 and 0 real rows in 64-row blocks, so
    # splits of 64 + 64 + 22 rows, of 64 + 36 + nothing, and wholly empty ones; D = 80 is two D
    # blocks in fp32 (one in bf16's tile), each with its own partial sums. Allocations are
    # NaN-poisoned: a partial sum read before it is written, or a y no program writes, fails.
    monkeypatch.setattr(triton_module, "_forward_plan", lambda *args: plan)
    launch, grids = triton_module._launch, []

    def recording_launch(kind, family, tiles, grid, *args, **constexprs):
        if kind == "forward":
            grids.append((grid({"BLOCK_R": tiles[0][0], "BLOCK_D": tiles[0][1]}), math.ceil(80 / tiles[0][1])))
        return launch(kind, family, tiles, grid, *args, **constexprs)

    monkeypatch.setattr(triton_module, "_launch", recording_launch)
    shape = Shape(3, 75, 2, 9, 80, (75, 50, 0))
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for name, got, expected in zip(NAMES, *triton_and_reference(shape, dtype)):
        torch.testing.assert_close(got.float(), expected.float(), **tolerance, msg=lambda m: f"{name}: {m}")
    whole, splits = plan
    [(grid, d_blocks)] = grids
    assert grid == (d_blocks * (whole + (3 - whole) * splits),)


def test_triton_interpreter_split_video_output_is_the_sum_of_its_shares(interpreter,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A split video's y and a_sum are the sums of every split's share, written by the last split
    # program to arrive, not that program's own share; float64 sums of the same shares are the
    # oracle. (That the sum runs in split order whichever program arrives last, the interpreter
    # cannot show: it runs programs in sequence.)
    inputs = make_inputs(Shape(2, 40, 2, 5, 16, (40, 33)), torch.float32)
    monkeypatch.setattr(triton_module, "_forward_plan", lambda *args: (0, 1))  # one split: not split
    whole, _ = triton_module.launch_forward(*inputs, torch.float32, "ieee")
    monkeypatch.setattr(triton_module, "_forward_plan", lambda *args: (0, 2))
    split, assignment_sum = triton_module.launch_forward(*inputs, torch.float32, "ieee")
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    x, logits, attention, lengths, centroids = inputs
    shares = []
    for begin, end in ((0, 64), (64, 80)):  # 80 real rows of video 0 in two 64-row-aligned splits
        rows_x = x[0].reshape(-1, 16)[begin:end].double()
        gate = torch.sigmoid(attention[0].reshape(-1)[begin:end].double())
        assignment = torch.softmax(logits[0].reshape(-1, 5)[begin:end].double(), dim=1) * gate[:, None]
        shares.append((assignment.T @ rows_x, assignment.sum(0)))
    expected_sum = shares[0][1] + shares[1][1]
    torch.testing.assert_close(assignment_sum[0].double(), expected_sum, rtol=1e-6, atol=1e-6)
    expected_y = shares[0][0] + shares[1][0] - expected_sum[:, None] * centroids.double()
    torch.testing.assert_close(split[0].double(), expected_y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim, precision", [(16, "ieee"), (80, "ieee"), (80, "tf32")],
                         ids=["one-D-block", "D-loop", "D-loop-tf32"])
@pytest.mark.parametrize("plan", [(1, 0, 1), (2, 0, 2), (5, 0, 5), (3, 2, 1), (2, 3, 2), (2, 9, 1)],
                         ids=lambda plan: "head{}-tail{}x{}".format(*plan))
def test_triton_interpreter_backward_walks_runs_of_row_blocks(interpreter, monkeypatch: pytest.MonkeyPatch,
                                                              plan: tuple[int, int, int], dim: int, precision: str) -> None:
    # 5 row blocks of 32 rows per video (the 33-frame video: 3 real), as (head run, tail blocks,
    # tail run): a program per block; runs of 2 (one straddling the short video's end, one wholly
    # past it); whole videos (the prefetch past the end); a head of 3 and a tail of 2 single blocks
    # (the interpreter's own plan); a tail of 3 as runs of 2 and 1 (the short video's first tail
    # run straddles its end); a tail longer than the video (clamped: tail runs only, as an autotuned
    # tile with fewer row blocks would get). D = 16 fits one block (dL/dy on chip, x prefetched);
    # D = 80 loops over 64-wide D blocks, with TF32 reading dL/dy a second time, transposed
    # (change 7; the interpreter multiplies exactly, so the fp32 tolerances hold). TF32's K_PAD 16 tile
    # has 64 rows: 3 blocks per video, so there the longer tails are clamped to the video.
    monkeypatch.setattr(triton_module, "_backward_plan", lambda *args: plan)
    launch, backward_constants = triton_module._launch, []

    def recording_launch(kind, *args, **constexprs):
        if kind == "backward":
            backward_constants.append(constexprs)
        return launch(kind, *args, **constexprs)

    monkeypatch.setattr(triton_module, "_launch", recording_launch)
    shape = Shape(3, 70, 2, 9, dim, (70, 33, 0))
    for name, got, expected in zip(NAMES, *triton_and_reference(shape, torch.float32, precision=precision)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert [constexprs["ONE_D_BLOCK"] for constexprs in backward_constants] == [dim == 16]
    # the L2 prefetch is inline PTX, which the interpreter cannot run (the sm_90 compile test has it)
    assert not any(constexprs["PREFETCH_NEXT_X"] for constexprs in backward_constants)


@pytest.mark.parametrize("dim", [16, 80], ids=["one-D-block", "D-loop"])
@pytest.mark.parametrize("plan", [(1, 0, 1), (3, 2, 1)], ids=["per-block", "head3-tail2x1"])
def test_triton_interpreter_padding_never_reaches_the_outputs(interpreter, monkeypatch: pytest.MonkeyPatch,
                                                               plan: tuple[int, int, int], dim: int) -> None:
    # The backward's first block of each program is loaded up to the video's padded end without
    # waiting for the lengths (change 14): NaN in the padded frames of x, logits and attention must
    # still not reach any output, gradients of padded rows included (the reference on zero padding
    # is the oracle). 5 row blocks of 32 rows; the 33-frame video ends inside block 2.
    monkeypatch.setattr(triton_module, "_backward_plan", lambda *args: plan)
    shape = Shape(3, 70, 2, 9, dim, (70, 33, 0))
    results = triton_and_reference(shape, torch.float32, triton_padding=float("nan"))
    for name, got, expected in zip(NAMES, *results):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _all_tiles(*tables) -> list[tuple[int, int, int]]:
    return sorted({tile for table in tables for family in table.values() for tiles in family.values() for tile in tiles})


ALL_TILES = (_all_tiles(triton_module._FORWARD_TILES, triton_module._BACKWARD_TILES)
             + [tile for tiles in triton_module._FORWARD_TILES_FOR_D.values() for tile, _ in tiles.values()]
             if triton_module else [])


@pytest.mark.parametrize("block_r,block_d", sorted({(rows, block_d) for rows, block_d, _ in ALL_TILES}))
def test_triton_interpreter_every_tile_shape(interpreter, monkeypatch: pytest.MonkeyPatch, block_r: int,
                                             block_d: int) -> None:
    """Every (BLOCK_R, BLOCK_D) the tables hold, on rows and D that are not multiples of it."""
    monkeypatch.setattr(triton_module, "_tiles", lambda *args: [(block_r, block_d, 4)])
    shape = Shape(2, 37, 3, 20, 40, (37, 11))
    for name, got, expected in zip(NAMES, *triton_and_reference(shape, torch.float32)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_triton_interpreter_autotuned_launch_path(interpreter, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's autotuned launch (configs, grid from meta-parameters), with a fake timer that
    makes the last candidate win, so a non-default tile runs."""
    timed = []

    def fake_timer(kernel_call, quantiles):
        kernel_call()
        timed.append(1)
        return [float(100 - len(timed))] * 3

    monkeypatch.setattr(triton_module, "_autotune_enabled", lambda interpret: True)
    monkeypatch.setattr(triton_module, "_AUTOTUNE_TIMER", fake_timer)
    triton_module._autotuned.cache_clear()
    try:
        shape = Shape(2, 40, 2, 100, 64, (40, 9))
        for name, got, expected in zip(NAMES, *triton_and_reference(shape, torch.float32)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    finally:
        triton_module._autotuned.cache_clear()
    tiles = triton_module._FORWARD_TILES["ieee"][128] + triton_module._BACKWARD_TILES["ieee"][128]
    assert len(timed) == len(tiles)


def test_triton_interpreter_autotuned_forward_with_frame_splits_writes_y_in_its_own_launch(
        interpreter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Split videos count their programs' arrivals; the autotuner's timed runs reuse the counter,
    so without resetting it the chosen tile's launch found it full and left y as a timed run wrote
    it. Here every timed run is followed by y poisoned with NaN: the final launch must write y."""
    launched = []

    def spy(kind, family, tiles, grid, *args, **constexprs):
        if kind == "forward":
            launched.append(args)
        return launch(kind, family, tiles, grid, *args, **constexprs)

    def poisoning_timer(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        launched[-1][5].fill_(float("nan"))  # y
        return [1.0] * 3

    launch = triton_module._launch
    monkeypatch.setattr(triton_module, "_launch", spy)
    monkeypatch.setattr(triton_module, "_autotune_enabled", lambda interpret: True)
    monkeypatch.setattr(triton_module, "_AUTOTUNE_TIMER", poisoning_timer)
    monkeypatch.setattr(triton_module, "_forward_plan", lambda *args: (0, 2))  # every video in 2 splits
    triton_module._autotuned.cache_clear()
    try:
        x, logits, attention, lengths, centroids = make_inputs(Shape(2, 40, 2, 20, 16, (40, 9)))
        y, _ = triton_module.launch_forward(x, logits, attention, lengths, centroids, torch.float32, "ieee")
    finally:
        triton_module._autotuned.cache_clear()
    torch.testing.assert_close(y, residual_aggregation_reference(x, logits, attention, lengths, centroids),
                               rtol=1e-5, atol=1e-5)


def test_triton_interpreter_fp16_normalized_gradients_beyond_fp16_range_stay_finite(interpreter) -> None:
    """fp16 inputs with ``normalize`` (the models' call): dL/dy comes back in fp32 through the L2
    normalisation, about 1/|y_k|, beyond fp16's 65504 for a cluster with almost no assignment. The
    backward's fp16 dots took it rounded to fp16: inf, then NaN gradients. The reference keeps it fp32."""
    x, logits, attention, lengths, centroids = make_inputs(Shape(2, 6, 2, 4, 16, (6, 3)))
    logits[..., 3] = -20.0  # cluster 3: about 2e-9 of every row
    grad_y = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2))
    gradients = {}
    for backend in ("triton", "reference"):
        leaves = [t.half().requires_grad_() for t in (x, logits, attention)] + [centroids.clone().requires_grad_()]
        y = residual_aggregation(*leaves[:3], lengths, leaves[3], backend=backend, normalize=True)
        gradients[backend] = torch.autograd.grad(y, leaves, grad_y.to(y.dtype))
    for name, got, expected in zip(("x", "logits", "attention", "centroids"), *gradients.values()):
        assert torch.isfinite(expected).all() and torch.isfinite(got).all(), name
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item(),
                                   msg=lambda m: f"grad {name}: {m}")


def test_triton_interpreter_clamps_unvalidated_lengths(interpreter) -> None:
    # Under torch.compile/export the lengths check is skipped; the kernels then clamp to [0, M]
    # (memory stays in bounds) exactly as the reference's frame mask does.
    x, logits, attention, _, centroids = make_inputs(Shape(2, 6, 2, 5, 16, (6, 6)))
    for lengths in (torch.tensor([-2, 11]), torch.tensor([-(2**32) + 3, 2**32 + 1])):  # int32 wraps to 3, 1
        y, _ = torch.ops.nextvlad.residual_aggregation(x, logits, attention, lengths, centroids, "ieee",
                                                       torch.float32, "triton")
        expected = residual_aggregation_reference(x, logits, attention, lengths, centroids)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"lengths {lengths}: {m}")


def _strided_views(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x's values in non-contiguous layouts whose last dim is contiguous."""
    batch, frames, groups, dim = x.shape
    wide = torch.zeros(batch, frames, 3 * groups * dim, dtype=x.dtype)
    wide[..., groups * dim:2 * groups * dim] = x.reshape(batch, frames, -1)
    group_major = x.transpose(1, 2).contiguous()  # (B, G, M, D), dense
    return {
        # a mixture runs its branches' expansion FCs as one GEMM and splits the output
        "split of a wider GEMM output": wide[..., groups * dim:2 * groups * dim].reshape(x.shape),
        "dense, groups outermost": group_major.transpose(1, 2),
    }


@pytest.mark.parametrize("layout", ["split of a wider GEMM output", "dense, groups outermost"])
def test_triton_interpreter_reads_strided_x_without_copying_it(interpreter, layout: str) -> None:
    shape = Shape(2, 9, 3, 7, 16, (9, 4))
    inputs = make_inputs(shape)
    upstream = torch.randn(shape.batch, shape.clusters, shape.dim, generator=torch.Generator().manual_seed(2))
    results = []
    for backend, x in (("triton", _strided_views(inputs[0])[layout]), ("reference", inputs[0])):
        assert backend == "reference" or not x.is_contiguous()
        x = x.detach().requires_grad_()
        logits, attention, centroids = with_grad(inputs[1], inputs[2], inputs[4])
        y = residual_aggregation(x, logits, attention, inputs[3], centroids, backend=backend, precision="ieee")
        if backend == "triton":  # the forward saved x itself, not a contiguous copy
            assert y.grad_fn.saved_tensors[0].data_ptr() == x.data_ptr()
        results.append((y, *gradients(y, (x, logits, attention, centroids), upstream)))
    for name, got, expected in zip(NAMES, *results):
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_triton_interpreter_output_can_be_modified_in_place(interpreter) -> None:
    # Autograd forbids in-place ops on a custom Function's output that is a view (e.g. y[0] of a
    # (splits, B, K, D) buffer); the reference's output allows them, so must the Triton one's.
    shape = INTERPRETER_SHAPES[0]
    results = []
    for backend in ("triton", "reference"):
        x, logits, attention, lengths, centroids = with_grad(*make_inputs(shape))
        y = residual_aggregation(x, logits, attention, lengths, centroids, backend=backend, precision="ieee")
        y.mul_(2.0)
        results.append((y, *gradients(y.sum(), (x, logits, attention, centroids), torch.tensor(1.0))))
    for name, got, expected in zip(NAMES, *results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_registered_op_refuses_double_backward(interpreter, backend: str) -> None:
    # The backward op (Triton kernels, or the hand-written reference on CPU) is not differentiable;
    # second derivatives (e.g. a gradient penalty) must raise instead of silently dropping terms.
    x, logits, attention, lengths, centroids = with_grad(*make_inputs(INTERPRETER_SHAPES[0]))
    y = residual_aggregation(x, logits, attention, lengths, centroids, backend=backend, precision="ieee")
    (grad_centroids,) = torch.autograd.grad(y.pow(2).sum(), centroids, create_graph=True)
    with pytest.raises(RuntimeError, match="residual_aggregation_backward.*no autograd formula"):
        grad_centroids.sum().backward()


@requires_triton
def test_launch_grids_fit_cuda_limits_for_large_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA grids allow 2**31 - 1 programs on axis 0 but only 65535 on axes 1 and 2, so the batch
    # must not have an axis of its own (a launch with B > 65535 would fail on a GPU; the
    # interpreter has no such limit, hence the grids are checked here without running them).
    grids = []
    monkeypatch.setattr(triton_module, "_launch",
                        lambda kind, family, tiles, grid, *args, **kwargs: grids.append(
                            grid({"BLOCK_R": tiles[0][0], "BLOCK_D": tiles[0][1]})))
    batch = 70_000
    x, logits, attention, lengths, centroids = make_inputs(Shape(1, 2, 1, 1, 16, (2,)))
    x, logits, attention = (t.expand(batch, *t.shape[1:]) for t in (x, logits, attention))
    lengths = lengths.expand(batch)
    triton_module.launch_forward(x, logits, attention, lengths, centroids, torch.float32, "ieee")
    grad_y_dot_centroids = torch.zeros(batch, 1)
    triton_module.launch_backward(x, logits, attention, lengths, torch.zeros(batch, 1, 16),
                                                 grad_y_dot_centroids, "ieee")
    assert len(grids) == 2
    for grid in grids:
        assert grid[0] < 2**31 and all(size <= 65535 for size in grid[1:]), grid


@requires_triton
def test_backward_plan_ends_with_short_tail_runs() -> None:
    plan, programs = triton_module._backward_plan, triton_module._backward_programs
    # 160 videos of 38 row blocks (4 D blocks) on 132 SMs: 4 x 132 / 160 -> 4 programs per video ->
    # head runs of 10; a tail of 132 x 10 / 160 -> 9 blocks in runs of 10 / 4 -> 3: 3 + 3 runs per video
    assert plan(160, 38, 4, 132) == (10, 9, 3) and programs(160, 38, (10, 9, 3)) == 160 * 6
    # 19 blocks of two D blocks: head runs of 5, a tail of 132 x 5 / 160 -> 5 blocks, in runs of 2 -> 6
    assert plan(160, 19, 2, 132) == (5, 6, 2) and programs(160, 19, (5, 6, 2)) == 160 * (3 + 3)
    assert plan(160, 19, 1, 132) == (5, 0, 5)  # D in one block (audio): head runs only
    # 512 videos: head runs of 19, a tail of 132 x 19 / 512 -> 5 blocks, one run
    assert plan(512, 38, 4, 132) == (19, 5, 5)
    assert plan(1, 38, 4, 132) == (1, 0, 1)  # one video: a program per row block, no tail to cut
    assert plan(10_000, 38, 4, 132) == (38, 0, 38)  # a program per whole video once the videos fill the GPU
    assert plan(0, 38, 4, 132) == (1, 0, 1)
    # the interpreter: heads of 3 and a tail of 2 single blocks where the video has room
    assert plan(160, 38, 2, None) == (3, 2, 1) and plan(3, 5, 2, None) == (3, 2, 1)
    assert plan(160, 2, 2, None) == (2, 0, 2) and plan(3, 5, 1, None) == (3, 0, 3)
    # a tail longer than the video (an autotuned tile's fewer blocks) is clamped: tail runs only
    assert programs(2, 5, (2, 9, 1)) == 2 * 5


@pytest.mark.parametrize("clusters", [56, 12, 6, 130, 7], ids=lambda k: f"K{k}")
def test_triton_interpreter_forward_with_aligned_cluster_rows_matches_oracle(interpreter, clusters: int) -> None:
    # K % 16 != 0: the forward declares the logits rows aligned to the largest power of two dividing
    # K (8, 4, 2, 2, 1) and masks the padded clusters in blocks of it. Too large an alignment (say 8
    # for K = 12) would drop clusters from the mask; the float64 oracle sees every one.
    assert triton_module._cluster_alignment(clusters) == {56: 8, 12: 4, 6: 2, 130: 2, 7: 1}[clusters]
    shape = Shape(3, 9, 2, clusters, 24, (9, 4, 0))
    inputs = make_inputs(shape)
    y = residual_aggregation(*inputs, backend="triton", precision="ieee")
    np.testing.assert_allclose(y.double().numpy(), numpy_oracle(*inputs), rtol=1e-5, atol=1e-5)


@requires_triton
def test_tf32_forward_takes_the_whole_d_tile_only_for_whole_d_blocks() -> None:
    tiles = triton_module._tiles
    forward = triton_module._FORWARD_TILES
    assert tiles(forward, "tf32", 128, 256)[0] == (64, 128, 8)  # the video stream: 2 D blocks of 128
    assert tiles(forward, "tf32", 100, 1024)[0] == (64, 128, 8)
    assert tiles(forward, "tf32", 128, 200)[0] == (64, 64, 8)  # a masked last D block: the table's own
    assert (64, 128, 8) not in tiles(forward, "tf32", 128, 200)
    assert tiles(forward, "tf32", 64, 64)[0] == (64, 64, 8)  # other K_PAD: unchanged
    assert tiles(forward, "half", 128, 256)[0] == (64, 128, 8)
    assert tiles(triton_module._BACKWARD_TILES, "tf32", 128, 256)[0] == (32, 64, 8)  # forward only


@requires_triton
def test_half_forward_takes_the_four_warp_tile_for_one_d_block_of_64() -> None:
    tiles = triton_module._tiles
    forward = triton_module._FORWARD_TILES
    assert tiles(forward, "half", 64, 64)[0] == (32, 64, 4)  # the audio stream, K = 64
    assert tiles(forward, "half", 56, 64)[0] == (32, 64, 4)  # K = 56 (same K_PAD)
    assert tiles(forward, "half", 40, 33)[0] == (32, 64, 4)
    assert tiles(forward, "half", 64, 32)[0] == (64, 32, 8)  # narrower D: the table's own, clamped
    assert tiles(forward, "half", 64, 256)[0] == (64, 128, 8)  # several D blocks: the table's own
    assert tiles(forward, "tf32", 64, 64)[0] == (64, 64, 8)  # bf16/fp16 only
    assert tiles(triton_module._BACKWARD_TILES, "half", 64, 64)[0] == (64, 64, 8)  # forward only


@requires_triton
def test_backward_prefetches_next_x_only_for_the_d_loop_below_k_pad_512_on_nvidia(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Change 17's rule, as on a CUDA machine (the interpreter has no inline PTX: there it is off).
    rule = triton_module._prefetches_next_x
    assert not rule(False, 128) if triton_interpreter_enabled() else rule(False, 128)
    monkeypatch.setattr(triton_module, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert rule(False, 128) and rule(False, 256)  # D loops over blocks: the video stream
    assert not rule(True, 128)  # one D block: x already comes a block ahead in registers
    assert not rule(False, 512)  # out of registers there
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not rule(False, 128)  # ROCm: Triton emits no PTX


@pytest.mark.parametrize("clusters, dim", [(100, 256), (128, 128)], ids=["K100-D256", "K128-D128"])
def test_triton_interpreter_tf32_forward_with_whole_d_blocks_matches_reference(interpreter, clusters: int,
                                                                               dim: int) -> None:
    # The TF32 forward's (64, 128, 8) tile, chosen when D is a multiple of 128 (the interpreter
    # multiplies exactly, so the fp32 tolerances hold); lengths end inside a 64-row block.
    shape = Shape(2, 40, 2, clusters, dim, (40, 13))
    triton_results, reference_results = triton_and_reference(shape, torch.float32, precision="tf32")
    for name, got, expected in zip(NAMES, triton_results, reference_results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shape", [Shape(3, 40, 4, 56, 64, (40, 13, 0)), Shape(2, 40, 4, 64, 48, (40, 21))], ids=str)
def test_triton_interpreter_half_forward_one_d_block_tile_matches_reference(interpreter, shape: Shape) -> None:
    # bf16 with D in one block of 64: the forward's (32, 64, 4) tile (change 16), against the
    # reference at the bf16 tolerances of the GPU tests (one rounding of the output).
    assert triton_module._tiles(triton_module._FORWARD_TILES, "half", 64, shape.dim)[0] == (32, 64, 4)
    assert_matches_reference(*triton_and_reference(shape, torch.bfloat16), torch.bfloat16)


@requires_triton
def test_cluster_alignment_by_hand() -> None:
    alignment = triton_module._cluster_alignment
    assert [alignment(k) for k in (56, 112, 128, 64, 7, 48, 24, 1)] == [8, 16, 16, 16, 1, 16, 8, 1]


@requires_triton
def test_forward_plan_fills_the_last_wave() -> None:
    plan = triton_module._forward_plan
    # small batches: every video split. 160 one-D-block videos on 132 SMs (264 slots): 2 splits =
    # 320 programs = 1.21 waves (39% of the last wave idle), 3 = 1.82 (10%), 4 = 2.42 (19%) -> 3
    assert plan(160, 1200, 1, 132) == (0, 3)
    # one video: 132 splits wanted, but at most one per 128 padded rows -> 2400 / 128 -> 19
    assert plan(1, 2400, 2, 132) == (0, 19)
    # larger batches: 320 programs = 2 waves + 56 programs = 28 videos, halved to fill one wave
    assert plan(160, 2400, 2, 132) == (132, 2)
    # 400 programs = 3 waves + 4 programs: 2 videos, 33 ways each wanted, 19 allowed
    assert plan(200, 2400, 2, 132) == (198, 19)
    # 265 one-block programs = 2 waves + 1: one video, 132 ways wanted, 10 allowed
    assert plan(265, 1200, 1, 132) == (264, 10)
    # 512 programs = 3 waves + 116: 58 videos cannot be split within one wave (132 // 116 = 1)
    assert plan(256, 2400, 2, 132) == (256, 1)
    assert plan(264, 2400, 1, 132) == (264, 1)  # whole waves
    assert plan(150, 64, 1, 132) == (150, 1)  # 150 < 264 programs, but one split per 128 rows
    assert plan(8, 1200, 1, None) == (8, 1)  # the interpreter


@requires_triton
def test_empty_batch_needs_no_frame_splits() -> None:
    # B = 0 on a GPU divided by the number of programs (zero); answered before any device query.
    assert triton_module._forward_plan(0, 2400, 2, 132) == (0, 1)


def test_triton_interpreter_gradcheck_float64(interpreter) -> None:
    x, logits, attention, lengths, centroids = with_grad(*make_inputs(Shape(2, 3, 2, 3, 4, (3, 1)), torch.float64))

    def op(x, logits, attention, centroids):
        return residual_aggregation(x, logits, attention, lengths, centroids, backend="triton", precision="ieee")

    assert torch.autograd.gradcheck(op, (x, logits, attention, centroids), fast_mode=True)


def test_triton_interpreter_is_deterministic(interpreter) -> None:
    shape = INTERPRETER_SHAPES[3]
    first, _ = triton_and_reference(shape, torch.float32)
    second, _ = triton_and_reference(shape, torch.float32)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@requires_triton
def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(residual_aggregation_module, "triton_interpreter_enabled", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        residual_aggregation(*make_inputs(INTERPRETER_SHAPES[0]), backend="triton")


@requires_triton
def test_triton_backend_rejects_more_than_512_clusters() -> None:
    inputs = make_inputs(Shape(1, 2, 1, 513, 16, (2,)))
    with pytest.raises(ValueError, match="at most K = 512"):
        residual_aggregation(*inputs, backend="triton")


def _run_compiled(script: str) -> None:
    """Runs ``script`` with Triton compiling (not interpreting) and benchmarks/ importable, in a
    subprocess because this process's Triton may be in interpreter mode; fails with its output."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@requires_triton
def test_kernels_compile_for_h100_without_register_spills() -> None:
    """Without a GPU, compile the kernels for sm_90 (Triton's bundled ptxas) at the paper's video
    stream and at awkward sizes: they must compile, fit in shared memory and not spill. Runs in a
    subprocess because this process's Triton may be in interpreter mode."""
    script = textwrap.dedent("""
        import torch
        from kernel_compile import compile_for_gpu, resource_usage
        from kernel_model import sass
        from nextvlad.kernels import residual_aggregation_triton as ops
        cases = [("forward", torch.bfloat16, 128, 256, "ieee"), ("backward", torch.bfloat16, 128, 256, "ieee"),
                 ("forward", torch.float32, 7, 24, "ieee"), ("backward", torch.float32, 7, 24, "ieee"),
                 # many clusters, small D: the tile's BLOCK_D is clamped towards D
                 ("backward", torch.bfloat16, 256, 16, "ieee"), ("backward", torch.float32, 128, 16, "tf32"),
                 # exact fp32 (matmul precision "highest") at K_PAD = 256
                 ("backward", torch.float32, 200, 256, "ieee"),
                 # the TF32 forward's whole-D tile (64, 128, 8), at the final recipe's video K and K_PAD 128, D = 512
                 ("forward", torch.float32, 112, 256, "tf32"), ("forward", torch.float32, 100, 512, "tf32"),
                 # K % 16 != 0: the forward's logits rows declared 8-aligned (the final recipe's audio K),
                 # in the 4-warp one-D-block tile (32, 64, 4) for bf16
                 ("forward", torch.bfloat16, 56, 64, "ieee"), ("forward", torch.float32, 56, 64, "tf32"),
                 ("forward", torch.bfloat16, 33, 48, "ieee"),
                 # the largest clusters Triton takes (K_PAD = 512), at both stream widths
                 ("forward", torch.bfloat16, 400, 256, "ieee"), ("backward", torch.bfloat16, 400, 256, "ieee"),
                 ("forward", torch.float32, 512, 64, "tf32"), ("backward", torch.bfloat16, 512, 16, "ieee")]
        # the variant for an x whose frames are not back to back (a mixture's split GEMM output)
        cases += [("forward", torch.bfloat16, 112, 256, "strided"), ("backward", torch.bfloat16, 112, 256, "strided")]
        # the backward's dL/dy rounding and reductions, at the paper's streams, K_PAD = 512 and a wide D
        cases += [("grad_y", dtype, clusters, dim, "ieee") for dtype in (torch.bfloat16, torch.float32)
                  for clusters, dim in ((128, 256), (56, 64), (512, 256), (16, 8192))]
        for kind, dtype, clusters, dim, precision in cases:
            strided = precision == "strided"
            compiled = compile_for_gpu(kind, dtype, clusters, dim, strided_x=strided,
                                       precision="ieee" if strided else precision)
            usage = resource_usage(compiled)
            print(kind, dtype, clusters, dim, precision, usage)
            assert usage["spill_stack_bytes"] == 0, usage
            assert usage["shared_memory_bytes"] <= 227 * 1024, usage
            if kind == "backward":
                # change 17: the D loop's backward asks L2 for the next row block's x (PTX
                # prefetch.global.L2, SASS CCTL.E.PF2), except at K_PAD 512; with one D block x
                # comes in registers
                family = ops._tile_family(dtype, "ieee" if strided else precision)
                k_pad = ops._padded_clusters(clusters)
                _, block_d, _ = ops._tiles(ops._BACKWARD_TILES, family, k_pad, dim)[0]
                expected = dim > block_d and k_pad < 512
                assert ("CCTL.E.PF2" in sass(compiled)) == expected, (kind, clusters, dim)
    """)
    _run_compiled(script)


@pytest.mark.slow
@requires_triton
def test_forward_padded_clusters_cost_no_selects_on_sm90() -> None:
    """Change 18: padded cluster columns (K < K_PAD) load copies of real ones, weighed out of the
    row sum, instead of -inf through a select per element (32 FSEL per thread and row block at
    K=112). So the bf16 forward's row-block loop, compiled for sm_90, holds as many FSEL at K=112
    as at K=128 (no padding) and at K=56 as at K=64."""
    script = textwrap.dedent("""
        import torch
        from kernel_compile import compile_for_gpu
        from kernel_model import KernelCode, sass
        for (padded, even, dim) in ((112, 128, 256), (56, 64, 64)):
            selects = [KernelCode.from_sass(sass(compile_for_gpu("forward", torch.bfloat16, clusters, dim))).loop_body
                       .count("FSEL") for clusters in (padded, even)]
            print(padded, even, selects)
            assert selects[0] == selects[1], (padded, selects)
    """)
    _run_compiled(script)


def test_auto_backend_on_cpu_is_the_reference() -> None:
    inputs = make_inputs(INTERPRETER_SHAPES[1])
    assert torch.equal(residual_aggregation(*inputs), residual_aggregation_reference(*inputs))


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def _replace(index: int, value):
    def mutate(inputs: list) -> list:
        inputs = list(inputs)
        inputs[index] = value(inputs[index]) if callable(value) else value
        return inputs

    return mutate


BAD_INPUTS = {
    "x rank": (_replace(0, lambda t: t[0]), "x"),
    "x integer": (_replace(0, lambda t: t.long()), "x"),
    "logits rank": (_replace(1, lambda t: t.flatten(2)), "logits"),
    "logits batch": (_replace(1, lambda t: t[:1]), "logits"),
    "logits groups": (_replace(1, lambda t: t[:, :, :1]), "logits"),
    "logits dtype": (_replace(1, lambda t: t.double()), "logits"),
    "attention frames": (_replace(2, lambda t: t[:, :2]), "attention"),
    "attention dtype": (_replace(2, lambda t: t.half()), "attention"),
    "attention rank": (_replace(2, lambda t: t[..., None]), "attention"),
    "lengths float": (_replace(3, lambda t: t.float()), "lengths"),
    "lengths uint32": (_replace(3, lambda t: t.to(torch.uint32)), "lengths"),  # torch cannot compare them
    "lengths negative": (_replace(3, lambda t: torch.tensor([-1, 2, 3])), "lengths"),
    "lengths above M": (_replace(3, lambda t: torch.tensor([1, 6, 3])), "lengths"),
    "lengths batch": (_replace(3, lambda t: t[:2]), "lengths"),
    "lengths rank": (_replace(3, lambda t: t[:, None]), "lengths"),
    "centroids K": (_replace(4, lambda t: t[:3]), "centroids"),
    "centroids D": (_replace(4, lambda t: t[:, :8]), "centroids"),
    "centroids rank": (_replace(4, lambda t: t[None]), "centroids"),
    "centroids device": (_replace(4, lambda t: t.to("meta")), "centroids"),
    "attention device": (_replace(2, lambda t: t.to("meta")), "attention"),
    "x not a tensor": (_replace(0, lambda t: t.numpy()), "x"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input_raises_value_error_naming_the_argument(case: str) -> None:
    mutate, argument = BAD_INPUTS[case]
    inputs = mutate(make_inputs(Shape(3, 5, 2, 7, 16, (0, 1, 5))))
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        residual_aggregation(*inputs)


def test_torch_export_traces_the_reference_without_the_lengths_check() -> None:
    """The lengths-value check is a data-dependent branch; under torch.export it is skipped, and the
    exported program matches eager, shorter videos included."""

    class Aggregate(torch.nn.Module):
        def forward(self, x, logits, attention, lengths, centroids):
            return residual_aggregation(x, logits, attention, lengths, centroids, backend="reference",
                                        normalize=True)

    inputs = make_inputs(Shape(2, 6, 2, 5, 16, (6, 3)))
    program = torch.export.export(Aggregate(), tuple(inputs))
    other = make_inputs(Shape(2, 6, 2, 5, 16, (1, 4)), seed=3)
    torch.testing.assert_close(program.module()(*other), Aggregate()(*other))


def test_torch_export_keeps_the_frame_axis_dynamic_down_to_one_frame() -> None:
    """Validating the sizes adds no guard on the symbolic frame count (e.g. M >= G + 1), so one
    program with a dynamic frame axis serves any number of frames, a single one included."""

    class Aggregate(torch.nn.Module):
        def forward(self, x, logits, attention, lengths, centroids):
            return residual_aggregation(x, logits, attention, lengths, centroids, backend="reference")

    batch, frames = torch.export.Dim("batch"), torch.export.Dim("frames")
    dynamic = ({0: batch, 1: frames}, {0: batch, 1: frames}, {0: batch, 1: frames}, {0: batch}, None)
    inputs = make_inputs(Shape(2, 6, 4, 5, 16, (6, 3)))
    program = torch.export.export(Aggregate(), tuple(inputs), dynamic_shapes=dynamic)
    for shape in (Shape(1, 1, 4, 5, 16, (1,)), Shape(3, 2, 4, 5, 16, (2, 0, 1))):
        other = make_inputs(shape, seed=4)
        torch.testing.assert_close(program.module()(*other), Aggregate()(*other))


@pytest.mark.parametrize("keyword", [{"backend": "cuda"}, {"precision": "bf16"}, {"normalize": "no"}])
def test_bad_options_raise_value_error(keyword: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(keyword))):
        residual_aggregation(*make_inputs(INTERPRETER_SHAPES[0]), **keyword)


# ----------------------------------------------------------------------------------------------
# Compiled kernels (GPU only)
# ----------------------------------------------------------------------------------------------

GPU_SHAPES = [
    Shape(4, 300, 8, 128, 256, (300, 1, 0, 187)),  # video stream, paper
    Shape(4, 300, 4, 56, 64, (300, 120, 299, 17)),  # audio stream, final recipe
    Shape(3, 301, 8, 112, 256, (301, 150, 2)),  # final recipe K, M > 300
    Shape(2, 64, 32, 7, 24, (64, 33)),  # G = 32, small odd K and D
    Shape(2, 300, 8, 400, 64, (300, 77)),  # K > 256: the K_PAD = 512 tiles
]
GPU_TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
# ||got - expected|| / ||expected|| over a whole tensor: fp32 differs from the reference only in
# summation order; bf16 outputs carry one bf16 rounding (2**-8) on top of fp32 accumulation.
GPU_RELATIVE_NORM = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def assert_matches_reference(triton_results, reference_results, dtype: torch.dtype, where: str = "") -> None:
    for name, got, expected in zip(NAMES, triton_results, reference_results):
        assert got.dtype == expected.dtype, name
        assert torch.isfinite(got).all(), f"{where}{name}: NaN/inf (an element no program wrote?)"
        scale = expected.float().abs().max().clamp(min=1.0)
        torch.testing.assert_close(got.float() / scale, expected.float() / scale, **GPU_TOLERANCES[dtype],
                                   msg=lambda m: f"{where}{name}: {m}")
        error = (got.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)
        assert error <= GPU_RELATIVE_NORM[dtype], f"{where}{name}: relative norm error {error:.2e}"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_compiled_triton_matches_reference(shape: Shape, dtype: torch.dtype) -> None:
    for seed in (0, 1):  # fresh random inputs, not one lucky draw
        assert_matches_reference(*triton_and_reference(shape, dtype, device="cuda", seed=seed), dtype, f"seed {seed} ")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_triton_more_than_65535_videos(dtype: torch.dtype) -> None:
    # CUDA grids take at most 65535 programs on axes 1 and 2: the batch must not live there.
    batch = 70_000
    shape = Shape(batch, 3, 2, 7, 16, tuple(video % 4 for video in range(batch)))
    assert_matches_reference(*triton_and_reference(shape, dtype, device="cuda"), dtype)


# The paper's batch: 160 videos of unequal lengths (empty, one frame, full, and 120-300).
PAPER_BATCH_LENGTHS = (0, 1, 17, 299, 300) + tuple(120 + (video * 37) % 181 for video in range(155))
# Six videos whose row blocks cover every kind of run: full, empty, one frame, ends inside a
# block, one frame short, ends on a block boundary (64 frames x 8 groups = 8 blocks of 64 rows).
PLAN_LENGTHS = (300, 0, 1, 187, 299, 64)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", [Shape(160, 300, 8, 128, 256, PAPER_BATCH_LENGTHS),
                                   Shape(160, 300, 4, 56, 64, PAPER_BATCH_LENGTHS)], ids=["video-K128", "audio-K56"])
def test_compiled_triton_paper_batch_matches_reference(shape: Shape) -> None:
    """The paper's batch on the GPU's own SM count, so the launcher's plans are the ones training
    runs: backward programs walking runs of row blocks (the video stream with a tail of short runs,
    change 12) and, for the video stream, the forward splitting only its last wave's videos (change
    11). The small GPU_SHAPES never reach these plans: with 4 videos every backward program is one
    row block and every forward video is split."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block_r, block_d, _ = triton_module._tiles(triton_module._BACKWARD_TILES, "half",
                                               triton_module._padded_clusters(shape.clusters), shape.dim)[0]
    head_run, _, _ = triton_module._backward_plan(shape.batch, math.ceil(shape.frames * shape.groups / block_r),
                                                  math.ceil(shape.dim / block_d), sms)
    assert head_run > 1, "the backward's runs are not walked at this batch on this GPU"
    assert_matches_reference(*triton_and_reference(shape, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backward_plan", [(10, 9, 3), (3, 2, 1), (2, 40, 3), (38, 0, 38)],
                         ids=lambda plan: "head{}-tail{}x{}".format(*plan))
@pytest.mark.parametrize("shape", [Shape(6, 300, 8, 128, 256, PLAN_LENGTHS), Shape(6, 300, 4, 56, 64, PLAN_LENGTHS)],
                         ids=["D-loop", "one-D-block"])
def test_compiled_triton_backward_plans_match_reference(monkeypatch: pytest.MonkeyPatch, shape: Shape,
                                                        backward_plan: tuple[int, int, int]) -> None:
    """Every kind of backward run on the real compiler, whatever the GPU's SM count (the
    interpreter's walk test, compiled): head runs with the next block prefetched, tail runs, runs
    straddling or wholly past a video's end, a tail clamped to the video, whole videos."""
    monkeypatch.setattr(triton_module, "_backward_plan", lambda *args: backward_plan)
    assert_matches_reference(*triton_and_reference(shape, torch.bfloat16, device="cuda"), torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("forward_plan", [(0, 3), (4, 2), (5, 19)], ids=["every-video-3", "last-two-2", "last-one-19"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_triton_forward_splits_match_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                        forward_plan: tuple[int, int]) -> None:
    """The forward's frame splits added up in the kernel (change 11) on the real compiler, where the
    split programs arrive in any order: every video split, the last two, the last one in 19 (empty
    splits for its short videos)."""
    monkeypatch.setattr(triton_module, "_forward_plan", lambda *args: forward_plan)
    shape = Shape(6, 300, 8, 128, 256, PLAN_LENGTHS)
    assert_matches_reference(*triton_and_reference(shape, dtype, device="cuda"), dtype)


@pytest.mark.gpu
@requires_cuda
def test_compiled_triton_tf32_normalize_and_determinism() -> None:
    shape = GPU_SHAPES[0]
    first, reference = triton_and_reference(shape, torch.float32, device="cuda", normalize=True, precision="tf32")
    second, _ = triton_and_reference(shape, torch.float32, device="cuda", normalize=True, precision="tf32")
    for name, got, again, expected in zip(NAMES, first, second, reference):
        assert torch.equal(got, again), name
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_compiled_triton_every_candidate_tile_matches_reference(monkeypatch: pytest.MonkeyPatch,
                                                              dtype: torch.dtype) -> None:
    """Autotuning may pick any candidate tile, so each must be right on the real compiler: run the
    i-th candidate of both kernels, for every i, at the final recipe's video and audio shapes."""
    tiles = triton_module._tiles
    for shape in (Shape(3, 300, 8, 112, 256, (300, 41, 0)), Shape(3, 300, 4, 56, 64, (300, 41, 0))):
        for index in range(5):
            monkeypatch.setattr(triton_module, "_tiles",
                                lambda *args, index=index: [tiles(*args)[index % len(tiles(*args))]])
            triton_results, reference_results = triton_and_reference(shape, dtype, device="cuda")
            for name, got, expected in zip(NAMES, triton_results, reference_results):
                scale = expected.float().abs().max().clamp(min=1.0)
                torch.testing.assert_close(got.float() / scale, expected.float() / scale, **GPU_TOLERANCES[dtype],
                                           msg=lambda m: f"{shape} candidate {index} {name}: {m}")


@pytest.mark.gpu
@requires_cuda
def test_compiled_triton_forward_captures_into_a_cuda_graph() -> None:
    # The lengths check syncs with the host, which a stream capture forbids; it is skipped there.
    inputs = make_inputs(GPU_SHAPES[1], torch.bfloat16, "cuda")
    expected = residual_aggregation(*inputs)  # compiles (and autotunes) outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        residual_aggregation(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = residual_aggregation(*inputs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_compiled_triton_runs_on_the_tensors_device_not_the_current_one() -> None:
    # Triton launches on the current device; the op must switch to x's (cuda:1 while cuda:0 is current).
    with torch.cuda.device(0):
        triton_results, reference_results = triton_and_reference(GPU_SHAPES[1], torch.float32, device="cuda:1")
    for name, got, expected in zip(NAMES, triton_results, reference_results):
        assert got.device == torch.device("cuda:1"), name
        torch.testing.assert_close(got, expected, **GPU_TOLERANCES[torch.float32], msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@requires_cuda
def test_auto_backend_on_cuda_is_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = triton_module.launch_forward
    monkeypatch.setattr(triton_module, "launch_forward", lambda *args: calls.append(args) or original(*args))
    residual_aggregation(*make_inputs(GPU_SHAPES[1], torch.bfloat16, "cuda"))
    assert len(calls) == 1
    residual_aggregation(*make_inputs(Shape(2, 3, 1, 513, 16, (3, 1)), torch.bfloat16, "cuda"))
    assert len(calls) == 1, "more than 512 clusters: the reference, not Triton"


# ----------------------------------------------------------------------------------------------
# Benchmark script (CPU smoke run)
# ----------------------------------------------------------------------------------------------


def test_benchmark_quick_run_writes_results(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_aggregation.py"
    spec = importlib.util.spec_from_file_location("bench_aggregation", script)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_aggregation", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--device", "cpu", "--threads", "1", "--output-dir", str(tmp_path), "--name", "smoke"])
    finally:
        torch.set_num_threads(threads)

    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["meta"]["torch"] == torch.__version__ and result["meta"]["device_type"] == "cpu"
    rows = result["rows"]
    assert {(r["provider"], r["mode"], r["lengths"]) for r in rows} == {
        (provider, mode, lengths) for provider in ("einsum", "reference")
        for mode in ("forward", "forward+backward") for lengths in ("full", "uniform")
    }
    assert all(r["ms"] > 0 and r["GB/s"] > 0 and r["note"] == "" for r in rows)
    assert all(r["x_ref"] == 1.0 for r in rows if r["provider"] == "reference")
    assert "| provider |" in (tmp_path / "smoke.md").read_text()
    assert (tmp_path / "smoke.png").stat().st_size > 0


def test_lengths_values_are_checked_once_per_tensor_and_again_after_an_in_place_change(monkeypatch):
    """The host-syncing range check runs once for the several calls a model makes per step."""
    x, logits, attention = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 3), torch.randn(2, 4, 1)
    centroids, lengths = torch.randn(3, 16), torch.tensor([4, 2])
    checks = []
    original_any = torch.Tensor.any
    monkeypatch.setattr(torch.Tensor, "any", lambda self, *a, **k: checks.append(1) or original_any(self, *a, **k))
    for _ in range(3):
        residual_aggregation(x, logits, attention, lengths, centroids, backend="reference")
    assert len(checks) == 1
    lengths[1] = 5  # in place: the version counter changes, so the values are checked again
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, M = 4\], got values \[5\]"):
        residual_aggregation(x, logits, attention, lengths, centroids, backend="reference")
    with pytest.raises(ValueError, match="lengths must lie"):  # a new tensor with bad values
        residual_aggregation(x, logits, attention, torch.tensor([4, -1]), centroids, backend="reference")


def test_lengths_values_of_an_inference_tensor_are_checked_once(monkeypatch):
    """predict runs under torch.inference_mode, whose tensors have no version counter: one host
    sync per lengths tensor there too, not one per op call."""
    checks = []
    original_any = torch.Tensor.any
    monkeypatch.setattr(torch.Tensor, "any", lambda self, *a, **k: checks.append(1) or original_any(self, *a, **k))
    with torch.inference_mode():
        x, logits, attention = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 3), torch.randn(2, 4, 1)
        centroids, lengths = torch.randn(3, 16), torch.tensor([4, 2])
        for _ in range(3):
            residual_aggregation(x, logits, attention, lengths, centroids)
        assert len(checks) == 1
        with pytest.raises(ValueError, match="lengths must lie"):
            residual_aggregation(x, logits, attention, torch.tensor([4, 7]), centroids)


def test_roofline_of_the_paper_video_stream_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_aggregation.py"
    spec = importlib.util.spec_from_file_location("bench_aggregation", script)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_aggregation", bench)
    spec.loader.exec_module(bench)
    rows = bench.roofline(160, 300, copy_gbps=4800.0, bf16_tflops=990.0)
    row = next(r for r in rows if (r["shape"], r["lengths"], r["dtype"], r["mode"])
               == ("video K128 (paper)", "full", "bf16", "forward"))
    # bf16 x, logits, attention of 160*300*8 rows (256 + 128 + 1 values), int64 lengths, fp32
    # centroids (128 x 256) in; bf16 y (160 x 128 x 256) out.
    moved = 2 * 160 * 300 * 8 * 385 + 8 * 160 + 4 * 128 * 256 + 2 * 160 * 128 * 256
    flops = 2 * 160 * 300 * 8 * 128 * 256
    assert row["MB"] == pytest.approx(moved / 1e6) and row["GFLOP"] == pytest.approx(flops / 1e9)
    assert row["roofline_us"] == pytest.approx(moved / 4800e9 * 1e6) and row["bound"] == "memory"
    backward = next(r for r in rows if (r["shape"], r["lengths"], r["dtype"], r["mode"])
                    == ("video K128 (paper)", "full", "fp32", "forward+backward"))
    assert backward["GFLOP"] == pytest.approx(3 * flops / 1e9)
    assert backward["compute_us"] == pytest.approx(3 * flops / 495e12 * 1e6)  # TF32: half the bf16 peak
