"""The paper configs checkpoint every N steps and at validation, atomically, keeping the top-k:
also across a kill during validation, at the end of a run and across a resume into a new folder."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# The video-level paper configs (days of training); the segment fine-tuning validates every epoch.
PAPER_CONFIGS = sorted(p for p in (REPO / "configs").glob("n*vlad*.yaml") if "segments" not in p.name)
TOP_K, PERIODIC = "nextvlad.callbacks.ModelCheckpointWithBest", "nextvlad.callbacks.PeriodicCheckpoint"
LIGHTNING = Path(sys.executable).parent / "lightning"
#: Kills its own process during the first validation batch at step ``at`` (run 1 of a test).
KILLER = textwrap.dedent('''
    import os, signal
    import lightning.pytorch as pl

    class KillDuringValidation(pl.Callback):
        def __init__(self, at: int):
            self.at = at

        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, *args):
            if trainer.global_step == self.at:
                os.kill(os.getpid(), signal.SIGKILL)
''')


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_configs_checkpoint_periodically_and_atomically(config):
    trainer = yaml.safe_load(config.read_text())["trainer"]
    assert [p["class_path"] for p in trainer["plugins"]] == ["nextvlad.checkpoint_io.AtomicCheckpointIO"]
    callbacks = {c["class_path"]: c["init_args"] for c in trainer["callbacks"]}
    top_k, periodic = callbacks[TOP_K], callbacks[PERIODIC]
    assert (top_k["monitor"], top_k["mode"], top_k["save_top_k"]) == ("val/gap", "max", 3)
    assert periodic["every_n_train_steps"] == 1000 and periodic["save_last"]
    # validation (every 10k steps) falls on a periodic save: last.ckpt is never older than 1000 steps
    assert trainer["val_check_interval"] % periodic["every_n_train_steps"] == 0


def tiny_config(synthetic_data, root: Path, every_n_train_steps: int, name: str = "config.yaml",
                callbacks: tuple[dict, ...] = (), **trainer) -> Path:
    """configs/nextvlad.yaml's trainer and checkpointing with a tiny model on the synthetic data,
    written to ``root/name``; checkpoints in ``root/checkpoints`` (``trainer`` overrides).

    Small for the 2-core machine: each validation reads one batch (8 videos) unless ``trainer``
    says otherwise, each video its first 20 frames (the synthetic ones have 20-60)."""
    config = yaml.safe_load((REPO / "configs" / "nextvlad.yaml").read_text())
    config["trainer"].update({"accelerator": "cpu", "precision": "32-true", "logger": False,
                              "default_root_dir": str(root), "enable_progress_bar": False,
                              "enable_model_summary": False, "limit_val_batches": 1, **trainer})
    config["trainer"]["callbacks"][1]["init_args"]["every_n_train_steps"] = every_n_train_steps
    config["trainer"]["callbacks"] += list(callbacks)
    config["model"]["init_args"].update(num_classes=10, clusters=4, groups=2, expansion=1, hidden_size=16,
                                        gating_reduction=4)
    config["data"]["init_args"].update(
        train_pattern=synthetic_data["dir"] + "/train*.tfrecord", test_pattern=None,
        val_pattern=synthetic_data["dir"] + "/validate*.tfrecord", predict_pattern=None,
        batch_size=8, eval_batch_size=8, num_workers=0, max_frames=20, num_classes=10,
        eigenvalues_path=None)
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """``lightning fit --config config ...`` run from the config's folder (``expect``: exit status)."""
    result = subprocess.run([str(LIGHTNING), "fit", "--config", str(config), *args], capture_output=True,
                            text=True, timeout=110, cwd=config.parent,
                            env={**os.environ, "PYTHONPATH": str(config.parent)})
    assert result.returncode == expect, result.stderr[-2000:]
    return result


