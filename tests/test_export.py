"""``nextvlad export``: ONNX / torch.export graphs match PyTorch; checkpoints load weights-only; errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_data import SMALL, loader, trainer

from nextvlad.cli import main as cli_main
from nextvlad.convert import checkpoint_from_module
from nextvlad.data.transforms import ReverseWhitening
from nextvlad.module import VideoClassifier

ort = pytest.importorskip("onnxruntime")


def write_config(path, hparams: dict, data: str = ""):
    """A LightningCLI config file at ``path``: VideoClassifier with ``hparams``, then ``data`` (YAML text)."""
    path.write_text("model:\n  class_path: nextvlad.VideoClassifier\n  init_args:\n"
                    + "".join(f"    {k}: {v}\n" for k, v in hparams.items()) + data)
    return path


def trained_checkpoint(tmp_path, name: str = "model.ckpt", **hparams) -> str:
    """A few training steps (so BN running statistics are not the identity), saved by the Trainer."""
    torch.manual_seed(0)
    run = trainer(max_steps=3, default_root_dir=tmp_path)
    run.fit(VideoClassifier(**{**SMALL, **hparams}), loader(24))
    path = tmp_path / name
    run.save_checkpoint(path)
    return str(path)


def reference_probabilities(ckpt_path: str, rgb, audio, lengths, whitening=None) -> np.ndarray:
    """The LightningModule itself, loaded the Lightning way, on the same inputs."""
    module = VideoClassifier.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    if whitening is not None:
        rgb = whitening(rgb)
    with torch.no_grad():
        return torch.sigmoid(module(rgb, audio, lengths)).double().numpy()


def videos(batch: int, frames: int, rgb_size: int, seed: int):
    """Dequantized-looking inputs, zero-padded after each video's length; lengths 1..frames."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, frames + 1, (batch,), generator=g)
    lengths[0] = frames
    rgb = torch.rand(batch, frames, rgb_size, generator=g) * 4 - 2
    audio = torch.rand(batch, frames, SMALL["audio_size"], generator=g) * 4 - 2
    padding = torch.arange(frames)[None, :] >= lengths[:, None]
    rgb[padding], audio[padding] = 0.0, 0.0
    return rgb, audio, lengths


@pytest.mark.parametrize("hparams", [{}, {"num_branches": 2}], ids=["single", "mixture"])
def test_onnx_matches_pytorch_on_videos_of_different_lengths(tmp_path, hparams):
    ckpt = trained_checkpoint(tmp_path, **hparams)
    output = tmp_path / "model.onnx"
    cli_main(["export", "--ckpt_path", ckpt, "--format", "onnx", "--output", str(output)])

    session = ort.InferenceSession(str(output))
    assert [i.name for i in session.get_inputs()] == ["rgb", "audio", "lengths"]
    assert session.get_inputs()[0].shape == ["batch", "frames", SMALL["rgb_size"]]
    assert session.get_outputs()[0].shape == ["batch", SMALL["num_classes"]]
    # Batch and frame counts that differ from the traced example, down to a single frame.
    for batch, frames, seed in [(1, 1, 0), (3, 17, 1), (5, 4, 2)]:
        rgb, audio, lengths = videos(batch, frames, SMALL["rgb_size"], seed)
        (onnx_out,) = session.run(None, {"rgb": rgb.numpy(), "audio": audio.numpy(), "lengths": lengths.numpy()})
        np.testing.assert_allclose(onnx_out, reference_probabilities(ckpt, rgb, audio, lengths), atol=1e-4, rtol=0)
    if hparams:
        return  # the mixture gate averages over all M rows (SPEC 9), so M matters there by design
    # Extra zero padding beyond every length changes nothing for a single model.
    padded = {"rgb": np.pad(rgb.numpy(), ((0, 0), (0, 9), (0, 0))),
              "audio": np.pad(audio.numpy(), ((0, 0), (0, 9), (0, 0))), "lengths": lengths.numpy()}
    np.testing.assert_allclose(session.run(None, padded)[0], onnx_out, atol=1e-6, rtol=0)


