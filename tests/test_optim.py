"""TF1Adam (SPEC 4) against a float64 transcription of TF1's ApplyAdam, tiny and zero gradients included."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nextvlad.optim import TF1Adam

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
STEPS = 6
LEARNING_RATES = [2e-4, 2e-4, 2e-4, 1.6e-4, 1.6e-4, 1.28e-4]  # a staircase decay set per step


def gradient_sequence(steps: int = STEPS) -> list[torch.Tensor]:
    """Per-step gradients of one 12-element tensor: ordinary (0-3), tiny as after per-tensor
    clipping of a large tensor (4-7), exact zeros (8-9), and nonzero once then zero (10-11)."""
    g = torch.Generator().manual_seed(0)
    grads = []
    for step in range(steps):
        grad = torch.empty(12, dtype=torch.float64)
        grad[:4] = torch.randn(4, generator=g, dtype=torch.float64) * 0.1
        grad[4:8] = torch.randn(4, generator=g, dtype=torch.float64) * 1e-9
        grad[8:10] = 0.0
        grad[10:] = 0.05 if step == 0 else 0.0
        grads.append(grad)
    return grads


def tf1_apply_adam(weights, m, v, grads, learning_rates, first_step=1):
    """TF1 training_ops.cc ApplyAdam, element by element in Python floats (float64)."""
    weights, m, v = list(weights), list(m), list(v)
    for t, (grad, lr) in enumerate(zip(grads, learning_rates), start=first_step):
        alpha = lr * math.sqrt(1 - BETA2**t) / (1 - BETA1**t)
        for i, g in enumerate(grad.tolist()):
            m[i] += (g - m[i]) * (1 - BETA1)
            v[i] += (g * g - v[i]) * (1 - BETA2)
            weights[i] -= m[i] * alpha / (math.sqrt(v[i]) + EPS)
    return torch.tensor(weights, dtype=torch.float64), m, v


def run(optimizer_class, weights, grads, learning_rates, dtype=torch.float64, **kwargs):
    param = torch.nn.Parameter(weights.clone().to(dtype))
    optimizer = optimizer_class([param], lr=learning_rates[0], betas=(BETA1, BETA2), eps=EPS, **kwargs)
    for grad, lr in zip(grads, learning_rates):
        optimizer.param_groups[0]["lr"] = lr
        param.grad = grad.to(dtype)
        optimizer.step()
    return param.detach().double(), optimizer


def start_weights() -> torch.Tensor:
    return torch.linspace(-1, 1, 12, dtype=torch.float64)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_tf1_adam_matches_float64_apply_adam_over_six_steps(fused):
    grads = gradient_sequence()
    expected, _, _ = tf1_apply_adam(start_weights().tolist(), [0.0] * 12, [0.0] * 12, grads, LEARNING_RATES)
    moved, optimizer = run(TF1Adam, start_weights(), grads, LEARNING_RATES, fused=fused)
    assert optimizer.fused is fused
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-15)
    # fp32 parameters
    moved32, _ = run(TF1Adam, start_weights(), grads, LEARNING_RATES, dtype=torch.float32, fused=fused)
    displacement = moved32 - start_weights().float().double()
    assert torch.equal(displacement[8:10], torch.zeros(2, dtype=torch.float64))  # never a gradient: never moves
    moving = [0, 1, 2, 3, 4, 5, 6, 7, 10, 11]
    # within fp32 rounding of the weights (about 6e-8 at |w| <= 1) of the float64 displacement
    torch.testing.assert_close(displacement[moving], (expected - start_weights())[moving], rtol=0, atol=2e-7)


def test_torch_adam_differs_from_tf1_where_gradients_are_tiny():
    """The oracle tells the two epsilon rules apart (so the test above can fail)."""
    grads = gradient_sequence()
    expected, _, _ = tf1_apply_adam(start_weights().tolist(), [0.0] * 12, [0.0] * 12, grads, LEARNING_RATES)
    moved, _ = run(torch.optim.Adam, start_weights(), grads, LEARNING_RATES)
    tf_step, torch_step = expected - start_weights(), moved - start_weights()
    tiny = slice(4, 8)
    relative = ((torch_step[tiny] - tf_step[tiny]).abs() / tf_step[tiny].abs()).max()
    assert relative > 0.1
    # ordinary gradients: the rules agree closely
    torch.testing.assert_close(torch_step[:4], tf_step[:4], rtol=1e-3, atol=0)
    # a tensor whose gradient went to zero keeps drifting, more under torch's rule
    assert (torch_step[10:] - tf_step[10:]).abs().min() > 0


def test_state_saved_by_torch_adam_loads_and_continues_with_tf1_rule():
    """A checkpoint from before TF1Adam (torch.optim.Adam's state) resumes with TF1's update."""
    grads = gradient_sequence(2 * 3)
    _, torch_adam = run(torch.optim.Adam, start_weights(), grads[:3], LEARNING_RATES[:3])
    saved = copy.deepcopy(torch_adam.state_dict())  # as from a file: no tensor shared with torch_adam
    state = saved["state"][0]
    param = torch.nn.Parameter(torch_adam.param_groups[0]["params"][0].detach().clone())
    expected, _, _ = tf1_apply_adam(param.tolist(), state["exp_avg"].tolist(), state["exp_avg_sq"].tolist(),
                                    grads[3:], LEARNING_RATES[3:], first_step=4)
    resumed = TF1Adam([param])
    resumed.load_state_dict(saved)
    for grad, lr in zip(grads[3:], LEARNING_RATES[3:]):
        resumed.param_groups[0]["lr"] = lr
        param.grad = grad
        resumed.step()
    assert int(resumed.state[param]["step"]) == 6
    torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-15)


def test_tensors_without_gradient_are_left_alone():
    with_grad, without = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = TF1Adam([with_grad, without], lr=0.1)
    with_grad.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(without.detach(), torch.ones(3)) and without not in optimizer.state
    assert torch.all(with_grad < 1)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(eps=-1e-8), dict(betas=(0.9, 1.0))])
def test_bad_arguments_are_named(kwargs):
    with pytest.raises(ValueError, match="TF1Adam needs"):
        TF1Adam([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_tensors_at_different_step_counts_each_follow_their_own_count():
    """A tensor that got no gradient at the first step is one step behind: its TF1 epsilon and
    bias corrections are those of its own count (updated in a call of their own)."""
    grads = gradient_sequence()
    early, late = torch.nn.Parameter(start_weights().clone()), torch.nn.Parameter(start_weights().clone())
    optimizer = TF1Adam([early, late], lr=LEARNING_RATES[0], betas=(BETA1, BETA2), eps=EPS)
    for step, (grad, lr) in enumerate(zip(grads, LEARNING_RATES)):
        optimizer.param_groups[0]["lr"] = lr
        early.grad, late.grad = grad.clone(), (grad.clone() if step > 0 else None)
        optimizer.step()
    expected_early, _, _ = tf1_apply_adam(start_weights().tolist(), [0.0] * 12, [0.0] * 12, grads, LEARNING_RATES)
    expected_late, _, _ = tf1_apply_adam(start_weights().tolist(), [0.0] * 12, [0.0] * 12, grads[1:], LEARNING_RATES[1:])
    torch.testing.assert_close(early.detach(), expected_early, rtol=0, atol=1e-15)
    torch.testing.assert_close(late.detach(), expected_late, rtol=0, atol=1e-15)
    assert [optimizer.state[p]["tf1_step"] for p in (early, late)] == [STEPS, STEPS - 1]


@pytest.mark.parametrize("saved_fused, loaded_fused", [(False, True), (True, False), (True, True)])
def test_a_saved_state_continues_exactly_with_either_implementation(saved_fused, loaded_fused):
    """Checkpoints of foreach and fused runs resume into either (the step tensor's device differs
    on a GPU; the host step count is rebuilt from it for a state saved without one)."""
    grads = gradient_sequence(STEPS)
    whole, _ = run(TF1Adam, start_weights(), grads, LEARNING_RATES, fused=saved_fused)
    _, first = run(TF1Adam, start_weights(), grads[:3], LEARNING_RATES[:3], fused=saved_fused)
    saved = copy.deepcopy(first.state_dict())
    del saved["state"][0]["tf1_step"]  # as saved before it existed
    param = torch.nn.Parameter(first.param_groups[0]["params"][0].detach().clone())
    resumed = TF1Adam([param], betas=(BETA1, BETA2), eps=EPS, fused=loaded_fused)
    resumed.load_state_dict(saved)
    for grad, lr in zip(grads[3:], LEARNING_RATES[3:]):
        resumed.param_groups[0]["lr"] = lr
        param.grad = grad
        resumed.step()
    assert torch.equal(param.detach(), whole)
