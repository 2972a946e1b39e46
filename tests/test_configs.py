"""Every YAML config parses with LightningCLI and builds the model SPEC 9 says it should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nextvlad.cli import NextVLADCLI, main, model_from_config
from nextvlad.models import count_parameters

REPO = Path(__file__).resolve().parents[1]
# Full run configs; the others (e.g. configs/evaluate.yaml) are snippets passed as a second --config.
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if "\nmodel:" in "\n" + p.read_text())

EXPECTED_PARAMETERS = {
    "nextvlad.yaml": 88_889_378,
    "nextvlad_mix3.yaml": 235_935_273,
    "nextvlad_mix3_0T.yaml": 235_935_273,
}


def test_every_paper_setting_has_a_config():
    names = {path.name for path in CONFIGS}
    assert {
        "nextvlad.yaml", "nextvlad_16g.yaml", "nextvlad_32g.yaml", "netvlad.yaml", "netvlad_small.yaml",
        "netvlad_random.yaml", "nextvlad_mix3.yaml", "nextvlad_mix3_0T.yaml", "demo.yaml",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates_with_lightning_cli(config, tmp_path, eigenvalues_path):
    eigenvalues = "null" if config.name == "demo.yaml" else eigenvalues_path
    with torch.device("meta"):  # shapes and counts only: no 236M-parameter initialisation
        cli = NextVLADCLI(
            args=["--config", str(config), f"--data.init_args.eigenvalues_path={eigenvalues}",
                  f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"],
            run=False,
        )
    hp = cli.model.hparams
    assert cli.datamodule.num_classes == hp.num_classes
    if config.name in EXPECTED_PARAMETERS:
        assert count_parameters(cli.model.model) == EXPECTED_PARAMETERS[config.name]


def test_paper_defaults_in_the_main_configs():
    with torch.device("meta"):
        _check_paper_defaults()


def _check_paper_defaults():
    single = model_from_config(REPO / "configs" / "nextvlad.yaml").hparams
    assert (single.groups, single.clusters, single.hidden_size, single.gating_reduction) == (8, 128, 2048, 8)
    assert (single.dropout, single.learning_rate, single.lr_decay, single.lr_decay_examples) == (0.5, 2e-4, 0.8, 2_000_000)
    mixture = model_from_config(REPO / "configs" / "nextvlad_mix3.yaml").hparams
    assert (mixture.num_branches, mixture.clusters, mixture.gating_reduction) == (3, 112, 16)
    assert (mixture.temperature, mixture.cl_lambda, mixture.lr_decay_examples) == (3.0, 9.0, 2_500_000)
    assert model_from_config(REPO / "configs" / "nextvlad_mix3_0T.yaml").hparams.temperature == 0.0


@pytest.mark.parametrize("config", [p for p in CONFIGS if "2 GPUs x 80" in p.read_text()], ids=lambda p: p.name)
def test_configs_of_the_authors_two_towers_normalise_per_tower_of_80(config):
    """Batch 160 on one device in place of 2 GPU towers of 80 (SPEC 4): BN per tower (SPEC 3.4)."""
    import yaml

    settings = yaml.safe_load(config.read_text())
    assert settings["data"]["init_args"]["batch_size"] == 160
    assert settings["model"]["init_args"]["bn_tower_videos"] == 80


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_a_last_ckpt_holds_the_final_state(config):
    """Lightning's ModelCheckpoint writes last.ckpt only with a new top-k file: demo_segments' last.ckpt
    stayed at its best epoch, and `--ckpt_path last` repeated the epochs after it. Every config that
    keeps a last.ckpt does so through nextvlad.callbacks' PeriodicCheckpoint (the final weights)."""
    import yaml

    callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
    for callback in callbacks:
        if (callback.get("init_args") or {}).get("save_last"):
            assert callback["class_path"] in ("nextvlad.callbacks.ModelCheckpointWithBest",
                                              "nextvlad.callbacks.PeriodicCheckpoint"), callback["class_path"]


def test_params_command_prints_exact_counts(capsys):
    main(["params", "--config", str(REPO / "configs" / "nextvlad.yaml")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].split() == ["total", "88,889,378"]
    components = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in lines[:-1]}
    assert components["hidden"] == 36864 * 2048
    assert sum(components.values()) == 88_889_378


def test_params_command_rejects_a_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        model_from_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("command", ["lightning", "nextvlad"])
def test_console_scripts_run_lightning_cli(command):
    """`lightning fit --config configs/demo.yaml` works as a shell command (Lightning ships none)."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / command
    if not script.exists():
        pytest.skip(f"{script} is not installed (package not installed as a distribution)")
    result = subprocess.run([str(script), "fit", "--config", str(REPO / "configs" / "demo.yaml"), "--print_config"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: nextvlad.VideoClassifier" in result.stdout
    assert "class_path: nextvlad.data.YT8MDataModule" in result.stdout


def test_readme_training_commands_parse_as_the_paper_recipe():
    """The README's `lightning fit` lines (up to the resume, which needs a run) with --print_config:
    the two-GPU line keeps the authors' 160 videos a step, 80 per rank, one BN tower each."""
    import shlex
    import subprocess
    import sys

    import yaml

    block = (REPO / "README.md").read_text().split("## Training\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.splitlines()
                if line.startswith("lightning fit") and "--ckpt_path" not in line]
    assert len(commands) == 2, block
    configs = []
    for command in commands:
        result = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:], "--print_config"],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        configs.append(yaml.safe_load(result.stdout))
    one_gpu, two_gpus = configs
    assert one_gpu["data"]["init_args"]["batch_size"] == 160 and str(one_gpu["trainer"]["devices"]) in ("auto", "1")
    assert str(two_gpus["trainer"]["devices"]) == "2" and two_gpus["data"]["init_args"]["batch_size"] == 80
    assert two_gpus["model"]["init_args"]["clusters"] == 64
    assert two_gpus["model"]["init_args"]["bn_tower_videos"] == 80
