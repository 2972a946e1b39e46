"""VideoClassifier (SPEC 4): losses, L2, LR schedule, clipping, distillation, resume, bad checkpoints."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from toy_data import NUM_CLASSES, SMALL, collate, loader, toy_videos, trainer

from nextvlad.module import VideoClassifier, clip_per_tensor_, summed_bce, weights_misfit
from nextvlad.optim import TF1Adam


def test_summed_bce_matches_float64_formula():
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 7) * 4, (torch.rand(5, 7) > 0.6).float()
    p = torch.sigmoid(logits.double())
    expected = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).sum(1).mean()
    assert summed_bce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_weights_misfit_counts_missing_unexpected_and_reshaped_entries():
    model = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1), "d": torch.zeros(5)}
    given = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "e": torch.zeros(1), "f": 7.0, "d": torch.zeros(5, 1)}
    assert weights_misfit(model, given) == "5 differences, first: missing c; unexpected e; unexpected f"
    assert weights_misfit(model, {k: given[k] for k in ("a", "b", "d")} | {"c": torch.ones(1)}) == (
        "2 differences, first: a: checkpoint (3, 2) vs model (2, 3); d: checkpoint (5, 1) vs model (5,)")
    assert weights_misfit(model, {key: torch.ones_like(value) for key, value in model.items()}) is None


def test_l2_is_half_sum_of_squares_of_classifier_weights_and_bias():
    module = VideoClassifier(**SMALL, l2_penalty=1e-3)
    with torch.no_grad():
        module.model.classifier.bias.fill_(0.5)
    w, b = module.model.classifier.weight, module.model.classifier.bias
    expected = 1e-3 * 0.5 * (w.double().pow(2).sum() + b.double().pow(2).sum())
    assert module.l2_loss().item() == pytest.approx(expected.item(), rel=1e-6)


def test_clip_per_tensor_is_tf_clip_by_norm_per_variable():
    small, big = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    small.grad = torch.tensor([0.3, 0.4, 0.0])  # norm 0.5: untouched
    big.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5: scaled to norm 1
    clip_per_tensor_([small, big], max_norm=1.0)
    assert torch.allclose(small.grad, torch.tensor([0.3, 0.4, 0.0]))
    assert torch.allclose(big.grad, torch.tensor([[0.6, 0.0], [0.0, 0.8]]))


@pytest.mark.parametrize("val_check_interval, per_epoch, videos, refused", [
    (3, 1, 64, True),  # validation after batches 3 and 6: inside steps of 2 batches
    (4, 1, 64, False),  # after batches 4 and 8: on steps
    (1.0, 1, 56, False),  # at the epoch's end only (7 batches): Lightning steps on the last batch
    # counted across epochs (the paper configs): epochs of 7 batches end on a step of 1 batch, so
    # the validation after global batch 8 (epoch 1's first) falls inside a step
    (4, None, 56, True),
    (4, None, 64, False),  # epochs of 8 batches: steps line up
    (7, None, 56, False),  # every epoch's end
])
def test_validation_inside_an_accumulated_step_is_refused(val_check_interval, per_epoch, videos, refused):
    """A checkpoint written at a validation between the micro-batches of one step would miss their
    gradients and examples: a resume from it could not be exact, so fit refuses to start."""
    module = VideoClassifier(**SMALL)
    run = trainer(max_epochs=2, accumulate_grad_batches=2, val_check_interval=val_check_interval,
                  check_val_every_n_epoch=per_epoch, limit_val_batches=1, num_sanity_val_steps=0)
    if refused:
        with pytest.raises(ValueError, match=f"^accumulate_grad_batches=2 with validation every "
                                             f"{val_check_interval} batches .epochs of {videos // 8}.: a checkpoint "
                                             "written at a validation would hold a half-accumulated"):
            run.fit(module, loader(videos), loader(16))
        assert module.trainer.global_step == 0
    else:
        run.fit(module, loader(videos), loader(16))
        assert module.trainer.global_step == 2 * (videos // 16 + (videos % 16 > 0))


def test_staircase_lr_counts_examples_over_accumulation():
    module = VideoClassifier(**SMALL, learning_rate=1e-2, lr_decay=0.5, lr_decay_examples=48)
    seen_lrs = []

    class RecordLR(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen_lrs.append((pl_module.examples_seen, optimizer.param_groups[0]["lr"]))

    trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[RecordLR()]).fit(module, loader(64))
    # 64 videos / 8 per batch = 8 batches = 4 optimizer steps of 16 examples per epoch
    assert module.examples_seen == 128
    assert module.trainer.global_step == 8
    # the LR applied at a step uses the examples of the *previous* steps (TF's global_step)
    assert [examples for examples, _ in seen_lrs] == [0, 16, 32, 48, 64, 80, 96, 112]
    for examples_before, lr in seen_lrs:
        assert lr == pytest.approx(1e-2 * 0.5 ** math.floor(examples_before / 48))
    assert {lr for _, lr in seen_lrs} == {1e-2, 5e-3, 2.5e-3}


def test_training_learns_and_logs_every_metric():
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, learning_rate=1e-2)
    run = trainer(max_epochs=6)
    run.fit(module, loader(96), loader(48, seed=1))
    metrics = run.callback_metrics
    for name in ("val/gap", "val/hit_at_one", "val/perr", "val/map", "val/loss", "train/gap", "train/lr",
                 "train/label_loss", "train/l2_loss"):
        assert name in metrics, name
    assert metrics["val/gap"] > 0.6  # chance level with one label among 12 is about 0.25


class MemoryLogger(pl.loggers.Logger):
    """Every (step, metrics) a Trainer hands its logger."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "memory", 0

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def test_a_logged_training_gap_is_its_own_steps_batch():
    def logged_gaps(every_n_steps: int) -> dict[int, float]:
        torch.manual_seed(0)
        memory = MemoryLogger()
        run = trainer(max_epochs=1, logger=memory, log_every_n_steps=every_n_steps)
        run.fit(VideoClassifier(**SMALL, learning_rate=1e-2), loader(64))
        return {step: metrics["train/gap"] for step, metrics in memory.rows if "train/gap" in metrics}

    every_step, every_third = logged_gaps(1), logged_gaps(3)
    assert len(every_step) == 8 and len(every_third) == 2  # 8 steps
    assert every_third == {step: every_step[step] for step in every_third}
    trainer(max_epochs=1, logger=MemoryLogger(), log_every_n_steps=0).fit(VideoClassifier(**SMALL), loader(16))