def test_reverse_whitening_from_the_config_is_baked_into_the_graph(tmp_path, eigenvalues_path):
    hparams = {**SMALL, "rgb_size": 1024}
    torch.manual_seed(0)
    ckpt = tmp_path / "wide.ckpt"
    run = trainer(max_steps=2, default_root_dir=tmp_path)
    run.fit(VideoClassifier(**hparams), _wide_loader())
    run.save_checkpoint(ckpt)
    config = write_config(tmp_path / "config.yaml", hparams,
                          f"data:\n  class_path: nextvlad.data.YT8MDataModule\n  init_args:\n    eigenvalues_path: {eigenvalues_path}\n")
    output = tmp_path / "whitened.onnx"
    cli_main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(output)])
    session = ort.InferenceSession(str(output))
    rgb, audio, lengths = videos(3, 9, 1024, 4)
    (onnx_out,) = session.run(None, {"rgb": rgb.numpy(), "audio": audio.numpy(), "lengths": lengths.numpy()})
    expected = reference_probabilities(str(ckpt), rgb, audio, lengths, ReverseWhitening(eigenvalues_path))
    np.testing.assert_allclose(onnx_out, expected, atol=1e-4, rtol=0)
    unwhitened = reference_probabilities(str(ckpt), rgb, audio, lengths)
    assert np.abs(onnx_out - unwhitened).max() > 1e-3  # the whitening really is in the graph

    bare = tmp_path / "bare.onnx"
    cli_main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(bare),
              "--no_reverse_whitening"])
    (bare_out,) = ort.InferenceSession(str(bare)).run(
        None, {"rgb": rgb.numpy(), "audio": audio.numpy(), "lengths": lengths.numpy()})
    np.testing.assert_allclose(bare_out, unwhitened, atol=1e-4, rtol=0)


def _wide_loader():
    """Toy videos with 1024-wide rgb (the eigenvalues' size)."""
    from toy_data import toy_videos, collate

    wide = []
    for video in toy_videos(8, 5):
        video = dict(video)
        video["rgb"] = torch.nn.functional.pad(video["rgb"], (0, 1024 - video["rgb"].shape[-1]))
        wide.append(video)
    return torch.utils.data.DataLoader(wide, batch_size=4, collate_fn=collate)


def test_torch_export_program_matches_pytorch(tmp_path):
    ckpt = trained_checkpoint(tmp_path)
    output = tmp_path / "model.pt2"
    cli_main(["export", "--ckpt_path", ckpt, "--format", "torch_export", "--output", str(output)])
    program = torch.export.load(str(output)).module()
    for batch, frames, seed in [(1, 1, 5), (4, 13, 6)]:
        rgb, audio, lengths = videos(batch, frames, SMALL["rgb_size"], seed)
        with torch.no_grad():
            out = program(rgb, audio, lengths).double().numpy()
        np.testing.assert_allclose(out, reference_probabilities(ckpt, rgb, audio, lengths), atol=1e-5, rtol=0)


def test_trainer_checkpoint_loads_weights_only(tmp_path):
    checkpoint = torch.load(trained_checkpoint(tmp_path, num_branches=2), weights_only=True)
    assert checkpoint["hyper_parameters"]["num_branches"] == 2
    assert set(checkpoint["state_dict"]) == set(VideoClassifier(**SMALL, num_branches=2).state_dict())


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {missing}"):
        cli_main(["export", "--ckpt_path", str(missing), "--output", str(tmp_path / "m.onnx")])


def test_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt: not a loadable checkpoint"):
        cli_main(["export", "--ckpt_path", str(junk), "--output", str(tmp_path / "m.onnx")])


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    ckpt = trained_checkpoint(tmp_path)
    config = write_config(tmp_path / "other.yaml", {**SMALL, "clusters": 8})
    with pytest.raises(ValueError, match="another architecture.*clusters: checkpoint 4 vs config 8"):
        cli_main(["export", "--config", str(config), "--ckpt_path", ckpt, "--output", str(tmp_path / "m.onnx")])
    assert not (tmp_path / "m.onnx").exists()


def test_weights_that_do_not_fit_are_named_before_anything_loads(tmp_path):
    """Hyper-parameters that agree but weights edited: one line naming the entries, as `--ckpt_path`."""
    checkpoint = torch.load(trained_checkpoint(tmp_path), weights_only=True)
    state = checkpoint["state_dict"]
    dropped = next(key for key in state if key.endswith("centroids"))
    resized = next(key for key in state if key.endswith("classifier.weight"))
    del state[dropped]
    expected_shape = tuple(state[resized].shape)
    state[resized] = state[resized][:-1]
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError) as error:
        cli_main(["export", "--ckpt_path", str(tmp_path / "edited.ckpt"), "--output", str(tmp_path / "m.onnx")])
    shorter = (expected_shape[0] - 1, *expected_shape[1:])
    assert str(error.value) == (f"{tmp_path / 'edited.ckpt'}: its weights do not fit VideoClassifier (2 differences, "
                                f"first: missing {dropped}; {resized}: checkpoint {shorter} vs model {expected_shape})")
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_on_remote_storage_is_read_through_fsspec(tmp_path):
    """`--ckpt_path last` on a gs:// / s3:// run folder, and export or init_from of such a file, load
    it by URL (memory:// here); a missing or foreign one is named by its URL."""
    import uuid

    import fsspec

    from nextvlad.export import load_checkpoint

    local = trained_checkpoint(tmp_path)
    root = f"memory://{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root}/last.ckpt", Path(local).read_bytes())
    fs.pipe(f"{root}/junk.ckpt", b"not a checkpoint")
    remote, expected = load_checkpoint(f"{root}/last.ckpt"), torch.load(local, weights_only=True)
    assert remote["hyper_parameters"] == expected["hyper_parameters"]
    assert all(torch.equal(value, expected["state_dict"][key]) for key, value in remote["state_dict"].items())
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {root}/nope.ckpt"):
        load_checkpoint(f"{root}/nope.ckpt")
    with pytest.raises(ValueError, match=f"{root}/junk.ckpt: not a loadable checkpoint"):
        load_checkpoint(f"{root}/junk.ckpt")


