"""TF weight conversion (SPEC 7.21): names, layouts, numerical parity with the TF graph, strictness, CLI.

The TF-named dicts here are written by hand from SPEC 7.21 (never produced by our exporter), and
the parity oracle is a float64 numpy transcription of the authors' graph (SPEC 3.1-3.3, eval mode
with moving statistics) that reads those TF-named arrays directly.
"""

from __future__ import annotations

import logging
import re

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nextvlad.cli import main as cli_main
from nextvlad.convert import export_tf_variables, load_tf_variables
from nextvlad.module import VideoClassifier

RGB, AUDIO, K, G, H, R, C, LAMBDA = 16, 8, 4, 2, 8, 2, 10, 2
TINY = dict(num_classes=C, rgb_size=RGB, audio_size=AUDIO, clusters=K, groups=G, hidden_size=H,
            gating_reduction=R, expansion=LAMBDA)
BRANCHES = 3
TF_BN_EPSILON = 1e-3  # slim.batch_norm default


# ------------------------------------------------------------------------ hand-written TF variables
def tf_batch_norm_vars(rng: np.random.Generator, scope: str, size: int) -> dict[str, np.ndarray]:
    return {
        f"{scope}/gamma": rng.uniform(0.5, 1.5, size).astype(np.float32),
        f"{scope}/beta": rng.normal(0, 0.2, size).astype(np.float32),
        f"{scope}/moving_mean": rng.normal(0, 0.3, size).astype(np.float32),
        f"{scope}/moving_variance": rng.uniform(0.05, 2.0, size).astype(np.float32),
    }


