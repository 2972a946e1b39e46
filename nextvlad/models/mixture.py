"""Mixture of NeXtVLAD models with on-the-fly knowledge distillation (paper 3.4, SPEC 3.3).

A gate (BN + FC + softmax over frame-mean features) mixes the *logits* of ``num_branches``
two-stream models, z_e = sum_m a_m(x) z_m. During training each branch is pulled towards the
mixture by KL(softmax(z_e / T) || softmax(z_m / T)) over classes (equations 14-16).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from nextvlad._dtypes import at_least_float32
from nextvlad._validation import check_choice, check_positive_int
from nextvlad.kernels import frame_mask
from nextvlad.models.initialization import tf_batch_norm, tf_linear
from nextvlad.models.nextvlad import NeXtVLAD
from nextvlad.models.video_model import VideoModel, without_autocast

GateInput = Literal["all", "masked", "per_frame"]

#: The authors add 1e-8 inside both logarithms of the KL (SPEC 3.3).
KL_EPSILON = 1e-8


class MixtureOutput(NamedTuple):
    logits: torch.Tensor  # (B, C) mixture logits z_e
    branch_logits: torch.Tensor  # (num_branches, B, C)
    gate: torch.Tensor  # (B, num_branches) softmax weights


class MixtureOfNeXtVLAD(nn.Module):
    """Gated mixture of two-stream models.

    Args:
        branches: the two-stream models (each built with ``build_video_model``).
        input_size: width of the gate input: features per frame (rgb + audio, 1152) for "all" and
            "masked", the number of frames M (300) for "per_frame".
        gate_input: "all" averages every one of the M padded rows and divides by M, as the authors'
            final code; "masked" averages the real frames only; "per_frame" averages the features
            of each frame, giving M values (the 2018 competition code, SPEC 7.1: needed to load its
            checkpoints, and only for inputs padded to exactly ``input_size`` frames).
    """

    def __init__(self, branches: list[VideoModel], input_size: int = 1152, gate_input: GateInput = "all") -> None:
        super().__init__()
        check_positive_int(num_branches=len(branches))
        check_choice("gate_input", gate_input, ("all", "masked", "per_frame"))
        self.branches = nn.ModuleList(branches)
        self.gate_input = gate_input
        self.gate_bn = tf_batch_norm(input_size, fused=True)  # the authors' mix_weights_bn
        self.gate_fc = tf_linear(input_size, len(branches))

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def gate(self, rgb: torch.Tensor, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Softmax weights (B, num_branches) in the inputs' dtype; in fp32 under autocast, because
        they scale every logit (autocast would run the gate FC in bf16/fp16)."""
        return without_autocast(self._gate, torch.cat([rgb, audio], dim=-1), lengths)

    def _gate(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.gate_input == "all":
            mean = frames.mean(dim=1)
        elif self.gate_input == "per_frame":
            if frames.shape[1] != self.gate_bn.num_features:
                raise ValueError(
                    f"gate_input='per_frame' needs inputs padded to {self.gate_bn.num_features} frames, "
                    f"got {frames.shape[1]}"
                )
            mean = frames.mean(dim=2)
        else:
            mask = frame_mask(lengths, frames.shape[1]).unsqueeze(-1)
            mean = (frames * mask).sum(dim=1) / lengths.clamp(min=1).unsqueeze(-1)
        return torch.softmax(self.gate_fc(self.gate_bn(mean)), dim=-1)

    def forward_all(self, rgb: torch.Tensor, audio: torch.Tensor, lengths: torch.Tensor) -> MixtureOutput:
        if all(isinstance(b.video_aggregator, NeXtVLAD) and isinstance(b.audio_aggregator, NeXtVLAD)
               for b in self.branches):
            branch_logits = self._nextvlad_branches(rgb, audio, lengths)
        else:
            branch_logits = torch.stack([branch(rgb, audio, lengths) for branch in self.branches])
        gate = self.gate(rgb, audio, lengths)
        # In fp32 with the branch logits (autocast would run this einsum's bmm in bf16): see without_autocast.
        logits = without_autocast(_gated_sum, gate, branch_logits)
        return MixtureOutput(logits, branch_logits, gate)

    def _nextvlad_branches(self, rgb: torch.Tensor, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """All branches' logits, their expansion FCs (the largest per-frame GEMMs) run as one."""
        self.branches[0].video_aggregator.check_frames(rgb)
        self.branches[0].audio_aggregator.check_frames(audio)
        video = _shared_linear(rgb, [b.video_aggregator.expansion_fc for b in self.branches])
        audio_expanded = _shared_linear(audio, [b.audio_aggregator.expansion_fc for b in self.branches])
        return torch.stack([
            branch.head(torch.cat([branch.video_aggregator.aggregate(v, lengths),
                                   branch.audio_aggregator.aggregate(a, lengths)], dim=1))
            for branch, v, a in zip(self.branches, video, audio_expanded)
        ])

    def forward(self, rgb: torch.Tensor, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_all(rgb, audio, lengths).logits

    def classifiers(self) -> list[nn.Linear]:
        return [branch.classifier for branch in self.branches]


def _gated_sum(gate: torch.Tensor, branch_logits: torch.Tensor) -> torch.Tensor:
    """z_e = sum_m gate[:, m] * z_m: (B, M) and (M, B, C) -> (B, C)."""
    return torch.einsum("bm,mbc->bc", gate.to(branch_logits.dtype), branch_logits)


def _shared_linear(inputs: torch.Tensor, layers: list[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """``[layer(inputs) for layer in layers]`` as one GEMM over the concatenated weights."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers])
    return torch.nn.functional.linear(inputs, weight, bias).split([layer.out_features for layer in layers], dim=-1)


def distillation_kl(
    mixture_logits: torch.Tensor, branch_logits: torch.Tensor, temperature: float, detach_teacher: bool = False
) -> torch.Tensor:
    """Mean over the batch of sum over branches of KL(softmax(z_e/T) || softmax(z_m/T)), at least fp32.

    Written as the authors do, with 1e-8 inside the logarithms, so the numbers match theirs.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for the KL term, got {temperature}")
    teacher = mixture_logits.detach() if detach_teacher else mixture_logits
    p_teacher = torch.softmax(at_least_float32(teacher) / temperature, dim=-1)
    p_students = torch.softmax(at_least_float32(branch_logits) / temperature, dim=-1)
    log_ratio = torch.log(p_teacher + KL_EPSILON).unsqueeze(0) - torch.log(p_students + KL_EPSILON)
    kl = (p_teacher.unsqueeze(0) * log_ratio).sum(dim=-1)  # (num_branches, B)
    return kl.sum(dim=0).mean()
