"""The registered op ``torch.ops.nextvlad.residual_aggregation``: opcheck (schema, fake tensors,
autograd registration, AOT dispatch with dynamic shapes), the hand-written backward against
autograd in float64, and torch.compile(fullgraph=True) of the full models with zero graph breaks
and no recompilation when the frame count changes."""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from nextvlad.kernels import residual_aggregation, residual_aggregation_reference, triton_interpreter_enabled
from nextvlad.kernels.residual_aggregation import reference_decompositions
from nextvlad.models import build_video_model
from nextvlad.models.mixture import MixtureOfNeXtVLAD

OP = torch.ops.nextvlad.residual_aggregation.default
BACKWARD_OP = torch.ops.nextvlad.residual_aggregation_backward.default

# (B, M, G, K, D, lengths): lengths 0, 1 and M; K not a power of two; G = 1; K > 16
OP_SHAPES = [(3, 5, 2, 7, 16, (0, 1, 5)), (2, 4, 1, 20, 16, (4, 2))]


def implementations() -> list[str]:
    """The reference everywhere; Triton where it can run here (the interpreter on a CPU)."""
    return ["reference", "triton"] if triton_interpreter_enabled() else ["reference"]


def op_inputs(shape, dtype=torch.float32, seed=0):
    batch, frames, groups, clusters, dim, lengths = shape
    generator = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=generator, dtype=torch.float64)).to(dtype).requires_grad_()

    return (randn(batch, frames, groups, dim), randn(batch, frames, groups, clusters, scale=2.0),
            randn(batch, frames, groups, scale=2.0), torch.tensor(lengths), randn(clusters, dim, scale=0.5))


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("shape", OP_SHAPES, ids=str)
def test_opcheck(shape, implementation: str) -> None:
    inputs = op_inputs(shape)
    torch.library.opcheck(OP, (*inputs, "ieee", torch.float32, implementation))


