"""``nextvlad export``: a trained checkpoint as ONNX or a ``torch.export`` program, for serving.

    nextvlad export --config configs/nextvlad.yaml --ckpt_path runs/.../best.ckpt \\
        --format onnx --output nextvlad.onnx

The exported graph maps ``rgb`` float32 (batch, frames, rgb_size), ``audio`` float32
(batch, frames, audio_size) and ``lengths`` int64 (batch,) to ``probabilities`` float32
(batch, num_classes), the sigmoid of the model's logits (SPEC 6 serves the same). Batch and frame
axes are dynamic. Frames at index >= ``lengths[b]`` are ignored by the aggregation, so a single
model gives the same output for any amount of padding. A mixture with the authors' gate
(``gate_input="all"``) averages over all rows, padding included, divided by the frame count, so
pad its inputs with 0.0 to the ``max_frames`` it was trained with (300), as the data layer does.
A mixture with the 2018 competition gate (``gate_input="per_frame"``) has one gate input per frame,
so its frame axis is fixed at ``gate_frames``: the output line and the ONNX metadata
(``nextvlad.frames``) say so.

Input preprocessing (SPEC 1.1, 2): the features are dequantized (``q * 4/255 + 4/512 - 2``) and
zero-padded by the caller. Reverse whitening is baked into the graph when training used it (the
config's ``data.init_args.eigenvalues_path``, or without ``--config`` the data module
hyper-parameters LightningCLI saved in the checkpoint) or ``--eigenvalues_path`` is given,
so the exported model takes the dequantized features exactly as the authors' inference graph does
(``input_batch_raw``); ``--no_reverse_whitening`` exports the bare model, which then expects
already reverse-whitened rgb, as the LightningModule does. The ONNX metadata
(``nextvlad.reverse_whitening``) records which, and whether training used reverse whitening at all.

The aggregation runs the PyTorch reference (matmul) path, which every exporter and runtime
understands; the result equals the Triton kernel's up to float rounding.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import nn

from nextvlad._validation import output_overwrites_input
from nextvlad.checkpoint_io import unloadable_checkpoint_error
from nextvlad.data.records import is_url, url_file_system
from nextvlad.kernels.residual_aggregation import reference_decompositions
from nextvlad.models import NetVLAD, NeXtVLAD

__all__ = ["ExportableClassifier", "load_checkpoint", "load_classifier", "classifier_from_checkpoint",
           "export_onnx", "export_program", "main"]

FORMATS = ("onnx", "torch_export")
ONNX_PACKAGES = ("onnx", "onnxscript")  # the extra "onnx" of pyproject.toml
INPUT_NAMES = ("rgb", "audio", "lengths")
OUTPUT_NAME = "probabilities"


class ExportableClassifier(nn.Module):
    """``(rgb, audio, lengths) -> probabilities`` of a classifier in eval mode, for export.

    Args:
        classifier: a ``VideoClassifier`` (its ``forward`` honours ``predict_branch``).
        eigenvalues_path: bake reverse whitening (SPEC 2) of the rgb input into the graph.
    """

    def __init__(self, classifier: nn.Module, eigenvalues_path: str | None = None) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.reverse_whitening = eigenvalues_path is not None
        if self.reverse_whitening:
            from nextvlad.data.transforms import WHITENING_OFFSET, ReverseWhitening

            self.whitening_offset = float(WHITENING_OFFSET)
            self.register_buffer("whitening_scale", ReverseWhitening(eigenvalues_path).scale.float())

    def forward(self, rgb: torch.Tensor, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.reverse_whitening:
            # ReverseWhitening.__call__ on every row, padding included, as the data layer does.
            rgb = (rgb - self.whitening_offset) * self.whitening_scale
        return torch.sigmoid(self.classifier(rgb, audio, lengths).float())


# ---------------------------------------------------------------------------------- loading
def load_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a Lightning checkpoint, with errors that name the file.

    A URL (``gs://``, ``s3://``, any fsspec protocol) is read through fsspec, as Lightning reads it."""
    if is_url(ckpt_path):
        fs, path = url_file_system(str(ckpt_path))
        name, is_file, source = str(ckpt_path), fs.isfile(path), lambda: fs.open(path, "rb")
    else:
        path = name = Path(ckpt_path)
        is_file, source = path.is_file(), lambda: open(path, "rb")
    if not is_file:
        raise FileNotFoundError(f"checkpoint not found: {name}")
    try:
        with source() as handle:
            checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have many types; all mean "not our checkpoint"
        raise unloadable_checkpoint_error(name, error) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{name}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def load_classifier(ckpt_path: str | Path, config_path: str | Path | None = None) -> nn.Module:
    """The LightningModule of a checkpoint, in eval mode on the CPU, aggregating with the reference.

    With ``config_path`` the model is built from the config's ``model`` section (so its choices,
    e.g. ``predict_branch``, apply) and the checkpoint must be of the same architecture; without it,
    from the hyper-parameters saved in the checkpoint.
    """
    return classifier_from_checkpoint(load_checkpoint(ckpt_path), str(ckpt_path), config_path)


