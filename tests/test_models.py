"""Model layers against SPEC 3: an independent float64 oracle, parameter counts, init, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nextvlad.models import NetVLAD, NeXtVLAD, SEContextGating, build_video_model, count_parameters
from nextvlad.models.initialization import MaskedBatchNorm1d, TFBatchNorm1d
from nextvlad.models.mixture import MixtureOfNeXtVLAD, distillation_kl


def tf_batch_norm_train(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """slim.batch_norm in training: biased moments over rows, eps 1e-3."""
    mean, var = x.mean(0), x.var(0, unbiased=False)
    return (x - mean) / torch.sqrt(var + 1e-3) * gamma + beta


def nextvlad_oracle(layer: NeXtVLAD, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """SPEC 3.1 steps 1-10 written out in float64 with the TF layouts (loops over groups)."""
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    B, M, _ = frames.shape
    G, K, D = layer.groups, layer.clusters, layer.group_size
    x = frames.double()
    mask = (torch.arange(M)[None, :] < lengths[:, None]).double()  # tf.sequence_mask
    expanded = x @ p["expansion_fc.weight"].T + p["expansion_fc.bias"]
    attention = torch.sigmoid(expanded @ p["group_attention.weight"].T + p["group_attention.bias"])
    attention = attention * mask[..., None]  # (B, M, G)
    logits = expanded.reshape(B * M, -1) @ p["cluster_logits.weight"].T
    logits = tf_batch_norm_train(logits, p["cluster_bn.weight"], p["cluster_bn.bias"])
    assignment = torch.softmax(logits.reshape(B, M * G, K), dim=-1) * attention.reshape(B, M * G, 1)
    centroids_tf = p["centroids"].T.unsqueeze(0)  # [1, D, K]
    vlad = torch.zeros(B, D, K, dtype=torch.float64)
    x_groups = expanded.reshape(B, M * G, D)
    for b in range(B):
        vlad[b] = (assignment[b].T @ x_groups[b]).T - assignment[b].sum(0)[None, :] * centroids_tf[0]
    norm = torch.sqrt(torch.clamp((vlad**2).sum(dim=1, keepdim=True), min=1e-12))
    flat = (vlad / norm).reshape(B, D * K)  # index d*K + k
    return tf_batch_norm_train(flat, p["vlad_bn.weight"], p["vlad_bn.bias"])


@pytest.fixture
def frames_and_lengths():
    torch.manual_seed(0)
    frames = torch.randn(3, 7, 16)
    lengths = torch.tensor([7, 3, 1])
    frames[1, 3:] = 0.0
    frames[2, 1:] = 0.0
    return frames, lengths


def test_nextvlad_matches_float64_oracle(frames_and_lengths):
    frames, lengths = frames_and_lengths
    layer = NeXtVLAD(feature_size=16, clusters=5, groups=4, expansion=2).train()
    with torch.no_grad():  # non-trivial BN affine parameters
        for bn in (layer.cluster_bn, layer.vlad_bn):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    expected = nextvlad_oracle(layer, frames, lengths)
    assert torch.allclose(layer(frames, lengths).double(), expected, atol=2e-4, rtol=1e-4)


def test_nextvlad_output_ignores_padded_frames_in_eval(frames_and_lengths):
    frames, lengths = frames_and_lengths
    layer = NeXtVLAD(16, 5, 4).eval()
    garbage = frames.clone()
    garbage[1, 3:] = 50.0
    garbage[2, 1:] = -7.0
    assert torch.allclose(layer(frames, lengths), layer(garbage, lengths), atol=1e-5)
    assert not torch.allclose(layer(frames, lengths), layer(frames, torch.tensor([7, 2, 1])), atol=1e-3)


def test_cluster_bn_statistics_all_rows_vs_masked(frames_and_lengths):
    frames, lengths = frames_and_lengths
    frames = frames + 3.0  # so that padded (zero) rows move the statistics
    frames[1, 3:] = 0.0
    frames[2, 1:] = 0.0
    torch.manual_seed(1)
    faithful = NeXtVLAD(16, 5, 4, cluster_bn_statistics="all").train()
    torch.manual_seed(1)
    masked = NeXtVLAD(16, 5, 4, cluster_bn_statistics="masked").train()
    faithful(frames, lengths)
    masked(frames, lengths)
    expanded = faithful.expansion_fc(frames)
    logits = faithful.cluster_logits(expanded).detach()  # (B, M, G*K)
    real = torch.arange(7)[None, :] < lengths[:, None]
    momentum = faithful.cluster_bn.momentum
    assert torch.allclose(faithful.cluster_bn.running_mean, momentum * logits.reshape(-1, 20).mean(0), atol=1e-6)
    assert torch.allclose(masked.cluster_bn.running_mean, momentum * logits[real].mean(0), atol=1e-6)
    # masked training output ignores padded rows entirely
    garbage = frames.clone()
    garbage[1, 3:] = 9.0
    masked_again = NeXtVLAD(16, 5, 4, cluster_bn_statistics="masked").train()
    masked_again.load_state_dict(masked.state_dict())
    assert torch.allclose(masked_again(frames, lengths), masked_again(garbage, lengths), atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_masked_batch_norm_matches_batch_norm_on_real_rows(fused):
    torch.manual_seed(0)
    x = torch.randn(12, 6)
    mask = torch.tensor([True] * 8 + [False] * 4)
    masked, plain = MaskedBatchNorm1d(6, fused).train(), MaskedBatchNorm1d(6, fused).train()
    out = masked(x, mask)
    reference = plain(x[mask])
    assert torch.allclose(out[mask], reference, atol=1e-6)
    assert torch.allclose(masked.running_mean, plain.running_mean)
    assert torch.allclose(masked.running_var, plain.running_var)


def moving_variance_oracle(batches: list[torch.Tensor], momentum: float, biased: bool) -> torch.Tensor:
    """slim's moving variance in float64: r <- r - (1 - decay) (r - var), var biased (non-fused
    kernel) or Bessel-corrected (fused kernel), starting from 1."""
    running = torch.ones(batches[0].shape[1], dtype=torch.float64)
    for x in batches:
        running = running - momentum * (running - x.double().var(0, unbiased=not biased))
    return running


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_moving_variance_is_biased_unless_fused(fused, masked):
    torch.manual_seed(0)
    layer = MaskedBatchNorm1d(5, fused).double().train() if masked else TFBatchNorm1d(5, fused).double().train()
    layer.momentum = 0.3
    batches = [torch.randn(6, 5, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    for x in batches:
        layer(x, torch.ones(6, dtype=torch.bool)) if masked else layer(x)
    expected = moving_variance_oracle(batches, 0.3, biased=not fused)
    torch.testing.assert_close(layer.running_var, expected, rtol=1e-12, atol=0)
    other_rule = moving_variance_oracle(batches, 0.3, biased=fused)
    assert (layer.running_var - other_rule).abs().min() > 1e-3  # 6 rows: the rules are far apart
    assert int(layer.num_batches_tracked) == 4
    # eval normalises with the moving statistics, as slim's is_training=False
    x = batches[0]
    expected_eval = (x - layer.running_mean) / torch.sqrt(layer.running_var + 1e-3) * layer.weight + layer.bias
    torch.testing.assert_close(layer.eval()(x), expected_eval)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_one_row_trains_as_slim_mean_the_row_variance_zero(fused, masked):
    """slim.batch_norm on one row: mean the row, variance 0 (the fused kernel's Bessel factor is
    n / max(n - 1, 1)), so the output is beta, no gradient reaches the input, and the moving
    averages move toward the row and toward 0. PyTorch's BatchNorm refuses one row in training."""
    layer = MaskedBatchNorm1d(4, fused) if masked else TFBatchNorm1d(4, fused)
    layer = layer.double().train()
    layer.momentum = 0.25
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
    x = torch.tensor([[1.5, -2.0, 7.0, 0.25]], dtype=torch.float64, requires_grad=True)
    out = layer(x, torch.tensor([True])) if masked else layer(x)
    out.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(out, layer.bias.detach()[None], rtol=0, atol=1e-15)
    assert torch.count_nonzero(x.grad) == 0
    torch.testing.assert_close(layer.bias.grad, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(layer.running_mean, 0.25 * x.detach()[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(layer.running_var, torch.full((4,), 0.75, dtype=torch.float64), rtol=0, atol=1e-15)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("fused", [False, True])
def test_one_row_after_more_rows_in_one_graph_backpropagates(fused):
    """F.batch_norm saves the running statistics for backward; the one-row path moves them
    afterwards in the same graph (BN towers) without invalidating what was saved."""
    layer = TFBatchNorm1d(3, fused).train()
    two, one = torch.randn(2, 3, requires_grad=True), torch.randn(1, 3, requires_grad=True)
    (layer(two).square().sum() + layer(one).sum()).backward()
    assert torch.isfinite(two.grad).all() and int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("architecture", ["nextvlad", "netvlad"])
def test_a_training_batch_of_one_video_trains_as_the_tf_graph(architecture):
    """A last batch of one video (``drop_last: false``) trains: every BN sees one row, so the
    features leave vlad_bn as its beta and the logits do not depend on the video (slim's result)."""
    model = build_video_model(architecture, num_classes=5, rgb_size=16, audio_size=8, clusters=4, groups=2,
                              hidden_size=8, gating_reduction=2, dropout=0.0).train()
    logits = [model(torch.randn(1, 6, 16), torch.randn(1, 6, 8), torch.tensor([length])) for length in (6, 2)]
    torch.testing.assert_close(logits[0], logits[1])
    logits[0].sum().backward()
    assert model.classifier.bias.grad is not None and torch.isfinite(model.classifier.bias.grad).all()


def test_moving_variance_rule_per_layer_as_the_authors_kernels():
    """cluster_bn, vlad_bn, hidden1_bn ran slim's non-fused kernel (biased); gating_bn and
    mix_weights_bn the fused one (Bessel-corrected): SPEC 3.4. Checked on every BN of a mixture
    against the float64 variance of the input each BN saw."""
    torch.manual_seed(0)
    branches = [build_video_model(num_classes=7, rgb_size=16, audio_size=8, clusters=4, groups=2, hidden_size=8,
                                  gating_reduction=2, hidden_activation="none") for _ in range(2)]
    mixture = MixtureOfNeXtVLAD(branches, input_size=24).double().train()
    seen = {}
    for name, layer in mixture.named_modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.momentum = 0.5
            layer.register_forward_hook(lambda module, inputs, output, name=name: seen.__setitem__(name, inputs[0]))
    rgb, audio = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    mixture(rgb, audio, torch.tensor([5, 3, 1]))
    fused_layers = {"gate_bn"} | {f"branches.{m}.context_gating.squeeze_bn" for m in range(2)}
    assert len(seen) == 2 * 6 + 1
    for name, layer in mixture.named_modules():
        if name in seen:
            expected = moving_variance_oracle([seen[name]], 0.5, biased=name not in fused_layers)
            torch.testing.assert_close(layer.running_var, expected, rtol=1e-12, atol=0, msg=name)


def test_mixture_works_in_float64_and_gates_in_fp32_under_autocast():
    torch.manual_seed(0)
    branches = [build_video_model(num_classes=7, rgb_size=16, audio_size=8, clusters=4, groups=2, hidden_size=8,
                                  gating_reduction=2) for _ in range(2)]
    mixture = MixtureOfNeXtVLAD(branches, input_size=24)
    rgb, audio, lengths = torch.randn(3, 5, 16), torch.randn(3, 5, 8), torch.tensor([5, 3, 1])
    double = copy.deepcopy(mixture).double()
    out = double.forward_all(rgb.double(), audio.double(), lengths)
    assert out.logits.dtype == out.gate.dtype == torch.float64
    out.logits.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in double.parameters())
    mixture.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gate = mixture.gate(rgb, audio, lengths)
    assert gate.dtype == torch.float32
    assert torch.equal(gate, mixture.gate(rgb, audio, lengths))  # the fp32 computation, not a bf16 one


def test_se_context_gating_formula():
    torch.manual_seed(0)
    gating = SEContextGating(16, reduction=4).train()
    h = torch.randn(10, 16)
    squeezed = h @ gating.squeeze.weight.T
    squeezed = torch.relu(tf_batch_norm_train(squeezed, gating.squeeze_bn.weight, gating.squeeze_bn.bias))
    expected = h * torch.sigmoid(squeezed @ gating.excite.weight.T)
    assert torch.allclose(gating(h), expected, atol=1e-5)
    assert gating.squeeze.bias is None and gating.excite.bias is None


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(clusters=128, groups=8, hidden_size=2048, gating_reduction=8), 88_889_378),
        (dict(clusters=112, groups=8, hidden_size=2048, gating_reduction=16), 78_643_170),
    ],
)
def test_parameter_counts_match_the_paper(kwargs, expected):
    with torch.device("meta"):
        model = build_video_model("nextvlad", **kwargs)
    assert count_parameters(model) == expected