def test_mixture_losses_and_gradients_reach_every_part():
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, num_branches=3, temperature=3.0, cl_lambda=9.0)
    batch = collate(toy_videos(8, 0))
    losses, _ = module.compute_losses(batch)
    expected_label = losses["mixture_loss"] + sum(losses[f"branch_{m}_loss"] for m in range(3))
    assert torch.allclose(losses["label_loss"], expected_label)
    losses["total"].backward()
    assert module.model.gate_fc.weight.grad.abs().sum() > 0
    for branch in module.model.branches:
        assert branch.classifier.weight.grad.abs().sum() > 0
        assert branch.video_aggregator.centroids.grad.abs().sum() > 0


@pytest.mark.parametrize("detach_teacher", [False, True])
def test_detached_teacher_stops_kl_gradient_into_gate(detach_teacher):
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, num_branches=2, detach_teacher=detach_teacher)
    losses, _ = module.compute_losses(collate(toy_videos(8, 0)))
    losses["distillation_loss"].backward()
    gate_grad = module.model.gate_fc.weight.grad
    if detach_teacher:
        assert gate_grad is None or gate_grad.abs().sum() == 0
    else:
        assert gate_grad.abs().sum() > 0
    assert module.model.branches[0].classifier.weight.grad.abs().sum() > 0


def test_zero_temperature_is_sum_of_cross_entropies_plus_l2():
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, num_branches=3, temperature=0.0)
    losses, _ = module.compute_losses(collate(toy_videos(8, 0)))
    assert "distillation_loss" not in losses
    assert torch.equal(losses["total"], losses["label_loss"] + losses["l2_loss"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), "top_k must be an integer >= 1, got 0"),
        (dict(top_k=2.5), "top_k must be an integer >= 1, got 2.5"),
        (dict(num_branches=0), "num_branches must be an integer >= 1, got 0"),
        (dict(lr_decay_examples=4e6), "lr_decay_examples must be an integer >= 1, got 4000000.0"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(num_branches=3, predict_branch=3), "predict_branch"),
        (dict(gradient_clip="sometimes"), "gradient_clip"),
        (dict(groups=3), "groups=3 must divide"),
        (dict(bn_momentum=0.0), "bn_momentum"),
        (dict(adam_epsilon="keras"), "adam_epsilon must be one of"),
    ],
)
def test_bad_hyper_parameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VideoClassifier(**{**SMALL, **kwargs})