def classifier_from_checkpoint(
    checkpoint: dict[str, Any], name: str, config_path: str | Path | None = None
) -> nn.Module:
    """:func:`load_classifier` for a checkpoint already loaded; ``name`` is used in errors."""
    from nextvlad.module import VideoClassifier, weights_misfit

    if config_path is not None:
        from nextvlad.cli import model_from_config

        module = model_from_config(config_path)
    else:
        saved = checkpoint.get("hyper_parameters")
        if not isinstance(saved, dict):
            raise ValueError(f"{name}: no hyper_parameters saved; pass --config")
        # LightningCLI adds _class_path/_instantiator entries; they are not constructor arguments.
        module = VideoClassifier(**{k: v for k, v in saved.items() if not k.startswith("_")})
    try:
        module.on_load_checkpoint(checkpoint)  # raises on another architecture
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error
    misfit = weights_misfit(module.state_dict(), checkpoint["state_dict"])
    if misfit:
        raise ValueError(f"{name}: its weights do not fit {type(module).__name__} ({misfit})")
    module.load_state_dict(checkpoint["state_dict"])
    return _aggregating_with_reference(module).eval()


def _aggregating_with_reference(module: nn.Module) -> nn.Module:
    """Set every aggregation layer to the backend "auto", which on the CPU tensors of a loaded
    classifier is the PyTorch reference: a model trained with ``aggregation_backend: triton``
    (CUDA only) exports and evaluates with the same weights and math."""
    for layer in module.modules():
        if isinstance(layer, (NeXtVLAD, NetVLAD)):
            layer.backend = "auto"
    return module


def training_eigenvalues(checkpoint: dict[str, Any], config_path: str | Path | None) -> str | None:
    """The eigenvalues file the model was trained with: the config's ``data.init_args`` when it sets
    ``eigenvalues_path`` (null: off), else the data module hyper-parameters LightningCLI saved in
    the checkpoint; None when whitening was off."""
    data_args = config_data_args(config_path)
    if "eigenvalues_path" in data_args:
        return data_args["eigenvalues_path"]
    return (checkpoint.get("datamodule_hyper_parameters") or {}).get("eigenvalues_path")


def config_data_args(config_path: str | Path | None) -> dict[str, Any]:
    """The ``data.init_args`` of a LightningCLI config file ({} without a file or a data section)."""
    if config_path is None:
        return {}
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    return (config.get("data") or {}).get("init_args") or {}


def whitening_note(in_graph: str | None, trained_with: str | None, recorded: bool) -> str:
    """What the exported model's rgb input is, for its metadata: ``in_graph`` is the eigenvalues file
    baked into the graph, ``trained_with`` the one training used, ``recorded`` whether the config or
    the checkpoint says what training used (a converted checkpoint without --config does not)."""
    if in_graph:
        return f"in graph ({in_graph}): the rgb input is the dequantized features"
    if trained_with:
        return f"not in graph: the rgb input must be reverse-whitened as in training ({trained_with})"
    if recorded:
        return "none: the model was trained without reverse whitening; the rgb input is the dequantized features"
    return "not in graph; unknown whether training used it (the checkpoint does not record it: export with --config)"


# ---------------------------------------------------------------------------------- export
def fixed_frames(module: ExportableClassifier) -> int | None:
    """The frame count a model takes, where it takes only one: a mixture gated per frame (2018
    competition gate, one gate input per frame) needs exactly ``gate_frames`` frames. None: any."""
    from nextvlad.models.mixture import MixtureOfNeXtVLAD

    model = getattr(module.classifier, "model", None)
    if isinstance(model, MixtureOfNeXtVLAD) and model.gate_input == "per_frame":
        return model.gate_bn.num_features
    return None