def test_unknown_format_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["export", "--ckpt_path", "x.ckpt", "--format", "tflite", "--output", "m"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_onnx_without_its_packages_names_the_extra_before_loading_anything(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "onnxscript"
                        else real_find_spec(name, *rest))
    with pytest.raises(SystemExit) as exit_code:  # the checkpoint does not exist: it is not read
        cli_main(["export", "--ckpt_path", "x.ckpt", "--output", "m.onnx"])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "nextvlad export: error: --format onnx needs onnxscript, which torch.onnx's exporter uses: "
        "pip install 'nextvlad[onnx]'")


def test_whitening_defaults_to_what_training_used(tmp_path):
    from nextvlad.export import training_eigenvalues

    saved_by_cli = {"datamodule_hyper_parameters": {"eigenvalues_path": "/data/eigenvals.npy"}}
    assert training_eigenvalues(saved_by_cli, None) == "/data/eigenvals.npy"
    assert training_eigenvalues({}, None) is None
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  init_args:\n    eigenvalues_path: null\n")
    assert training_eigenvalues(saved_by_cli, config) is None  # the config given wins
    config.write_text("model:\n  class_path: nextvlad.VideoClassifier\n")  # a model-only config says nothing
    assert training_eigenvalues(saved_by_cli, config) == "/data/eigenvals.npy"


def test_a_config_whose_whitening_is_not_the_checkpoints_is_refused(tmp_path, eigenvalues_path, capsys):
    """Trained without reverse whitening (the checkpoint records it), exported with a config that has
    it: the graph whitened its input and its metadata said training did. validate / predict refuse
    the pair; export too, unless told what the graph takes."""
    ckpt = tmp_path / "plain.ckpt"
    checkpoint = torch.load(trained_checkpoint(tmp_path), weights_only=False)
    checkpoint["datamodule_hyper_parameters"] = {"eigenvalues_path": None}
    torch.save(checkpoint, ckpt)
    config = write_config(tmp_path / "c.yaml", SMALL, f"data:\n  init_args:\n    eigenvalues_path: {eigenvalues_path}\n")
    output = tmp_path / "m.onnx"
    with pytest.raises(SystemExit):
        cli_main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(output)])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"nextvlad export: error: {ckpt}: the checkpoint's reverse whitening is not the config's (eigenvalues_path: "
        f"checkpoint None vs config {eigenvalues_path!r}; None: off): the graph would not whiten as training did; "
        "pass --eigenvalues_path or --no_reverse_whitening to say what it takes")
    assert not output.exists()
    cli_main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(output),
              "--no_reverse_whitening"])
    assert output.exists()


def test_metadata_says_what_training_used_for_reverse_whitening(tmp_path):
    """The ONNX metadata states the whitening of the rgb input as training had it, also when the
    graph holds none; a checkpoint that does not record it (no --config) says so."""
    from nextvlad.export import whitening_note

    assert whitening_note("e.npy", "e.npy", True).startswith("in graph (e.npy)")
    assert whitening_note(None, "e.npy", True).startswith("not in graph: the rgb input must be reverse-whitened")
    assert whitening_note(None, None, True).startswith("none: the model was trained without reverse whitening")
    assert "unknown" in whitening_note(None, None, False)

    onnx = pytest.importorskip("onnx")
    ckpt = trained_checkpoint(tmp_path)
    config = write_config(tmp_path / "c.yaml", SMALL, "data:\n  init_args:\n    eigenvalues_path: data/eigenvals.npy\n")
    output = tmp_path / "bare.onnx"
    cli_main(["export", "--config", str(config), "--ckpt_path", ckpt, "--output", str(output), "--no_reverse_whitening"])
    metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert metadata["nextvlad.reverse_whitening"] == (
        "not in graph: the rgb input must be reverse-whitened as in training (data/eigenvals.npy)")
    # a model-only config says nothing of the data: with a checkpoint that does not record it either
    write_config(config, SMALL)
    cli_main(["export", "--config", str(config), "--ckpt_path", ckpt, "--output", str(output)])
    metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert "unknown whether training used it" in metadata["nextvlad.reverse_whitening"]