def test_bn_momentum_reaches_every_batch_norm():
    module = VideoClassifier(**SMALL, num_branches=2, bn_momentum=0.05)
    norms = [m for m in module.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2 * 6 + 1  # per branch: 2 cluster, 2 vlad, hidden and gating BN; gate BN
    assert all(m.momentum == 0.05 for m in norms)
    assert VideoClassifier(**SMALL).model.hidden_bn.momentum == 1e-3


def test_feature_size_that_does_not_match_the_data_fails_before_training():
    module = VideoClassifier(**{**SMALL, "rgb_size": 64})
    with pytest.raises(ValueError, match=r"batch\['rgb'\] has 32 features per frame .* rgb_size=64"):
        trainer(max_steps=1).fit(module, loader(16))
    assert module.examples_seen == 0


def test_resume_continues_step_lr_and_optimizer_state(tmp_path):
    torch.manual_seed(0)
    hparams = dict(**SMALL, learning_rate=1e-2, lr_decay=0.5, lr_decay_examples=24)
    first = trainer(max_steps=4, default_root_dir=tmp_path)
    first.fit(VideoClassifier(**hparams), loader(64))
    ckpt = tmp_path / "stop.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    observed = {}

    class Observe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            observed["step"] = trainer.global_step
            observed["examples"] = pl_module.examples_seen
            observed["lr"] = pl_module.current_learning_rate()
            observed["exp_avg"] = trainer.optimizers[0].state_dict()["state"][0]["exp_avg"].clone()

    resumed_module = VideoClassifier(**hparams)
    resumed = trainer(max_steps=6, default_root_dir=tmp_path, callbacks=[Observe()])
    resumed.fit(resumed_module, loader(64), ckpt_path=ckpt)
    assert observed["step"] == 4 and observed["examples"] == 32
    assert observed["lr"] == pytest.approx(1e-2 * 0.5)
    assert torch.equal(observed["exp_avg"], saved["optimizer_states"][0]["state"][0]["exp_avg"])
    assert resumed.global_step == 6 and resumed_module.examples_seen == 48


@pytest.mark.parametrize("adam_epsilon, optimizer_class", [(None, TF1Adam), ("torch", torch.optim.Adam)])
def test_adam_epsilon_rule_defaults_to_tf1(adam_epsilon, optimizer_class):
    kwargs = {} if adam_epsilon is None else {"adam_epsilon": adam_epsilon}
    optimizer = VideoClassifier(**SMALL, **kwargs).configure_optimizers()
    assert type(optimizer) is optimizer_class
    expected = {"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8}
    assert {k: optimizer.defaults[k] for k in ("lr", "betas", "eps")} == expected


def tf_training_steps_float64(model: torch.nn.Module, batches: list[dict], hp: dict) -> None:
    """The authors' train step (SPEC 4) written out in float64 on ``model``: summed CE on
    probabilities, L2 on the classifier, tf.clip_by_norm per tensor, staircase LR by examples seen
    before the step, and TF1's ApplyAdam."""
    params = [p for p in model.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    examples = 0
    for t, batch in enumerate(batches, start=1):
        logits = model(batch["rgb"].double(), batch["audio"].double(), batch["lengths"])
        p, y = torch.sigmoid(logits), batch["labels"].double()
        label_loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).sum(1).mean()
        classifier = model.classifier
        l2 = hp["l2_penalty"] * 0.5 * (classifier.weight.pow(2).sum() + classifier.bias.pow(2).sum())
        grads = torch.autograd.grad(label_loss + l2, params)
        lr = hp["learning_rate"] * hp["lr_decay"] ** math.floor(examples / hp["lr_decay_examples"])
        alpha = lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        with torch.no_grad():
            for param, grad, m_i, v_i in zip(params, grads, m, v):
                grad = grad * hp["gradient_clip_norm"] / max(grad.norm().item(), hp["gradient_clip_norm"])
                m_i += (grad - m_i) * (1 - 0.9)
                v_i += (grad * grad - v_i) * (1 - 0.999)
                param -= alpha * m_i / (v_i.sqrt() + 1e-8)
        examples += len(batch["lengths"])


def test_training_steps_match_the_authors_recipe_in_float64():
    """Six Trainer steps of VideoClassifier's defaults (loss, L2, clipping, LR, TF1 Adam, BN
    updates) against the same steps written out from SPEC 4 on a float64 copy of the model."""
    torch.manual_seed(0)
    hp = dict(**SMALL, dropout=0.0, learning_rate=1e-2, lr_decay=0.5, lr_decay_examples=16, l2_penalty=1e-3,
              gradient_clip_norm=0.5, bn_momentum=0.1)
    module = VideoClassifier(**hp)
    reference = copy.deepcopy(module.model).double().train()
    data = loader(48)
    trainer(max_steps=6, precision="64-true").fit(module, data)
    tf_training_steps_float64(reference, list(data), hp)
    assert module.examples_seen == 48
    trained, expected = module.model.state_dict(), reference.state_dict()
    # atol: vlad_bn's beta has an exactly zero gradient in theory (hidden_bn removes any shift),
    # so it moves by Adam-normalised rounding noise, about 1e-12 here. torch's epsilon rule
    # (adam_epsilon="torch") misses the oracle by about 1e-4.
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-9, atol=1e-10, msg=name)


def test_checkpoint_from_before_tf1_adam_resumes_with_it(tmp_path):
    """Checkpoints written before ``adam_epsilon`` existed hold torch.optim.Adam's state and no such
    hyper-parameter: they resume under the TF1 rule, continuing the moments and step counts."""
    first = trainer(max_steps=2, default_root_dir=tmp_path)
    first.fit(VideoClassifier(**SMALL, adam_epsilon="torch"), loader(32))
    ckpt = tmp_path / "before.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    del saved["hyper_parameters"]["adam_epsilon"]
    torch.save(saved, ckpt)
    assert VideoClassifier.load_from_checkpoint(ckpt).hparams.adam_epsilon == "tf1"
    module = VideoClassifier(**SMALL)
    resumed = trainer(max_steps=3, default_root_dir=tmp_path)
    resumed.fit(module, loader(32), ckpt_path=ckpt)
    optimizer = resumed.optimizers[0]
    assert isinstance(optimizer, TF1Adam)
    assert {int(state["step"]) for state in optimizer.state.values()} == {3}
    assert module.examples_seen == 24


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    run = trainer(max_steps=1, default_root_dir=tmp_path)
    run.fit(VideoClassifier(**SMALL), loader(16))
    ckpt = tmp_path / "small.ckpt"
    run.save_checkpoint(ckpt)
    other = VideoClassifier(**{**SMALL, "clusters": 8})
    with pytest.raises(ValueError, match="another architecture.*clusters: checkpoint 4 vs config 8"):
        trainer(max_steps=2, default_root_dir=tmp_path).fit(other, loader(16), ckpt_path=ckpt)


@pytest.mark.parametrize("num_branches", [1, 3])
def test_bf16_mixed_precision_trains(num_branches):
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, num_branches=num_branches, cluster_bn_statistics="masked")
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer(max_steps=3, precision="bf16-mixed", callbacks=[Record()]).fit(module, loader(32))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay fp32