def example_inputs(module: ExportableClassifier, batch: int = 2, frames: int | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with; sizes > 1 so the exporter keeps the dynamic axes symbolic."""
    frames = frames or fixed_frames(module) or 6
    hparams = module.classifier.hparams
    generator = torch.Generator().manual_seed(0)
    rgb = torch.randn(batch, frames, hparams.rgb_size, generator=generator)
    audio = torch.randn(batch, frames, hparams.audio_size, generator=generator)
    lengths = torch.tensor([frames] + [max(1, frames // 2)] * (batch - 1))
    return rgb, audio, lengths


def export_program(module: ExportableClassifier) -> torch.export.ExportedProgram:
    """``torch.export`` program with dynamic batch and frame axes (frames shared by rgb and audio;
    fixed where :func:`fixed_frames` says so).

    The model is traced as it runs (the registered aggregation op included); the op is then
    replaced by its PyTorch reference, so the program holds ATen ops only and runs without
    nextvlad and without Triton (ONNX, a .pt2 served elsewhere)."""
    batch = torch.export.Dim("batch")
    frames = None if fixed_frames(module) else torch.export.Dim("frames")  # None: static, as traced
    shapes = {"rgb": {0: batch, 1: frames}, "audio": {0: batch, 1: frames}, "lengths": {0: batch}}
    program = torch.export.export(module, example_inputs(module), dynamic_shapes=shapes)
    return program.run_decompositions(reference_decompositions())


def export_onnx(
    module: ExportableClassifier, path: str | Path, opset: int | None = None, whitening: str | None = None
) -> None:
    """Write an ONNX model: inputs rgb/audio/lengths, output probabilities, axes batch/frames.

    ``whitening`` is the metadata's account of reverse whitening (:func:`whitening_note`); by
    default it says only whether the graph holds it."""
    # torch.onnx takes the program as it is (no example inputs, no second trace).
    onnx_program = torch.onnx.export(
        export_program(module), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
        opset_version=opset, dynamo=True, verbose=False,
    )
    # torch.onnx's own renaming (what it does when given axis names); rgb's two symbols are shared
    # by audio and lengths, whose shapes the program ties to them.
    frames = fixed_frames(module)
    onnx_program._rename_dynamic_axes({"rgb": {0: "batch"} if frames else {0: "batch", 1: "frames"},
                                       "audio": {}, "lengths": {}})
    hparams = module.classifier.hparams
    onnx_program.model.metadata_props.update({
        "nextvlad.frames": frames_note(frames),
        "nextvlad.inputs": "rgb float32 (batch, frames, rgb_size), audio float32 (batch, frames, audio_size): "
                           "dequantized, zero-padded; lengths int64 (batch,)",
        "nextvlad.reverse_whitening": whitening or ("in graph" if module.reverse_whitening else "not in graph"),
        "nextvlad.num_classes": str(hparams.num_classes),
        "nextvlad.architecture": str(hparams.architecture),
    })
    onnx_program.save(str(path))


def frames_note(frames: int | None) -> str:
    """What the exported frame axis takes, for the metadata and the output line."""
    if frames is None:
        return "dynamic"
    return f"fixed at {frames} (gate_input='per_frame': pad or cut every video to {frames} frames)"


# ---------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> None:
    """``nextvlad export --ckpt_path X [--config Y] --format onnx|torch_export --output Z``."""
    parser = argparse.ArgumentParser(
        prog="nextvlad export",
        description="Export a trained checkpoint (ONNX or torch.export .pt2) for serving. The model takes "
                    "dequantized, zero-padded rgb/audio frames and lengths; see nextvlad/export.py.",
    )
    parser.add_argument("--config", help="LightningCLI config the checkpoint was trained with (model section; "
                                         "data.init_args.eigenvalues_path). Default: the checkpoint's hyper-parameters")
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint (.ckpt)")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--output", required=True, help="file to write (.onnx or .pt2)")
    parser.add_argument("--eigenvalues_path", help="PCA eigenvals.npy: bake reverse whitening into the graph "
                                                   "(default: the one training used: the config's "
                                                   "data.init_args.eigenvalues_path, else the checkpoint's)")
    parser.add_argument("--no_reverse_whitening", action="store_true",
                        help="do not bake reverse whitening: the model expects reverse-whitened rgb")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's)")
    args = parser.parse_args(argv)

    missing = [name for name in ONNX_PACKAGES if args.format == "onnx" and importlib.util.find_spec(name) is None]
    if missing:  # torch.onnx would fail only after the checkpoint is loaded and traced, with a traceback
        parser.error(f"--format onnx needs {' and '.join(missing)}, which torch.onnx's exporter uses: "
                     "pip install 'nextvlad[onnx]'")
    if args.config is not None and not Path(args.config).is_file():
        parser.error(f"config file not found: {args.config}")
    overwritten = output_overwrites_input(args.output, {"--ckpt_path": args.ckpt_path, "--config": args.config,
                                                        "--eigenvalues_path": args.eigenvalues_path})
    if overwritten:
        parser.error(f"--output {args.output} is the {overwritten} file: it would be overwritten; write elsewhere")
    checkpoint = load_checkpoint(args.ckpt_path)
    trained_with = training_eigenvalues(checkpoint, args.config)
    if args.config is not None and not (args.eigenvalues_path or args.no_reverse_whitening):
        from nextvlad.cli import whitening_mismatch  # the check validate / predict make

        mismatch = whitening_mismatch(checkpoint, {"eigenvalues_path": trained_with})
        if mismatch:
            parser.error(f"{args.ckpt_path}: {mismatch}: the graph would not whiten as training did; "
                         "pass --eigenvalues_path or --no_reverse_whitening to say what it takes")
    recorded = "eigenvalues_path" in config_data_args(args.config) or "datamodule_hyper_parameters" in checkpoint
    eigenvalues = None if args.no_reverse_whitening else args.eigenvalues_path or trained_with
    module = ExportableClassifier(classifier_from_checkpoint(checkpoint, args.ckpt_path, args.config), eigenvalues)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "onnx":
        export_onnx(module, output, args.opset, whitening_note(eigenvalues, trained_with, recorded))
    else:
        torch.export.save(export_program(module), str(output))
    whitening = f"reverse whitening in graph ({eigenvalues})" if eigenvalues else "no reverse whitening in graph"
    print(f"wrote {output} ({args.format}; frames {frames_note(fixed_frames(module))}; {whitening})")
