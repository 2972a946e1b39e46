"""Weights trained with the authors' TensorFlow code (SPEC 7.21) in and out of nextvlad models.

The package never imports TensorFlow: a user dumps the checkpoint to an ``.npz`` whose keys are the
TF variable names (see the README), and ``load_tf_variables`` fills a single two-stream NeXtVLAD
model or a mixture from it. ``export_tf_variables`` is the inverse. ``nextvlad convert-tf`` turns an
``.npz`` plus a config into a Lightning checkpoint that ``validate``/``test``/``predict`` accept.

Layouts (TF -> torch):

* dense weights ``[in, out]`` -> ``Linear.weight`` ``(out, in)``;
* centroids ``cluster_weights2 [1, D, K]`` -> ``NeXtVLAD.centroids`` ``(K, D)``;
* BN ``gamma, beta, moving_mean, moving_variance`` -> ``weight, bias, running_mean, running_var``
  (both frameworks normalise with epsilon 1e-3 here);
* the vlad BN and the rows of ``hidden1_weights`` use TF's flatten order d*K+k, which our
  ``flatten_like_tf`` reproduces, so they are copied as they are;
* cluster logits / cluster BN channels are g*K+k in both.

BN ``num_batches_tracked`` has no TF counterpart and is left as it is: with a fixed momentum (all
our BNs) PyTorch never reads it.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import nn

from nextvlad._validation import output_overwrites_input
from nextvlad.checkpoint_io import AtomicCheckpointIO
from nextvlad.models.mixture import MixtureOfNeXtVLAD
from nextvlad.models.nextvlad import NeXtVLAD
from nextvlad.models.video_model import VideoModel

log = logging.getLogger(__name__)

#: The variable scope of the authors' training graph (``train.py`` builds the model in ``tower``).
TF_SCOPE = "tower"

Layout = Literal["same", "dense", "centroids"]

#: torch BatchNorm tensor -> slim.batch_norm variable.
_BATCH_NORM_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}

#: Last name component of optimizer slots and averages that TF saves beside each variable.
_SLOT_PATTERN = re.compile(
    r"^(Adam|Momentum|RMSProp|Adagrad|AdagradDA|Adadelta|Ftrl|ExponentialMovingAverage)(_\d+)?$"
)
#: Training bookkeeping variables (Adam's beta powers, the step counter).
_TRAINING_STATE_PATTERN = re.compile(r"^(global_step|beta1_power|beta2_power)(_\d+)?$")


@dataclass(frozen=True)
class TFVariable:
    """Where one torch tensor lives in a TF checkpoint: the variable name and its layout."""

    name: str
    layout: Layout

    def tf_shape(self, torch_shape: Sequence[int]) -> tuple[int, ...]:
        if self.layout == "dense":
            return tuple(reversed(torch_shape))
        if self.layout == "centroids":  # (K, D) -> [1, D, K]
            return (1, torch_shape[1], torch_shape[0])
        return tuple(torch_shape)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.layout == "dense":
            return array.T
        if self.layout == "centroids":
            return array[0].T
        return array

    def to_tf(self, array: np.ndarray) -> np.ndarray:
        if self.layout == "dense":
            return np.ascontiguousarray(array.T)
        if self.layout == "centroids":
            return np.ascontiguousarray(array.T[None])
        return array


@dataclass(frozen=True)
class ConversionReport:
    """What ``load_tf_variables`` did: the TF names it loaded and those it skipped (``ignore_extra``)."""

    loaded: tuple[str, ...]
    ignored: tuple[str, ...]


# --------------------------------------------------------------------------------------- name map
def tf_variable_map(model: nn.Module, scope: str = TF_SCOPE) -> dict[str, TFVariable]:
    """Every state_dict key of ``model`` (but ``num_batches_tracked``) -> its TF variable (SPEC 7.21).

    ``model`` is a ``VideoClassifier`` (its ``.model`` is used), a two-stream ``VideoModel`` built
    with NeXtVLAD aggregators, or a ``MixtureOfNeXtVLAD`` of them.
    """
    model = _unwrap(model)
    prefix = f"{scope}/" if scope else ""
    if isinstance(model, MixtureOfNeXtVLAD):
        names: dict[str, TFVariable] = {}
        for m, branch in enumerate(model.branches):
            branch_names = _video_model_map(branch, f"{prefix}branch_{m}/", lowercase_streams=True)
            names.update({f"branches.{m}.{key}": value for key, value in branch_names.items()})
        names.update(_batch_norm_map("gate_bn", f"{prefix}mix_weights_bn"))
        names.update(_dense_map("gate_fc", f"{prefix}mix_weights", bias=True))
    else:
        names = _video_model_map(model, prefix, lowercase_streams=False)
    uncovered = [key for key in model.state_dict() if key not in names and not key.endswith("num_batches_tracked")]
    if uncovered:  # a layer this converter does not know: refuse rather than leave it random
        raise ValueError(f"the TF layout (SPEC 7.21) has no variable for model tensors {uncovered}")
    return names


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    if not isinstance(inner, (VideoModel, MixtureOfNeXtVLAD)):
        raise TypeError(
            f"expected a VideoClassifier, VideoModel or MixtureOfNeXtVLAD, got {type(model).__name__}"
        )
    return inner


def _video_model_map(model: VideoModel, prefix: str, lowercase_streams: bool) -> dict[str, TFVariable]:
    """``NeXtVLADModel.create_model`` names; mixture branches spell the stream scopes in lowercase."""
    names: dict[str, TFVariable] = {}
    for attribute, tf_scope in (("video_aggregator", "video_VLAD"), ("audio_aggregator", "audio_VLAD")):
        aggregator = getattr(model, attribute)
        if not isinstance(aggregator, NeXtVLAD):
            raise ValueError(
                f"only NeXtVLAD models can be converted from the authors' TF code; {attribute} is a "
                f"{type(aggregator).__name__} (architecture {type(aggregator).__name__.lower()})"
            )
        scope = prefix + (tf_scope.lower() if lowercase_streams else tf_scope)
        names.update(_dense_map(f"{attribute}.expansion_fc", f"{scope}/fully_connected", bias=True))
        names.update(_dense_map(f"{attribute}.group_attention", f"{scope}/fully_connected_1", bias=True))
        names[f"{attribute}.cluster_logits.weight"] = TFVariable(f"{scope}/cluster_weights", "dense")
        names.update(_batch_norm_map(f"{attribute}.cluster_bn", f"{scope}/cluster_bn"))
        names[f"{attribute}.centroids"] = TFVariable(f"{scope}/cluster_weights2", "centroids")
        names.update(_batch_norm_map(f"{attribute}.vlad_bn", f"{scope}/vlad_bn"))
    names["hidden.weight"] = TFVariable(f"{prefix}hidden1_weights", "dense")
    names.update(_batch_norm_map("hidden_bn", f"{prefix}hidden1_bn"))
    names["context_gating.squeeze.weight"] = TFVariable(f"{prefix}gating_weights_1", "dense")
    names.update(_batch_norm_map("context_gating.squeeze_bn", f"{prefix}gating_bn"))
    names["context_gating.excite.weight"] = TFVariable(f"{prefix}gating_weights_2", "dense")
    names.update(_dense_map("classifier", f"{prefix}fully_connected", bias=True))  # LogisticModel
    return names


def _dense_map(module: str, tf_scope: str, bias: bool) -> dict[str, TFVariable]:
    names = {f"{module}.weight": TFVariable(f"{tf_scope}/weights", "dense")}
    if bias:
        names[f"{module}.bias"] = TFVariable(f"{tf_scope}/biases", "same")
    return names


def _batch_norm_map(module: str, tf_scope: str) -> dict[str, TFVariable]:
    return {
        f"{module}.{ours}": TFVariable(f"{tf_scope}/{theirs}", "same") for ours, theirs in _BATCH_NORM_NAMES.items()
    }


def is_training_state(name: str) -> bool:
    """Optimizer slots (``.../Adam``, ``.../Adam_1``), moving averages, ``global_step``, beta powers."""
    last = name.rsplit("/", 1)[-1]
    return bool(_SLOT_PATTERN.match(last) or _TRAINING_STATE_PATTERN.match(last))


# --------------------------------------------------------------------------------------- load / export
def read_variables(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` whose keys are TF variable names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TF variables file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not an .npz archive of TF variables ({error})") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive (np.savez) of TF variables, found a single array")
    with archive:
        try:
            return {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: unreadable .npz archive of TF variables ({error})") from error


def load_tf_variables(
    model: nn.Module,
    variables: Mapping[str, np.ndarray] | str | Path,
    *,
    ignore_extra: bool = False,
    scope: str = TF_SCOPE,
) -> ConversionReport:
    """Fill ``model`` with the authors' TF variables (SPEC 7.21), strictly.

    Args:
        model: a ``VideoClassifier``, ``VideoModel`` or ``MixtureOfNeXtVLAD`` (NeXtVLAD streams)
            whose hyper-parameters match the TF model's.
        variables: TF variable name -> array, or the path of an ``.npz`` holding them. A trailing
            ``:0`` (tensor names) is accepted.
        ignore_extra: skip optimizer slots, moving averages, ``global_step`` and beta powers (they
            are listed in the report and logged). Any other unused variable is still an error.
        scope: the outer variable scope (``tower`` in the authors' training graph; "" for none).

    Every model parameter and BN statistic is set and every TF variable is used; otherwise a
    ``ValueError`` names the missing, unexpected and mis-shaped variables and the model is left
    unchanged.
    """
    arrays = read_variables(variables) if isinstance(variables, (str, Path)) else _strip_tensor_suffix(variables)
    names = tf_variable_map(model, scope)
    state = _unwrap(model).state_dict()
    expected_shapes = {tf.name: tf.tf_shape(state[key].shape) for key, tf in names.items()}
    training_state = [name for name in arrays if name not in expected_shapes and is_training_state(name)]
    problems = _problems(arrays, expected_shapes, skip=training_state if ignore_extra else ())
    if problems:
        raise ValueError(_mismatch_message(model, arrays, scope, problems, [] if ignore_extra else training_state))

    with torch.no_grad():  # state_dict tensors share storage with the parameters and buffers
        for key, tf in names.items():
            value = torch.from_numpy(np.ascontiguousarray(tf.to_torch(np.asarray(arrays[tf.name]))))
            state[key].copy_(value.to(state[key].dtype))
    ignored = tuple(training_state) if ignore_extra else ()
    if ignored:
        log.info("ignored %d TF training-state variables: %s", len(ignored), ", ".join(ignored))
    return ConversionReport(loaded=tuple(expected_shapes), ignored=ignored)


def export_tf_variables(model: nn.Module, *, scope: str = TF_SCOPE) -> dict[str, np.ndarray]:
    """The model's parameters and BN statistics as the authors' TF variables (name -> array).

    float32/float64 tensors keep their dtype; half types are exported as float32, as TF stores them.
    """
    state = _unwrap(model).state_dict()
    exported = {}
    for key, tf in tf_variable_map(model, scope).items():
        tensor = state[key].detach().cpu()
        if tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()
        exported[tf.name] = tf.to_tf(tensor.numpy())
    return exported


def _strip_tensor_suffix(variables: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``name:0`` (a tensor name, as ``tf.global_variables()`` gives) -> ``name``."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        plain = name[:-2] if name.endswith(":0") else name
        if plain in arrays:
            raise ValueError(f"TF variable {plain!r} is given twice (as {plain!r} and {plain + ':0'!r})")
        arrays[plain] = value
    return arrays


@dataclass(frozen=True)
class _Problem:
    """One way the TF variables and the model disagree (in the order they are reported)."""

    name: str
    text: str
    tf_shape: tuple[int, ...] = ()
    model_shape: tuple[int, ...] = ()


def _problems(
    arrays: Mapping[str, np.ndarray], expected_shapes: Mapping[str, tuple[int, ...]], skip: Sequence[str]
) -> list[_Problem]:
    """Mis-shaped and non-float variables (model order), then missing, then unexpected ones."""
    problems = []
    for name, want in expected_shapes.items():
        if name not in arrays:
            continue
        array = np.asarray(arrays[name])
        if array.shape != want:
            problems.append(_Problem(name, f"has shape {array.shape} but the model expects {want}", array.shape, want))
        elif not np.issubdtype(array.dtype, np.floating):
            problems.append(_Problem(name, f"is not a floating-point array (dtype {array.dtype})"))
    problems += [_Problem(name, "is missing") for name in expected_shapes if name not in arrays]
    problems += [_Problem(name, "is unexpected") for name in arrays if name not in expected_shapes and name not in skip]
    return problems


def _mismatch_message(
    model: nn.Module, arrays: Mapping[str, np.ndarray], scope: str, problems: list[_Problem], training_state: list[str]
) -> str:
    shown = 40
    lines = [f"the TF variables do not fit the model: {problems[0].name!r} {problems[0].text}"]
    if len(problems) > 1:
        lines.append(f"{len(problems)} problems in all:")
        lines += [f"  {p.name!r} {p.text}" for p in problems[:shown]]
        if len(problems) > shown:
            lines.append(f"  ... and {len(problems) - shown} more")
    if training_state:
        lines.append(
            f"{len(training_state)} variables are optimizer/training state (e.g. {training_state[0]!r}); "
            "pass ignore_extra=True (nextvlad convert-tf --ignore-extra) to skip them"
        )
    return "\n".join(lines + _hints(model, arrays, scope, problems))


def _hints(model: nn.Module, arrays: Mapping[str, np.ndarray], scope: str, problems: list[_Problem]) -> list[str]:
    """Explain the common architecture mismatches: branch count, scope, the 2018 mixture gate."""
    hints = []
    prefix = f"{scope}/" if scope else ""
    branch_ids = {int(m.group(1)) for name in arrays if (m := re.match(rf"^{re.escape(prefix)}branch_(\d+)/", name))}
    inner = _unwrap(model)
    model_branches = inner.num_branches if isinstance(inner, MixtureOfNeXtVLAD) else 1
    tf_branches = len(branch_ids) or 1
    if tf_branches != model_branches:
        hints.append(
            f"hint: the variables hold {_describe(tf_branches)} but the config builds {_describe(model_branches)} "
            "(model.init_args.num_branches)"
        )
    if arrays and prefix and not any(name.startswith(prefix) for name in arrays):
        hints.append(f"hint: no variable starts with {prefix!r}; pass the checkpoint's outer scope (scope=/--scope)")
    misshaped = [p for p in problems if p.tf_shape]
    for problem in misshaped:
        if problem.name.endswith("mix_weights_bn/gamma"):
            hints.append(
                f"hint: a mixture gate over {problem.tf_shape[0]} inputs is the competition-era gate (mean over "
                "the features of each frame, SPEC 7.1): set model.init_args.gate_input: per_frame and "
                f"gate_frames: {problem.tf_shape[0]}; HEAD's gate averages frames (1152 inputs)"
            )
    if misshaped:
        hints.append("hint: the config's sizes (clusters, groups, expansion, hidden_size, gating_reduction, "
                     "num_classes, rgb_size, audio_size) must be those the TF model was trained with")
    return hints


def _describe(branches: int) -> str:
    return f"a mixture of {branches} branches" if branches > 1 else "a single model"


# --------------------------------------------------------------------------------------- checkpoint / CLI
def checkpoint_from_module(module: LightningModule, source: str = "") -> dict:
    """A Lightning checkpoint dict of a LightningModule's weights and hyper-parameters (no training state).

    It holds what ``load_from_checkpoint`` and ``Trainer.validate/test/predict(ckpt_path=...)``
    read; it has no optimizer state, so ``fit`` starts from it with ``load_from_checkpoint`` weights
    rather than resuming with ``--ckpt_path``.
    """
    module_class = type(module)
    # `_class_path` as LightningCLI saves it in training checkpoints: the CLI (and load_from_checkpoint)
    # read it to know which LightningModule the hyper-parameters belong to.
    hyper_parameters = {"_class_path": f"{module_class.__module__}.{module_class.__qualname__}", **module.hparams}
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": module.state_dict(),
        module.CHECKPOINT_HYPER_PARAMS_KEY: hyper_parameters,
        "nextvlad_converted_from": source,
    }
    if getattr(module, "_hparams_name", None):
        checkpoint[module.CHECKPOINT_HYPER_PARAMS_NAME] = module._hparams_name
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def main(argv: Sequence[str]) -> None:
    """``nextvlad convert-tf --variables vars.npz --config configs/x.yaml --out model.ckpt``."""
    from nextvlad.cli import TOOLS, model_from_config

    parser = argparse.ArgumentParser(
        prog="nextvlad convert-tf",
        description=TOOLS["convert-tf"][1] + ". The config's model section must describe the TF model "
        "(sizes, num_branches; hidden_activation: none for the authors' HEAD code, relu for the paper-era one).",
    )
    parser.add_argument("--variables", required=True, help=".npz of TF variable name -> array (see README)")
    parser.add_argument("--config", required=True, help="a LightningCLI YAML config whose model matches the TF model")
    parser.add_argument("--out", required=True, help="the Lightning checkpoint to write (.ckpt)")
    parser.add_argument("--ignore-extra", action="store_true",
                        help="skip optimizer slots (.../Adam), moving averages, global_step, beta powers")
    parser.add_argument("--scope", default=TF_SCOPE, help="outer TF variable scope (default: %(default)s; '' for none)")
    args = parser.parse_args(argv)
    overwritten = output_overwrites_input(args.out, {"--variables": args.variables, "--config": args.config})
    if overwritten:
        parser.error(f"--out {args.out} is the {overwritten} file: it would be overwritten; write elsewhere")
    try:
        module = model_from_config(args.config)
        report = load_tf_variables(module, args.variables, ignore_extra=args.ignore_extra, scope=args.scope)
    except (FileNotFoundError, ValueError, TypeError) as error:
        sys.exit(f"nextvlad convert-tf: error: {error}")
    # Written aside and renamed (as training's checkpoints): a crash leaves no half file, and an
    # --out that is a link (best.ckpt) is replaced, not written through to the checkpoint it names.
    AtomicCheckpointIO().save_checkpoint(checkpoint_from_module(module, source=str(args.variables)), args.out)
    print(f"loaded {len(report.loaded)} TF variables from {args.variables} into {type(module).__name__}")
    if report.ignored:
        print(f"ignored {len(report.ignored)} training-state variables: {', '.join(report.ignored)}")
    hparams = getattr(module, "hparams", {})
    if hparams.get("num_branches", 1) == 1:
        print(f"note: hidden_activation={hparams.get('hidden_activation')!r} (the authors' HEAD code has none, "
              "the paper-era code a ReLU): it must match the code that trained these weights")
    print(f"wrote {args.out}")