def run_console(*args: str) -> subprocess.CompletedProcess:
    """``nextvlad <args>`` through the installed console script, as a user runs it."""
    return subprocess.run([str(Path(sys.executable).parent / "nextvlad"), *args], capture_output=True, text=True,
                          timeout=600)


def test_per_frame_gated_mixture_exports_with_its_fixed_frame_axis(tmp_path):
    """The 2018 competition gate (README: converted mixtures) takes exactly gate_frames frames: the
    frame axis is exported fixed at that size, the output line and ONNX metadata say so, and the
    exported models compute what PyTorch does."""
    frames = 10
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, num_branches=2, gate_input="per_frame", gate_frames=frames, bn_momentum=0.5)
    with torch.no_grad():  # training-mode passes, so BN running statistics are not the identity
        for seed in range(3):
            module(*videos(4, frames, SMALL["rgb_size"], seed))
    module.eval()
    ckpt = tmp_path / "per_frame.ckpt"
    torch.save(checkpoint_from_module(module), ckpt)

    onnx_path, program_path = tmp_path / "per_frame.onnx", tmp_path / "per_frame.pt2"
    for output, export_format in [(onnx_path, "onnx"), (program_path, "torch_export")]:
        result = run_console("export", "--ckpt_path", str(ckpt), "--format", export_format, "--output", str(output))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"frames fixed at {frames} (gate_input='per_frame'" in result.stdout
    session = ort.InferenceSession(str(onnx_path))
    assert session.get_inputs()[0].shape == ["batch", frames, SMALL["rgb_size"]]
    assert session.get_modelmeta().custom_metadata_map["nextvlad.frames"].startswith(f"fixed at {frames}")
    program = torch.export.load(str(program_path)).module()
    for batch, seed in [(1, 7), (3, 8)]:  # batch stays dynamic
        rgb, audio, lengths = videos(batch, frames, SMALL["rgb_size"], seed)
        with torch.no_grad():
            expected = torch.sigmoid(module(rgb, audio, lengths)).double().numpy()
            program_out = program(rgb, audio, lengths).double().numpy()
        (onnx_out,) = session.run(None, {"rgb": rgb.numpy(), "audio": audio.numpy(), "lengths": lengths.numpy()})
        np.testing.assert_allclose(onnx_out, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(program_out, expected, atol=1e-5, rtol=0)


def test_config_of_another_architecture_names_the_checkpoint_on_the_command_line(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save(checkpoint_from_module(VideoClassifier(**SMALL)), ckpt)
    config = write_config(tmp_path / "other.yaml", {**SMALL, "clusters": 8})
    result = run_console("export", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(tmp_path / "m.onnx"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"nextvlad export: error: {ckpt}: ") and "clusters: checkpoint 4 vs config 8" in line


@pytest.mark.parametrize("with_config", [False, True], ids=["saved-hparams", "config"])
def test_a_model_trained_with_the_triton_backend_exports_on_the_cpu(tmp_path, with_config):
    """aggregation_backend: triton runs on CUDA only; export (always on the CPU) aggregates with the
    reference, so the exported graph computes what the same weights compute with backend auto."""
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, aggregation_backend="triton").eval()
    ckpt = tmp_path / "triton.ckpt"
    torch.save(checkpoint_from_module(module), ckpt)
    args = ["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "m.onnx")]
    if with_config:
        config = write_config(tmp_path / "triton.yaml", {**SMALL, "aggregation_backend": "triton"})
        args[1:1] = ["--config", str(config)]
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as on a user's CPU machine
    result = subprocess.run([str(Path(sys.executable).parent / "nextvlad"), *args], capture_output=True, text=True,
                            timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = VideoClassifier(**SMALL).eval()
    reference.load_state_dict(module.state_dict())
    rgb, audio, lengths = videos(3, 7, SMALL["rgb_size"], seed=2)
    (onnx_out,) = ort.InferenceSession(str(tmp_path / "m.onnx")).run(
        None, {"rgb": rgb.numpy(), "audio": audio.numpy(), "lengths": lengths.numpy()})
    with torch.no_grad():
        expected = torch.sigmoid(reference(rgb, audio, lengths)).double().numpy()
    np.testing.assert_allclose(onnx_out, expected, atol=1e-5, rtol=0)