def global_step(path: Path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_nextvlad_config_saves_last_every_n_steps_and_top_k_at_validation(synthetic_data, tmp_path):
    fit(tiny_config(synthetic_data, tmp_path, every_n_train_steps=3, max_steps=7, val_check_interval=5))
    folder = tmp_path / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    # steps 3 and 6 periodic (last.ckpt, the newest kept), step 5 validated: in the top 3, and
    # best.ckpt links to it
    assert len(names) == 3 and names[:2] == ["best.ckpt", "last.ckpt"] and names[2].startswith("step5-gap"), names
    assert (folder / "best.ckpt").resolve() == (folder / names[2]).resolve()
    # step 7, the last, is neither periodic nor validated: last.ckpt still holds its weights (and
    # Adam's step count says they are the weights after 7 updates)
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert last["global_step"] == 7
    assert {int(state["step"]) for state in last["optimizer_states"][0]["state"].values()} == {7}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_run_killed_validating_a_periodic_step_validates_it_after_resume(synthetic_data, tmp_path):
    """Step 6 saves (every 3) and validates (every 6); killed during that validation and resumed
    from last.ckpt, the run validates step 6: its top-k file exists."""
    (tmp_path / "killer.py").write_text(KILLER)
    settings = dict(every_n_train_steps=3, max_steps=8, val_check_interval=6)
    killed = tiny_config(synthetic_data, tmp_path, name="killed.yaml", **settings,
                         callbacks=({"class_path": "killer.KillDuringValidation", "init_args": {"at": 6}},))
    fit(killed, expect=-signal.SIGKILL)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert global_step(last) == 3  # step 6's checkpoint comes after its validation, which was cut short
    fit(tiny_config(synthetic_data, tmp_path, **settings), "--ckpt_path", str(last))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(names) == 3 and names[:2] == ["best.ckpt", "last.ckpt"] and names[2].startswith("step6-gap"), names
    assert global_step(last) == 8


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_last_ckpt_of_a_run_stopped_by_max_steps_continues_its_epoch(synthetic_data, tmp_path):
    """A run stopped by max_steps at step 7 of a 15-step epoch (neither periodic nor validated),
    resumed from last.ckpt with max_steps 10, ends with the weights of one run of 10 steps (CPU,
    bitwise): the final checkpoint is a mid-epoch one, not one that counts the epoch as done."""
    settings = dict(every_n_train_steps=3, val_check_interval=5, deterministic=True)
    whole, part = tmp_path / "whole", tmp_path / "part"
    whole.mkdir(), part.mkdir()
    fit(tiny_config(synthetic_data, whole, max_steps=10, **settings))
    fit(tiny_config(synthetic_data, part, max_steps=7, **settings))
    fit(tiny_config(synthetic_data, part, max_steps=10, **settings), "--ckpt_path", str(part / "checkpoints" / "last.ckpt"))
    one, resumed = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=False) for run in (whole, part))
    assert one["global_step"] == resumed["global_step"] == 10
    assert one["state_dict"].keys() == resumed["state_dict"].keys()
    for name, value in one["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), name


#: Validation once per epoch, as the segment configs: saves at the train epoch's end.
EPOCH_END_SAVES = dict(every_n_train_steps=4, val_check_interval=1.0, check_val_every_n_epoch=1, deterministic=True)


@pytest.fixture(scope="module")
def two_epochs_in_one_run(synthetic_data, tmp_path_factory) -> dict:
    """The final checkpoint of one uninterrupted run of 30 steps (two epochs of 15) under EPOCH_END_SAVES."""
    whole = tmp_path_factory.mktemp("whole")
    fit(tiny_config(synthetic_data, whole, max_steps=30, max_epochs=2, **EPOCH_END_SAVES))
    return torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("first_run", [{"max_epochs": 1}, {"max_steps": 15}], ids=["max_epochs", "max_steps"])
def test_a_run_resumed_from_an_epochs_end_with_max_steps_trains_the_next_epoch(synthetic_data, tmp_path, first_run,
                                                                                two_epochs_in_one_run):
    """Lightning 2.6 skipped the whole next epoch when a run resumed from a checkpoint written at an
    epoch's end had max_steps set (nextvlad._fit_loop). Epoch 0 (15 steps) ended by max_epochs or by
    max_steps, resumed with max_steps 30 and max_epochs 2: the weights of one run of 30 steps (CPU,
    bitwise), not 15 steps with an epoch counted twice."""
    fit(tiny_config(synthetic_data, tmp_path, **{"max_epochs": 2, **first_run}, **EPOCH_END_SAVES))
    assert global_step(tmp_path / "checkpoints" / "last.ckpt") == 15
    fit(tiny_config(synthetic_data, tmp_path, max_steps=30, max_epochs=2, **EPOCH_END_SAVES),
        "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"))
    one, resumed = two_epochs_in_one_run, torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert one["global_step"] == resumed["global_step"] == 30
    for name, value in one["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), name


def _validation_gaps(version: Path) -> list[float]:
    """val/gap of each validation of a run, in order, as CSVLogger wrote them."""
    with (version / "metrics.csv").open() as handle:
        return [float(row["val/gap"]) for row in csv.DictReader(handle) if row.get("val/gap")]


def _step(path: str | Path) -> int:
    return int(re.search(r"step(\d+)-gap", str(path)).group(1))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_resume_into_a_new_version_keeps_the_earlier_top_k_that_still_exists(synthetic_data, tmp_path):
    """The README's resume (``--ckpt_path .../version_0/checkpoints/last.ckpt``) writes to version_1:
    its top-3 and best.ckpt rank the validations of both runs, less a file the user deleted, and
    files of version_0 are never deleted."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "tiny"}}
    # every validation video (45, not tiny_config's one batch): the runs' 6 scores rank without ties
    settings = dict(every_n_train_steps=3, val_check_interval=2, logger=logger, limit_val_batches=1.0)
    fit(tiny_config(synthetic_data, tmp_path, max_steps=9, **settings))  # validates at 2, 4, 6, 8
    first, second = tmp_path / "runs" / "tiny" / "version_0", tmp_path / "runs" / "tiny" / "version_1"
    scores = dict(zip((2, 4, 6, 8), _validation_gaps(first)))
    kept = sorted(first.glob("checkpoints/step*-gap*.ckpt"), key=lambda path: scores[_step(path)])
    assert [_step(path) for path in kept] == sorted(scores, key=scores.get)[1:]  # top 3 of 4, worst first
    kept[-1].unlink()  # the best one, deleted by the user: never ranked or linked again

    fit(tiny_config(synthetic_data, tmp_path, max_steps=13, **settings),  # validates at 10, 12
        "--ckpt_path", str(first / "checkpoints" / "last.ckpt"))
    scores.update(zip((10, 12), _validation_gaps(second)))
    assert len(set(scores.values())) == len(scores) == 6, scores  # a ranking without ties
    candidates = [_step(path) for path in kept[:-1]] + [10, 12]
    expected = sorted(candidates, key=scores.get, reverse=True)[:3]
    state = next(value for key, value in torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)
                 ["callbacks"].items() if key.startswith("ModelCheckpointWithBest"))
    assert sorted(_step(path) for path in state["best_k_models"]) == sorted(expected)
    best = second / "checkpoints" / "best.ckpt"
    assert best.exists() and _step(best.resolve()) == expected[0] == _step(state["best_model_path"])
    assert all(path.exists() for path in kept[:-1])  # version_0's files stay, in the top-k or not


def test_top_k_never_deletes_files_of_another_folder_on_a_remote_filesystem():
    """Lightning keeps files outside the checkpoint folder on local disks only; ModelCheckpointWithBest
    on any filesystem (a resumed run's top-k holds the earlier run's files)."""
    from nextvlad.callbacks import ModelCheckpointWithBest

    callback = ModelCheckpointWithBest(monitor="val/gap", mode="max")
    callback.dirpath = "memory://runs/tiny/version_1/checkpoints"
    trainer = SimpleNamespace(ckpt_path=None)
    current = callback.dirpath + "/step12-gap0.5000.ckpt"
    assert callback._should_remove_checkpoint(trainer, callback.dirpath + "/step10-gap0.4000.ckpt", current)
    assert not callback._should_remove_checkpoint(trainer, "memory://runs/tiny/version_0/checkpoints/step8-gap0.4500.ckpt",
                                                  current)


PROBE = textwrap.dedent('''
    import json
    import torch
    import lightning.pytorch as pl

    class LastStepAt(pl.Callback):
        """Writes last.ckpt's global_step as it is when the training step ``at`` starts."""
        def __init__(self, at: int, folder: str):
            self.at, self.folder = at, folder

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == self.at:
                step = torch.load(self.folder + "/last.ckpt", weights_only=False)["global_step"]
                open(self.folder + "/probe.json", "w").write(json.dumps(step))
''')


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_mid_epoch_validation_saves_its_held_step_also_when_saving_at_epoch_ends(synthetic_data, tmp_path):
    """save_on_train_epoch_end moves only the epoch's last validation's save to the epoch's end: the
    periodic save held for a mid-epoch validation (step 3 of a 15-step epoch) is written right after
    it, not at the epoch's end (step 15) as a first version of the hold did."""
    (tmp_path / "probe.py").write_text(PROBE)
    folder = str(tmp_path / "checkpoints")
    config = tiny_config(synthetic_data, tmp_path, every_n_train_steps=3, max_steps=6, val_check_interval=3,
                         callbacks=({"class_path": "probe.LastStepAt", "init_args": {"at": 5, "folder": folder}},))
    settings = yaml.safe_load(config.read_text())
    periodic, probe = settings["trainer"]["callbacks"][1:]  # alone: the top-k callback saves last.ckpt too
    periodic["init_args"]["save_on_train_epoch_end"] = True
    settings["trainer"]["callbacks"] = [periodic, probe]
    config.write_text(yaml.safe_dump(settings))
    fit(config)
    assert (tmp_path / "checkpoints" / "probe.json").read_text() == "3"