def test_predict_step_breaks_ties_at_the_cut_off_by_lower_class_index():
    module = VideoClassifier(**SMALL, top_k=3).eval()
    batch = collate(toy_videos(2, 0))
    tied = torch.tensor([[0.0, 5.0, 1.0, 1.0, 1.0, 1.0] + [-9.0] * (NUM_CLASSES - 6)] * 2)
    module.forward = lambda rgb, audio, lengths: tied  # the ranking alone is under test
    out = module.predict_step(batch, 0)
    assert out["classes"].tolist() == [[1, 2, 3], [1, 2, 3]]
    assert torch.allclose(out["scores"], torch.sigmoid(tied).gather(1, out["classes"]))


def average_precision_float64(scores: np.ndarray, positive: np.ndarray, positives: float) -> float:
    """SPEC 5: (1 / positives) * sum over positive ranks i of (positives in ranks 1..i) / i; 0 without positives."""
    hits = positive[np.argsort(-scores, kind="stable")]
    return float((np.cumsum(hits) / np.arange(1, len(hits) + 1) * hits).sum() / positives) if positives else 0.0


def spec5_metrics_float64(p: np.ndarray, y: np.ndarray, top_k: int, map_over_all: bool = True) -> dict[str, float]:
    """The authors' eval.py metrics over every video (SPEC 5), written out in float64 numpy; MAP
    over every class (the authors') or over the classes with a positive (Google's)."""
    rows, top = np.arange(len(p))[:, None], np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    in_top = np.zeros(p.shape, bool)
    in_top[rows, top] = True
    perr = [0.0 if n == 0 else float((y_b * (p_b > 0))[np.argsort(-p_b)[:n]].sum() / n)
            for p_b, y_b, n in zip(p, y, y.sum(1).astype(int))]  # n = 0: precision 0, still counted
    return {
        "gap": average_precision_float64(p[in_top], y[in_top], y.sum()),
        "hit_at_one": float(y[rows[:, 0], p.argmax(1)].mean()),
        "perr": float(np.mean(perr)),
        "map": float(np.mean([average_precision_float64(p[in_top[:, c], c], y[in_top[:, c], c], y[:, c].sum())
                              for c in range(p.shape[1]) if map_over_all or y[:, c].any()])),
    }