@pytest.mark.parametrize("implementation", implementations())
def test_backward_op_of_strided_inputs_returns_contiguous_gradients_as_its_fake_says(implementation: str) -> None:
    """Logits, attention and centroids in other layouts than contiguous: both implementations write
    contiguous gradients, and the fake must say so (it said the inputs' strides, and Inductor's
    stride assertion failed in the backward of a compiled caller)."""
    def relaid(tensor: torch.Tensor) -> torch.Tensor:  # same values and shape, reversed memory layout
        dims = tuple(range(tensor.dim() - 1, -1, -1))
        return tensor.detach().permute(dims).contiguous().permute(dims)

    x, logits, attention, lengths, centroids = (t.detach() for t in op_inputs(OP_SHAPES[0]))
    logits, attention, centroids = relaid(logits), relaid(attention), relaid(centroids)
    assert not (logits.is_contiguous() or attention.is_contiguous() or centroids.is_contiguous())
    _, assignment_sum = OP(x, logits, attention, lengths, centroids, "ieee", torch.float32, implementation)
    grad_y = torch.randn(x.shape[0], logits.shape[3], x.shape[3], generator=torch.Generator().manual_seed(1))
    arguments = (x, logits, attention, lengths, centroids, assignment_sum, grad_y, None, "ieee", implementation)
    assert all(grad.is_contiguous() for grad in BACKWARD_OP(*arguments))
    torch.library.opcheck(BACKWARD_OP, arguments, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("implementation", implementations())
def test_op_gradients_of_both_outputs_match_autograd_of_the_reference_float64(implementation: str) -> None:
    """y and a_sum are both differentiable outputs: the registered backward (hand-written formulas
    or the Triton kernels) against autograd through the reference formulation, and gradcheck."""
    x, logits, attention, lengths, centroids = op_inputs(OP_SHAPES[0], torch.float64)
    y, assignment_sum = OP(x, logits, attention, lengths, centroids, "ieee", torch.float64, implementation)
    generator = torch.Generator().manual_seed(5)
    grad_y = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    grad_sum = torch.randn(assignment_sum.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad((y * grad_y).sum() + (assignment_sum * grad_sum).sum(), (x, logits, attention, centroids))

    expected_y = residual_aggregation_reference(x, logits, attention, lengths, centroids)
    real = (torch.arange(x.shape[1]) < lengths[:, None])[:, :, None, None]
    assignment = torch.softmax(logits, -1) * torch.sigmoid(attention)[..., None] * real
    expected_sum = assignment.sum(dim=(1, 2))
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(assignment_sum, expected_sum)
    expected = torch.autograd.grad((expected_y * grad_y).sum() + (expected_sum * grad_sum).sum(),
                                   (x, logits, attention, centroids))
    for name, a, b in zip(("x", "logits", "attention", "centroids"), got, expected):
        torch.testing.assert_close(a, b, msg=lambda m: f"grad {name}: {m}")

    def both_outputs(x, logits, attention, centroids):
        return OP(x, logits, attention, lengths, centroids, "ieee", torch.float64, implementation)

    assert torch.autograd.gradcheck(both_outputs, (x, logits, attention, centroids), fast_mode=True)


def test_op_is_what_auto_calls_and_takes_the_reference_on_cpu() -> None:
    inputs = op_inputs(OP_SHAPES[0])
    y, _ = OP(*inputs, "ieee", torch.float32, "reference")
    torch.testing.assert_close(residual_aggregation(*inputs), y, rtol=0, atol=0)
    torch.testing.assert_close(y, residual_aggregation_reference(*inputs))


# ----------------------------------------------------------------------------------------------
# torch.compile and torch.export of the models
# ----------------------------------------------------------------------------------------------

SIZES = dict(num_classes=6, rgb_size=32, audio_size=8, clusters=6, groups=2, hidden_size=16,
             gating_reduction=2, dropout=0.0)


def video_model(backend: str = "auto") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_video_model("nextvlad", backend=backend, **SIZES)


def mixture(backend: str = "auto") -> torch.nn.Module:
    torch.manual_seed(0)
    branches = [build_video_model("nextvlad", backend=backend, **SIZES) for _ in range(2)]
    return MixtureOfNeXtVLAD(branches, input_size=SIZES["rgb_size"] + SIZES["audio_size"])


def batch(frames: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    rgb = torch.randn(3, frames, SIZES["rgb_size"], generator=generator)
    audio = torch.randn(3, frames, SIZES["audio_size"], generator=generator)
    lengths = torch.tensor([frames, max(1, frames // 2), 1])
    return rgb, audio, lengths


def forward_backward(model: torch.nn.Module, inputs) -> list[torch.Tensor]:
    output = model(*inputs)
    scores = output if isinstance(output, torch.Tensor) else output[0]
    scores.sum().backward()
    return [scores.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


class CountingBackend:
    """A torch.compile backend that counts compilations (graphs) and defers to ``inner``."""

    def __init__(self, inner: str) -> None:
        self.inner = torch._dynamo.lookup_backend(inner)
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return self.inner(graph_module, example_inputs)


@pytest.mark.slow
@pytest.mark.parametrize("build", [video_model, mixture], ids=["VideoModel", "mixture"])
def test_compile_fullgraph_of_the_models_has_no_graph_break_and_no_recompile(build) -> None:
    """The op and the lengths check trace without a break; one dynamic graph serves 7, 11 and 4
    frames (forward and backward), and its results equal eager's."""
    torch._dynamo.reset()
    eager_model = build()
    explanation = torch._dynamo.explain(copy.deepcopy(eager_model))(*batch(7))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    backend = CountingBackend("aot_eager")
    compiled_model = copy.deepcopy(eager_model)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True, dynamic=True)
    graphs_after_first_call = None
    for frames in (7, 11, 4):
        eager_model.zero_grad(), compiled_model.zero_grad()
        expected = forward_backward(eager_model, batch(frames, seed=frames))
        got = forward_backward(compiled, batch(frames, seed=frames))
        for index, (a, b) in enumerate(zip(got, expected)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{frames} frames, tensor {index}: {m}")
        # (Dynamo may restart its first analysis once, e.g. to specialise a Python float: that is
        # one compilation, not a recompilation.)
        graphs_after_first_call = graphs_after_first_call or backend.graphs
    assert backend.graphs == graphs_after_first_call, "recompiled when the frame count changed"


@pytest.mark.slow
def test_compile_with_the_triton_backend_under_the_interpreter() -> None:
    """The CUDA configuration (backend="triton") traced by torch.compile: torch cannot trace
    kernels that the interpreter runs, so here the op stays whole in the graph (a GPU's compiled
    Triton lets Inductor see the launches); the graph still has no break and matches eager."""
    if not triton_interpreter_enabled():
        pytest.skip("needs Triton's interpreter (a GPU runs the compiled kernels in the GPU tests)")
    torch._dynamo.reset()
    eager_model = video_model("triton")
    compiled_model = copy.deepcopy(eager_model)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True, dynamic=True)
    expected = forward_backward(eager_model, batch(5))
    got = forward_backward(compiled, batch(5))
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"tensor {index}: {m}")


def test_lengths_check_raises_in_eager_and_never_syncs_when_compiled() -> None:
    """Eager: a clear ValueError. Compiled: no data-dependent branch (fullgraph would fail on one);
    the op clamps lengths to [0, M] like the reference's mask."""
    x, logits, attention, _, centroids = (t.detach() for t in op_inputs(OP_SHAPES[0]))
    bad = torch.tensor([-1, 9, 2])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, M = 5\]"):
        residual_aggregation(x, logits, attention, bad, centroids)
    torch._dynamo.reset()
    compiled = torch.compile(residual_aggregation, backend="aot_eager", fullgraph=True)
    clamped = torch.tensor([0, 5, 2])
    torch.testing.assert_close(compiled(x, logits, attention, bad, centroids),
                               residual_aggregation(x, logits, attention, clamped, centroids))


def test_export_keeps_the_op_and_the_reference_table_replaces_it() -> None:
    """torch.export keeps the registered op whole (no backend switch needed); the decomposition
    table turns it into ATen ops that compute the same."""
    model = video_model().eval()
    inputs = batch(6)
    program = torch.export.export(model, inputs)
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert OP in targets
    decomposed = program.run_decompositions(reference_decompositions())
    targets = {node.target for node in decomposed.graph.nodes if node.op == "call_function"}
    assert OP not in targets
    other = batch(6, seed=9)
    torch.testing.assert_close(decomposed.module()(*other), model(*other))


@pytest.mark.slow
def test_inductor_compiles_the_model_on_cpu_without_the_interpreter() -> None:
    """Where Triton is compiled (every user machine), the op is a triton_op: under torch.compile
    it decomposes into the reference's ATen ops on a CPU, which Inductor compiles to C++. Runs in a
    subprocess because this test process's Triton may run interpreted."""
    script = textwrap.dedent("""
        import copy, torch
        from nextvlad.models import build_video_model
        torch.manual_seed(0)
        model = build_video_model("nextvlad", num_classes=6, rgb_size=32, audio_size=8, clusters=6, groups=2,
                                  hidden_size=16, gating_reduction=2, dropout=0.0).eval()
        compiled = torch.compile(copy.deepcopy(model), fullgraph=True, dynamic=True)
        for frames in (7, 4):
            rgb, audio = torch.randn(3, frames, 32), torch.randn(3, frames, 8)
            lengths = torch.tensor([frames, 2, 1])
            with torch.no_grad():
                torch.testing.assert_close(compiled(rgb, audio, lengths), model(rgb, audio, lengths),
                                           rtol=1e-4, atol=1e-5)
        print("ok")
    """)
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["TORCHINDUCTOR_CACHE_DIR"] = str(pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "nextvlad_inductor")
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr[-4000:]


# ----------------------------------------------------------------------------------------------
# GPU only: what Inductor and CUDA graphs make of the op
# ----------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_cuda
def test_inductor_on_cuda_launches_the_triton_kernels_inside_its_graph() -> None:
    """On a GPU the triton_op decomposes under torch.compile: Inductor's generated code calls our
    kernels itself (no graph break, no opaque op), forward and backward, and matches eager."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = video_model().cuda()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, dynamic=True)
    inputs = [t.cuda() for t in batch(9)]

    def step(module):
        module.zero_grad()
        return forward_backward(module, inputs)

    got, code = run_and_get_code(step, compiled)
    expected = step(model)
    source = "\n".join(code)
    assert "residual_aggregation_forward_kernel" in source and "residual_aggregation_backward_kernel" in source
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"tensor {index}: {m}")


@pytest.mark.gpu
@requires_cuda
def test_compile_reduce_overhead_captures_the_op_into_cuda_graphs() -> None:
    """mode="reduce-overhead" (CUDA graphs) must capture the op: no host sync inside it."""
    torch._dynamo.reset()
    model = video_model().cuda().eval()
    compiled = torch.compile(copy.deepcopy(model), mode="reduce-overhead", fullgraph=True)
    inputs = [t.cuda() for t in batch(9)]
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            got = compiled(*inputs).clone()
        torch.testing.assert_close(got, model(*inputs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["no triton", "torch too old"])
def test_without_triton_the_op_runs_the_reference_and_a_broken_import_is_not_hidden(case):
    """Triton absent (a CPU build of torch): the reference, and backend='triton' says why not.
    Any other import failure of the Triton module (a torch without torch.library.wrap_triton) also
    leaves the reference, but with a warning that names it (it was taken for Triton's absence in
    silence, and every CUDA call ran the reference), and backend='triton' says what failed."""
    hide = 'sys.modules["triton"] = None' if case == "no triton" else "del torch.library.wrap_triton"
    script = textwrap.dedent(f'''
        import sys
        import torch
        {hide}
        from nextvlad.kernels import residual_aggregation
        x = torch.randn(2, 3, 2, 4)
        y = residual_aggregation(x, torch.randn(2, 3, 2, 5), torch.randn(2, 3, 2), torch.tensor([3, 1]),
                                 torch.randn(5, 4))
        print(tuple(y.shape))
        try:
            residual_aggregation(x, torch.randn(2, 3, 2, 5), torch.randn(2, 3, 2), torch.tensor([3, 1]),
                                 torch.randn(5, 4), backend="triton")
        except ValueError as error:
            print(error)
    ''')
    result = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    if case == "no triton":
        assert result.stdout.splitlines() == ["(2, 5, 4)", "backend='triton' cannot run: the triton package is not installed"]
        assert "Triton" not in result.stderr
    else:
        why = "the Triton kernels cannot be imported (ImportError: cannot import name 'wrap_triton' from 'torch.library'"
        assert result.stdout.splitlines()[0] == "(2, 5, 4)"
        assert result.stdout.splitlines()[1].startswith(f"backend='triton' cannot run: {why}")
        assert f"UserWarning: {why}" in result.stderr, result.stderr[-2000:]