def test_mixture_parameter_count():
    with torch.device("meta"):
        branches = [build_video_model("nextvlad", clusters=112, gating_reduction=16, hidden_activation="none")
                    for _ in range(3)]
        mixture = MixtureOfNeXtVLAD(branches)
    assert count_parameters(mixture) == 235_935_273


def test_parameter_count_formula_spec_3_5():
    """P_layer of SPEC 3.5 for a small, odd configuration."""
    def p_layer(n, g, k, lam=2):
        d = lam * n // g
        return n * lam * n + lam * n + lam * n * g + g + lam * n * g * k + 2 * g * k + d * k + 2 * d * k
    g, k, h, r, c = 4, 6, 40, 5, 17
    model = build_video_model("nextvlad", num_classes=c, rgb_size=32, audio_size=8, clusters=k, groups=g,
                              hidden_size=h, gating_reduction=r)
    v = 2 * 32 * k // g + 2 * 8 * (k // 2) // (g // 2)
    expected = p_layer(32, g, k) + p_layer(8, g // 2, k // 2) + v * h + 2 * h + 2 * h * (h // r) + 2 * (h // r) + h * c + c
    assert count_parameters(model) == expected


def test_initialisation_is_slim_variance_scaling():
    torch.manual_seed(0)
    model = build_video_model("nextvlad", num_classes=64, clusters=16, groups=8, hidden_size=512)
    weight = model.hidden.weight  # fan_in = vlad dim
    fan_in = weight.shape[1]
    std = math.sqrt(2.6 / fan_in)
    assert weight.abs().max() <= 2 * std + 1e-7
    # a normal truncated at 2 sigma has standard deviation 0.8796 sigma
    assert abs(weight.std().item() / (0.8796 * std) - 1) < 0.02
    centroids = model.video_aggregator.centroids  # TF [1, D, K]: fan_in = D
    assert centroids.abs().max() <= 2 * math.sqrt(2.6 / centroids.shape[1]) + 1e-7
    assert torch.count_nonzero(model.classifier.bias) == 0
    bn = model.hidden_bn
    assert (bn.eps, bn.momentum) == (1e-3, 1e-3)


def test_netvlad_small_and_masking(frames_and_lengths):
    frames, lengths = frames_and_lengths
    layer = NetVLAD(16, clusters=3, input_reduction=4).eval()
    assert layer.output_size == 3 * 4
    out = layer(frames, lengths)
    assert out.shape == (3, 12)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    garbage = frames.clone()
    garbage[2, 1:] = 11.0
    assert torch.allclose(out, layer(garbage, lengths), atol=1e-5)


def test_netvlad_matches_plain_vlad_formula(frames_and_lengths):
    frames, lengths = frames_and_lengths
    layer = NetVLAD(16, clusters=3).eval()
    x = frames.double()
    assignment = torch.softmax(layer.cluster_bn(layer.cluster_logits(frames).reshape(-1, 3)).double().reshape(3, 7, 3), -1)
    assignment = assignment * (torch.arange(7)[None, :] < lengths[:, None])[..., None]
    vlad = torch.einsum("bmk,bmd->bkd", assignment, x) - assignment.sum(1)[..., None] * layer.centroids.double()
    vlad = torch.nn.functional.normalize(vlad, dim=-1)
    expected = torch.nn.functional.normalize(vlad.transpose(1, 2).reshape(3, -1), dim=-1)
    assert torch.allclose(layer(frames, lengths).double(), expected, atol=1e-5)


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: NeXtVLAD(128, 8, groups=3), "groups=3 must divide"),
        (lambda: NeXtVLAD(128, 0, groups=8), "clusters must be an integer >= 1, got 0"),
        (lambda: NeXtVLAD(128, 8.5, groups=8), "clusters must be an integer >= 1, got 8.5"),
        (lambda: NeXtVLAD(128, 8, groups=8, expansion=2.0), "expansion must be an integer >= 1, got 2.0"),
        (lambda: NetVLAD(10, 4.0), "clusters must be an integer >= 1, got 4.0"),
        (lambda: SEContextGating(100.0, 4), "hidden_size must be an integer >= 1, got 100.0"),
        (lambda: NeXtVLAD(128, 8, 8, cluster_bn_statistics="some"), "cluster_bn_statistics"),
        (lambda: build_video_model("nextvlad", groups=1), "groups=1 leaves the audio stream .*audio_groups"),
        (lambda: build_video_model("nextvlad", clusters=1), "clusters=1 leaves the audio stream .*audio_clusters"),
        (lambda: build_video_model("netvlad", clusters=1), "clusters=1 leaves the audio stream .*audio_clusters"),
        (lambda: build_video_model("resnet"), "architecture"),
        (lambda: SEContextGating(100, 8), "gating_reduction=8 must divide"),
        (lambda: NetVLAD(10, 4, input_reduction=4), "input_reduction=4 must divide"),
        (lambda: MixtureOfNeXtVLAD([]), "num_branches must be an integer >= 1, got 0"),
    ],
)
def test_impossible_configurations_raise(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_feature_size_mismatch_names_the_sizes():
    layer = NeXtVLAD(16, 4, 4)
    with pytest.raises(ValueError, match="expects 16 features per frame, got 12"):
        layer(torch.randn(2, 5, 12), torch.tensor([5, 5]))


def distillation_kl_float64(mixture: torch.Tensor, branches: torch.Tensor, T: float) -> float:
    """SPEC 3.3 by hand: mean over videos of sum over branches of KL(p_e || p_m), 1e-8 in both logs."""
    num_branches, batch, _ = branches.shape
    total = 0.0
    for b in range(batch):
        p_e = [math.exp(v / T) for v in mixture[b].double().tolist()]
        p_e = [v / sum(p_e) for v in p_e]
        for m in range(num_branches):
            p_m = [math.exp(v / T) for v in branches[m, b].double().tolist()]
            p_m = [v / sum(p_m) for v in p_m]
            total += sum(pe * (math.log(pe + 1e-8) - math.log(pm + 1e-8)) for pe, pm in zip(p_e, p_m))
    return total / batch


def test_distillation_kl_matches_float64_hand_computation():
    torch.manual_seed(0)
    mixture = torch.randn(4, 9)
    branches = torch.randn(3, 4, 9)
    expected = distillation_kl_float64(mixture, branches, 3.0)
    assert distillation_kl(mixture, branches, 3.0).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_kl(mixture, mixture.expand(3, 4, 9), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_kl_of_a_confidently_wrong_branch_is_bounded_by_the_authors_epsilon():
    """The teacher is sure of class 0, the branch sure it is not (p_m about 1e-14, 0 further out):
    the authors' 1e-8 bounds the term near -log(1e-8) = 18.42, where log(p_m) alone gives 32 or inf."""
    mixture = torch.tensor([[90.0, 0.0, 0.0, 0.0]])
    for wrong in (-90.0, -400.0):
        branches = torch.tensor([[[wrong, 0.0, 0.0, 0.0]]])
        expected = distillation_kl_float64(mixture, branches, 3.0)
        assert expected == pytest.approx(-math.log(1e-8), rel=1e-3)
        assert distillation_kl(mixture, branches, 3.0).item() == pytest.approx(expected, rel=1e-5)


def test_mixture_gate_input_all_rows_vs_masked():
    torch.manual_seed(0)
    branches = [build_video_model("nextvlad", num_classes=5, rgb_size=8, audio_size=4, clusters=2, groups=2,
                                  hidden_size=8, gating_reduction=2) for _ in range(2)]
    rgb, audio = torch.randn(3, 6, 8), torch.randn(3, 6, 4)
    lengths = torch.tensor([6, 2, 4])
    everything = MixtureOfNeXtVLAD(branches, input_size=12, gate_input="all").eval()
    masked = MixtureOfNeXtVLAD(branches, input_size=12, gate_input="masked").eval()
    masked.load_state_dict(everything.state_dict())
    frames = torch.cat([rgb, audio], -1)
    real = (torch.arange(6)[None, :] < lengths[:, None]).float()[..., None]
    gate_of = lambda mean: torch.softmax(everything.gate_fc(everything.gate_bn(mean)), -1)
    assert torch.allclose(everything.gate(rgb, audio, lengths), gate_of(frames.sum(1) / 6), atol=1e-6)
    expected_masked = gate_of((frames * real).sum(1) / lengths[:, None])
    assert torch.allclose(masked.gate(rgb, audio, lengths), expected_masked, atol=1e-6)
    out = everything.forward_all(rgb, audio, lengths)
    mixed = sum(out.gate[:, m:m + 1] * out.branch_logits[m] for m in range(2))
    assert torch.allclose(out.logits, mixed, atol=1e-6)


def test_mixture_shared_expansion_gemm_equals_branch_by_branch():
    torch.manual_seed(0)
    branches = [build_video_model("nextvlad", num_classes=5, rgb_size=8, audio_size=4, clusters=2, groups=2,
                                  hidden_size=8, gating_reduction=2) for _ in range(3)]
    mixture = MixtureOfNeXtVLAD(branches, input_size=12).eval()
    rgb, audio, lengths = torch.randn(3, 6, 8), torch.randn(3, 6, 4), torch.tensor([6, 2, 4])
    fused = mixture.forward_all(rgb, audio, lengths).branch_logits
    separate = torch.stack([branch(rgb, audio, lengths) for branch in branches])
    assert torch.allclose(fused, separate, atol=1e-5)
    with pytest.raises(ValueError, match="expects 8 features per frame, got 7"):
        mixture(torch.randn(3, 6, 7), audio, lengths)


def test_competition_era_mixture_parameter_count():
    """SPEC 3.5: the 2018 gate (BN over 300 frame means + FC 300->3) gives 235,931,013."""
    with torch.device("meta"):
        branches = [build_video_model("nextvlad", clusters=112, gating_reduction=16, hidden_activation="none")
                    for _ in range(3)]
        mixture = MixtureOfNeXtVLAD(branches, input_size=300, gate_input="per_frame")
    assert count_parameters(mixture) == 235_931_013


def test_netvlad_works_in_float64(frames_and_lengths):
    frames, lengths = frames_and_lengths
    layer = NetVLAD(frames.shape[-1], clusters=3).double().train()
    out = layer(frames.double(), lengths)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert layer.cluster_logits.weight.grad.dtype == torch.float64


def classifier_inputs(models: list[torch.nn.Module]) -> list[torch.Tensor]:
    """Hooks recording what each model's classifier is fed (the hidden features), in call order."""
    seen = []
    for model in models:
        model.classifier.register_forward_hook(lambda layer, args, output: seen.append(args[0].detach()))
    return seen


def logistic_float64(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return hidden.double() @ model.classifier.weight.double().T + model.classifier.bias.double()


@pytest.mark.parametrize("training", [True, False])
def test_logits_are_fp32_under_bf16_autocast(training):
    """bf16 logits (8-bit mantissa) tie a video's top-20 and bias GAP down: the classifier and the
    mixture's gated sum run in fp32 on the hidden features that the bf16 network computed."""
    torch.manual_seed(0)
    build = lambda: build_video_model(num_classes=50, rgb_size=16, audio_size=8, clusters=4, groups=2,
                                      hidden_size=64, gating_reduction=4)
    rgb, audio, lengths = torch.randn(4, 5, 16), torch.randn(4, 5, 8), torch.tensor([5, 3, 1, 4])
    single = build().train(training)
    hidden = classifier_inputs([single])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = single(rgb, audio, lengths)
    assert logits.dtype == torch.float32
    expected = logistic_float64(single, hidden[0])
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    # A bf16 classifier would be off by far more than that tolerance.
    assert (logits.double() - expected.bfloat16().double()).abs().max() > 1e-3

    branches = [build() for _ in range(3)]
    mixture = MixtureOfNeXtVLAD(branches, input_size=24).train(training)
    hidden = classifier_inputs(branches)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixture.forward_all(rgb, audio, lengths)
    assert out.logits.dtype == out.branch_logits.dtype == out.gate.dtype == torch.float32
    branch_expected = [logistic_float64(branch, h) for branch, h in zip(branches, hidden)]
    torch.testing.assert_close(out.branch_logits.double(), torch.stack(branch_expected), rtol=1e-5, atol=1e-5)
    mixed = sum(out.gate[:, m:m + 1].double() * branch_expected[m] for m in range(3))
    torch.testing.assert_close(out.logits.double(), mixed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["nextvlad", "netvlad", "mixture"])
def test_an_empty_batch_gives_empty_scores_in_eval(architecture):
    """B = 0 in inference (an empty shard): (0, classes) scores, no reshape error on 0 elements."""
    torch.manual_seed(0)
    kwargs = dict(num_classes=7, rgb_size=16, audio_size=8, clusters=4, groups=2, hidden_size=8, gating_reduction=2)
    if architecture == "mixture":
        model = MixtureOfNeXtVLAD([build_video_model("nextvlad", **kwargs) for _ in range(2)], input_size=24)
    else:
        model = build_video_model(architecture, **kwargs)
    logits = model.eval()(torch.randn(0, 5, 16), torch.randn(0, 5, 8), torch.zeros(0, dtype=torch.long))
    assert logits.shape == (0, 7)


def test_the_readmes_model_classes_are_importable_from_nextvlad_models():
    """README's "What is in the box" names these under nextvlad.models."""
    import nextvlad.models as models
    from nextvlad.models.mixture import MixtureOfNeXtVLAD

    assert models.MixtureOfNeXtVLAD is MixtureOfNeXtVLAD
    assert {"NeXtVLAD", "NetVLAD", "SEContextGating", "VideoModel", "MixtureOfNeXtVLAD"} <= set(models.__all__)