@pytest.mark.parametrize("num_branches", [1, 3])
def test_validation_counts_label_less_videos_as_the_authors_eval(num_branches):
    """Labelled and label-less videos mixed in batches (and one batch without labels): the logged
    metrics, branch GAPs and loss are SPEC 5's over every video, a label-less one as all-zero labels."""
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, num_branches=num_branches, top_k=5).eval()
    videos = toy_videos(24, 3)
    batch = collate(videos)
    with torch.no_grad():
        if num_branches == 1:
            logits, branch_logits = module(batch["rgb"], batch["audio"], batch["lengths"]), []
        else:
            out = module.model.forward_all(batch["rgb"], batch["audio"], batch["lengths"])
            logits, branch_logits = out.logits, out.branch_logits
    # Labels the model's own ranking makes informative: half the labelled videos hit at rank 1,
    # some have two labels. Videos 2, 5, ... and the whole last batch (16..23) have none.
    g = torch.Generator().manual_seed(1)
    for i, video in enumerate(videos):
        video["labels"] = torch.zeros(NUM_CLASSES)
        video["has_labels"] = torch.tensor(i < 16 and i % 3 != 2)
        if video["has_labels"]:
            first = int(logits[i].argmax()) if i % 2 == 0 else int(torch.randint(NUM_CLASSES, (1,), generator=g))
            video["labels"][first] = 1.0
            if i % 4 == 0:
                video["labels"][int(torch.randint(NUM_CLASSES, (1,), generator=g))] = 1.0
    y = np.stack([video["labels"].numpy() for video in videos]).astype(np.float64)
    labelled = np.array([bool(video["has_labels"]) for video in videos])
    probabilities = lambda z: torch.sigmoid(z.float()).numpy().astype(np.float64)  # the metrics' fp32 scores

    logged = trainer().validate(module, DataLoader(videos, batch_size=8, collate_fn=collate), verbose=False)[0]
    expected = spec5_metrics_float64(probabilities(logits), y, top_k=5)
    for name, value in expected.items():
        assert logged[f"val/{name}"] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    # Only over the labelled videos (the old behaviour) every one of them reads otherwise.
    only_labelled = spec5_metrics_float64(probabilities(logits)[labelled], y[labelled], top_k=5)
    assert all(abs(only_labelled[name] - value) > 1e-3 for name, value in expected.items())
    z = logits.double().numpy()
    loss = (np.logaddexp(0, z) - y * z).sum(1).mean()  # BCE from logits, summed over classes
    assert logged["val/loss"] == pytest.approx(loss, rel=1e-6)
    for m, branch in enumerate(branch_logits):
        branch_gap = spec5_metrics_float64(probabilities(branch), y, top_k=5)["gap"]
        assert logged[f"val/branch_{m}/gap"] == pytest.approx(branch_gap, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("task", "map_classes", "over_all"), [
    ("video", None, True), ("video", "with_positives", False), ("segments", None, False), ("segments", "all", True)])
