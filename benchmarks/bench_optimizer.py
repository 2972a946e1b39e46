"""The optimizer step of a config's model: per-tensor clipping plus TF1Adam, fused against foreach.

    python benchmarks/bench_optimizer.py                                  # configs/nextvlad.yaml, this device
    python benchmarks/bench_optimizer.py --config configs/nextvlad_mix3.yaml --device cpu

The step the training loop takes after backward (``clip_per_tensor_`` then ``TF1Adam.step``) over
every parameter of the model, with random gradients, timed per step (median after warm-up) for both
implementations in one run, side by side: ``fused`` (torch's fused Adam kernel, one pass over
parameter, gradient and moments; TF1Adam's default where torch has it) and ``foreach`` (torch's
foreach Adam, seven passes, TF1Adam's other path; TF1Adam's own six passes before it used torch's
kernels moved about as much). Both compute TF1's update (tests/test_optim.py). The bytes column is
the minimal traffic of each (fused Adam 28 bytes per fp32 parameter, foreach 72, the clip 12 more);
GB/s is that over the measured time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_results  # noqa: E402
from bench_train import REPO, median_step_seconds, model_hparams, synchronize  # noqa: E402

from nextvlad.module import VideoClassifier, clip_per_tensor_  # noqa: E402
from nextvlad.optim import TF1Adam  # noqa: E402

#: Minimal bytes per fp32 parameter: Adam reads p, g, m, v and writes p, m, v (fused: 7 x 4); torch's
#: foreach passes (lerp, mul, addcmul, sqrt into a new tensor, div, add, addcdiv) move 18 x 4.
ADAM_BYTES = {"fused": 28, "foreach": 72}
#: The clip: a norm pass (reads g) and a multiply (reads and writes g).
CLIP_BYTES = 12


def time_optimizer_step(parameters: list[torch.nn.Parameter], fused: bool, device: torch.device, warmup: int,
                        steps: int) -> float:
    optimizer = TF1Adam(parameters, lr=2e-4, fused=fused)
    generator = torch.Generator(device=device).manual_seed(0)
    for p in parameters:
        p.grad = torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype)

    def step() -> None:
        clip_per_tensor_(parameters, 1.0)
        optimizer.step()

    return median_step_seconds(step, warmup, steps, lambda: synchronize(device))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "nextvlad.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a small model of the config (tests, dry runs)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a scratch folder (see _common)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tiny = dict(clusters=8, groups=4, hidden_size=64, gating_reduction=4) if args.tiny else {}
    model = VideoClassifier(**model_hparams(args.config, tiny)).model.to(device)
    count = sum(p.numel() for p in model.parameters())
    rows = []
    for name in ("fused", "foreach"):
        parameters = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        seconds = time_optimizer_step(parameters, name == "fused", device, args.warmup, args.steps)
        traffic = count * (ADAM_BYTES[name] + CLIP_BYTES)
        rows.append({"implementation": name, "parameters": count, "ms_per_step": 1000 * seconds,
                     "minimal_GB": traffic / 1e9, "GB/s": traffic / seconds / 1e9})
    rows[0]["foreach / fused"] = rows[1]["ms_per_step"] / rows[0]["ms_per_step"]
    config = args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
    meta = {**environment(device), "config": str(config), "tiny": args.tiny, "warmup": args.warmup,
            "steps": args.steps}
    columns = ["implementation", "parameters", "ms_per_step", "minimal_GB", "GB/s", "foreach / fused"]
    print(markdown_table(rows, columns), flush=True)
    write_results(f"optimizer_{args.config.stem}_{device.type}{'_tiny' if args.tiny else ''}", rows, meta,
                  columns=columns, output_dir=args.output_dir)
    return rows


if __name__ == "__main__":
    main()
