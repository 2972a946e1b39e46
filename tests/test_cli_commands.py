"""The README's commands as written, run through the console scripts on a small synthetic dataset.

``lightning fit --config configs/demo.yaml`` trains for two steps in a scratch directory laid out as
a clone (``data/synthetic/``); validate / test / predict / export / convert-tf / params then run on
what it wrote. Oracles: the validation GAP that training recorded in the checkpoint's file name,
the videos read back from the TFRecords, and the source model evaluated in this process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nextvlad.cli import console_main
from nextvlad.convert import checkpoint_from_module, export_tf_variables
from nextvlad.data import iter_videos, write_synthetic_dataset
from nextvlad.module import VideoClassifier

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO, EVALUATE, PREDICT, PREDICT_SEGMENTS = (str(REPO / "configs" / f"{name}.yaml")
                                             for name in ("demo", "evaluate", "predict", "predict_segments"))
CLASSES, MAX_FRAMES = 100, 60  # configs/demo.yaml
#: A model small enough to build and run in a blink, on the demo's data (1024 + 128 features, 100 classes).
TINY = dict(num_classes=CLASSES, clusters=4, groups=4, hidden_size=16, gating_reduction=4)

pytestmark = pytest.mark.slow


def run(command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A console script of this package, as a user runs it."""
    return subprocess.run([str(BIN / command), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The last stderr line of a failed command, which must be its only error output."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A scratch directory with data/synthetic/ (labelled train/validate, unlabelled test) in which
    ``lightning fit --config configs/demo.yaml`` has run for two steps."""
    root = tmp_path_factory.mktemp("clone")
    write_synthetic_dataset(root / "data" / "synthetic", num_train=64, num_validate=32, num_test=20,
                            num_classes=CLASSES, files_per_split=2, min_frames=5, max_frames=MAX_FRAMES, seed=1)
    result = run("lightning", "fit", "--config", DEMO, "--trainer.max_steps", "2",
                 "--trainer.enable_progress_bar", "false", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def checkpoints(clone: Path) -> Path:
    return clone / "runs" / "demo" / "version_0" / "checkpoints"


def test_training_writes_best_ckpt_pointing_at_the_best_checkpoint(clone):
    directory = checkpoints(clone)
    scored = {float(path.stem.split("gap")[1]): path for path in directory.glob("epoch*-gap*.ckpt")}
    assert scored, sorted(directory.iterdir())
    best = directory / "best.ckpt"
    assert best.resolve() == scored[max(scored)].resolve()
    saved = torch.load(best, weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in torch.load(scored[max(scored)], weights_only=True)["state_dict"].items())


def test_readme_resume_keeps_a_best_ckpt_in_the_new_run(clone, tmp_path):
    """`lightning fit --config ... --ckpt_path .../last.ckpt` (the README's resume) in a copy of the
    clone: the new version directory has a best.ckpt that resolves to the best checkpoint so far."""
    copy = tmp_path / "clone"
    shutil.copytree(clone, copy, symlinks=True)
    result = run("lightning", "fit", "--config", DEMO, "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false",
                 "--ckpt_path", "runs/demo/version_0/checkpoints/last.ckpt", cwd=copy)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = sorted((copy / "runs" / "demo").glob("version_*"))[-1]
    assert resumed.name != "version_0"
    assert torch.load(resumed / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] in (2, 4)


def test_readme_validate_test_predict_and_export_on_best_ckpt(clone):
    """The README's evaluation commands on fit's best.ckpt, in the clone. They also leave a user's
    config.yaml in the working directory alone: LightningCLI saved the merged config as
    ./config.yaml (logger: false puts the log dir in the working directory), over the user's own
    config of that name; only fit saves it, in its run."""
    assert (clone / "runs" / "demo" / "version_0" / "config.yaml").is_file()  # fit's, in its log dir
    mine = Path(DEMO).read_bytes() + b"# my own config, named as LightningCLI names its copy\n"
    (clone / "config.yaml").write_bytes(mine)
    try:
        readme_validate_test_predict_and_export_on_best_ckpt(clone, mine)
    finally:
        (clone / "config.yaml").unlink()  # the clone is the other tests' working directory


def readme_validate_test_predict_and_export_on_best_ckpt(clone: Path, mine: bytes) -> None:
    best = checkpoints(clone) / "best.ckpt"
    recorded_gap = float(best.resolve().stem.split("gap")[1])  # fit's validation of the same weights

    result = run("nextvlad", "validate", "--config", DEMO, "--config", EVALUATE, "--ckpt_path", str(best), cwd=clone)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (clone / "config.yaml").read_bytes() == mine, "validate"
    validated = yaml.safe_load((best.parent / "best.validate.json").read_text())["metrics"]
    assert validated["gap"] == pytest.approx(recorded_gap, abs=5e-5)
    # README: Google's MAP (over the classes with a positive) by an option of the evaluation alone;
    # the user's config.yaml (demo.yaml's) passed as the config is left alone too
    result = run("nextvlad", "validate", "--config", "config.yaml", "--config", EVALUATE, "--ckpt_path", str(best),
                 "--model.init_args.map_classes", "with_positives", "--trainer.callbacks.output_dir=google", cwd=clone)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (clone / "config.yaml").read_bytes() == mine, "validate --config config.yaml"
    google = yaml.safe_load((clone / "google" / "best.validate.json").read_text())
    per_class = np.array(google["per_class"]["average_precision"])
    positives = np.array(google["per_class"]["positives"])
    assert google["metrics"]["map"] == pytest.approx(per_class[positives > 0].mean(), abs=1e-9)
    assert google["metrics"]["gap"] == validated["gap"]
    assert google["map_classes"] == "with_positives"  # the report says which MAP it holds
    assert yaml.safe_load((best.parent / "best.validate.json").read_text())["map_classes"] == "all"

    # configs/demo.yaml points `test` at labelled data: the same metrics, not zeros.
    tested = run("nextvlad", "test", "--config", DEMO, "--config", EVALUATE, "--ckpt_path", str(best), cwd=clone)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert (clone / "config.yaml").read_bytes() == mine, "test"
    test_metrics = yaml.safe_load((best.parent / "best.test.json").read_text())["metrics"]
    assert test_metrics["gap"] == pytest.approx(validated["gap"], rel=1e-6) and test_metrics["gap"] > 0

    predicted = run("nextvlad", "predict", "--config", DEMO, "--config", PREDICT, "--ckpt_path", str(best),
                    "--trainer.callbacks.output_path=submission.csv", cwd=clone)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert (clone / "config.yaml").read_bytes() == mine, "predict"
    for result in (tested, predicted):  # Lightning's false alarms for these commands are not shown
        assert "Be aware that when using `ckpt_path`" not in result.stderr
        assert "`IterableDataset` has `__len__` defined" not in result.stderr
    rows = (clone / "submission.csv").read_text().splitlines()
    test_ids = [video["id"] for video in iter_videos(str(clone / "data/synthetic/test*.tfrecord"), num_classes=CLASSES)]
    assert rows[0] == "VideoId,LabelConfidencePairs" and [row.split(",")[0] for row in rows[1:]] == test_ids

    exported = run("nextvlad", "export", "--ckpt_path", str(best), "--format", "onnx", "--output", "nextvlad.onnx",
                   cwd=clone)
    assert exported.returncode == 0, exported.stderr[-3000:]
    onnx = pytest.importorskip("onnx")
    metadata = {p.key: p.value for p in onnx.load(str(clone / "nextvlad.onnx")).metadata_props}
    assert metadata["nextvlad.reverse_whitening"].startswith("none: the model was trained without reverse whitening")


def test_an_architecture_argument_that_contradicts_the_checkpoint_is_an_error(clone):
    result = run("nextvlad", "validate", "--config", DEMO, "--ckpt_path", str(checkpoints(clone) / "best.ckpt"),
                 "--model.init_args.clusters", "32", cwd=clone)
    assert "another architecture (clusters: checkpoint 16 vs config 32)" in error_line(result)


def padded_videos(pattern: str) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    videos = list(iter_videos(pattern, max_frames=MAX_FRAMES, num_classes=CLASSES))
    rgb, audio = torch.zeros(len(videos), MAX_FRAMES, 1024), torch.zeros(len(videos), MAX_FRAMES, 128)
    for b, video in enumerate(videos):
        rgb[b, :video["num_frames"]] = torch.from_numpy(video["rgb"])
        audio[b, :video["num_frames"]] = torch.from_numpy(video["audio"])
    return [v["id"] for v in videos], rgb, audio, torch.tensor([v["num_frames"] for v in videos])


def top_classes(probabilities: torch.Tensor, k: int = 20) -> list[list[int]]:
    """Oracle ranking: float64 sort by (-probability, class)."""
    rows = probabilities.double().tolist()
    return [sorted(range(len(row)), key=lambda c: (-row[c], c))[:k] for row in rows]


def submission_classes(path: Path) -> dict[str, list[int]]:
    rows = path.read_text().splitlines()[1:]
    return {row.split(",")[0]: [int(c) for c in row.split(",")[1].split(" ")[::2]] for row in rows}


def write_model_config(path: Path, **init_args) -> Path:
    path.write_text(yaml.safe_dump({"model": {"class_path": "nextvlad.VideoClassifier", "init_args": init_args}}))
    return path


def test_predict_branch_and_top_k_on_the_command_line_apply_to_a_mixture_checkpoint(clone, tmp_path):
    torch.manual_seed(0)
    mixture = VideoClassifier(**TINY, num_branches=2).eval()
    torch.save(checkpoint_from_module(mixture), tmp_path / "mixture.ckpt")
    config = write_model_config(tmp_path / "mixture.yaml", **TINY, num_branches=2)
    result = run("nextvlad", "predict", "--config", DEMO, "--config", str(config), "--config", PREDICT,
                 "--ckpt_path", str(tmp_path / "mixture.ckpt"), "--model.init_args.predict_branch", "0",
                 "--model.init_args.top_k", "5", f"--trainer.callbacks.output_path={tmp_path / 'branch0.csv'}", cwd=clone)
    assert result.returncode == 0, result.stderr[-3000:]

    ids, rgb, audio, lengths = padded_videos(str(clone / "data/synthetic/test*.tfrecord"))
    with torch.no_grad():
        branch = top_classes(torch.sigmoid(mixture.model.branches[0](rgb, audio, lengths)), k=5)
        mixed = top_classes(torch.sigmoid(mixture.model(rgb, audio, lengths)), k=5)
    assert branch != mixed  # otherwise this test could not tell the two apart
    assert submission_classes(tmp_path / "branch0.csv") == dict(zip(ids, branch))


def test_readme_convert_tf_then_validate_and_predict(clone, tmp_path):
    """`nextvlad convert-tf ... --out nextvlad_tf.ckpt --ignore-extra`, then validate and predict with
    the same config: the metrics and the submission are those of the model the weights came from."""
    torch.manual_seed(1)
    source = VideoClassifier(**TINY, hidden_activation="none").eval()
    variables = export_tf_variables(source)
    variables["global_step"] = np.int64(460000)  # training state that --ignore-extra skips
    np.savez(tmp_path / "nextvlad_tf.npz", **variables)
    config = yaml.safe_load(Path(DEMO).read_text())
    config["model"]["init_args"] = {**TINY, "hidden_activation": "none"}
    (tmp_path / "tf.yaml").write_text(yaml.safe_dump(config))

    converted = run("nextvlad", "convert-tf", "--variables", str(tmp_path / "nextvlad_tf.npz"), "--config",
                    str(tmp_path / "tf.yaml"), "--out", str(tmp_path / "nextvlad_tf.ckpt"), "--ignore-extra", cwd=clone)
    assert converted.returncode == 0, converted.stderr[-3000:]
    validated = run("nextvlad", "validate", "--config", str(tmp_path / "tf.yaml"), "--config", EVALUATE,
                    "--ckpt_path", str(tmp_path / "nextvlad_tf.ckpt"), cwd=clone)
    assert validated.returncode == 0, validated.stderr[-3000:]
    predicted = run("nextvlad", "predict", "--config", str(tmp_path / "tf.yaml"), "--config", PREDICT,
                    "--ckpt_path", str(tmp_path / "nextvlad_tf.ckpt"),
                    f"--trainer.callbacks.output_path={tmp_path / 'submission.csv'}", cwd=clone)
    assert predicted.returncode == 0, predicted.stderr[-3000:]

    ids, rgb, audio, lengths = padded_videos(str(clone / "data/synthetic/validate*.tfrecord"))
    labels = torch.stack([torch.from_numpy(v["labels"]) for v in iter_videos(
        str(clone / "data/synthetic/validate*.tfrecord"), max_frames=MAX_FRAMES, num_classes=CLASSES)]).double()
    with torch.no_grad():
        logits = source(rgb, audio, lengths).double()
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1).mean()
    report = yaml.safe_load((tmp_path / "nextvlad_tf.validate.json").read_text())["metrics"]
    assert report["loss"] == pytest.approx(float(expected_loss), rel=1e-5)

    ids, rgb, audio, lengths = padded_videos(str(clone / "data/synthetic/test*.tfrecord"))
    with torch.no_grad():
        expected = top_classes(torch.sigmoid(source(rgb, audio, lengths)))
    assert submission_classes(tmp_path / "submission.csv") == dict(zip(ids, expected))


# ------------------------------------------------------------------ known user errors: one line
def cli_error(monkeypatch, capsys, *argv: str, script: str = "nextvlad") -> str:
    """What ``<script> <argv>`` (the console script's function, in this process) exits with: a
    message, i.e. exit status 1, of one line. The real console script's exit status and stderr are
    checked by test_an_architecture_argument_that_contradicts_the_checkpoint_is_an_error."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    message = str(exit_info.value.code)
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err
    assert message.endswith("(--debug shows the traceback)")
    return message


def usage_error(monkeypatch, capsys, *argv: str) -> str:
    """The last stderr line of ``nextvlad <argv>`` (in this process) refused by its tool's argument
    parser: exit status 2, no traceback."""
    monkeypatch.setattr(sys, "argv", ["nextvlad", *argv])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("override, expected", [
    (["--data.init_args.val_pattern", "nowhere/*.tfrecord"],
     "YT8MDataModule val_pattern: no files match 'nowhere/*.tfrecord'"),
    (["--data.init_args.eigenvalues_path", "missing/eigenvals.npy"], "eigenvalues_path: missing/eigenvals.npy does not exist"),
    (["--data.init_args.max_frames", "0"], "max_frames must be an integer >= 1, got 0"),
    (["--data.init_args.num_classes", "50"],
     "model.init_args.num_classes = 100 but data.init_args.num_classes = 50: the classifier's outputs"),
    (["--data.init_args.num_classes", "5", "--model.init_args.num_classes", "5"],
     "data/synthetic/validate0000.tfrecord, record 0: label"),  # "... is outside [0, num_classes=5)"
])
def test_known_data_errors_are_one_line(clone, monkeypatch, capsys, override, expected):
    monkeypatch.chdir(clone)
    message = cli_error(monkeypatch, capsys, "validate", "--config", DEMO, *override)
    assert message.startswith(f"nextvlad validate: error: {expected}")


def test_testing_data_without_labels_is_an_error(clone, monkeypatch, capsys):
    monkeypatch.chdir(clone)
    message = cli_error(monkeypatch, capsys, "test", "--config", DEMO, "--config", EVALUATE, "--ckpt_path",
                        str(checkpoints(clone) / "best.ckpt"), "--data.init_args.test_pattern", "data/synthetic/test*.tfrecord")
    assert message.startswith("nextvlad test: error: no video of the test data has labels "
                              "(data.init_args.test_pattern = 'data/synthetic/test*.tfrecord')")


def test_corrupt_and_foreign_checkpoints_are_one_line_without_torch_advice(clone, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(clone)
    best = checkpoints(clone) / "best.ckpt"
    (tmp_path / "truncated.ckpt").write_bytes(best.read_bytes()[: 100_000])
    (tmp_path / "garbage.ckpt").write_bytes(bytes(range(256)) * 8)
    torch.save({"state_dict": {"layer.weight": torch.zeros(3)}, "hyper_parameters": {}}, tmp_path / "other.ckpt")
    for name in ("truncated", "garbage"):
        message = cli_error(monkeypatch, capsys, "validate", "--config", DEMO, "--ckpt_path", str(tmp_path / f"{name}.ckpt"))
        assert f"{name}.ckpt: not a loadable checkpoint" in message and "weights_only" not in message
    message = cli_error(monkeypatch, capsys, "predict", "--config", DEMO, "--ckpt_path", str(tmp_path / "other.ckpt"))
    assert message.startswith(f"nextvlad predict: error: {tmp_path / 'other.ckpt'}: its weights do not fit VideoClassifier")


def test_debug_shows_the_original_exception(clone, monkeypatch):
    monkeypatch.chdir(clone)
    monkeypatch.setattr(sys, "argv", ["nextvlad", "validate", "--config", DEMO, "--debug",
                                      "--data.init_args.val_pattern", "nowhere/*.tfrecord"])
    with pytest.raises(FileNotFoundError, match="val_pattern: no files match"):
        console_main()


# ------------------------------------------------------------------ params
def nextvlad_layer_parameters(n: int, groups: int, clusters: int, expansion: int = 2) -> int:
    """SPEC 3.5: P_layer(N, G, K)."""
    expanded = expansion * n
    d = expanded // groups
    return (n * expanded + expanded + expanded * groups + groups + expanded * groups * clusters
            + 2 * groups * clusters + d * clusters + 2 * d * clusters)


def nextvlad_model_parameters(groups: int, clusters: int, hidden: int = 2048, reduction: int = 8, classes: int = 3862) -> int:
    """SPEC 3.5: P = P_layer(1024, G, K) + P_layer(128, G/2, K/2) + V*H + 2H + 2*H*(H/r) + 2*(H/r) + H*C + C."""
    vlad = 2304 * clusters // groups
    return (nextvlad_layer_parameters(1024, groups, clusters) + nextvlad_layer_parameters(128, groups // 2, clusters // 2)
            + vlad * hidden + 2 * hidden + 2 * hidden * (hidden // reduction) + 2 * (hidden // reduction)
            + hidden * classes + classes)


def printed_total(output: str) -> int:
    [total] = [line for line in output.splitlines() if line.startswith("total")]
    return int(total.split()[-1].replace(",", ""))


@pytest.mark.parametrize("config, groups, spec_millions", [("nextvlad_16g", 16, 53.3), ("nextvlad_32g", 32, 38.7)])
def test_params_of_the_group_configs_match_spec(capsys, config, groups, spec_millions):
    from nextvlad.cli import main

    main(["params", "--config", str(REPO / "configs" / f"{config}.yaml")])
    total = printed_total(capsys.readouterr().out)
    assert total == nextvlad_model_parameters(groups=groups, clusters=128)
    assert round(total / 1e6, 1) == spec_millions  # SPEC 3.5's "38.7M and 53.3M"


def test_params_takes_several_configs_and_overrides_like_the_other_commands(tmp_path):
    extra = write_model_config(tmp_path / "extra.yaml", clusters=64)
    result = run("nextvlad", "params", "--config", str(REPO / "configs" / "nextvlad.yaml"), "--config", str(extra),
                 "--model.init_args.groups", "16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed_total(result.stdout) == nextvlad_model_parameters(groups=16, clusters=64)
    assert "Seed set" not in result.stdout + result.stderr


def readme_parameter_table() -> dict[str, int]:
    """config file name -> count, from the README's table under "Training"."""
    counts = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[2].replace(",", "").isdigit():
            for name in cells[0].replace("`", "").split(", "):
                counts[name] = int(cells[2].replace(",", ""))
    return counts


def test_readme_parameter_table_is_what_params_prints(capsys):
    from nextvlad.cli import main

    table = readme_parameter_table()
    assert {"nextvlad_16g.yaml", "nextvlad_32g.yaml", "netvlad.yaml", "netvlad_small.yaml", "netvlad_random.yaml"} <= set(table)
    for config, count in table.items():
        main(["params", "--config", str(REPO / "configs" / config)])
        assert printed_total(capsys.readouterr().out) == count, config


# ------------------------------------------------------------------ what the commands must not touch
def test_export_and_convert_tf_refuse_to_write_over_their_input(clone, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.ckpt"
    shutil.copyfile(checkpoints(clone) / "best.ckpt", ckpt)
    before = ckpt.read_bytes()
    assert usage_error(monkeypatch, capsys, "export", "--ckpt_path", "model.ckpt", "--output", "./model.ckpt") == (
        "nextvlad export: error: --output ./model.ckpt is the --ckpt_path file: it would be overwritten; write elsewhere")
    assert ckpt.read_bytes() == before

    np.savez(tmp_path / "tf.npz", **export_tf_variables(VideoClassifier(**TINY, hidden_activation="none")))
    variables = (tmp_path / "tf.npz").read_bytes()
    write_model_config(tmp_path / "tf.yaml", **TINY, hidden_activation="none")
    line = usage_error(monkeypatch, capsys, "convert-tf", "--variables", "tf.npz", "--config", "tf.yaml", "--out",
                       str(tmp_path / "tf.npz"))
    assert line.startswith(f"nextvlad convert-tf: error: --out {tmp_path / 'tf.npz'} is the --variables file"), line
    assert (tmp_path / "tf.npz").read_bytes() == variables


def test_convert_tf_out_that_is_a_link_replaces_the_link_not_the_checkpoint_it_names(clone, tmp_path):
    torch.manual_seed(2)
    source = VideoClassifier(**TINY).eval()
    np.savez(tmp_path / "tf.npz", **export_tf_variables(source))
    config = yaml.safe_load(Path(DEMO).read_text())
    config["model"]["init_args"] = dict(TINY)
    (tmp_path / "tf.yaml").write_text(yaml.safe_dump(config))
    trained = tmp_path / "epoch3.ckpt"
    shutil.copyfile(checkpoints(clone) / "best.ckpt", trained)
    (tmp_path / "best.ckpt").symlink_to(trained.name)
    before = trained.read_bytes()
    converted = run("nextvlad", "convert-tf", "--variables", str(tmp_path / "tf.npz"), "--config",
                    str(tmp_path / "tf.yaml"), "--out", str(tmp_path / "best.ckpt"), cwd=clone)
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert trained.read_bytes() == before and not (tmp_path / "best.ckpt").is_symlink()
    weights = torch.load(tmp_path / "best.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(weights[key], value) for key, value in source.state_dict().items())
    assert not list(tmp_path.glob(".best.ckpt*"))  # no partial file left

def test_cut_short_checkpoint_is_refused_naming_the_newest_other_beside_it(clone, monkeypatch, capsys, tmp_path):
    """The README's promise, through --ckpt_path of validate (and of export)."""
    monkeypatch.chdir(clone)
    whole = (checkpoints(clone) / "best.ckpt").read_bytes()
    for age, name in [(300, "epoch0.ckpt"), (200, "epoch1.ckpt")]:
        (tmp_path / name).write_bytes(whole)
        os.utime(tmp_path / name, (time.time() - age,) * 2)
    cut = tmp_path / "last.ckpt"
    cut.write_bytes(whole[: len(whole) // 2])
    validated = cli_error(monkeypatch, capsys, "validate", "--config", DEMO, "--config", EVALUATE, "--ckpt_path", str(cut))
    assert validated.startswith(f"nextvlad validate: error: {cut}: not a loadable checkpoint: cut short")
    assert str(tmp_path / "epoch1.ckpt") in validated and "epoch0" not in validated
    exported = cli_error(monkeypatch, capsys, "export", "--ckpt_path", str(cut), "--output", str(tmp_path / "m.onnx"))
    assert f"{cut}: not a loadable checkpoint: cut short" in exported and str(tmp_path / "epoch1.ckpt") in exported



def test_ckpt_path_last_that_is_cut_short_is_one_line_naming_the_newest_other(clone, monkeypatch, capsys, tmp_path):
    """Lightning resolves --ckpt_path last itself (past the CLI's own check): the checkpoint IO of
    the configs refuses the cut-short file, and the CLI shows that as its one-line error."""
    (tmp_path / "data").symlink_to(clone / "data")
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    whole = (checkpoints(clone) / "last.ckpt").read_bytes()
    (folder / "epoch0.ckpt").write_bytes(whole)
    os.utime(folder / "epoch0.ckpt", (time.time() - 100,) * 2)
    (folder / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    line = cli_error(monkeypatch, capsys, "fit", "--config", DEMO, f"--trainer.callbacks.dirpath={folder}",
                     "--ckpt_path", "last", "--trainer.max_steps", "1", script="lightning")
    assert line.startswith(f"lightning fit: error: {folder / 'last.ckpt'}: not a loadable checkpoint: cut short"), line
    assert f"newest other checkpoint in its folder instead: {folder / 'epoch0.ckpt'}" in line

# ------------------------------------------------------------------ --ckpt_path last / best, preemption
def test_fit_ckpt_path_last_resumes_the_newest_of_its_settings_passing_over_newer_ones_of_other_runs(clone, tmp_path):
    """The configs' logger numbers each run (version_N): `--ckpt_path last` is the newest last.ckpt
    of any version, named on the console, and training continues from its weights, not from
    scratch in the new, empty version. A sweep under one logger name, each job requeued with
    `--ckpt_path last`: the newest last.ckpt may be another job's. A newer one of another seed and
    one of another learning rate are passed over, each named with the setting that differs; the
    run resumes the newest of its own, in version_50, not the older version_0. Oracle: the
    classifier bias, shifted by 1 in version_50, 2 in version_80 (seed) and 3 in version_90
    (learning rate), far more than a training step moves it (Adam, learning rate 0.003)."""
    copy = tmp_path / "clone"
    shutil.copytree(clone, copy, symlinks=True)
    runs = copy / "runs" / "demo"
    own = runs / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(own, weights_only=True)
    bias = checkpoint["state_dict"]["model.classifier.bias"].clone()
    newer = {"version_50": (None, None, 1.0), "version_80": ("seed_everything", 7, 2.0),
             "version_90": ("learning_rate", 0.5, 3.0)}  # oldest first
    for age, (version, (setting, value, shift)) in enumerate(newer.items()):
        other = torch.load(own, weights_only=True)
        if setting is not None:
            (other if setting == "seed_everything" else other["hyper_parameters"])[setting] = value
        other["state_dict"]["model.classifier.bias"] += shift
        path = runs / version / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save(other, path)
        os.utime(path, (time.time() - 100 + age,) * 2)
    os.utime(own, (time.time() - 200,) * 2)

    result = run("lightning", "fit", "--config", DEMO, "--trainer.max_steps", "3", "--trainer.enable_progress_bar",
                 "false", "--ckpt_path", "last", cwd=copy)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "--ckpt_path last: runs/demo/version_50/checkpoints/last.ckpt (the newest last.ckpt of the run with " \
           "these settings)" in said
    assert ("passed over newer checkpoints of other settings: runs/demo/version_90/checkpoints/last.ckpt "
            "(model learning_rate: checkpoint 0.5 vs config 0.003), runs/demo/version_80/checkpoints/last.ckpt "
            "(seed_everything: checkpoint 7 vs config 0)") in said
    resumed = max(runs.glob("version_*"), key=lambda path: int(path.name.split("_")[1]))
    assert resumed.name == "version_91"
    trained = torch.load(runs / "version_91" / "checkpoints" / "last.ckpt", weights_only=True)
    # from version_50: about 1 (from scratch or version_0: about 0; version_80: 2; version_90: 3)
    assert torch.allclose(trained["state_dict"]["model.classifier.bias"] - bias, torch.ones_like(bias), atol=0.1)
    assert trained["seed_everything"] == 0

    # No checkpoint of these settings: the newest is continued with them, the differences said.
    result = run("lightning", "fit", "--config", DEMO, "--trainer.max_steps", "3", "--trainer.enable_progress_bar",
                 "false", "--ckpt_path", "last", "--model.init_args.learning_rate", "0.25", "--seed_everything", "7",
                 cwd=copy)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert ("--ckpt_path last: no last.ckpt of the run has this command's settings; continuing the newest with these "
            "settings: runs/demo/version_91/checkpoints/last.ckpt (model learning_rate: checkpoint 0.003 vs config "
            "0.25; seed_everything: checkpoint 0 vs config 7)") in " ".join(said.split())
    assert "of the run with these settings)" not in said  # not said of a checkpoint of other settings


def test_a_setting_a_checkpoint_predates_is_compared_at_its_default():
    """A checkpoint written before bn_tower_videos existed ran as one tower (the default, None):
    resuming it under the paper configs' 80 is a difference, as for a checkpoint that records None
    (it was called "the run with these settings"); data settings alike."""
    from nextvlad.cli import settings_differences
    from nextvlad.data import YT8MDataModule

    small = dict(num_classes=10, clusters=4, groups=2, hidden_size=16, gating_reduction=4)
    data = YT8MDataModule(train_pattern="train*.tfrecord", batch_size=8)
    old = {"hyper_parameters": dict(VideoClassifier(**small).hparams), "datamodule_hyper_parameters": dict(data.hparams)}
    del old["hyper_parameters"]["bn_tower_videos"], old["datamodule_hyper_parameters"]["shuffle_buffer"]
    assert settings_differences(old, VideoClassifier(**small), data, None) == []
    assert settings_differences(old, VideoClassifier(**small, bn_tower_videos=80), data, None) == [
        "model bn_tower_videos: checkpoint None (not recorded: before the setting) vs config 80"]
    other_data = YT8MDataModule(train_pattern="train*.tfrecord", batch_size=8, shuffle_buffer=64)
    assert settings_differences(old, VideoClassifier(**small), other_data, None) == [
        "data shuffle_buffer: checkpoint 512 (not recorded: before the setting) vs config 64"]
    # adam_epsilon came with TF1's Adam: runs from before it ran torch.optim.Adam, not the default
    del old["hyper_parameters"]["adam_epsilon"]
    assert settings_differences(old, VideoClassifier(**small, adam_epsilon="torch"), data, None) == []
    assert settings_differences(old, VideoClassifier(**small), data, None) == [
        "model adam_epsilon: checkpoint 'torch' (not recorded: before the setting) vs config 'tf1'"]
    # a subclass passing its base's arguments on through **kwargs: the base's defaults count
    from nextvlad.data import YT8MSegmentDataModule

    segments = YT8MSegmentDataModule(train_pattern="train*.tfrecord", batch_size=8, shuffle_buffer=64)
    assert "data shuffle_buffer: checkpoint 512 (not recorded: before the setting) vs config 64" in \
        settings_differences(old, VideoClassifier(**small, adam_epsilon="torch"), segments, None)


def test_fit_ckpt_path_last_without_a_last_ckpt_is_an_error_not_a_fresh_start(clone, monkeypatch, capsys, tmp_path):
    (tmp_path / "data").symlink_to(clone / "data")
    monkeypatch.chdir(tmp_path)
    line = cli_error(monkeypatch, capsys, "fit", "--config", DEMO, "--trainer.max_steps", "1", "--ckpt_path", "last",
                     script="lightning")
    assert line.startswith("lightning fit: error: --ckpt_path last: no last.ckpt in runs/demo/*/checkpoints; "
                           "pass a checkpoint file, or start the run without --ckpt_path"), line
    assert not list(tmp_path.glob("runs/**/*.ckpt"))  # nothing trained
    # Outside fit there is nothing to start: the advice is the file only.
    line = cli_error(monkeypatch, capsys, "validate", "--config", DEMO, "--ckpt_path", "best")
    assert line.startswith("nextvlad validate: error: --ckpt_path best: no best.ckpt in runs/demo/*/checkpoints; "
                           "pass a checkpoint file ("), line


def test_ckpt_path_best_is_the_newest_best_ckpt_of_the_run(clone, tmp_path):
    """Lightning's "best" is the best of a ModelCheckpoint of this process, which a new process has
    not got: `best`, as `last`, is the run's newest best.ckpt. Oracle: the validation loss of the
    weights in that file (the classifier bias shifted, so unlike any other), computed here."""
    from nextvlad.export import classifier_from_checkpoint

    copy = tmp_path / "clone"
    shutil.copytree(clone, copy, symlinks=True)
    checkpoint = torch.load(checkpoints(copy) / "last.ckpt", weights_only=True)
    checkpoint["state_dict"]["model.classifier.bias"] -= 2.0
    newest = copy / "runs" / "demo" / "version_40" / "checkpoints" / "best.ckpt"
    newest.parent.mkdir(parents=True)
    torch.save(checkpoint, newest)

    result = run("nextvlad", "validate", "--config", DEMO, "--ckpt_path", "best", cwd=copy)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "--ckpt_path best: runs/demo/version_40/checkpoints/best.ckpt" in output
    ids, rgb, audio, lengths = padded_videos(str(copy / "data/synthetic/validate*.tfrecord"))
    labels = torch.stack([torch.from_numpy(v["labels"]) for v in iter_videos(
        str(copy / "data/synthetic/validate*.tfrecord"), max_frames=MAX_FRAMES, num_classes=CLASSES)]).double()
    with torch.no_grad():
        logits = classifier_from_checkpoint(checkpoint, str(newest))(rgb, audio, lengths).double()
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1).mean()
    assert float(re.search(r"val/loss\s+([0-9.]+)", output).group(1)) == pytest.approx(float(expected_loss), rel=1e-5)


@pytest.mark.timeout(600)
def test_sigterm_stops_fit_with_exit_status_143(clone, tmp_path):
    """A preempted run (SIGTERM) must not look finished to a requeueing wrapper: status 128 + 15,
    and a line that says so. The signal comes once training is under way (a last.ckpt exists)."""
    (tmp_path / "data").symlink_to(clone / "data")
    process = subprocess.Popen([str(BIN / "nextvlad"), "fit", "--config", DEMO, "--trainer.max_epochs", "1000",
                                "--trainer.enable_progress_bar", "false"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not list(tmp_path.glob("runs/demo/version_0/checkpoints/last.ckpt")) and process.poll() is None:
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        stderr = process.communicate(timeout=300)[1]
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("nextvlad fit: stopped by SIGTERM before the end; "
                                                      "continue it with --ckpt_path last")
    assert "Traceback" not in stderr


def with_whitening(source: Path, target: Path, eigenvalues_path: str | None) -> Path:
    """``source`` as LightningCLI would have saved it with ``data.init_args.eigenvalues_path``."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["eigenvalues_path"] = eigenvalues_path
    torch.save(checkpoint, target)
    return target


def test_evaluating_with_another_reverse_whitening_than_the_checkpoint_is_an_error(clone, monkeypatch, capsys, tmp_path):
    """Reverse whitening changes every rgb input the weights see: on vs off, or other eigenvalues,
    is an error naming both values; the same eigenvalues in a file at another path are the same."""
    monkeypatch.chdir(clone)
    eigenvalues = np.linspace(4.0, 0.5, 2048, dtype=np.float32)
    np.save(tmp_path / "eigenvals.npy", eigenvalues)
    np.save(tmp_path / "same_eigenvals.npy", eigenvalues)
    np.save(tmp_path / "other_eigenvals.npy", eigenvalues * 2)
    plain = checkpoints(clone) / "last.ckpt"
    assert torch.load(plain, weights_only=True)["datamodule_hyper_parameters"]["eigenvalues_path"] is None
    whitened = with_whitening(plain, tmp_path / "whitened.ckpt", str(tmp_path / "eigenvals.npy"))

    message = cli_error(monkeypatch, capsys, "predict", "--config", DEMO, "--config", PREDICT, "--ckpt_path", str(whitened))
    assert message.startswith(f"nextvlad predict: error: {whitened}: the checkpoint's reverse whitening is not the "
                              f"config's (eigenvalues_path: checkpoint '{tmp_path / 'eigenvals.npy'}' vs config None")
    message = cli_error(monkeypatch, capsys, "validate", "--config", DEMO, "--config", EVALUATE, "--ckpt_path", str(plain),
                        f"--data.init_args.eigenvalues_path={tmp_path / 'eigenvals.npy'}")
    assert f"eigenvalues_path: checkpoint None vs config '{tmp_path / 'eigenvals.npy'}'" in message
    message = cli_error(monkeypatch, capsys, "test", "--config", DEMO, "--config", EVALUATE, "--ckpt_path", str(whitened),
                        f"--data.init_args.eigenvalues_path={tmp_path / 'other_eigenvals.npy'}")
    assert (f"(eigenvalues_path: checkpoint '{tmp_path / 'eigenvals.npy'}' vs config "
            f"'{tmp_path / 'other_eigenvals.npy'}': files of other values") in message

    same = run("nextvlad", "predict", "--config", DEMO, "--config", PREDICT, "--ckpt_path", str(whitened),
               f"--data.init_args.eigenvalues_path={tmp_path / 'same_eigenvals.npy'}",
               f"--trainer.callbacks.output_path={tmp_path / 'submission.csv'}", cwd=clone)
    assert same.returncode == 0, same.stderr[-3000:]
    assert len((tmp_path / "submission.csv").read_text().splitlines()) == 1 + 20  # the 20 test videos


def test_init_from_a_corrupt_or_foreign_file_is_one_line_naming_it(clone, monkeypatch, capsys, tmp_path):
    """`fit --model.init_args.init_from` (the segment fine-tuning start) goes through the same
    checkpoint loading as --ckpt_path: one line naming the file, not torch.load's traceback."""
    (tmp_path / "data").symlink_to(clone / "data")  # a failed fit still makes its run folder: not in clone
    monkeypatch.chdir(tmp_path)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((checkpoints(clone) / "best.ckpt").read_bytes()[:100_000])
    (tmp_path / "table.csv").write_text("VideoId,LabelConfidencePairs\n")
    for path, reason in [(cut, "not a loadable checkpoint: cut short"),
                         (tmp_path / "table.csv", "not a loadable checkpoint, corrupt or not written by torch.save")]:
        line = cli_error(monkeypatch, capsys, "fit", "--config", DEMO, "--trainer.max_steps", "1",
                         f"--model.init_args.init_from={path}")
        assert line.startswith(f"nextvlad fit: error: init_from: {path}: {reason}"), line


# ------------------------------------------------------------------ a predict config of the other task
def test_predict_config_of_the_other_task_is_one_line_before_any_batch(clone, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(clone)
    whitelist = tmp_path / "segment_label_ids.csv"
    whitelist.write_text("Index\n" + "".join(f"{c}\n" for c in range(CLASSES)))
    video = cli_error(monkeypatch, capsys, "predict", "--config", DEMO, "--config", PREDICT_SEGMENTS, "--ckpt_path",
                      str(checkpoints(clone) / "best.ckpt"), f"--trainer.callbacks.whitelist_path={whitelist}",
                      f"--trainer.callbacks.output_path={tmp_path / 'segments.csv'}")
    assert video.startswith("nextvlad predict: error: SegmentSubmissionWriter writes the submission of "
                            "task='segments' models, but the model has task='video': predict with configs/predict.yaml")

    torch.save(checkpoint_from_module(VideoClassifier(**TINY, task="segments")), tmp_path / "segments.ckpt")
    config = write_model_config(tmp_path / "segments.yaml", **TINY, task="segments")
    segments = cli_error(monkeypatch, capsys, "predict", "--config", DEMO, "--config", str(config), "--config", PREDICT,
                         "--ckpt_path", str(tmp_path / "segments.ckpt"),
                         f"--trainer.callbacks.output_path={tmp_path / 'videos.csv'}")
    assert segments.startswith("nextvlad predict: error: SubmissionWriter writes the submission of task='video' "
                               "models, but the model has task='segments': predict with configs/predict_segments.yaml")
    assert not any(tmp_path.glob("*.csv.*")) and not (tmp_path / "videos.csv").exists()


def test_the_newest_last_ckpt_is_found_on_remote_storage_too():
    """A callback dirpath or logger save_dir on an object store (gs://, s3://): the run's versions
    are listed through fsspec, not the local disk (memory:// here); Lightning's -vN names count."""
    import uuid

    import fsspec

    from nextvlad.cli import run_checkpoints_named

    fs, root = fsspec.filesystem("memory"), f"/{uuid.uuid4().hex}"
    for path in ["version_0/checkpoints/last.ckpt", "version_2/checkpoints/last-v1.ckpt",
                 "version_1/checkpoints/last.ckpt", "version_1/checkpoints/lastly.ckpt"]:
        fs.pipe(f"{root}/{path}", b"x")
        time.sleep(0.01)  # distinct creation times, in this order
    assert run_checkpoints_named("last", [f"memory://{root}/*/checkpoints"]) == [
        f"memory://{root}/version_1/checkpoints/last.ckpt", f"memory://{root}/version_2/checkpoints/last-v1.ckpt",
        f"memory://{root}/version_0/checkpoints/last.ckpt"]
    assert run_checkpoints_named("best", [f"memory://{root}/*/checkpoints"]) == []


@pytest.mark.parametrize("extra", [EVALUATE, PREDICT])
def test_evaluation_configs_resolve_best_in_no_stray_folder(clone, monkeypatch, capsys, tmp_path, extra):
    """evaluate.yaml / predict.yaml drop the run's checkpoint callback: --ckpt_path best has no run
    to look in, and must not take Lightning's default ./checkpoints (a stray best.ckpt here)."""
    (tmp_path / "data").symlink_to(clone / "data")
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(checkpoints(clone) / "last.ckpt", tmp_path / "checkpoints" / "best.ckpt")
    monkeypatch.chdir(tmp_path)
    command = "validate" if extra == EVALUATE else "predict"
    line = cli_error(monkeypatch, capsys, command, "--config", DEMO, "--config", extra, "--ckpt_path", "best")
    assert line.startswith(f"nextvlad {command}: error: --ckpt_path best: the config has no ModelCheckpoint callback "
                           "to find the run's checkpoints by; pass a checkpoint file ("), line