def test_map_classes_chooses_the_authors_or_googles_mean(task, map_classes, over_all):
    """MAP over every class (a class without a positive counts 0, the authors') or over the classes
    with a positive (Google's eval_util); by default the authors' for videos, Google's for segments."""
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, top_k=5, task=task, map_classes=map_classes).eval()
    videos = toy_videos(16, 3)
    for video in videos:
        video["labels"][NUM_CLASSES - 3:] = 0.0  # the last classes without any positive
        video["label_weights"] = torch.ones(NUM_CLASSES)
    batch = collate(videos)
    with torch.no_grad():
        logits = module(batch["rgb"], batch["audio"], batch["lengths"])
    y = batch["labels"].numpy().astype(np.float64)
    expected = spec5_metrics_float64(torch.sigmoid(logits.float()).numpy().astype(np.float64), y, top_k=5,
                                     map_over_all=over_all)["map"]
    other = spec5_metrics_float64(torch.sigmoid(logits.float()).numpy().astype(np.float64), y, top_k=5,
                                  map_over_all=not over_all)["map"]
    collate_batch = (lambda items: {**collate(items), "label_weights": torch.stack([v["label_weights"] for v in items])})
    logged = trainer().validate(module, DataLoader(videos, batch_size=8, collate_fn=collate_batch), verbose=False)[0]
    assert logged["val/map"] == pytest.approx(expected, rel=1e-9, abs=1e-12) and abs(expected - other) > 1e-3


def test_map_classes_must_be_a_known_choice():
    with pytest.raises(ValueError, match="map_classes"):
        VideoClassifier(**SMALL, map_classes="some")


def test_segment_validation_scores_rated_segments_with_the_same_proxy_for_branches():
    """Segments (SPEC_SEGMENTS 2, 6): rows without ratings (inference candidates) stay out, and
    the mixture and each branch are scored alike on probabilities x label_weights vs ratings > 0;
    MAP is Google's, over the classes with a rated positive (SPEC 5)."""
    from test_segments_training import collate_segments, toy_segments

    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, num_branches=2, task="segments", top_k=5).eval()
    items = toy_segments(24, 2)
    for item in items[1::4]:  # candidates: no ratings
        item.update(labels=torch.zeros(NUM_CLASSES), label_weights=torch.zeros(NUM_CLASSES), has_labels=torch.tensor(False))
    batch = collate_segments(items)
    with torch.no_grad():
        out = module.model.forward_all(batch["rgb"], batch["audio"], batch["lengths"])
    rated = batch["has_labels"].numpy()
    y = (batch["labels"].numpy()[rated] > 0).astype(np.float64)
    proxy = lambda z: (torch.sigmoid(z.float()) * batch["label_weights"]).numpy()[rated].astype(np.float64)

    assert not y.any(0).all()  # some classes have no rated positive: the MAP conventions differ
    logged = trainer().validate(module, DataLoader(items, batch_size=8, collate_fn=collate_segments), verbose=False)[0]
    for name, value in spec5_metrics_float64(proxy(out.logits), y, top_k=5, map_over_all=False).items():
        assert logged[f"val/{name}"] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    for m in range(2):
        gap = spec5_metrics_float64(proxy(out.branch_logits[m]), y, top_k=5)["gap"]
        assert logged[f"val/branch_{m}/gap"] == pytest.approx(gap, rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_ddp_validation_with_a_rank_of_label_less_videos():
    """Two gloo ranks; the sampler deals videos alternately, so rank 1 sees only label-less ones:
    the same metrics as one process over all videos. With no labels anywhere, every rank raises
    (the count of labelled videos is a collective) instead of hanging."""
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL)
    videos = toy_videos(16, 3)
    for video in videos[1::2]:
        video.update(labels=torch.zeros(NUM_CLASSES), has_labels=torch.tensor(False))
    data = DataLoader(videos, batch_size=4, collate_fn=collate)
    single = trainer().validate(module, data, verbose=False)[0]
    two_ranks = trainer(strategy="ddp_spawn", devices=2).validate(module, data, verbose=False)[0]
    assert two_ranks.keys() == single.keys()
    for name, value in single.items():
        assert two_ranks[name] == pytest.approx(value, rel=1e-6), name
    # The spawned rank's ValueError reaches here wrapped, with its message.
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="ValueError: no video of the validation data has labels"):
        trainer(strategy="ddp_spawn", devices=2).validate(module, loader(16, labelled=False), verbose=False)


