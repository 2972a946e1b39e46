"""Multi-node training through Lightning's own cluster environments: 2 nodes x 1 process on
localhost (gloo), started as on two machines, through the `nextvlad.cli` entry point: by torchrun
(node ranks, master address and port) and by SLURM's srun (the SLURM_* variables srun sets for one
task per node). Every training and validation video is seen exactly once per epoch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

RECORDER = '''
import faulthandler, json, os
import lightning.pytorch as pl

# imported by each node's CLI when it builds its callbacks: a hang dumps where every thread of
# the rank waits and ends it, before the test's own deadline (as in tests/test_data_ddp.py)
faulthandler.dump_traceback_later(200, exit=True)

class RecordIds(pl.Callback):
    """Appends each batch's video ids to ids-<stage>-rank<r>.jsonl in OUT_DIR."""

    def _write(self, trainer, stage, batch):
        path = os.path.join(os.environ["OUT_DIR"], f"ids-{stage}-rank{trainer.global_rank}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "world": trainer.world_size,
                                "nodes": trainer.num_nodes, "ids": list(batch["id"])}) + "\\n")

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._write(trainer, "train", batch)

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._write(trainer, "validate", batch)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(synthetic_data, tmp_path) -> Path:
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["trainer"].update(max_epochs=2, logger=False, default_root_dir=str(tmp_path),
                             enable_progress_bar=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, callbacks=[{"class_path": "recorder.RecordIds"}])
    config["model"]["init_args"].update(num_classes=10, clusters=4, groups=2, expansion=1, hidden_size=16)
    # no DataLoader workers and 20 frames a video, for the 2-core machine: what is tested is each
    # node's share of the videos (sharding over ranks x workers: tests/test_data_sharding.py);
    # validation stays whole, as every validation video is counted
    config["data"]["init_args"].update(
        train_pattern=synthetic_data["dir"] + "/train*.tfrecord",
        val_pattern=synthetic_data["dir"] + "/validate*.tfrecord", test_pattern=None,
        predict_pattern=None, batch_size=8, num_workers=0, max_frames=20, num_classes=10)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun(node: int, port: int, command: list[str]) -> tuple[list[str], dict]:
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "nextvlad.cli",
            *command[1:]], {}


def _srun(node: int, port: int, command: list[str]) -> tuple[list[str], dict]:
    """What `srun` (sbatch --nodes 2 --ntasks-per-node 1) gives the task on node `node`."""
    return [str(Path(sys.executable).parent / command[0]), *command[1:]], {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "nextvlad", "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0", "SLURM_NODEID": str(node), "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(port)}


def _outputs_within(nodes: list[subprocess.Popen], timeout: float) -> list[str]:
    """Every node's output once all have exited; past ``timeout`` seconds in all, every node's
    process group is killed and the test fails with each node's last output (a hang shows where
    each rank was: the recorder's faulthandler dump).

    The group, not the launcher alone: a rank's DataLoader worker (or the rank itself, under
    torchrun) holds the output pipe open after the launcher has gone, and reading to its end
    would then wait past the test's own timeout, losing the output."""
    try:
        deadline = time.monotonic() + timeout
        return [node.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)  # the node was started in its own session
        tails = [f"node {rank} (exit {node.wait()}):\n{node.communicate()[0][-6000:]}"
                 for rank, node in enumerate(nodes)]
        pytest.fail(f"the nodes did not finish within {timeout:.0f} s\n" + "\n".join(tails))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("launch", [_torchrun, _srun], ids=["torchrun", "slurm"])
def test_two_nodes_see_every_video_once_per_epoch(synthetic_data, tmp_path, launch):
    (tmp_path / "recorder.py").write_text(RECORDER)
    config = _config(synthetic_data, tmp_path)
    env = {**os.environ, "OUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    port = _free_port()
    nodes = []
    for node in range(2):
        # the README's commands, with this config: the strategy is Lightning's "auto" (DDP)
        command, extra_env = launch(node, port, ["lightning", "fit", "--config", str(config),
                                                 "--trainer.num_nodes", "2", "--trainer.devices", "1"])
        nodes.append(subprocess.Popen(command, env={**env, **extra_env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outputs = _outputs_within(nodes, timeout=220)
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]

    def seen(stage: str, rank: int) -> list[dict]:
        path = tmp_path / f"ids-{stage}-rank{rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    # 120 videos, 2 ranks x 7 batches of 8 per epoch: 8 not read (drop_last keeps ranks in step)
    for epoch in range(2):
        train = [seen("train", r) for r in range(2)]
        assert all(b["world"] == 2 and b["nodes"] == 2 for rank in train for b in rank)
        ids = [i for rank in train for b in rank if b["epoch"] == epoch for i in b["ids"]]
        assert len(ids) == 2 * 7 * 8 and len(set(ids)) == len(ids)  # each video at most once
        per_rank = [{i for b in rank if b["epoch"] == epoch for i in b["ids"]} for rank in train]
        assert not per_rank[0] & per_rank[1]
        validate = [i for r in range(2) for b in seen("validate", r) if b["epoch"] == epoch
                    for i in b["ids"]]
        assert sorted(validate) == sorted(set(validate)) and len(validate) == 45  # all, once
