"""Command line: ``nextvlad {fit,validate,test,predict,params}`` and the ``lightning`` alias.

fit/validate/test/predict are LightningCLI (configs/*.yaml name the model and data classes by
``class_path``); ``params`` prints the exact trainable parameter count of a config's model.

Known user errors (a missing file, a bad value, a record that does not parse, a checkpoint of
another model) end with one ``nextvlad <command>: error: ...`` line and exit status 1; ``--debug``
(anywhere on the command line) or ``NEXTVLAD_DEBUG=1`` shows the traceback instead. Under DDP the
failing rank's error is that line (ddp_spawn: the launching process prints it), and a rank that only
lost its connection to the failing one says so in one line. A run stopped
by SIGTERM (preemption) exits with status 143. ``--ckpt_path last`` / ``best`` are the newest
``last.ckpt`` / ``best.ckpt`` in any version of the run with the command's settings (an error when
there is none at all).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import inspect
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from lightning.pytorch.cli import LightningCLI, instantiate_class
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.multiprocessing import ProcessRaisedException

from nextvlad._distributed import has_process_group, shutdown_process_group
from nextvlad.data.records import is_url, url_file_system
from nextvlad.data.shm_pool import shared_memory_full_message
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

    def before_instantiate_classes(self) -> None:
        """Only ``fit`` saves its config (in the run's log dir, beside its checkpoints).

        validate / test / predict make no run of their own (configs/evaluate.yaml and predict*.yaml
        set ``logger: false``), so Lightning would write the merged config to the working directory
        as config.yaml, over a user's own file of that name. Their outputs need no config beside
        them: the report names its checkpoint and the config that trained it is in fit's log dir."""
        if self.subcommand != "fit":
            self.save_config_callback = None

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` against the configured model, in place of LightningCLI's own step.

        LightningCLI re-applies the checkpoint's hyper-parameters over the config and the command
        line without a word: ``--model.init_args.predict_branch 0`` would be ignored and a
        contradicting ``--model.init_args.clusters`` replaced. Here the config and the command line
        build the model, so inference options (predict_branch, top_k, aggregation_backend) and
        training options apply as given, and an architecture hyper-parameter or a reverse whitening
        that contradicts the checkpoint is an error that names both values (see
        :meth:`_checked_checkpoint`). ``last`` and ``best`` are found once the trainer exists
        (:meth:`after_instantiate_classes`).
        """
        self._checkpoint = None
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not _is_local_checkpoint(str(ckpt_path)) or str(ckpt_path) in RUN_CHECKPOINTS:
            return  # "hpc"/"registry" and remote paths: Lightning resolves them
        if self.config[subcommand].get("model") is None:  # no model configured: build the checkpoint's own
            from nextvlad.export import load_checkpoint

            load_checkpoint(ckpt_path)  # errors that name the file
            return super()._parse_ckpt_path()
        self._checkpoint = self._checked_checkpoint(subcommand, ckpt_path)

    def _checked_checkpoint(self, subcommand: str, ckpt_path: str,
                            checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint (loaded weights-only with errors that name the file, unless given), after
        checking that it is of the configured model's class and architecture and was trained with
        the configured reverse whitening (:func:`whitening_mismatch`)."""
        from nextvlad.export import load_checkpoint
        from nextvlad.module import architecture_mismatch

        checkpoint = load_checkpoint(ckpt_path) if checkpoint is None else checkpoint
        model = self.config[subcommand].model
        saved = checkpoint.get("hyper_parameters") or {}
        saved_class = saved.get("_class_path")
        if saved_class and _import_object(saved_class) is not _import_object(model.class_path):
            raise ValueError(f"{ckpt_path}: a checkpoint of {saved_class}, but the config's model is {model.class_path}")
        mismatch = architecture_mismatch(saved, model.init_args.as_dict() if model.init_args else {})
        data = self.config[subcommand].get("data")
        mismatch = mismatch or whitening_mismatch(checkpoint, (data.get("init_args") or {}) if data else {})
        if mismatch:
            raise ValueError(f"{ckpt_path}: {mismatch}")
        return checkpoint

    def after_instantiate_classes(self) -> None:
        """A model whose classes differ from the data's, or a checkpoint whose weights do not fit
        the model (e.g. saved without hyper-parameters by another LightningModule), is a clear
        error here, before the data is scanned. ``--ckpt_path last``/``best`` become a file here."""
        model_classes = (getattr(getattr(self, "model", None), "hparams", None) or {}).get("num_classes")
        data_classes = getattr(getattr(self, "datamodule", None), "num_classes", None)  # none: `params`
        if None not in (model_classes, data_classes) and model_classes != data_classes:
            raise ValueError(f"model.init_args.num_classes = {model_classes} but data.init_args.num_classes = "
                             f"{data_classes}: the classifier's outputs and the labels must have the same classes")
        checkpoint, self._checkpoint = getattr(self, "_checkpoint", None), None
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt_path in RUN_CHECKPOINTS:
            ckpt_path, checkpoint = self._resolve_run_checkpoint(str(ckpt_path))
            if self.config[self.subcommand].get("model") is not None:
                checkpoint = self._checked_checkpoint(self.subcommand, ckpt_path, checkpoint)
            else:
                checkpoint = None  # the checkpoint's own model: nothing to check it against
        if checkpoint is None:
            return
        from nextvlad.module import weights_misfit

        misfit = weights_misfit(self.model.state_dict(), checkpoint["state_dict"])
        if misfit:
            raise ValueError(f"{ckpt_path}: its weights do not fit {type(self.model).__name__} ({misfit})")

    def _set_seed(self) -> None:
        """Lightning's, remembering the configured seed (None for none or a random one): the run's
        seed is one of the settings ``--ckpt_path last`` tells runs apart by."""
        configured = self._get(self.config, "seed_everything")
        self._configured_seed = None if isinstance(configured, bool) else configured
        super()._set_seed()

    def _resolve_run_checkpoint(self, name: str) -> tuple[str, dict[str, Any]]:
        """``--ckpt_path last`` or ``best``: the newest ``last.ckpt`` / ``best.ckpt`` of the run
        trained with this command's settings, which becomes the command's ``ckpt_path`` (and is
        said on the console), and the checkpoint, loaded.

        Lightning looks for "last" only in this process's own checkpoint folder, which for a
        logger with automatic versions is the new, empty ``version_N+1/checkpoints``: it warns and
        trains from scratch. "best" it takes from a ``ModelCheckpoint`` of this process, which has
        none before it trains. Here both are looked for in every version of the logger's run
        (``<save_dir>/<name>/*/checkpoints``) and in the checkpoint callbacks' own folders; none
        found is an error, never a fresh start. Runs sharing a logger name (a sweep, requeued job
        by job) are told apart by their settings (:func:`settings_differences`): a newer
        checkpoint of other settings is passed over, and when no checkpoint has these settings the
        newest is taken (a resume with a setting changed on purpose) with the differences said."""
        folders = run_checkpoint_folders(self.trainer)
        found = run_checkpoints_named(name, folders)
        if not found:
            start = ", or start the run without --ckpt_path" if self.subcommand == "fit" else ""
            where = (f"no {name}.ckpt in {', '.join(folders)}" if folders else
                     "the config has no ModelCheckpoint callback to find the run's checkpoints by")
            raise FileNotFoundError(f"--ckpt_path {name}: {where}; pass a checkpoint file{start}")
        from nextvlad.export import load_checkpoint

        passed_over = []
        for path in found:
            checkpoint = load_checkpoint(path)
            differences = settings_differences(checkpoint, self.model, self.datamodule, self._configured_seed)
            if not differences:
                rank_zero_info(f"--ckpt_path {name}: {path} (the newest {name}.ckpt of the run with these settings)")
                if passed_over:
                    rank_zero_info(f"--ckpt_path {name}: passed over newer checkpoints of other settings: "
                                   + ", ".join(passed_over))
                break
            passed_over.append(f"{path} ({'; '.join(differences)})")
        else:
            path, checkpoint = found[0], load_checkpoint(found[0])  # the newest: loaded again (this rare path)
            rank_zero_warn(f"--ckpt_path {name}: no {name}.ckpt of the run has this command's settings; continuing "
                           f"the newest with these settings: {passed_over[0]}")
        self.config[self.subcommand].ckpt_path = self.config_init[self.subcommand].ckpt_path = path
        return path, checkpoint


class ParamsCLI(NextVLADCLI):
    """LightningCLI's parsing for ``nextvlad params`` (several ``--config``, dotted overrides, as the
    other commands), building only the model, on the meta device: shapes are all a count needs."""

    def _set_seed(self) -> None:
        """Nothing is random here: no seed (and no "Seed set to" line)."""

    def instantiate_classes(self) -> None:
        with torch.device("meta"):
            self.model = instantiate_class((), self.config["model"].as_dict())


#: ``--ckpt_path`` values that name a checkpoint of the run (:meth:`NextVLADCLI._resolve_run_checkpoint`).
RUN_CHECKPOINTS = ("last", "best")


def _is_local_checkpoint(ckpt_path: str) -> bool:
    return ckpt_path != "hpc" and not ckpt_path.startswith("registry") and not is_url(ckpt_path)


def run_checkpoint_folders(trainer: Trainer) -> list[str]:
    """Where the trainer's ``ModelCheckpoint`` callbacks write, in every version of the run: a
    callback's own ``dirpath``, else ``checkpoints`` in each version folder of the first logger
    (``<save_dir>/<name>/*``, as Lightning places them), else in ``default_root_dir``."""
    folders = []
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None) is not None:
            folders.append(str(callback.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            folders.append(os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), "*", "checkpoints"))
        else:
            folders.append(os.path.join(trainer.default_root_dir, "checkpoints"))
    return list(dict.fromkeys(folders))


def run_checkpoints_named(name: str, folders: Sequence[str]) -> list[str]:
    """The ``<name>.ckpt`` files (and Lightning's versioned ``<name>-vN.ckpt``) in ``folders``
    (glob patterns), the most recently written first, as Lightning orders last checkpoints."""
    pattern = re.compile(rf"{re.escape(name)}(-v\d+)?\.ckpt")
    found = {path: written for folder in folders for path, written in _checkpoints_in(folder, name, pattern).items()}
    return sorted(found, key=found.__getitem__, reverse=True)


#: Hyper-parameters that say how a run is served or read, not which run it is (the evaluation and
#: prediction configs change them): runs differing only in these have the same settings.
NOT_RUN_SETTINGS = {
    "model": {"aggregation_backend", "predict_branch", "top_k", "map_classes"},
    "data": {"val_pattern", "test_pattern", "predict_pattern", "eval_batch_size", "num_workers", "on_error",
             "compression", "dequantize_in_workers", "predict_rated",
             "eigenvalues_path"},  # compared by value (whitening_mismatch), not by where the file is
}


#: Settings that runs from before they existed used otherwise than their default: what they used
#: (adam_epsilon came with TF1's Adam; earlier runs ran torch.optim.Adam).
BEFORE_THE_SETTING = {"model": {"adam_epsilon": "torch"}, "data": {}}


def _constructor_defaults(owner: Any) -> dict[str, Any]:
    """The defaults of ``owner``'s constructor arguments, also those a subclass passes on through
    ``**kwargs`` (its bases' signatures, the nearest first)."""
    defaults: dict[str, Any] = {}
    for cls in reversed(type(owner).__mro__):
        if "__init__" in vars(cls):
            for name, parameter in inspect.signature(vars(cls)["__init__"]).parameters.items():
                if parameter.default is not inspect.Parameter.empty:
                    defaults[name] = parameter.default
    return defaults


def settings_differences(checkpoint: dict[str, Any], model: Any, datamodule: Any, seed: int | None) -> list[str]:
    """How the run that wrote ``checkpoint`` was set up otherwise than this command's ``model`` and
    ``datamodule``: their hyper-parameters (less :data:`NOT_RUN_SETTINGS`) and ``seed_everything``
    (``seed``; None: not compared), each as "what: checkpoint X vs config Y". A setting the
    checkpoint does not record (written before the setting existed) is taken as what that run used:
    its default, or :data:`BEFORE_THE_SETTING`; a part without recorded hyper-parameters is not
    compared."""
    differences = []
    for part, saved, owner in (("model", checkpoint.get("hyper_parameters"), model),
                               ("data", checkpoint.get("datamodule_hyper_parameters"), datamodule)):
        if saved is None or owner is None:
            continue
        defaults = _constructor_defaults(owner) | BEFORE_THE_SETTING[part]
        for key, value in (getattr(owner, "hparams", None) or {}).items():
            if key.startswith("_") or key in NOT_RUN_SETTINGS[part] or (key not in saved and key not in defaults):
                continue
            was, note = (saved[key], "") if key in saved else (defaults[key], " (not recorded: before the setting)")
            if was != value:
                differences.append(f"{part} {key}: checkpoint {was!r}{note} vs config {value!r}")
    saved_seed = checkpoint.get("seed_everything")
    if None not in (seed, saved_seed) and saved_seed != seed:
        differences.append(f"seed_everything: checkpoint {saved_seed} vs config {seed}")
    return differences


def _checkpoints_in(folder: str, name: str, pattern: re.Pattern) -> dict[str, float]:
    """{path: when written (seconds)} of the files in ``folder`` (a glob pattern, local or an fsspec
    URL such as gs://) whose name matches ``pattern``."""
    if not is_url(folder):
        return {path: os.stat(path).st_mtime for path in glob.glob(os.path.join(folder, f"{name}*.ckpt"))
                if pattern.fullmatch(os.path.basename(path)) and os.path.isfile(path)}
    fs, root = url_file_system(folder)
    found = {}
    for path in fs.glob(f"{root.rstrip('/')}/{name}*.ckpt"):
        if pattern.fullmatch(path.rsplit("/", 1)[-1]) and fs.isfile(path):
            try:
                found[fs.unstrip_protocol(path)] = fs.modified(path).timestamp()
            except NotImplementedError:
                raise OSError(f"--ckpt_path {name}: {type(fs).__name__} does not say when {path} was written, "
                              "so the newest cannot be chosen; pass the checkpoint file") from None
    return found


def whitening_mismatch(checkpoint: dict[str, Any], data_args: dict[str, Any]) -> str | None:
    """What a checkpoint's reverse whitening and the configured data's disagree on, naming both
    values; None when they agree or the checkpoint does not record it (converted weights).

    Both on agree when the two files hold the same eigenvalues (what the weights saw), whatever
    their paths: a serving machine keeps the file elsewhere. When the checkpoint's file is not
    there to compare, the config's is taken on trust, with a warning."""
    from nextvlad.data.transforms import whitening_scale
    from nextvlad.export import training_eigenvalues

    if "datamodule_hyper_parameters" not in checkpoint:
        return None
    trained_with, configured = training_eigenvalues(checkpoint, None), data_args.get("eigenvalues_path")
    if trained_with == configured:
        return None
    values = f"eigenvalues_path: checkpoint {trained_with!r} vs config {configured!r}"
    if not (trained_with and configured):
        return f"the checkpoint's reverse whitening is not the config's ({values}; None: off)"
    if not os.path.isfile(trained_with):
        warnings.warn(f"{trained_with}, the eigenvalues the checkpoint was trained with, is not here to compare "
                      f"with {configured}: taken to hold the same values")
        return None
    if np.array_equal(whitening_scale(trained_with), whitening_scale(configured)):
        return None
    return f"the checkpoint's reverse whitening is not the config's ({values}: files of other values)"


def _import_object(dotted_path: str) -> Any:
    module_name, _, name = dotted_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


#: Exceptions that are user errors (files, values, records, checkpoints: the checkpoint IO's
#: UnloadableCheckpointError is a ValueError): one line, no traceback.
USER_ERRORS = (OSError, ValueError)
#: The exit status of a command that SIGTERM stopped (preemption): 128 + 15, the shell's convention.
SIGTERM_EXIT_STATUS = 128 + 15
#: The last line of a traceback: "module.Class: message" (a builtin exception has no module).
_TRACEBACK_LAST_LINE = re.compile(r"([A-Za-z_][\w.]*): (.*)")
#: How gloo (RuntimeError) and NCCL (DistBackendError, a RuntimeError) report a rank's lost connection
#: to another rank, which is what a rank sees when another rank failed or was killed.
_PEER_GONE = re.compile(r"Connection (closed|reset) by peer|remote process exited|Write error .*Broken pipe")


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
    object would become exit status 1. A run stopped by SIGTERM exits with status 143."""
    argv = [arg for arg in sys.argv[1:] if arg != "--debug"]
    debug = len(argv) < len(sys.argv) - 1 or os.environ.get("NEXTVLAD_DEBUG", "0") not in ("", "0")
    sys.argv[1:] = argv
    command = " ".join([Path(sys.argv[0]).name] + argv[:1])
    try:
        with _debug_for_the_other_ranks(debug), warnings.catch_warnings():
            _ignore_false_alarms(argv[:1])
            main()
        shutdown_process_group()
    except SIGTERMException:
        # Lightning stops the loops on SIGTERM with a SystemExit without a code, i.e. status 0: a
        # preempted run would look finished to a requeueing wrapper. 128 + 15, as if killed by it.
        again = ("continue it with --ckpt_path last (the newest last.ckpt of the run; without it while "
                 "none has been written yet)" if argv[:1] == ["fit"] else "run it again")
        print(f"{command}: stopped by SIGTERM before the end; {again}", file=sys.stderr)
        sys.exit(SIGTERM_EXIT_STATUS)
    except Exception as error:
        if debug:
            raise
        if is_user_error(error):
            sys.exit(f"{command}: error: {error_message(error)} (--debug shows the traceback)")
        if is_shared_memory_full(error):  # torch's own allocation, beside the worker's buffer pool
            sys.exit(f"{command}: error: {shared_memory_full_message()} (--debug shows the traceback)")
        if is_peer_disconnection(error) and (isinstance(error, ProcessRaisedException) or has_process_group()):
            sys.exit(f"{command}: error: {peer_disconnection_message(error)}")
        raise


def _ignore_false_alarms(subcommand: list[str]) -> None:
    """Lightning warnings that are wrong for this package, shown by every run of a command."""
    # YT8MFrameDataset gives every DataLoader worker its own records and its own batch count.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    if subcommand and subcommand[0] in ("validate", "test", "predict"):
        # configs/evaluate.yaml and predict.yaml leave the training callbacks out on purpose (they
        # would write checkpoints); the advice to add them back is for resuming fit.
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks")


@contextlib.contextmanager
def _debug_for_the_other_ranks(debug: bool):
    """NEXTVLAD_DEBUG=1 while the command runs when debugging: Lightning starts the other DDP ranks
    from sys.argv, which no longer holds --debug, and the environment, which they inherit."""
    before = os.environ.get("NEXTVLAD_DEBUG")
    if debug:
        os.environ["NEXTVLAD_DEBUG"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("NEXTVLAD_DEBUG", None)
        else:
            os.environ["NEXTVLAD_DEBUG"] = before


def is_user_error(error: BaseException) -> bool:
    """A :data:`USER_ERRORS` exception, also when a DataLoader worker or a ddp_spawn rank raised it."""
    if isinstance(error, USER_ERRORS):
        return True
    error_class, _ = original_error(error)
    return error_class is not None and issubclass(error_class, USER_ERRORS)


def error_message(error: BaseException) -> str:
    """The message that explains ``error``: the original message of a DataLoader worker's or a
    ddp_spawn rank's error (see :func:`original_error`); from jsonargparse, which reports a
    constructor's error as "Does not validate against any of the Union subtypes ...", the
    constructor's own message."""
    if isinstance(error.__cause__, USER_ERRORS) and error.__traceback__ is not None:
        if "jsonargparse" in traceback.extract_tb(error.__traceback__)[-1].filename:
            return error_message(error.__cause__)
    return original_error(error)[1]


def original_error(error: BaseException) -> tuple[type[BaseException] | None, str]:
    """The class and message of the error that ``error`` passes on. torch re-raises the error of a
    DataLoader worker (as its class when it can rebuild it from one message, else as RuntimeError)
    and of a ddp_spawn rank (as ProcessRaisedException) with that process's traceback as text in
    the message: then the class and message of the text's last line, the class None when this
    process has not imported it (or the message spans lines), which no check takes for a user
    error."""
    message = str(error)
    if not isinstance(error, ProcessRaisedException) and "Original Traceback" not in message:
        return type(error), message
    last_line = _TRACEBACK_LAST_LINE.fullmatch((message.strip().splitlines() or [""])[-1])
    if last_line is None:
        return None, message
    module, _, name = last_line.group(1).rpartition(".")
    found = getattr(sys.modules.get(module or "builtins"), name, None)
    is_error_class = isinstance(found, type) and issubclass(found, BaseException)
    return (found if is_error_class else None), last_line.group(2)


def is_shared_memory_full(error: BaseException) -> bool:
    """torch's RuntimeError for a tensor that a DataLoader worker could not put in a full /dev/shm."""
    error_class, message = original_error(error)
    return (error_class is not None and issubclass(error_class, RuntimeError)
            and "unable to allocate shared memory" in message and "No space left on device" in message)


def is_peer_disconnection(error: BaseException) -> bool:
    """Whether ``error`` is only a rank's lost connection to another rank (gloo's or NCCL's), which
    follows another rank's failure: that rank reports the failure."""
    error_class, message = original_error(error)
    return error_class is not None and issubclass(error_class, RuntimeError) and bool(_PEER_GONE.search(message))


def peer_disconnection_message(error: BaseException) -> str:
    """What a lost connection to another rank tells the user (see :func:`is_peer_disconnection`)."""
    if isinstance(error, ProcessRaisedException):  # ddp_spawn passes on the first rank that ended
        return ("another rank failed or was killed, but ddp_spawn passed on only a rank's lost connection "
                "to it; --trainer.strategy ddp shows the failing rank's error")
    return "another rank failed or was killed (see its error; --debug shows this rank's traceback)"


def params_main(argv: Sequence[str]) -> None:
    """``nextvlad params --config configs/nextvlad.yaml [--config more.yaml] [--model.init_args.X Y]``."""
    with warnings.catch_warnings():  # LightningCLI warns when args= is given beside sys.argv: intended here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = ParamsCLI(args=list(argv), run=False, parser_kwargs={"prog": "nextvlad params",
                                                                   "description": TOOLS["params"][1]})
    print(parameter_table(cli.model))


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