@pytest.mark.slow
def test_ddp_segment_validation_with_a_rank_of_unrated_segments():
    """Two gloo ranks; rank 1 is dealt only unrated segments (inference candidates), which the
    segment metrics leave out: the same metrics as one process, not a rank waiting in the loss's
    collective for one that never logged it. (It also aborted now and then at exit, in gloo's
    destructor, until every rank destroyed its group at exit: destroy_process_group_at_exit.)"""
    from test_segments_training import collate_segments, toy_segments

    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, task="segments", top_k=5)
    items = toy_segments(16, 4)
    for item in items[1::2]:
        item.update(labels=torch.zeros(NUM_CLASSES), label_weights=torch.zeros(NUM_CLASSES), has_labels=torch.tensor(False))
    data = DataLoader(items, batch_size=4, collate_fn=collate_segments)
    single = trainer().validate(module, data, verbose=False)[0]
    two_ranks = trainer(strategy="ddp_spawn", devices=2).validate(module, data, verbose=False)[0]
    assert two_ranks.keys() == single.keys() and "val/loss" in single
    for name, value in single.items():
        assert two_ranks[name] == pytest.approx(value, rel=1e-6), name


# ------------------------------------------------------------------ settings that would train wrongly, non-finite weights
@pytest.mark.parametrize("name,value", [("learning_rate", 0.0), ("lr_decay", -0.8), ("lr_decay", 1.5),
                                        ("gradient_clip_norm", -1.0), ("gradient_clip_norm", 0.0),
                                        ("l2_penalty", -1e-5), ("cl_lambda", -9.0), ("learning_rate", float("nan"))])
