"""Command line: ``nextvlad {fit,validate,test,predict,params}`` and the ``lightning`` alias.

fit/validate/test/predict are LightningCLI (configs/*.yaml name the model and data classes by
``class_path``); ``params`` prints the exact trainable parameter count of a config's model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch import LightningDataModule, LightningModule

from nextvlad.models.video_model import count_parameters

#: Tools beside the Lightning subcommands: name -> ("module:function" taking argv, help). Each tool
#: lives in its own module and is imported only when called.
TOOLS: dict[str, tuple[str, str]] = {
    "params": ("nextvlad.cli:params_main", "print the trainable parameters of a config's model, per component"),
    "export": ("nextvlad.export:main", "export a trained checkpoint (ONNX, torch.export)"),
    "convert-tf": ("nextvlad.convert:main", "turn the authors' TensorFlow weights (.npz) into a checkpoint"),
    "score-segments": ("nextvlad.score_segments:main", "mAP@K of a 2019 segment submission against rated records"),
}


class NextVLADCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule named in the config."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            **kwargs,
        )


def main(argv: Sequence[str] | None = None) -> LightningCLI | None:
    """Entry point of the ``nextvlad`` and ``lightning`` commands; returns the LightningCLI."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        module_name, _, function_name = TOOLS[argv[0]][0].partition(":")
        getattr(importlib.import_module(module_name), function_name)(argv[1:])
        return None
    if argv and argv[0] in ("-h", "--help"):
        print("Tools beside the Lightning subcommands (each takes --help):")
        for name, (_, help_text) in TOOLS.items():
            print(f"  nextvlad {name:<12} {help_text}")
        print()
    return NextVLADCLI(args=None if from_command_line else argv)


def console_main() -> None:
    """The ``nextvlad`` and ``lightning`` console scripts (current Lightning ships no ``lightning``
    command, so ``lightning fit --config configs/nextvlad.yaml`` is ours). Returns None: a returned
    object would become exit status 1."""
    main()


def params_main(argv: Sequence[str]) -> None:
    """``nextvlad params --config configs/nextvlad.yaml``."""
    parser = argparse.ArgumentParser(prog="nextvlad params", description=TOOLS["params"][1])
    parser.add_argument("--config", required=True, help="a LightningCLI YAML config (configs/*.yaml)")
    args = parser.parse_args(argv)
    with torch.device("meta"):  # shapes are all a count needs: no initialisation
        module = model_from_config(args.config)
    print(parameter_table(module))


def model_from_config(config_path: str | Path) -> LightningModule:
    """Instantiate the ``model`` section of a LightningCLI config (class_path + init_args)."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    section = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(section, dict) or "class_path" not in section:
        raise ValueError(f"{path}: expected a 'model' section with a 'class_path'")
    module_name, _, class_name = section["class_path"].rpartition(".")
    model_class = getattr(importlib.import_module(module_name), class_name)
    return model_class(**(section.get("init_args") or {}))


def parameter_table(module: LightningModule) -> str:
    """Trainable parameters per top-level component of ``module.model`` (and the total)."""
    model = getattr(module, "model", module)
    rows = [(name, count_parameters(child)) for name, child in _components(model)]
    rows.append(("total", count_parameters(model)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {count:>14,}" for name, count in rows)


def _components(model):
    """Leaf-ish components: aggregators and head layers; mixture branches and gate."""
    for name, child in model.named_children():
        if name == "branches":
            yield from ((f"branches.{i}", branch) for i, branch in enumerate(child))
        elif count_parameters(child):
            yield name, child


if __name__ == "__main__":
    main()
