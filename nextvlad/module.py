"""``VideoClassifier``: the LightningModule that trains, validates and predicts with every model.

One flat, typed constructor so that LightningCLI configs (configs/*.yaml) and checkpoints
(``save_hyperparameters``) describe a run completely. Defaults reproduce the authors' recipe
(SPEC 4 and 9): summed BCE, L2 on the classifier(s) only, Adam 2e-4 with TF1's epsilon placement,
staircase decay 0.8 every 2,000,000 examples, per-tensor gradient clipping at 1.0.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal, Mapping

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from nextvlad._distributed import (destroy_process_group_at_exit, gather_per_rank, rank_and_world_size, rng_states,
                                   set_rng_states)
from nextvlad._dtypes import at_least_float32
from nextvlad._fit_loop import resume_finished_epochs_as_the_next
from nextvlad._validation import check_choice, check_in_range, check_positive_int
from nextvlad.metrics_segments import SegmentMeanAveragePrecision
from nextvlad.metrics import (
    GlobalAveragePrecision,
    HitAtOne,
    MeanAveragePrecision,
    PrecisionAtEqualRecallRate,
)
from nextvlad.models.mixture import GateInput, MixtureOfNeXtVLAD, MixtureOutput, distillation_kl
from nextvlad.models.nextvlad import ClusterBNStatistics
from nextvlad.models.video_model import Architecture, HiddenActivation, build_video_model
from nextvlad.optim import TF1Adam

GradientClip = Literal["per_tensor", "global", "off"]
AdamEpsilon = Literal["tf1", "torch"]
Task = Literal["video", "segments"]
Unrated = Literal["ignore", "negative"]
MapClasses = Literal["all", "with_positives"]

#: Hyper-parameters passed to ``build_video_model`` under the same name.
BUILD_ARGS = (
    "architecture", "num_classes", "rgb_size", "audio_size", "clusters", "groups", "expansion",
    "audio_clusters", "audio_groups", "input_reduction", "hidden_size", "gating_reduction", "dropout",
    "cluster_bn_statistics",
)

#: Hyper-parameters that fix what the weights compute (their shapes, the activations and the mixture
#: gate's input): a checkpoint and the model it is loaded into must agree on all of them.
ARCHITECTURE_HPARAMS = (
    "architecture", "num_classes", "rgb_size", "audio_size", "clusters", "groups", "expansion",
    "audio_clusters", "audio_groups", "input_reduction", "hidden_size", "gating_reduction", "num_branches",
    "hidden_activation", "branch_hidden_activation", "gate_input", "gate_frames",
)
#: The others either only choose how a trained model runs (predict_branch, top_k, map_classes,
#: aggregation_backend) or only act in training (dropout, optimisation, distillation, batch-norm
#: momentum and statistics): for those the config and the command line apply, whatever the
#: checkpoint was trained with (see NextVLADCLI._parse_ckpt_path).


class VideoClassifier(pl.LightningModule):
    """Multi-label YouTube-8M classifier: NeXtVLAD / NetVLAD, single or a distilled mixture.

    Model args (SPEC 3): ``architecture`` ("nextvlad" | "netvlad"), ``clusters`` K and ``groups`` G
    of the video stream (the audio stream takes K/2, G/2 unless ``audio_clusters``/``audio_groups``
    are set), ``expansion`` lambda, ``hidden_size`` H, ``gating_reduction`` r, ``dropout``,
    ``hidden_activation`` after the hidden BN (default "relu" for a single model as in the paper
    era; mixture branches use ``branch_hidden_activation``, default "none"),
    ``cluster_bn_statistics`` ("all" rows as the TF code, or "masked"), ``input_reduction``
    (NetVLAD_small: 4).

    Mixture args (SPEC 3.3): ``num_branches`` > 1 builds ``MixtureOfNeXtVLAD`` with ``gate_input``
    ("all" frames as the authors' final code, "masked", or "per_frame" over ``gate_frames`` frames as
    the 2018 competition code); ``temperature`` T and ``cl_lambda`` weight the distillation KL (T = 0 disables it);
    ``detach_teacher`` stops its gradient into the mixture; ``predict_branch`` predicts with one
    branch instead of the mixture.

    Optimisation args (SPEC 4): ``learning_rate``, ``lr_decay`` every ``lr_decay_examples`` examples
    (counted over all ranks and accumulated batches), ``l2_penalty`` (on classifier weights and
    biases, as ``l2 * 0.5 * sum w^2``), ``gradient_clip`` ("per_tensor" as TF's clip_by_norm per
    variable, "global", "off") at ``gradient_clip_norm``. ``adam_epsilon`` places Adam's epsilon as
    TF1's AdamOptimizer does ("tf1", the authors' optimizer, ``nextvlad.optim.TF1Adam``) or as
    torch.optim.Adam does ("torch"; they differ for tiny gradients, SPEC 4). ``bn_momentum`` is the running-statistics
    update of every batch norm (default 1e-3, slim's decay 0.999, which takes thousands of steps to
    settle: short runs such as the demo use a larger value). ``bn_tower_videos`` (>= 2) cuts a
    training batch into towers of that many videos (segments, for ``task`` "segments"; a batch that
    does not divide: towers as equal as can be, of at least 2) that the model runs one after the
    other, as the authors' 2 GPU towers of 80 (SPEC 3.4, 4): every batch norm normalises a tower
    with the tower's own statistics and moves its running statistics once per tower; losses and
    gradients stay those of the whole batch (None: the batch is one tower). ``top_k`` is the k of GAP/MAP and of
    predictions. ``map_classes`` averages MAP over "all" classes (a class without a positive counts
    0, the authors' eval) or over those "with_positives" (Google's eval_util, SPEC 5); None: the
    authors' for videos, Google's for segments (whose proxies are Google's).

    Segment args (the 2019 task, SPEC_SEGMENTS; batches from ``YT8MSegmentDataModule``): ``task``
    "segments" trains and validates on rated 5-frame segments (``label_weights`` in the batch),
    reports ``segment_map`` (`SegmentMeanAveragePrecision`) beside GAP/Hit@1/PERR/MAP of the
    label-weighted predictions (Google's eval.py proxies), and predicts the full probability rows
    that `SegmentSubmissionWriter` needs. ``unrated`` "ignore" takes the loss on rated entries only;
    "negative" trains unrated classes as negatives, as Google's train.py does. ``init_from`` is a
    checkpoint (e.g. a video-level model) whose weights initialise the model when ``fit`` starts;
    every parameter name and shape, and the architecture hyper-parameters, must match.
    """

    def __init__(
        self,
        architecture: Architecture = "nextvlad",
        num_classes: int = 3862,
        rgb_size: int = 1024,
        audio_size: int = 128,
        clusters: int = 128,
        groups: int = 8,
        expansion: int = 2,
        audio_clusters: int | None = None,
        audio_groups: int | None = None,
        input_reduction: int = 1,
        hidden_size: int = 2048,
        gating_reduction: int = 8,
        dropout: float = 0.5,
        hidden_activation: HiddenActivation = "relu",
        cluster_bn_statistics: ClusterBNStatistics = "all",
        num_branches: int = 1,
        branch_hidden_activation: HiddenActivation = "none",
        gate_input: GateInput = "all",
        gate_frames: int = 300,
        temperature: float = 3.0,
        cl_lambda: float = 9.0,
        detach_teacher: bool = False,
        predict_branch: int | None = None,
        aggregation_backend: Literal["auto", "triton", "reference"] = "auto",
        bn_momentum: float = 1e-3,
        bn_tower_videos: int | None = None,
        learning_rate: float = 2e-4,
        lr_decay: float = 0.8,
        lr_decay_examples: int = 2_000_000,
        l2_penalty: float = 1e-5,
        gradient_clip: GradientClip = "per_tensor",
        gradient_clip_norm: float = 1.0,
        adam_epsilon: AdamEpsilon = "tf1",
        top_k: int = 20,
        map_classes: MapClasses | None = None,
        task: Task = "video",
        unrated: Unrated = "ignore",
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_positive_int(num_branches=num_branches, top_k=top_k, lr_decay_examples=lr_decay_examples)
        check_choice("gradient_clip", gradient_clip, ("per_tensor", "global", "off"))
        check_choice("adam_epsilon", adam_epsilon, ("tf1", "torch"))
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 disables distillation), got {temperature}")
        # A negative clip norm flips every gradient, a negative decay flips every other period's
        # learning rate: training would run, climbing the loss.
        check_in_range("learning_rate", learning_rate, 0.0, low_open=True)
        check_in_range("lr_decay", lr_decay, 0.0, 1.0, low_open=True)
        check_in_range("gradient_clip_norm", gradient_clip_norm, 0.0, low_open=True)
        check_in_range("l2_penalty", l2_penalty, 0.0)
        check_in_range("cl_lambda", cl_lambda, 0.0)
        if predict_branch is not None and not 0 <= predict_branch < num_branches:
            raise ValueError(f"predict_branch must be in [0, {num_branches}), got {predict_branch}")
        check_choice("task", task, ("video", "segments"))
        if map_classes is not None:
            check_choice("map_classes", map_classes, ("all", "with_positives"))
        check_choice("unrated", unrated, ("ignore", "negative"))
        if task == "segments" and num_branches > 1 and gate_input == "per_frame" and gate_frames != 5:
            raise ValueError(f"gate_input='per_frame' over gate_frames={gate_frames} frames cannot take "
                             "5-frame segments: use gate_input 'all' or 'masked' for task='segments'")
        check_in_range("bn_momentum", bn_momentum, 0.0, 1.0, low_open=True)
        if bn_tower_videos is not None:
            check_positive_int(bn_tower_videos=bn_tower_videos)
            if bn_tower_videos < 2:  # every BN would normalise one row: output beta, nothing learns
                raise ValueError(f"bn_tower_videos must be >= 2 (or null: one tower), got {bn_tower_videos}")
        self.model = self._build_model()
        for layer in self.model.modules():  # one knob for every BN (TF decay = 1 - momentum)
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.momentum = bn_momentum
        self.train_gap = GlobalAveragePrecision(top_k=top_k, validate_args=False)  # no per-step device sync
        self.val_metrics = self._evaluation_metrics("val/")
        self.test_metrics = self._evaluation_metrics("test/")
        # A mixture also reports each branch's GAP, so that the mixture can be compared with them.
        branch_gaps = 0 if num_branches == 1 or predict_branch is not None else num_branches
        self.branch_gaps = nn.ModuleDict({
            stage: nn.ModuleList(GlobalAveragePrecision(top_k=top_k) for _ in range(branch_gaps))
            for stage in ("val", "test")
        })
        # The mean loss over every video (segment) of all ranks, as one process computes it: a
        # sum and a count per rank, summed across ranks at the end. (Lightning's sync_dist mean
        # divides by an integer-averaged batch count, wrong when ranks' counts differ, and a rank
        # that logged nothing left the others waiting in its collective.)
        self.evaluation_loss = nn.ModuleDict({stage: MeanMetric(nan_strategy="error").set_dtype(torch.float64)
                                              for stage in ("val", "test")})
        segment_stages = ("val", "test") if task == "segments" else ()
        self.segment_map = nn.ModuleDict({stage: SegmentMeanAveragePrecision(num_classes) for stage in segment_stages})
        # Labelled videos of the running evaluation per stage (the metrics count every video):
        # none at all is an error (_check_labelled_videos_seen). Not a buffer, so that DDP does not broadcast it.
        self._labelled_videos: dict[str, torch.Tensor] = {}
        self.examples_seen = 0  # optimizer-step examples over all ranks; drives the LR schedule
        self._pending_examples = 0
        self._step_examples: int | None = None  # this step's count over all ranks, once summed

    # ----------------------------------------------------------------------------- construction
    def _build_model(self) -> nn.Module:
        hp = self.hparams
        shared = {name: hp[name] for name in BUILD_ARGS}

        def branch(activation: HiddenActivation) -> nn.Module:
            return build_video_model(**shared, hidden_activation=activation, backend=hp.aggregation_backend)

        if hp.num_branches == 1:
            return branch(hp.hidden_activation)
        branches = [branch(hp.branch_hidden_activation) for _ in range(hp.num_branches)]
        gate_size = hp.gate_frames if hp.gate_input == "per_frame" else hp.rgb_size + hp.audio_size
        return MixtureOfNeXtVLAD(branches, gate_size, hp.gate_input)

    def _evaluation_metrics(self, prefix: str) -> MetricCollection:
        hp = self.hparams
        # All four see the same (preds, target): GAP checks their values (one device sync per
        # batch), the others skip the identical check.
        metrics = {
            "gap": GlobalAveragePrecision(top_k=hp.top_k),
            "hit_at_one": HitAtOne(validate_args=False),
            "perr": PrecisionAtEqualRecallRate(validate_args=False),
            # Segments by default: Google's eval.py proxy, whose MAP skips classes without a positive
            # (SPEC 5, SPEC_SEGMENTS 6): most of the 3862 classes are never rated. Videos: the authors' (all).
            "map": MeanAveragePrecision(num_classes=hp.num_classes, top_k=hp.top_k, validate_args=False,
                                        filter_empty_classes=self.map_classes_used == "with_positives"),
        }
        return MetricCollection(metrics, prefix=prefix, compute_groups=False)

    @property
    def map_classes_used(self) -> str:
        """The classes MAP averages over: "all" or "with_positives" (``map_classes`` resolved)."""
        if self.hparams.map_classes is not None:
            return self.hparams.map_classes
        return "with_positives" if self.hparams.task == "segments" else "all"

    @property
    def is_mixture(self) -> bool:
        return isinstance(self.model, MixtureOfNeXtVLAD)

    # ----------------------------------------------------------------------------- forward / loss
    def forward(self, rgb: torch.Tensor, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of the mixture, of ``predict_branch``, or of the single model."""
        if self.is_mixture and self.hparams.predict_branch is not None:
            return self.model.branches[self.hparams.predict_branch](rgb, audio, lengths)
        return self.model(rgb, audio, lengths)

    def _check_batch(self, batch: dict[str, Any]) -> None:
        for key, size in (("rgb", self.hparams.rgb_size), ("audio", self.hparams.audio_size)):
            if batch[key].shape[-1] != size:
                raise ValueError(
                    f"batch[{key!r}] has {batch[key].shape[-1]} features per frame but the model was "
                    f"built with {key}_size={size}"
                )
        if batch["labels"].shape[-1] != self.hparams.num_classes:
            raise ValueError(
                f"batch['labels'] has {batch['labels'].shape[-1]} classes but the model has "
                f"num_classes={self.hparams.num_classes}"
            )

    def compute_losses(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every loss term of SPEC 4 at least in fp32 (``total`` is what is optimised), and the logits."""
        self._check_batch(batch)
        labels = batch["labels"].float()
        weights = self._loss_weights(batch)
        if not self.is_mixture:
            logits = self._in_towers(self.model, batch)
            label_loss = summed_bce(logits, labels, weights)
            losses = {"label_loss": label_loss}
        else:
            out = self._in_towers(self.model.forward_all, batch)
            logits = out.logits
            losses = {"mixture_loss": summed_bce(logits, labels, weights)}
            for m, branch_logits in enumerate(out.branch_logits):
                losses[f"branch_{m}_loss"] = summed_bce(branch_logits, labels, weights)
            losses["label_loss"] = sum(losses.values())
            if self.hparams.temperature > 0:
                kl = distillation_kl(logits, out.branch_logits, self.hparams.temperature, self.hparams.detach_teacher)
                losses["distillation_loss"] = self.hparams.cl_lambda * kl
        losses["l2_loss"] = self.l2_loss()
        losses["total"] = losses["label_loss"] + losses["l2_loss"] + losses.get("distillation_loss", 0.0)
        return losses, logits

    def _in_towers(self, forward: Any, batch: dict[str, Any]) -> Any:
        """``forward`` (the model or the mixture's forward_all) on the batch's videos, in training
        tower after tower of at most ``bn_tower_videos`` (tf.split's contiguous parts; a batch that
        does not divide, e.g. a last one, in parts as equal as can be: 81 in towers of 80 is 41 +
        40, not 80 + 1; 3 in towers of 2 is one tower of 3), the outputs joined again."""
        size, inputs = self.hparams.bn_tower_videos, (batch["rgb"], batch["audio"], batch["lengths"])
        videos = len(batch["lengths"])
        if not self.training or size is None or videos <= size:
            return forward(*inputs)
        # at least 2 videos a tower: on one row every batch norm outputs its beta (nothing learns)
        count = min(-(-videos // size), videos // 2)  # videos > size >= 2: both at least 1
        towers = [forward(*tower) for tower in zip(*(tensor.tensor_split(count) for tensor in inputs))]
        if not isinstance(towers[0], MixtureOutput):
            return torch.cat(towers)
        return MixtureOutput(*(torch.cat(outputs, dim=1 if field == "branch_logits" else 0)
                               for field, outputs in zip(MixtureOutput._fields, zip(*towers))))

    def _loss_weights(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Per-entry BCE weights: the rated entries of a segment batch unless ``unrated`` is
        "negative"; None (every entry) for video-level training."""
        if self.hparams.task != "segments":
            return None
        if "label_weights" not in batch:
            raise ValueError("task='segments' needs segment batches with 'label_weights' "
                             "(data: nextvlad.data.YT8MSegmentDataModule)")
        return batch["label_weights"].float() if self.hparams.unrated == "ignore" else None

    def l2_loss(self) -> torch.Tensor:
        """``l2_penalty * 0.5 * (|W|^2 + |b|^2)`` summed over the classifier(s) (slim.l2_regularizer)."""
        parameters = [p for layer in self.model.classifiers() for p in layer.parameters()]
        squares = sum(at_least_float32(p).pow(2).sum() for p in parameters)
        return self.hparams.l2_penalty * 0.5 * squares

    # ----------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.hparams.task == "segments" and len(batch["lengths"]) < 2:
            # A segment batch can hold 0 or 1 segments (its videos had no ratings or are in the
            # validation fold); on 1 row every batch norm outputs its beta (slim's result), so the
            # segment's features would not reach the loss: the step is not taken. A zero loss that
            # touches every parameter keeps DDP's gradient all-reduce in step with the other ranks;
            # when no rank trained on a batch, the optimizer makes no update (_no_update_without_examples).
            return sum(p.sum() for p in self.parameters()) * 0.0
        losses, logits = self.compute_losses(batch)
        batch_size = len(batch["lengths"])
        self._pending_examples += batch_size
        if self.trainer._logger_connector.should_update_logs:
            # Batch-level GAP as in the authors' training summaries, computed only on the steps
            # that are logged (its top-k over C classes would be wasted work on the others):
            # Lightning's own test (no public one), or a logged step would show an older batch's.
            # forward() computes it without a cross-rank sync; reset() keeps the state small.
            gap = self.train_gap(torch.sigmoid(logits.detach().float()), batch["labels"])
            self.train_gap.reset()
            self.log("train/gap", gap, on_step=True, prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            if name != "total":
                self.log(f"train/{name}", value, on_step=True, prog_bar=name == "label_loss", batch_size=batch_size)
        self.log("train/lr", self.current_learning_rate(), on_step=True, batch_size=batch_size)
        return losses["total"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def _stage_metrics(self, stage: str) -> MetricCollection:
        return self.val_metrics if stage == "val" else self.test_metrics

    def _evaluation_step(self, batch: dict[str, Any], stage: str) -> None:
        self._check_batch(batch)
        labelled = batch["has_labels"]
        self._labelled_videos[stage] = self._labelled_videos[stage] + labelled.sum()  # reset at the epoch's start
        if self.hparams.task == "segments":
            # Google's segment eval sees rated segments only (a video without ratings yields no
            # example, SPEC_SEGMENTS 2); unrated rows are inference candidates and stay out.
            if not labelled.any():
                return
            ids = [video for video, rated in zip(batch.get("id") or [], labelled.tolist()) if rated] or None
            batch = {key: value[labelled] for key, value in batch.items() if torch.is_tensor(value)} | {"id": ids}
        weights = self._loss_weights(batch)  # first: the clear error for a segment batch without label_weights
        # Video task: every video counts, a label-less one with its all-zero labels, as in the
        # authors' eval.py: PERR and Hit@1 score it 0, GAP ranks its top-k as negatives, the loss
        # averages over all videos (SPEC 5, 7.17).
        branch_gaps = self.branch_gaps[stage]
        if branch_gaps:
            out = self.model.forward_all(batch["rgb"], batch["audio"], batch["lengths"])
            logits = out.logits
            for gap, branch_logits in zip(branch_gaps, out.branch_logits):
                gap.update(*self._metric_inputs(branch_logits, batch))
        else:
            logits = self(batch["rgb"], batch["audio"], batch["lengths"])
        # Also inf: the loss of an infinite logit is undefined (inf - inf).
        check_finite_scores(logits, batch.get("id"), getattr(self._trainer, "ckpt_path", None), allow_inf=False)
        if self.hparams.task == "segments":
            self.segment_map[stage].update(torch.sigmoid(logits.float()), batch["labels"].float(),
                                           batch["label_weights"].float())
        self._stage_metrics(stage).update(*self._metric_inputs(logits, batch))
        self.evaluation_loss[stage].update(summed_bce(logits, batch["labels"].float(), weights), logits.shape[0])

    def _metric_inputs(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, multi-hot labels) for the SPEC 5 metrics; for segments Google's eval.py
        proxies (SPEC_SEGMENTS 6): probabilities times ``label_weights`` against the positive ratings."""
        probabilities = torch.sigmoid(logits.float())
        if self.hparams.task != "segments":
            return probabilities, batch["labels"].float()
        return probabilities * batch["label_weights"].float(), (batch["labels"] > 0).float()

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._reset_metrics("test")

    def _reset_metrics(self, stage: str) -> None:
        # Fresh state tensors: under ddp_spawn the module reaches the ranks in shared memory, and
        # in-place accumulation would add every rank's counts into the same tensors.
        self._stage_metrics(stage).reset()
        self.evaluation_loss[stage].reset()
        self._labelled_videos[stage] = torch.zeros((), dtype=torch.long, device=self.device)
        for gap in self.branch_gaps[stage]:
            gap.reset()
        if stage in self.segment_map:
            self.segment_map[stage].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, stage: str) -> None:
        metrics = self._stage_metrics(stage)
        self._check_labelled_videos_seen(stage, self._labelled_videos[stage])
        self.log_dict(metrics.compute(), prog_bar=True)
        metrics.reset()
        self.log(f"{stage}/loss", self.evaluation_loss[stage].compute().float())
        self.evaluation_loss[stage].reset()
        if stage in self.segment_map:
            self.log(f"{stage}/segment_map", self.segment_map[stage].compute(), prog_bar=True)
            self.segment_map[stage].reset()
        for m, gap in enumerate(self.branch_gaps[stage]):
            self.log(f"{stage}/branch_{m}/gap", gap.compute())
            gap.reset()

    def _check_labelled_videos_seen(self, stage: str, labelled_videos: torch.Tensor) -> None:
        """Metrics of data without labels would read 0.000000 as if measured: stop instead.

        Counted over all ranks (a collective, so every rank raises alike under DDP)."""
        labelled = int(self.trainer.strategy.reduce(labelled_videos.clone(), reduce_op="sum"))
        if labelled == 0:
            option = "val_pattern" if stage == "val" else "test_pattern"
            pattern = getattr(self.trainer.datamodule, "hparams", {}).get(option)
            where = f"data.init_args.{option} = {pattern!r}" if pattern is not None else "the evaluated data"
            raise ValueError(
                f"no video of the {'validation' if stage == 'val' else 'test'} data has labels ({where}); "
                "metrics need labelled videos "
                "(YouTube-8M's test partition has none: evaluate the validate files, or use predict)"
            )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Top-k classes and probabilities per video (never the full (videos x C) matrix); for
        ``task="segments"`` every segment's probabilities (S, C), which the segment submission
        masks with the class whitelist before taking each segment's top 20 (SPEC_SEGMENTS 4.2)."""
        probabilities = torch.sigmoid(self(batch["rgb"], batch["audio"], batch["lengths"]).float())
        check_finite_scores(probabilities, batch["id"], getattr(self._trainer, "ckpt_path", None))
        if self.hparams.task == "segments":
            return {"id": list(batch["id"]), "probabilities": probabilities.cpu()}
        # A stable sort, so that a tie at the k-th score keeps the lower class index (topk leaves
        # that choice to the backend), as the metrics do.
        classes = torch.argsort(probabilities, dim=-1, descending=True, stable=True)[:, : self.hparams.top_k]
        scores = probabilities.gather(1, classes)
        return {"id": list(batch["id"]), "scores": scores.cpu(), "classes": classes.cpu()}

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Adam with TF's defaults; no weight decay (only the classifier carries an L2 term).
        adam = TF1Adam if self.hparams.adam_epsilon == "tf1" else torch.optim.Adam
        return adam(self.parameters(), lr=self.hparams.learning_rate, betas=(0.9, 0.999), eps=1e-8)

    def current_learning_rate(self) -> float:
        """Staircase decay by examples seen before this step (TF exponential_decay, staircase=True)."""
        hp = self.hparams
        return hp.learning_rate * hp.lr_decay ** math.floor(self.examples_seen / hp.lr_decay_examples)

    def on_train_start(self) -> None:
        check_validation_between_accumulated_steps(self.trainer)
        if self.trainer.gradient_clip_val is not None:  # configure_gradient_clipping has its own
            raise ValueError(f"trainer.gradient_clip_val = {self.trainer.gradient_clip_val} is not used: the model "
                             "clips as set by model.init_args.gradient_clip (per_tensor, global, off) and "
                             "gradient_clip_norm; remove it and set those")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        learning_rate = self.current_learning_rate()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        optimizer.step(closure=self._no_update_without_examples(optimizer_closure))
        # The closure ran the last accumulated training_step, so every micro-batch is counted now.
        self.examples_seen += self._examples_over_ranks()
        self._pending_examples, self._step_examples = 0, None

    def _examples_over_ranks(self) -> int:
        """This step's examples summed over the ranks, once per step: ranks' batches differ in size
        (segments per video; a last batch short without drop_last or after skipped records), and
        every rank must count the same to take the same learning rate. One scalar all-reduce per
        step with more than one rank (Lightning's progress bar, at its default refresh rate, reads
        the loss each step anyway)."""
        if self._step_examples is None:
            examples = self._pending_examples
            if self.trainer.world_size > 1:
                total = torch.tensor(float(examples), device=self.device)
                examples = int(self.trainer.strategy.reduce(total, reduce_op="sum").item())
            self._step_examples = examples
        return self._step_examples

    def _no_update_without_examples(self, closure: Any) -> Any:
        """The closure, then, in the segment task, every gradient dropped when no rank had a
        segment batch to train on (training_step's zero loss): Adam would still move each weight
        along its old moments; with no gradient it leaves the weights and its state untouched.
        The count is summed over ranks, so that all of them skip the update together. The closure
        then returns None, Lightning's "backward skipped": with fp16's GradScaler, unscaling and
        stepping an optimizer without gradients would fail ("No inf checks were recorded")."""
        if self.hparams.task != "segments" or closure is None:
            return closure

        def closure_then_drop_empty_gradients() -> Any:
            loss = closure()
            if self._examples_over_ranks() == 0:
                for parameter in self.parameters():
                    parameter.grad = None
                return None
            return loss

        return closure_then_drop_empty_gradients

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        mode, max_norm = self.hparams.gradient_clip, self.hparams.gradient_clip_norm
        if mode == "global":
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        elif mode == "per_tensor":
            clip_per_tensor_([p for p in self.parameters() if p.grad is not None], max_norm)

    # ----------------------------------------------------------------------------- checkpoints
    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()  # on every rank of every command (ddp_spawn workers too)
        trainer = self._trainer  # None when called by hand (a fine-tuning start from init_from)
        if trainer is not None and stage == "fit":  # before Lightning restores a --ckpt_path's loop state
            resume_finished_epochs_as_the_next(trainer)
        if trainer is not None and trainer.precision in CAST_PRECISIONS:
            raise ValueError(f"trainer.precision = {trainer.precision!r}: the model runs in 32-true, bf16-mixed, "
                             "16-mixed or 64-true (its logits and losses stay at least float32, as the metrics need)")
        # In setup, before Lightning restores a --ckpt_path: resuming a fine-tuning run keeps
        # its own weights, a fresh one starts from init_from.
        if stage == "fit" and self.hparams.init_from:
            self.load_model_weights(self.hparams.init_from)

    def load_model_weights(self, checkpoint_path: str) -> None:
        """Copy the model weights of a checkpoint (e.g. video-level) into this module's model.

        Raises ValueError listing missing, unexpected and differently shaped parameters, and the
        architecture hyper-parameters that differ, when the checkpoint does not fit exactly.
        """
        from nextvlad.export import load_checkpoint  # here: export imports this module

        try:
            checkpoint = load_checkpoint(checkpoint_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"init_from: checkpoint {checkpoint_path} does not exist") from None
        except ValueError as error:  # corrupt, cut short or not a checkpoint: the message names the file
            raise ValueError(f"init_from: {error}") from error
        state = {key[len("model."):]: value for key, value in checkpoint.get("state_dict", {}).items()
                 if key.startswith("model.")}
        misfit = weights_misfit(self.model.state_dict(), state)
        # Checked even when every shape fits: weights of another activation or gate load without
        # a shape problem but compute something else (--ckpt_path refuses them the same way).
        mismatch = architecture_mismatch(checkpoint.get("hyper_parameters") or {}, self.hparams)
        if misfit or mismatch:
            misfit = f"the checkpoint's model does not fit this one ({misfit})" if misfit else None
            raise ValueError(f"init_from {checkpoint_path}: "
                             + "; ".join(reason for reason in (misfit, mismatch) if reason))
        self.model.load_state_dict(state, strict=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:  # convert-tf saves without one
            check_finite_weights(self, f"at step {self._trainer.global_step}: not saved",
                                 "training diverged: resume from an earlier checkpoint with a lower learning_rate")
        else:
            check_finite_weights(self, "in the checkpoint to write: not saved")
        checkpoint["examples_seen"] = self.examples_seen
        # Dropout draws from the global generators: a resumed run continues them (Lightning saves
        # none of them), so that it takes the same steps as the uninterrupted run.
        checkpoint["rng_states"] = gather_per_rank(rng_states())
        # Which run this is, with the hyper-parameters: `--ckpt_path last` prefers a checkpoint of
        # the same settings among concurrent runs (seed_everything sets this variable).
        seed = os.environ.get("PL_GLOBAL_SEED")
        checkpoint["seed_everything"] = None if seed is None else int(seed)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        mismatch = architecture_mismatch(checkpoint.get("hyper_parameters") or {}, self.hparams)
        if mismatch:
            raise ValueError(mismatch)
        self.examples_seen = int(checkpoint.get("examples_seen", 0))
        rng_states = checkpoint.get("rng_states")
        if rng_states and self._trainer is not None and self.trainer.state.fn == "fit":
            rank, world_size = rank_and_world_size()
            if len(rng_states) == world_size:
                set_rng_states(rng_states[rank])


#: Trainer precisions that cast the whole model to 16 bits, logits included.
CAST_PRECISIONS = ("bf16-true", "16-true")


def check_finite_weights(module: nn.Module, when: str, advice: str = "") -> None:
    """ValueError naming the first parameter or buffer that holds NaN or inf: a run that diverged
    stops at its next checkpoint instead of saving it (the weights are the same on every rank, so
    every rank stops alike). One device sync per call: at saves only."""
    tensors = [(name, t) for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]) if tensors else torch.ones(0, dtype=torch.bool)
    if bool(finite.all()):
        return
    name = tensors[int((~finite).nonzero()[0])][0]
    raise ValueError(f"the model's weights are not finite {when} (first: {name})" + (f"; {advice}" if advice else ""))


def check_finite_scores(scores: torch.Tensor, ids: Any, ckpt_path: str | None, allow_inf: bool = True) -> None:
    """ValueError naming the first video whose scores (logits or probabilities, (B, ...)) hold NaN,
    or inf unless ``allow_inf`` (an inf logit gives probability 0 or 1, which ranks fine, but no
    loss): a submission or metric of NaN scores would rank them first without a word. One device
    sync per batch, as the metrics' own checks."""
    if not scores.numel():
        return
    bad = (torch.isnan(scores) if allow_inf else ~torch.isfinite(scores)).flatten(1).any(1)
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0])
    video = ids[first] if ids is not None else f"row {first} of the batch"
    what = "NaN" if allow_inf else "not finite"
    raise ValueError(f"the model's scores are {what} for video {video} ({int(bad.sum())} of the batch's "
                     f"{len(bad)}): the weights of {ckpt_path or 'the model'} or that video's features are not finite")


def weights_misfit(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> str | None:
    """How the weights ``given`` (a checkpoint's state dict) do not fit a model's state dict
    (``expected``): how many entries are missing, unexpected or of another shape, and the first
    three; None when they fit exactly (as ``load_state_dict(strict=True)`` needs)."""
    def shape(value: Any) -> tuple[int, ...]:
        return tuple(getattr(value, "shape", ()))

    problems = [f"missing {key}" for key in expected if key not in given]
    problems += [f"unexpected {key}" for key in given if key not in expected]
    problems += [f"{key}: checkpoint {shape(given[key])} vs model {shape(value)}"
                 for key, value in expected.items() if key in given and shape(given[key]) != shape(value)]
    if not problems:
        return None
    return f"{len(problems)} differences, first: {'; '.join(problems[:3])}"


def architecture_mismatch(saved: Mapping[str, Any], configured: Mapping[str, Any]) -> str | None:
    """What a checkpoint's hyper-parameters (``saved``) and the configured model disagree on
    (:data:`ARCHITECTURE_HPARAMS` only), naming both values; None when they agree."""
    mismatched = [
        f"{name}: checkpoint {saved[name]!r} vs config {configured[name]!r}"
        for name in ARCHITECTURE_HPARAMS
        if name in saved and name in configured and saved[name] != configured[name]
    ]
    if not mismatched:
        return None
    return f"the checkpoint is of another architecture ({', '.join(mismatched)})"


def check_validation_between_accumulated_steps(trainer: pl.Trainer) -> None:
    """ValueError when a validation, and so the checkpoints written after it, can fall between
    the accumulated micro-batches of one optimizer step: their gradients and example count are in
    no checkpoint, so a resume from it could not continue that step exactly (README: exact resume).
    Validation at an epoch's end is on a step (Lightning steps on the last batch)."""
    accumulate, every, batches = trainer.accumulate_grad_batches, trainer.val_check_batch, trainer.num_training_batches
    if accumulate == 1 or not trainer.enable_validation or every == float("inf"):
        return
    if every is None:  # by time: anywhere
        on_steps = False
    elif trainer.check_val_every_n_epoch is not None:  # counted within each epoch, whose last batch steps
        on_steps = every >= batches or every % accumulate == 0
    else:  # counted across epochs: steps restart each epoch, so they line up only if the epoch does
        on_steps = every % batches == 0 or (every % accumulate == 0 and batches % accumulate == 0)
    if on_steps:
        return
    when = "by time" if every is None else f"every {every} batches (epochs of {batches})"
    raise ValueError(f"accumulate_grad_batches={accumulate} with validation {when}: a checkpoint written at a "
                     f"validation would hold a half-accumulated step, which a resume cannot continue exactly; "
                     f"validate every multiple of {accumulate} batches (--trainer.val_check_interval), with "
                     f"check_val_every_n_epoch null also in epochs of a multiple of {accumulate} batches")


def summed_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy summed over classes, mean over the batch (SPEC 4), from logits, at least fp32.

    ``weights`` (B, C) multiply each entry before the sum, as Google's CrossEntropyLoss does with
    ``label_weights`` (SPEC_SEGMENTS 6): 0 leaves an unrated class out of the loss.
    """
    logits = at_least_float32(logits)
    per_class = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    if weights is not None:
        per_class = per_class * weights
    return per_class.sum(dim=-1).mean()


@torch.no_grad()
def clip_per_tensor_(parameters: list[nn.Parameter], max_norm: float) -> None:
    """TF ``clip_by_norm`` on each gradient: g * max_norm / max(|g|, max_norm), batched with foreach."""
    grads = [p.grad for p in parameters]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    scales = [max_norm / torch.clamp(norm, min=max_norm) for norm in norms]
    torch._foreach_mul_(grads, scales)