def test_optimisation_settings_out_of_range_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be in [(\[]0\.0, .*got {value}"):
        VideoClassifier(**SMALL, **{name: value})


def test_trainer_gradient_clip_val_is_refused_not_ignored():
    """The module clips per tensor (SPEC 4) in configure_gradient_clipping; Lightning's own clip
    options would do nothing without a word."""
    with pytest.raises(ValueError, match=r"trainer.gradient_clip_val = 0.01 is not used: .*gradient_clip_norm"):
        trainer(max_steps=1, gradient_clip_val=0.01).fit(VideoClassifier(**SMALL), loader(8))


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_precisions_that_cast_the_logits_are_refused(precision):
    with pytest.raises(ValueError, match=rf"trainer.precision = '{precision}': the model runs in 32-true, bf16-mixed"):
        trainer(max_steps=1, precision=precision).predict(VideoClassifier(**SMALL), loader(8))


class PoisonWeights(pl.Callback):
    """Sets one weight to NaN after step ``at``, as a diverged step would."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, module, *args):
        if trainer.global_step == self.at:
            with torch.no_grad():
                module.model.hidden.weight[0, 0] = float("nan")


def test_a_diverged_run_stops_at_its_next_checkpoint_without_writing_it(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="step{step}")
    run = trainer(max_steps=6, enable_checkpointing=True, callbacks=[PoisonWeights(at=3), saves])
    with pytest.raises(ValueError, match=r"weights are not finite at step 4: not saved \(first: model\."):
        run.fit(VideoClassifier(**SMALL), loader(64))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["stepstep=2.ckpt"]  # steps 4 and 6 never written


@pytest.mark.parametrize("command, what", [("predict", "NaN"), ("validate", "not finite")])
def test_nan_scores_name_the_video_instead_of_ranking_first(command, what):
    module = VideoClassifier(**SMALL)
    with torch.no_grad():
        module.model.hidden.weight[0, 0] = float("nan")  # every video's logits become NaN
    with pytest.raises(ValueError, match=rf"the model's scores are {what} for video v0 \(8 of the batch's 8\)"):
        getattr(trainer(), command)(module, loader(8))


def test_an_infinite_logit_is_named_in_evaluation_which_has_no_loss_for_it():
    """BCE of an inf logit is inf - inf: the evaluation loss would be NaN (and its metric raise a
    traceback naming nothing); predict ranks an inf logit fine (probability 1)."""
    module = VideoClassifier(**SMALL)
    with torch.no_grad():
        module.model.classifier.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"the model's scores are not finite for video v0 \(8 of the batch's 8\)"):
        trainer().validate(module, loader(8), verbose=False)
    predictions = trainer().predict(module, loader(8))
    assert all(torch.equal(batch["classes"][:, 0], torch.zeros(8, dtype=torch.long)) for batch in predictions)


def test_nan_segment_scores_name_the_rated_segment():
    """Segment evaluation keeps the rated rows only: the error names the segment of the row that is
    NaN, not its index among the rated ones."""
    from torch.utils.data import DataLoader
    from test_segments_training import collate_segments, toy_segments

    module = VideoClassifier(**SMALL, task="segments", top_k=5)
    with torch.no_grad():
        module.model.hidden.weight[0, 0] = float("nan")
    items = toy_segments(8, 2)
    first_rated = next(item for item in items if bool(item["has_labels"]))["id"]
    with pytest.raises(ValueError, match=rf"the model's scores are not finite for video {first_rated} "):
        trainer().validate(module, DataLoader(items, batch_size=8, collate_fn=collate_segments), verbose=False)


@pytest.mark.parametrize("num_branches", [1, 3])
def test_bn_towers_run_as_the_authors_two_gpu_towers(num_branches):
    """bn_tower_videos=4 on a batch of 10 videos: towers of 4, 3 and 3 videos (as equal as can be),
    each normalised with its own statistics and moving every running statistic once, in order
    (SPEC 3.4, 4: tf.split into towers sharing variables); the loss is that of the joined logits,
    as the tower-averaged gradients of equal towers are."""
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, num_branches=num_branches, dropout=0.0, bn_momentum=0.3,
                             bn_tower_videos=4).train()
    towers_run = copy.deepcopy(module)
    batch = collate(toy_videos(10, seed=4))
    losses, logits = module.compute_losses(batch)

    expected = []
    for start, end in ((0, 4), (4, 7), (7, 10)):
        rgb, audio, lengths = (batch[k][start:end] for k in ("rgb", "audio", "lengths"))
        out = towers_run.model(rgb, audio, lengths) if num_branches == 1 else towers_run.model.forward_all(
            rgb, audio, lengths).logits
        expected.append(out)
    torch.testing.assert_close(logits, torch.cat(expected), rtol=1e-6, atol=1e-6)
    for (name, mine), theirs in zip(module.model.named_buffers(), towers_run.model.buffers()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=name)
    assert int(module.model.get_buffer(next(n for n, _ in module.model.named_buffers()
                                            if n.endswith("num_batches_tracked")))) == 3

    whole = copy.deepcopy(towers_run)
    whole.hparams.bn_tower_videos = None
    _, whole_logits = whole.compute_losses(batch)
    assert (whole_logits - logits).abs().max() > 1e-2  # one tower of 10 normalises otherwise
    module.eval()
    torch.testing.assert_close(module.compute_losses(batch)[1], module(batch["rgb"], batch["audio"], batch["lengths"]))


@pytest.mark.parametrize("num_branches", [1, 3])
def test_towers_hold_at_least_two_videos_and_backpropagate(num_branches):
    """5 videos in towers of at most 2: 3 + 2, not 2 + 2 + 1 (on one row every BN outputs beta, and
    its in-place update of statistics an earlier tower saved made backward refuse); every video
    gets a gradient."""
    torch.manual_seed(0)
    module = VideoClassifier(**SMALL, num_branches=num_branches, bn_tower_videos=2).train()
    batch = collate(toy_videos(5, seed=4))
    batch["rgb"].requires_grad_()
    losses, _ = module.compute_losses(batch)
    losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert (batch["rgb"].grad.flatten(1).abs().sum(1) > 0).all()
    bn = next(m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    assert int(bn.num_batches_tracked) == 2


def test_bn_tower_videos_must_be_at_least_two():
    with pytest.raises(ValueError, match="bn_tower_videos must be an integer >= 1, got 0"):
        VideoClassifier(**SMALL, bn_tower_videos=0)
    with pytest.raises(ValueError, match=r"bn_tower_videos must be >= 2 \(or null: one tower\), got 1"):
        VideoClassifier(**SMALL, bn_tower_videos=1)