def dense(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(0, 1 / np.sqrt(shape[-2] if len(shape) > 1 else 1), shape).astype(np.float32)


def tf_nextvlad_vars(rng, scope: str, n: int, k: int, g: int) -> dict[str, np.ndarray]:
    """``NeXtVLAD.forward`` under ``scope`` (SPEC 3.1 / 7.21)."""
    expanded, d = LAMBDA * n, LAMBDA * n // g
    return {
        f"{scope}/fully_connected/weights": dense(rng, n, expanded),
        f"{scope}/fully_connected/biases": dense(rng, expanded) * 0.1,
        f"{scope}/fully_connected_1/weights": dense(rng, expanded, g),
        f"{scope}/fully_connected_1/biases": dense(rng, g) * 0.1,
        f"{scope}/cluster_weights": dense(rng, expanded, g * k),
        **tf_batch_norm_vars(rng, f"{scope}/cluster_bn", g * k),
        f"{scope}/cluster_weights2": dense(rng, 1, d, k),
        **tf_batch_norm_vars(rng, f"{scope}/vlad_bn", d * k),
    }


def tf_model_vars(rng, prefix: str, video_scope: str, audio_scope: str) -> dict[str, np.ndarray]:
    """``NeXtVLADModel.create_model`` under ``prefix`` (video K, G; audio K/2, G/2)."""
    vlad_dim = K * LAMBDA * RGB // G + (K // 2) * LAMBDA * AUDIO // (G // 2)
    return {
        **tf_nextvlad_vars(rng, prefix + video_scope, RGB, K, G),
        **tf_nextvlad_vars(rng, prefix + audio_scope, AUDIO, K // 2, G // 2),
        f"{prefix}hidden1_weights": dense(rng, vlad_dim, H),
        **tf_batch_norm_vars(rng, f"{prefix}hidden1_bn", H),
        f"{prefix}gating_weights_1": dense(rng, H, H // R),
        **tf_batch_norm_vars(rng, f"{prefix}gating_bn", H // R),
        f"{prefix}gating_weights_2": dense(rng, H // R, H),
        f"{prefix}fully_connected/weights": dense(rng, H, C),
        f"{prefix}fully_connected/biases": dense(rng, C) * 0.1,
    }


def tf_single(seed: int = 0) -> dict[str, np.ndarray]:
    return tf_model_vars(np.random.default_rng(seed), "tower/", "video_VLAD", "audio_VLAD")


def tf_mixture(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    variables = {}
    for m in range(BRANCHES):
        variables.update(tf_model_vars(rng, f"tower/branch_{m}/", "video_vlad", "audio_vlad"))
    variables.update(tf_batch_norm_vars(rng, "tower/mix_weights_bn", RGB + AUDIO))
    variables["tower/mix_weights/weights"] = dense(rng, RGB + AUDIO, BRANCHES)
    variables["tower/mix_weights/biases"] = dense(rng, BRANCHES) * 0.1
    return variables


# ------------------------------------------------------------------------ float64 TF graph (eval)
def np_batch_norm(x, v, scope):
    return (x - v[f"{scope}/moving_mean"]) / np.sqrt(v[f"{scope}/moving_variance"] + TF_BN_EPSILON) \
        * v[f"{scope}/gamma"] + v[f"{scope}/beta"]


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_nextvlad(frames, mask, v, scope, k, g):
    """SPEC 3.1 steps 1-10, written as the TF code computes them (reshapes included)."""
    b, m, _ = frames.shape
    expanded = frames @ v[f"{scope}/fully_connected/weights"] + v[f"{scope}/fully_connected/biases"]
    d = expanded.shape[-1] // g
    attention = np_sigmoid(expanded @ v[f"{scope}/fully_connected_1/weights"] + v[f"{scope}/fully_connected_1/biases"])
    attention = (attention * mask[..., None]).reshape(b, m * g, 1)
    logits = expanded.reshape(b * m, -1) @ v[f"{scope}/cluster_weights"]
    logits = np_batch_norm(logits, v, f"{scope}/cluster_bn")
    activation = np_softmax(logits.reshape(b, m * g, k)) * attention
    a = activation.sum(axis=1, keepdims=True) * v[f"{scope}/cluster_weights2"]  # [B, D, K]
    vlad = np.transpose(activation, (0, 2, 1)) @ expanded.reshape(b, m * g, d)  # [B, K, D]
    vlad = np.transpose(vlad, (0, 2, 1)) - a
    vlad = vlad / np.sqrt(np.maximum((vlad ** 2).sum(axis=1, keepdims=True), 1e-12))
    return np_batch_norm(vlad.reshape(b, d * k), v, f"{scope}/vlad_bn")


def np_model(rgb, audio, lengths, v, prefix, video_scope, audio_scope, relu):
    """SPEC 3.2 in eval mode: logits."""
    mask = (np.arange(rgb.shape[1])[None] < lengths[:, None]).astype(np.float64)
    vlad = np.concatenate([np_nextvlad(rgb, mask, v, prefix + video_scope, K, G),
                           np_nextvlad(audio, mask, v, prefix + audio_scope, K // 2, G // 2)], axis=1)
    hidden = np_batch_norm(vlad @ v[f"{prefix}hidden1_weights"], v, f"{prefix}hidden1_bn")
    if relu:
        hidden = np.maximum(hidden, 0)
    gates = np.maximum(np_batch_norm(hidden @ v[f"{prefix}gating_weights_1"], v, f"{prefix}gating_bn"), 0)
    hidden = hidden * np_sigmoid(gates @ v[f"{prefix}gating_weights_2"])
    return hidden @ v[f"{prefix}fully_connected/weights"] + v[f"{prefix}fully_connected/biases"]


def np_mixture(rgb, audio, lengths, v):
    """SPEC 3.3 (HEAD) in eval mode: the gate averages all M rows, padding included."""
    branch_logits = [np_model(rgb, audio, lengths, v, f"tower/branch_{m}/", "video_vlad", "audio_vlad", relu=False)
                     for m in range(BRANCHES)]
    feature_mean = np.concatenate([rgb, audio], axis=-1).mean(axis=1)
    gate = np_softmax(np_batch_norm(feature_mean, v, "tower/mix_weights_bn") @ v["tower/mix_weights/weights"]
                      + v["tower/mix_weights/biases"])
    return sum(gate[:, m:m + 1] * branch_logits[m] for m in range(BRANCHES))


def inputs(seed: int = 3, batch: int = 5, frames: int = 7):
    """Random frames with varied lengths; padded rows are non-zero (they must not matter, but for the gate)."""
    rng = np.random.default_rng(seed)
    rgb, audio = rng.normal(size=(batch, frames, RGB)), rng.normal(size=(batch, frames, AUDIO))
    lengths = np.array([frames, 1, 3, frames - 1, 4][:batch])
    return rgb, audio, lengths


def as64(v):
    return {name: value.astype(np.float64) for name, value in v.items()}


def randomize_statistics(module: VideoClassifier, seed: int) -> VideoClassifier:
    """Non-trivial BN moving statistics, so that the round trip checks them too."""
    g = torch.Generator().manual_seed(seed)
    for name, buffer in module.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(torch.randn(buffer.shape, generator=g))
        elif name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.1)
    return module


def state_without_counters(module):
    return {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("num_branches", [1, BRANCHES])
def test_round_trip_gives_identical_parameters_buffers_and_outputs(num_branches):
    torch.manual_seed(0)
    source = randomize_statistics(VideoClassifier(**TINY, num_branches=num_branches), seed=1).eval()
    torch.manual_seed(1)
    target = VideoClassifier(**TINY, num_branches=num_branches).eval()

    exported = export_tf_variables(source)
    report = load_tf_variables(target, exported)

    hand_written = tf_single() if num_branches == 1 else tf_mixture()
    assert {n: a.shape for n, a in exported.items()} == {n: a.shape for n, a in hand_written.items()}
    assert set(report.loaded) == set(exported) and report.ignored == ()
    expected, got = state_without_counters(source), state_without_counters(target)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    rgb, audio, lengths = inputs()
    rgb, audio, lengths = torch.from_numpy(rgb).float(), torch.from_numpy(audio).float(), torch.from_numpy(lengths)
    with torch.no_grad():
        assert torch.equal(source(rgb, audio, lengths), target(rgb, audio, lengths))


def test_hand_built_variables_land_in_the_right_places():
    v = tf_single()
    module = VideoClassifier(**TINY)
    load_tf_variables(module, v)
    model = module.model
    video, audio = model.video_aggregator, model.audio_aggregator
    d_video = LAMBDA * RGB // G
    video_dim = d_video * K

    d, k, j = 5, 3, 6  # hidden1_weights row d*K+k (video), column j -> hidden.weight[j, row]
    assert model.hidden.weight[j, d * K + k] == v["tower/hidden1_weights"][d * K + k, j]
    d_a, k_a = 2, 1  # the audio rows follow the video rows, again d*K'+k with K' = K/2
    row = video_dim + d_a * (K // 2) + k_a
    assert model.hidden.weight[j, row] == v["tower/hidden1_weights"][row, j]
    assert video.centroids[k, d] == v["tower/video_VLAD/cluster_weights2"][0, d, k]
    assert audio.centroids[k_a, d_a] == v["tower/audio_VLAD/cluster_weights2"][0, d_a, k_a]
    assert video.vlad_bn.running_mean[d * K + k] == v["tower/video_VLAD/vlad_bn/moving_mean"][d * K + k]
    assert video.vlad_bn.running_var[d * K + k] == v["tower/video_VLAD/vlad_bn/moving_variance"][d * K + k]
    assert video.vlad_bn.weight[7] == v["tower/video_VLAD/vlad_bn/gamma"][7]
    assert video.vlad_bn.bias[7] == v["tower/video_VLAD/vlad_bn/beta"][7]
    g, i = 1, 30  # cluster logits channel g*K+k from expanded feature i
    assert video.cluster_logits.weight[g * K + k, i] == v["tower/video_VLAD/cluster_weights"][i, g * K + k]
    assert video.cluster_bn.running_mean[g * K + k] == v["tower/video_VLAD/cluster_bn/moving_mean"][g * K + k]
    assert video.expansion_fc.weight[i, 9] == v["tower/video_VLAD/fully_connected/weights"][9, i]
    assert video.expansion_fc.bias[i] == v["tower/video_VLAD/fully_connected/biases"][i]
    assert video.group_attention.weight[g, i] == v["tower/video_VLAD/fully_connected_1/weights"][i, g]
    assert audio.group_attention.bias[0] == v["tower/audio_VLAD/fully_connected_1/biases"][0]
    assert model.context_gating.squeeze.weight[1, 6] == v["tower/gating_weights_1"][6, 1]
    assert model.context_gating.squeeze_bn.running_var[3] == v["tower/gating_bn/moving_variance"][3]
    assert model.context_gating.excite.weight[6, 1] == v["tower/gating_weights_2"][1, 6]
    assert model.hidden_bn.running_mean[4] == v["tower/hidden1_bn/moving_mean"][4]
    assert model.classifier.weight[9, 2] == v["tower/fully_connected/weights"][2, 9]
    assert model.classifier.bias[9] == v["tower/fully_connected/biases"][9]


def test_hand_built_mixture_variables_land_in_the_right_places():
    v = tf_mixture()
    module = VideoClassifier(**TINY, num_branches=BRANCHES)
    load_tf_variables(module, v)
    mixture = module.model
    branch = mixture.branches[2]
    assert branch.video_aggregator.centroids[1, 4] == v["tower/branch_2/video_vlad/cluster_weights2"][0, 4, 1]
    assert branch.audio_aggregator.vlad_bn.running_mean[5] == v["tower/branch_2/audio_vlad/vlad_bn/moving_mean"][5]
    assert branch.hidden.weight[3, 50] == v["tower/branch_2/hidden1_weights"][50, 3]
    assert mixture.branches[1].classifier.bias[4] == v["tower/branch_1/fully_connected/biases"][4]
    assert mixture.gate_fc.weight[2, 20] == v["tower/mix_weights/weights"][20, 2]
    assert mixture.gate_fc.bias[1] == v["tower/mix_weights/biases"][1]
    assert mixture.gate_bn.running_var[20] == v["tower/mix_weights_bn/moving_variance"][20]
    assert mixture.gate_bn.weight[20] == v["tower/mix_weights_bn/gamma"][20]


@pytest.mark.parametrize("hidden_activation", ["none", "relu"])
def test_single_model_matches_the_tf_graph_in_float64(hidden_activation):
    v = tf_single(seed=4)
    module = VideoClassifier(**TINY, hidden_activation=hidden_activation)
    load_tf_variables(module, as64(v))
    module = module.double().eval()
    rgb, audio, lengths = inputs()
    expected = np_model(rgb, audio, lengths, as64(v), "tower/", "video_VLAD", "audio_VLAD",
                        relu=hidden_activation == "relu")
    with torch.no_grad():
        got = module(torch.from_numpy(rgb), torch.from_numpy(audio), torch.from_numpy(lengths)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert np.ptp(expected) > 0.5  # the check is not dominated by a constant (e.g. biases only)


def test_mixture_matches_the_tf_graph():
    v = tf_mixture(seed=5)
    module = VideoClassifier(**TINY, num_branches=BRANCHES).eval()  # branches: no ReLU; gate over all rows
    load_tf_variables(module, v)
    rgb, audio, lengths = inputs()
    expected = np_mixture(rgb, audio, lengths, as64(v))
    with torch.no_grad():
        got = module(*(torch.from_numpy(a).float() for a in (rgb, audio)), torch.from_numpy(lengths)).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.ptp(expected) > 0.5


def test_npz_file_and_tensor_names_are_accepted(tmp_path):
    v = tf_single()
    path = tmp_path / "vars.npz"
    np.savez(path, **v)
    from_file, from_dict = VideoClassifier(**TINY), VideoClassifier(**TINY)
    load_tf_variables(from_file, path)
    load_tf_variables(from_dict, {f"{name}:0": value for name, value in v.items()})
    assert all(torch.equal(a, b) for a, b in zip(from_file.state_dict().values(), from_dict.state_dict().values()))
    assert from_file.model.hidden.weight[1, 2] == v["tower/hidden1_weights"][2, 1]


# ------------------------------------------------------------------------ strictness
def assert_unchanged_on_error(variables, match, **kwargs):
    module = VideoClassifier(**TINY)
    before = {k: t.clone() for k, t in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_tf_variables(module, variables, **kwargs)
    assert all(torch.equal(before[k], t) for k, t in module.state_dict().items())


def test_missing_variable_is_named():
    v = tf_single()
    del v["tower/audio_VLAD/vlad_bn/moving_variance"]
    assert_unchanged_on_error(v, r"'tower/audio_VLAD/vlad_bn/moving_variance' is missing")


def test_unexpected_variable_is_named_even_with_ignore_extra():
    v = tf_single()
    v["tower/video_VLAD/cluster_weights3"] = np.zeros(3, np.float32)
    assert_unchanged_on_error(v, r"'tower/video_VLAD/cluster_weights3' is unexpected")
    assert_unchanged_on_error(v, r"'tower/video_VLAD/cluster_weights3' is unexpected", ignore_extra=True)


def test_misshaped_variable_names_both_shapes():
    v = tf_single()
    v["tower/video_VLAD/cluster_weights2"] = v["tower/video_VLAD/cluster_weights2"][0].T.copy()  # (K, D)
    assert_unchanged_on_error(
        v, re.escape("'tower/video_VLAD/cluster_weights2' has shape (4, 16) but the model expects (1, 16, 4)"))


def test_non_float_variable_is_an_error():
    v = tf_single()
    v["tower/fully_connected/biases"] = np.arange(C)
    assert_unchanged_on_error(v, r"'tower/fully_connected/biases' is not a floating-point array")


OPTIMIZER_STATE = ["tower/hidden1_weights/Adam", "tower/hidden1_weights/Adam_1",
                   "tower/video_VLAD/cluster_bn/beta/ExponentialMovingAverage", "beta1_power", "beta2_power",
                   "global_step"]


def test_optimizer_slots_are_errors_unless_ignored(caplog):
    v = tf_single()
    v.update({name: np.zeros(1, np.float32) for name in OPTIMIZER_STATE})
    assert_unchanged_on_error(v, r"'tower/hidden1_weights/Adam' is unexpected(.|\n)*--ignore-extra")

    module = VideoClassifier(**TINY)
    with caplog.at_level(logging.INFO, logger="nextvlad.convert"):
        report = load_tf_variables(module, v, ignore_extra=True)
    assert sorted(report.ignored) == sorted(OPTIMIZER_STATE)
    assert set(report.loaded) == set(tf_single())
    assert "global_step" in caplog.text and "tower/hidden1_weights/Adam_1" in caplog.text
    assert module.model.hidden.weight[0, 3] == v["tower/hidden1_weights"][3, 0]


def test_variables_of_a_mixture_into_a_single_model_explain_the_mismatch():
    with pytest.raises(ValueError, match="a mixture of 3 branches but the config builds a single model"):
        load_tf_variables(VideoClassifier(**TINY), tf_mixture())
    with pytest.raises(ValueError, match="'tower/branch_0/video_vlad/fully_connected/weights' is missing"):
        load_tf_variables(VideoClassifier(**TINY, num_branches=BRANCHES), tf_single())


def test_competition_era_gate_is_explained_and_loads_with_per_frame_gate():
    rng = np.random.default_rng(0)
    v = tf_mixture(seed=5)
    frames = 7  # the 2018 gate has one input per padded frame (300 in the authors' graph)
    v.update(tf_batch_norm_vars(rng, "tower/mix_weights_bn", frames))
    v["tower/mix_weights/weights"] = dense(rng, frames, BRANCHES)
    with pytest.raises(ValueError, match="competition-era gate.*gate_input: per_frame and gate_frames: 7"):
        load_tf_variables(VideoClassifier(**TINY, num_branches=BRANCHES), v)
    module = VideoClassifier(**TINY, num_branches=BRANCHES, gate_input="per_frame", gate_frames=frames).eval()
    load_tf_variables(module, v)
    rgb, audio, lengths = inputs(frames=frames)
    w = as64(v)
    # SPEC 7.1: reduce_mean(input, axis=-1), a per-frame mean over the 1152 features, padding included
    frame_mean = np.concatenate([rgb, audio], axis=-1).mean(axis=-1)
    gate = np_softmax(np_batch_norm(frame_mean, w, "tower/mix_weights_bn") @ w["tower/mix_weights/weights"]
                      + w["tower/mix_weights/biases"])
    branch_logits = [np_model(rgb, audio, lengths, w, f"tower/branch_{m}/", "video_vlad", "audio_vlad", relu=False)
                     for m in range(BRANCHES)]
    expected = sum(gate[:, m:m + 1] * branch_logits[m] for m in range(BRANCHES))
    with torch.no_grad():
        got = module(*(torch.from_numpy(a).float() for a in (rgb, audio)), torch.from_numpy(lengths)).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs inputs padded to 7 frames, got 6"):
        module(torch.zeros(2, 6, RGB), torch.zeros(2, 6, AUDIO), torch.tensor([6, 3]))


def test_other_scope_and_netvlad():
    v = {name.removeprefix("tower/"): value for name, value in tf_single().items()}
    with pytest.raises(ValueError, match="no variable starts with 'tower/'"):
        load_tf_variables(VideoClassifier(**TINY), v)
    module = VideoClassifier(**TINY)
    load_tf_variables(module, v, scope="")
    assert module.model.classifier.bias[0] == v["fully_connected/biases"][0]
    with pytest.raises(ValueError, match="only NeXtVLAD models"):
        load_tf_variables(VideoClassifier(**{**TINY, "architecture": "netvlad"}), tf_single())


def test_missing_or_bad_npz_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vars_missing.npz"):
        load_tf_variables(VideoClassifier(**TINY), tmp_path / "vars_missing.npz")
    not_npz = tmp_path / "vars.npz"
    not_npz.write_text("not an archive")
    with pytest.raises(ValueError, match="vars.npz: not an .npz archive"):
        load_tf_variables(VideoClassifier(**TINY), not_npz)
    single_array = tmp_path / "array.npy"
    np.save(single_array, np.zeros(3))
    with pytest.raises(ValueError, match="array.npy: expected an .npz archive"):
        load_tf_variables(VideoClassifier(**TINY), single_array)


# ------------------------------------------------------------------------ CLI and checkpoints
CONFIG = """\
model:
  class_path: nextvlad.VideoClassifier
  init_args:
    num_classes: {C}
    rgb_size: {RGB}
    audio_size: {AUDIO}
    clusters: {clusters}
    groups: {G}
    hidden_size: {H}
    gating_reduction: {R}
    hidden_activation: none
"""


def write_config(path, clusters=K):
    path.write_text(CONFIG.format(C=C, RGB=RGB, AUDIO=AUDIO, clusters=clusters, G=G, H=H, R=R))
    return path


def evaluation_loader(rgb, audio, lengths, labels) -> DataLoader:
    videos = [{"id": f"v{i}", "rgb": torch.from_numpy(rgb[i]).float(), "audio": torch.from_numpy(audio[i]).float(),
               "lengths": torch.tensor(lengths[i]), "labels": torch.from_numpy(labels[i]).float(),
               "has_labels": torch.tensor(True)} for i in range(len(lengths))]
    return DataLoader(videos, batch_size=len(videos))


def test_cli_writes_a_checkpoint_that_validate_predict_and_load_from_checkpoint_accept(tmp_path, capsys):
    v = tf_single(seed=7)
    v.update({"global_step": np.int64(460000), "tower/hidden1_weights/Adam": v["tower/hidden1_weights"]})
    np.savez(tmp_path / "vars.npz", **v)
    out = tmp_path / "out" / "converted.ckpt"
    cli_main(["convert-tf", "--variables", str(tmp_path / "vars.npz"), "--config",
              str(write_config(tmp_path / "tf.yaml")), "--out", str(out), "--ignore-extra"])
    printed = capsys.readouterr().out
    assert "ignored 2 training-state variables" in printed and f"wrote {out}" in printed

    loaded = VideoClassifier.load_from_checkpoint(out)
    assert loaded.hparams.hidden_activation == "none" and loaded.hparams.clusters == K
    assert loaded.model.video_aggregator.centroids[2, 5] == v["tower/video_VLAD/cluster_weights2"][0, 5, 2]

    rgb, audio, lengths = inputs(seed=11)
    labels = (np.random.default_rng(0).random((len(lengths), C)) < 0.3).astype(np.float64)
    logits = np_model(rgb, audio, lengths, as64(v), "tower/", "video_VLAD", "audio_VLAD", relu=False)
    p = np_sigmoid(logits)
    expected_loss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).sum(axis=1).mean()

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    fresh = VideoClassifier(**TINY, hidden_activation="none")  # random weights: the checkpoint must replace them
    [metrics] = trainer.validate(fresh, evaluation_loader(rgb, audio, lengths, labels), ckpt_path=out)
    assert metrics["val/loss"] == pytest.approx(expected_loss, rel=1e-5)
    [predictions] = trainer.predict(fresh, evaluation_loader(rgb, audio, lengths, labels), ckpt_path=out)
    np.testing.assert_allclose(predictions["scores"][:, 0].numpy(), p.max(axis=1), rtol=1e-5)
    assert torch.equal(predictions["classes"][:, 0], torch.from_numpy(p.argmax(axis=1)))


def test_cli_errors_name_the_file_and_the_first_mismatch(tmp_path):
    np.savez(tmp_path / "vars.npz", **tf_single())
    with pytest.raises(SystemExit, match="TF variables file not found: .*absent.npz"):
        cli_main(["convert-tf", "--variables", str(tmp_path / "absent.npz"), "--config",
                  str(write_config(tmp_path / "tf.yaml")), "--out", str(tmp_path / "x.ckpt")])
    with pytest.raises(SystemExit, match=re.escape(
            "'tower/video_VLAD/cluster_weights' has shape (32, 8) but the model expects (32, 16)")):
        cli_main(["convert-tf", "--variables", str(tmp_path / "vars.npz"), "--config",
                  str(write_config(tmp_path / "other.yaml", clusters=2 * K)), "--out", str(tmp_path / "x.ckpt")])
    with pytest.raises(SystemExit, match="optimizer/training state"):
        np.savez(tmp_path / "slots.npz", global_step=np.int64(1), **tf_single())
        cli_main(["convert-tf", "--variables", str(tmp_path / "slots.npz"), "--config",
                  str(write_config(tmp_path / "tf.yaml")), "--out", str(tmp_path / "x.ckpt")])
    assert not (tmp_path / "x.ckpt").exists()


def test_non_finite_tf_weights_are_refused_naming_the_tensor():
    """A NaN in the TF variables would make a checkpoint whose every score is NaN."""
    from nextvlad.convert import checkpoint_from_module

    variables = export_tf_variables(VideoClassifier(**TINY).eval())
    name = next(key for key in variables if key.endswith("hidden1_weights"))
    variables[name] = variables[name].copy()
    variables[name][0, 0] = np.nan
    target = VideoClassifier(**TINY).eval()
    load_tf_variables(target, variables)
    with pytest.raises(ValueError, match=r"^the model's weights are not finite in the checkpoint to write: not saved "
                                         r"\(first: model\.hidden\.weight\)$"):
        checkpoint_from_module(target, "vars.npz")
