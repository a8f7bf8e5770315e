"""Stage 1: DSCL (+ PBSD) representation learning — one step and the epoch loop.

The functions here take objects (configs, models, datasets, paths), never argv; ``cli.py`` is the
only caller that parses arguments or picks exit codes. The pretrain step spells the algorithm out
in the order of METHOD.md A.9: momentum update, forward of both encoders and the patches, losses,
weighted sum, backward, optimiser step, enqueue of the gathered keys and labels.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dscl import dist
from dscl.adapters import lr_scales
from dscl.backbones import BackboneSpec
from dscl.config import Config, ConfigError, LossConfig, ViewConfig, dump_config, method_name, uses_pbsd
from dscl.data import DatasetSplits, DSCLTransform, LTDataset, build_datasets, check_files_before_training
from dscl.data.batched_views import BatchedDSCLTransform, CanvasTransform, augment_on_device, working_size
from dscl.errors import DivergedError
from dscl.io import format_duration
from dscl.losses import dscl_loss, pbsd_loss, supcon_loss
from dscl.model import (
    DSCLModel,
    Encoder,
    backbone_spec,
    base_record,
    build_model,
    load_trained,
    momentum_update,
    trained_state,
)
from dscl.rng import derived_seed, rng_state, seed_everything, set_rng_state
from dscl.run import (
    STAGE1_FILE,
    CheckpointError,
    DataMeta,
    MetricsLog,
    RunFacts,
    Stage1State,
    check_compatible,
    check_same_inputs,
    load_stage1,
    prepare_run_dir,
    record_resume,
    save_stage1,
)
from dscl.runtime import (
    Preempted,
    StopSignals,
    amp_dtype,
    autocast,
    configure_backends,
    make_loader,
    num_workers,
    say,
    thread_adapter,
    to_device,
)
from dscl.schedules import warmup_cosine
from dscl.threads import ThreadAdapter
from dscl.trackers import require_trackers


@dataclass
class Batch:
    """One training batch on the device. patches (B, L, 3, h, w); boxes (B, L, 4) query pixels."""

    query: torch.Tensor
    key: torch.Tensor
    patches: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor


def pretrain_step(
    model: DSCLModel,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    m: float,
    loss_cfg: LossConfig,
    scaler: torch.amp.GradScaler | None = None,
    dtype: torch.dtype | None = None,
    num_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """One stage-1 iteration (METHOD.md A.9 with our deliberate differences). Returns detached losses.

    ``loss_cfg.loss`` picks the contrastive term: ``dscl`` (Eq. 9 of the paper) or ``scl`` (the
    paper's SupCon baseline over the same queue); the CE baseline has its own step (:func:`ce_step`).
    PBSD is added with weight ``loss_cfg.pbsd_weight`` when patches are given.

    The step never reads a value back from the device, so a GPU is never stalled by the host
    (fp16's ``GradScaler.step`` keeps its own one read of the overflow flag). Hence it does not check
    the loss: a non-finite loss is the caller's to detect (:class:`NonFiniteGuard`, at log steps).
    With ``scaler`` (fp16) the gradients of all ranks are averaged while still scaled and then
    unscaled, so every rank's scaler sees the same gradients, takes the same skip/step decision and
    keeps the same scale. ``num_classes`` (the dataset's class count) lets the contrastive losses
    skip ``torch.unique`` over the labels, which would wait for the GPU once per step.
    """
    if loss_cfg.loss == "ce":
        raise ValueError("loss ce has its own step (dscl.pretrain.ce_step): no momentum encoder, queue or patches")
    device = batch.query.device
    image_size = (batch.query.shape[-2], batch.query.shape[-1])
    use_pbsd = loss_cfg.pbsd_weight > 0 and batch.patches.shape[1] > 0
    momentum_update(model.online, model.momentum, m)
    with autocast(device, dtype):
        z, fmap = model.online(batch.query)
        keys = dist.shuffled_forward(lambda x: model.momentum(x)[0], batch.key)
        if use_pbsd:
            teacher = model.patch_teacher(fmap, batch.boxes, image_size)
            student = model.patch_student(batch.patches)
    queue, queue_labels = model.queue.snapshot()
    if loss_cfg.loss == "scl":
        loss_con = supcon_loss(z, keys, batch.labels, queue, queue_labels,
                               temperature=loss_cfg.temperature, num_classes=num_classes)
    else:
        loss_con = dscl_loss(z, keys, batch.labels, queue, queue_labels,
                             alpha=loss_cfg.alpha, temperature=loss_cfg.temperature, num_classes=num_classes)
    loss_pbsd = (pbsd_loss(teacher, student, keys, queue, temperature=loss_cfg.temperature)
                 if use_pbsd else torch.zeros((), device=device))
    loss = loss_con + loss_cfg.pbsd_weight * loss_pbsd
    skipped = _optimise(loss, optimizer, lr, scaler)
    # every rank holds the same per-rank batch in stage 1, so the gathers need no size exchange
    model.queue.enqueue(dist.all_gather_cat(keys.float(), equal_sizes=True),
                        dist.all_gather_cat(batch.labels, equal_sizes=True))
    return _parts(loss, loss_con, loss_pbsd, skipped)


def ce_step(
    model: DSCLModel,
    head: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    scaler: torch.amp.GradScaler | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One step of the cross-entropy baseline (``loss.loss=ce``): ``head`` (a linear classifier) on
    the online backbone's features of the query view. No momentum encoder, queue or patches."""
    with autocast(batch.query.device, dtype):
        logits = head(model.online.features(batch.query))
    loss = F.cross_entropy(logits.float(), batch.labels)
    skipped = _optimise(loss, optimizer, lr, scaler)
    return _parts(loss, loss, torch.zeros((), device=loss.device), skipped)


def _optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, lr: float,
              scaler: torch.amp.GradScaler | None) -> torch.Tensor | None:
    """Backward, gradients averaged over ranks, optimiser step at ``lr``. With ``scaler`` (fp16) returns
    a 0-dim bool device tensor, True when the scaler skipped the step; else None."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is None:
        loss.backward()
        dist.average_gradients(params)
        optimizer.step()
        return None
    scaler.scale(loss).backward()
    # Average BEFORE unscaling: unscale_ is where a scaler decides "found inf". Deciding on each
    # rank's own gradients and averaging after let one rank's inf reach ranks that had decided
    # to step (non-finite weights there, scales diverging). An inf anywhere now skips everywhere.
    dist.average_gradients(params)
    # the scale as a device tensor (GradScaler keeps it in _scale; get_scale() would read it to the
    # host): update() lowers it exactly when step() skipped, so a lower scale marks a skipped step
    # (a finite loss with inf gradients included), with no host-device sync
    scale_before = scaler._scale.clone() if scaler._scale is not None else None
    scaler.step(optimizer)  # unscale_, skip if non-finite, else step
    scaler.update()
    if scale_before is None or scaler._scale is None:
        return None
    return scaler._scale < scale_before


def _parts(loss: torch.Tensor, loss_con: torch.Tensor, loss_pbsd: torch.Tensor,
           skipped: torch.Tensor | None) -> dict[str, torch.Tensor]:
    parts = {"loss": loss.detach(), "loss_con": loss_con.detach(), "loss_pbsd": loss_pbsd.detach()}
    if skipped is not None:
        parts["scaler_skipped"] = skipped  # 0-dim bool on the device (fp16 only); not a loss
    return parts


class NonFiniteGuard:
    """Watches stage-1 losses for inf/NaN on the device; reads the verdict only at log steps.

    :meth:`update` queues three tiny device ops per step (no host-device sync); :meth:`check`, called
    at every log step (always including an epoch's last step, before its checkpoint is saved), reads
    the counters once, combined over ranks so that every rank stops together.

    Policy. Without a gradient scaler (fp32, bf16) a non-finite loss is an error: its step has already
    put NaN into the weights, so the run stops at the next check and ``checkpoints/last.pt`` keeps the
    last finished epoch. With fp16 (``tolerate=True``) an overflow is routine: the scaler skips that
    step and lowers its scale, so the run goes on, and stops only after ``max_streak`` skipped steps
    in a row (a diverged run, or a forward pass that overflows float16 whatever the scale). A skipped
    step is a non-finite loss or a finite loss whose gradients overflowed (the scaler's own skips,
    the usual fp16 case), so ``skipped_steps`` in metrics.jsonl counts every step the scaler skipped.
    """

    def __init__(self, device: torch.device, *, tolerate: bool, max_streak: int = 20) -> None:
        self.tolerate = tolerate
        self.max_streak = max_streak  # 20 halvings take the default scale from 65536 to 1/16
        self.count = torch.zeros((), dtype=torch.long, device=device)  # since the last check
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self.worst = torch.zeros((), dtype=torch.long, device=device)  # longest streak since the last check
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The counters since the last check (a mid-epoch checkpoint carries them over)."""
        return {"count": self.count.cpu(), "streak": self.streak.cpu(), "worst": self.worst.cpu(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("count", "streak", "worst"):
            getattr(self, name).copy_(state[name])
        self.steps = int(state["steps"])

    def update(self, loss: torch.Tensor, skipped: torch.Tensor | None = None) -> None:
        """Count a step whose loss is non-finite or (fp16) whose update the gradient scaler skipped."""
        bad = ~torch.isfinite(loss)
        if skipped is not None:
            bad = bad | skipped
        bad = bad.long()
        self.count += bad
        self.streak = (self.streak + 1) * bad
        torch.maximum(self.worst, self.streak, out=self.worst)
        self.steps += 1

    def check(self, step: int) -> int:
        """Raise FloatingPointError if the run must stop; else return the non-finite steps since the
        last check (the most of any rank). ``step`` (1-based, global) is only for the message."""
        counts = dist.all_reduce_max(torch.stack([self.count, self.worst]))
        n, worst = (int(v) for v in counts.tolist())
        window, self.steps = self.steps, 0
        self.count.zero_()
        self.worst.copy_(self.streak)
        if n and not self.tolerate:
            raise DivergedError(
                f"stage-1 loss became inf/NaN ({n} of the {window} steps up to step {step}); the weights are "
                f"no longer finite, so nothing is saved and checkpoints/last.pt keeps the last finished epoch. "
                f"Lower optim.base_lr (or use optim.amp=none after a bf16 run) and continue with --resume"
            )
        if worst >= self.max_streak:
            raise DivergedError(
                f"fp16 stage-1 steps were skipped for {worst} steps in a row (inf/NaN loss or gradients, up to step "
                f"{step}): the gradient scaler skips such steps, but this many means the run diverged or float16 "
                f"overflows in the "
                f"forward pass. Use optim.amp=bf16 (Ampere or newer) or optim.amp=none, or lower "
                f"optim.base_lr, and continue from checkpoints/last.pt with --resume"
            )
        return n


def _check_world(state: Stage1State, steps_per_epoch: int) -> None:
    """Refuse a checkpoint whose steps per epoch differ (the schedule would jump); say what a resume with
    another world size keeps exact and what not (:func:`_restore_rng`)."""
    world = dist.world_size()
    saved_world = state.facts.world_size or len(state.rng)
    saved_steps = state.facts.steps_per_epoch
    if saved_steps is not None and saved_steps != steps_per_epoch:
        raise CheckpointError(
            f"the checkpoint was saved at {saved_steps} steps per epoch but this run has {steps_per_epoch} "
            f"(optim.batch_size or the training set changed), so the learning-rate schedule would jump; "
            f"resume with the original global batch and data"
        )
    if saved_world != world:
        say(f"resuming a {saved_world}-process run with {world} process(es): model, optimiser, queue and "
            f"schedule continue exactly (same global batch, {steps_per_epoch} steps per epoch); the "
            f"augmentations and the split of each global batch over processes differ, so the result is not "
            f"bit-identical to an uninterrupted run")


def _restore_rng(state: Stage1State, seed: int, epoch: int) -> None:
    """Continue every rank's random streams from a stage-1 checkpoint, whatever world size saved it.

    Same world size: each rank restores its own state, and the resume is bit-exact (on a GPU only
    with ``optim.deterministic``). Another world size: ranks that existed restore theirs, new ranks
    get :func:`~dscl.rng.derived_seed`. The model, optimiser, scaler, queue and schedule
    position are exact, and each global step still trains on the same images (the sampler shuffles
    the same global order; the global batch and steps per epoch do not depend on the world size), but
    the split of a global batch over ranks (so shuffle-BN groups and BatchNorm batch statistics), the
    augmentations and the order of the keys a step adds to the queue differ: the run is not bit-identical
    to an uninterrupted one.
    """
    rank = dist.rank()
    if rank < len(state.rng):
        set_rng_state(state.rng[rank])
    else:
        seed_everything(derived_seed(seed, rank, epoch))


def patches_channels_last(patches: torch.Tensor) -> torch.Tensor:
    """The same (B, L, 3, h, w) patches stored L-major and channels-last, so that the student's
    ``patches.transpose(0, 1).reshape(L * B, 3, h, w)`` is a channels-last view: no copy there, and no
    layout conversion in the first convolution of a channels-last model."""
    return patches.permute(1, 0, 3, 4, 2).contiguous().permute(1, 0, 4, 2, 3)


_VIEW_STREAM = 0x5643  # tags the batched views' seeds apart from every other stream of a run


def _view_seed(seed: int, rank: int, epoch: int | None = None) -> int:
    """Seed of rank ``rank``'s batched-view generator: at the start (``epoch`` None), or for a rank a
    resumed run has no saved state for (a resume with more processes)."""
    return derived_seed(seed, rank, epoch, stream=_VIEW_STREAM)


def _training_views(
    cfg: Config, splits: DatasetSplits, views: ViewConfig, device: torch.device, spec: BackboneSpec
) -> tuple[LTDataset, BatchedDSCLTransform | None]:
    """The training set with its DataLoader-side transform, and the batched on-device transform; both
    normalise with the backbone spec's mean / std (the dataset's, or the pretrained weights').

    ``views.augment_on`` (see :func:`dscl.data.batched_views.augment_on_device`): per sample in the
    loader (returns ``(set with DSCLTransform, None)``), or batched on ``device``: the loader delivers
    uint8 canvases and the returned :class:`BatchedDSCLTransform` (its generator seeded per rank)
    makes the views.
    """
    mean, std = _normalisation(spec)
    if not augment_on_device(views.augment_on, device, cfg.data.image_size):
        return splits.train.with_transform(DSCLTransform(cfg.data.image_size, views, mean, std)), None
    generator = torch.Generator(device=device)
    generator.manual_seed(_view_seed(cfg.optim.seed, dist.rank()))
    augment = BatchedDSCLTransform(cfg.data.image_size, views, mean, std, device=device,
                                   generator=generator)
    canvas = CanvasTransform(working_size(cfg.data.image_size, views, splits.train.in_memory))
    return splits.train.with_transform(canvas), augment


def _normalisation(spec: BackboneSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if spec.mean is None or spec.std is None:
        raise ValueError(f"backbone spec {spec.qualified_name} has no input settings (dscl.model.backbone_spec)")
    return spec.mean, spec.std


class EpochSampler(DistributedSampler):
    """:class:`DistributedSampler` that can start an epoch part-way: :attr:`skip` of this rank's samples
    of the epoch's order are left out (a mid-epoch resume), the rest come in the same order."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def _batches(loader: Iterable, device: torch.device, channels_last: bool,
             augment: BatchedDSCLTransform | None = None) -> Iterator[Batch]:
    for views, labels in loader:
        if augment is not None:
            views = augment(views)  # Canvas (uint8) -> DSCLViews, made on the device
        patches = to_device(views.patches, device)
        yield Batch(
            query=to_device(views.query, device, channels_last),
            key=to_device(views.key, device, channels_last),
            patches=patches_channels_last(patches) if channels_last else patches,
            boxes=to_device(views.boxes, device),
            labels=labels.to(device, non_blocking=True),
        )


@dataclass
class Stage1:
    """Everything a stage-1 run works with, set up once (:func:`setup_stage1`)."""

    cfg: Config
    out: Path
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype (None: fp32)
    splits: DatasetSplits
    spec: BackboneSpec  # the backbone's spec (stored in every checkpoint)
    train: LTDataset  # the training set with its loader-side transform
    augment: BatchedDSCLTransform | None  # the batched on-device views, or None (views made in the loader)
    sampler: EpochSampler
    loader: DataLoader
    steps_per_epoch: int
    model: DSCLModel
    ce_head: nn.Module | None  # the CE baseline's classifier (loss.loss=ce), else None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    base_lr: float  # optim.base_lr x global batch / 256
    base: dict[str, Any] | None = None  # the frozen base of a partial fine-tune (dscl.model.base_record)

    @functools.cached_property
    def train_fingerprint(self) -> str:
        return self.splits.train.fingerprint()

    @property
    def total_steps(self) -> int:
        return self.cfg.optim.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        # a run shorter than the preset's warm-up (e.g. optim.epochs=2) warms up over the whole run
        return min(round(self.cfg.optim.warmup_epochs * self.steps_per_epoch), self.total_steps)

    def lr(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.base_lr)

    def step(self, batch: Batch, lr: float) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if self.ce_head is not None:
            return ce_step(self.model, self.ce_head, batch, self.optimizer, lr=lr, scaler=self.scaler,
                           dtype=self.dtype)
        return pretrain_step(self.model, batch, self.optimizer, lr=lr, m=cfg.model.momentum, loss_cfg=cfg.loss,
                             scaler=self.scaler, dtype=self.dtype, num_classes=self.splits.num_classes)


def _training_data(cfg: Config, dev: torch.device, progress: bool, splits: DatasetSplits, spec: BackboneSpec,
                   ) -> tuple[LTDataset, BatchedDSCLTransform | None, EpochSampler, DataLoader]:
    """The training set (files checked) with its views, its sampler and loader."""
    check_files_before_training(splits, enabled=cfg.data.check_files, progress=progress)  # issue #12: fail in seconds
    world, rank = dist.world_size(), dist.rank()
    if cfg.optim.batch_size % world:
        raise ConfigError(f"optim.batch_size {cfg.optim.batch_size} must be divisible by the {world} processes")
    # without PBSD no patch is cut, augmented or transferred (the data side of "no patch work")
    views = cfg.views if uses_pbsd(cfg) else dataclasses.replace(cfg.views, num_patches=0)
    train, augment = _training_views(cfg, splits, views, dev, spec)
    if len(train) < cfg.optim.batch_size:
        raise ConfigError(
            f"the training set has {len(train)} images, fewer than optim.batch_size "
            f"{cfg.optim.batch_size}; lower the batch size"
        )
    sampler = EpochSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.optim.seed, drop_last=True)
    workers = num_workers(cfg.data.num_workers)
    if augment is not None and train.in_memory and cfg.data.num_workers < 0:
        workers = 0  # the loader only copies uint8 arrays out of memory: a worker process costs more than that
    loader = make_loader(train, cfg.optim.batch_size // world, sampler=sampler, workers=workers, device=dev,
                         drop_last=True)
    return train, augment, sampler, loader


def setup_stage1(cfg: Config, out: Path, dev: torch.device, dtype: torch.dtype | None, *, progress: bool,
                 splits: DatasetSplits | None = None) -> Stage1:
    """Data, model (identical on every rank), optimiser and scaler of a stage-1 run; writes nothing.
    ``dtype``: the autocast dtype (:func:`dscl.runtime.amp_dtype`); ``splits``: built here if None."""
    seed_everything(cfg.optim.seed)  # same on every rank: identical initial weights
    if splits is None:
        splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    # the input settings come from the pretrained weights' configuration when they have one
    spec = backbone_spec(cfg, splits.mean, splits.std, pretrained=cfg.model.pretrained)
    train, augment, sampler, loader = _training_data(cfg, dev, progress, splits, spec)
    model = build_model(cfg, splits.num_classes, spec=spec)  # model.queue_init=random draws from the seeded RNG
    ce_head = nn.Linear(model.online.backbone.num_features, splits.num_classes) if cfg.loss.loss == "ce" else None
    model.to(dev)
    if ce_head is not None:
        ce_head.to(dev)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    dist.broadcast_module(model)
    optimizer = torch.optim.SGD(param_groups(cfg, model.online, ce_head), lr=0.0, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    base_lr = cfg.optim.base_lr * cfg.optim.batch_size / 256  # linear scaling by the global batch
    return Stage1(cfg, out, dev, dtype, splits, spec, train, augment, sampler, loader, len(loader), model, ce_head,
                  optimizer, scaler, base_lr, base_record(cfg, model.online))


def param_groups(cfg: Config, online: Encoder, ce_head: nn.Module | None) -> list[Any]:
    """What the optimiser trains: the online encoder's trainable tensors (all of them for ``full``, the
    adapters / last blocks otherwise) and the CE head. One plain list when every tensor learns at the same
    rate (the paper); otherwise groups carrying an ``lr_scale`` (``optim.backbone_lr`` x the layer-wise decay
    of ``optim.layer_decay``, :func:`dscl.adapters.lr_scales`), the head at scale 1."""
    head = list(ce_head.parameters()) if ce_head is not None else []
    trained = [(n, p) for n, p in online.named_parameters() if p.requires_grad]
    if cfg.optim.backbone_lr == 1.0 and cfg.optim.layer_decay == 1.0:
        return [p for _, p in trained] + head
    names = [n[len("backbone."):] for n, _ in trained if n.startswith("backbone.")]
    scales = lr_scales(online.backbone, names, backbone_lr=cfg.optim.backbone_lr, layer_decay=cfg.optim.layer_decay)
    groups: dict[float, list[nn.Parameter]] = {}
    for n, p in trained:
        groups.setdefault(scales.get(n[len("backbone."):], 1.0) if n.startswith("backbone.") else 1.0, []).append(p)
    if head:
        groups.setdefault(1.0, []).extend(head)
    return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]


def restore_stage1(run: Stage1, state: Stage1State) -> None:
    """Continue ``run`` from a checkpoint: weights, optimiser, scaler and queue (the random streams:
    :func:`restore_streams`)."""
    check_compatible(state, run.cfg, run.splits.num_classes, run.out / STAGE1_FILE)
    check_same_inputs(state.spec, run.spec, run.out / STAGE1_FILE)
    _check_world(state, run.steps_per_epoch)
    load_trained(run.model, state.model, stored=state.base, built=run.base, where=run.out / STAGE1_FILE)
    if run.ce_head is not None and state.ce_head is not None:
        run.ce_head.load_state_dict(state.ce_head)
    if state.optimizer is not None:
        run.optimizer.load_state_dict(state.optimizer)
    if run.scaler is not None and state.scaler:
        run.scaler.load_state_dict(state.scaler)


def restore_streams(run: Stage1, state: Stage1State) -> None:
    """Every random stream of the checkpoint (global RNGs of each rank, the batched views' generator).
    A mid-epoch resume calls it after the epoch's data iterator exists (making one draws a seed)."""
    cfg, rank = run.cfg, dist.rank()
    _restore_rng(state, cfg.optim.seed, state.epoch)
    generator = run.augment.generator if run.augment is not None else None
    if generator is not None:  # the batched views' own stream
        saved = state.view_rng or []
        # a state of another generator kind (a CPU run resumed on a GPU) cannot be restored
        if rank < len(saved) and saved[rank].numel() == generator.get_state().numel():
            generator.set_state(saved[rank])
        else:
            generator.manual_seed(_view_seed(cfg.optim.seed, rank, state.epoch))


def stage1_state(run: Stage1, epoch: int, wall: float, position: int = 0,
                 extra: dict[str, Any] | None = None) -> Stage1State:
    """The checkpoint after ``epoch`` epochs and ``position`` steps of the next one (call on every rank:
    the RNG states are gathered). ``extra``: the mid-epoch entries (epoch_log, guard, threads)."""
    cfg, splits, augment = run.cfg, run.splits, run.augment
    rngs = cast(list[dict[str, Any]], dist.gather_objects(rng_state()))
    view_rngs = (cast(list[torch.Tensor], dist.gather_objects(augment.generator.get_state()))
                 if augment is not None and augment.generator is not None else None)
    facts = RunFacts(
        method=method_name(cfg), backbone=run.spec.qualified_name, num_classes=splits.num_classes, dim=cfg.model.dim,
        precision={"none": "fp32"}.get(cfg.optim.amp, cfg.optim.amp), device=str(run.device),
        torch_version=str(torch.__version__), global_batch=cfg.optim.batch_size, world_size=dist.world_size(),
        lr=run.base_lr, steps_per_epoch=run.steps_per_epoch,  # with world_size: checked when resuming elsewhere
        train_fingerprint=run.train_fingerprint)
    return Stage1State(
        epoch=epoch, epochs=cfg.optim.epochs, finished=epoch == cfg.optim.epochs and position == 0,
        wall_seconds=wall, facts=facts, position=position, config=cfg.to_dict(), spec=run.spec,
        # what dscl.inference.load_run needs without the dataset (a run copied elsewhere)
        data=DataMeta.of(splits.class_names, splits.train_counts, splits.mean, splits.std),
        model=trained_state(run.model), base=run.base,
        ce_head=run.ce_head.state_dict() if run.ce_head is not None else None,
        optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict() if run.scaler else None,
        rng=rngs, view_rng=view_rngs, **(extra or {}))


class _EpochLog:
    """Stage-1 logging of one epoch: a metrics line and the progress bar every ``optim.log_every``
    steps (and at the epoch's last), the epoch's mean losses at its end."""

    def __init__(self, run: Stage1, epoch: int, progress: bool, start: int = 0,
                 saved: dict[str, Any] | None = None) -> None:
        self.run, self.epoch = run, epoch
        self.log = MetricsLog(run.out / "metrics.jsonl")
        self.bar = tqdm(total=run.steps_per_epoch, initial=start, desc=f"pretrain {epoch + 1}/{run.cfg.optim.epochs}",
                        unit="step", disable=not (progress and dist.is_main()), leave=False, dynamic_ncols=True)
        self.t_log, self.seen = time.perf_counter(), 0
        self.sums, self.n = {"loss": 0.0, "loss_con": 0.0, "loss_pbsd": 0.0}, 0
        if saved is not None:  # a mid-epoch resume continues the epoch's means
            self.sums, self.n = dict(saved["sums"]), int(saved["n"])

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "n": self.n}

    def step(self, images: int) -> None:
        self.seen += images
        self.bar.update(1)

    def write(self, step: int, lr: float, parts: dict[str, torch.Tensor], skipped: int) -> None:
        run = self.run
        values = {k: float(v) for k, v in parts.items() if k != "scaler_skipped"}
        now = time.perf_counter()
        ips = self.seen / max(now - self.t_log, 1e-9)
        self.log.write(stage="pretrain", epoch=self.epoch + 1, step=step + 1, lr=lr, momentum=run.cfg.model.momentum,
                       img_per_s=round(ips, 1), queue_fill=len(run.model.queue), threads=torch.get_num_threads(),
                       queue_rejected=int(run.model.queue.rejected),  # non-finite keys kept out, since the start
                       **values, **({"skipped_steps": skipped} if run.scaler is not None else {}))
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{ips:.0f}")
        self.t_log, self.seen = now, 0
        for k in self.sums:
            self.sums[k] += values[k]
        self.n += 1

    def close(self) -> dict[str, float]:
        self.bar.close()
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}


class Checkpointing:
    """When stage 1 saves inside an epoch: on SIGTERM / SIGUSR1 (:class:`~dscl.runtime.StopSignals`, then
    it stops) and every ``optim.checkpoint_every_minutes``. Single process: decided after every step.
    Under torchrun: at log steps only, combined over ranks (one tiny all-reduce), so every rank saves
    and stops after the same step whichever rank received the signal or saw the time pass."""

    def __init__(self, device: torch.device, every_minutes: float, signals: StopSignals | None = None) -> None:
        self.device, self.every, self.signals = device, every_minutes * 60.0, signals
        self.last = time.monotonic()

    def decide(self, log_step: bool) -> tuple[bool, bool]:
        """``(save, stop)`` after the current step."""
        if dist.is_dist() and not log_step:
            return False, False
        stop = self.signals is not None and self.signals.requested is not None
        save = stop or (self.every > 0 and time.monotonic() - self.last >= self.every)
        if dist.is_dist():
            flags = dist.all_reduce_max(torch.tensor([int(save), int(stop)], device=self.device))
            save, stop = (bool(v) for v in flags.tolist())
        return save, stop

    def saved(self) -> None:
        self.last = time.monotonic()


@dataclass
class _Resume:
    """A mid-epoch checkpoint's state, applied when its epoch starts again."""

    state: Stage1State

    def apply(self, run: Stage1, guard: NonFiniteGuard, adapter: ThreadAdapter | None) -> None:
        restore_streams(run, self.state)
        if self.state.guard is not None:
            guard.load_state_dict(self.state.guard)
        if adapter is not None and self.state.threads is not None:  # the adapter's choice continues
            adapter.threads = self.state.threads
            adapter.apply(self.state.threads)


def train_epoch(run: Stage1, epoch: int, guard: NonFiniteGuard, adapter: ThreadAdapter | None, *,
                progress: bool, resume: _Resume | None = None, checkpointing: Checkpointing | None = None,
                save: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, float] | None:
    """One epoch of stage 1 (``adapter``: the thread adapter, ticked every step); returns its mean
    logged losses, or None when it stopped part-way on a signal after ``save(position, extra)`` saved
    a mid-epoch checkpoint. ``resume``: continue a mid-epoch checkpoint of this epoch."""
    cfg, world = run.cfg, dist.world_size()
    start = resume.state.position if resume is not None else 0
    run.sampler.set_epoch(epoch)
    run.sampler.skip = start * (cfg.optim.batch_size // world)
    run.model.train()
    log = _EpochLog(run, epoch, progress, start, resume.state.epoch_log if resume is not None else None)
    data = iter(run.loader)  # before the streams are restored: making the iterator draws a seed
    if resume is not None:
        resume.apply(run, guard, adapter)
    for it, batch in enumerate(_batches(data, run.device, cfg.model.channels_last, run.augment), start=start):
        step = epoch * run.steps_per_epoch + it
        lr = run.lr(step)
        parts = run.step(batch, lr)
        guard.update(parts["loss"], parts.get("scaler_skipped"))
        if adapter is not None:
            adapter.tick()
        log.step(batch.query.shape[0] * world)
        log_step = (it + 1) % cfg.optim.log_every == 0 or it + 1 == run.steps_per_epoch
        if log_step:
            skipped = guard.check(step + 1)  # raises (on every rank) before a bad epoch is saved
            log.write(step, lr, parts, skipped)
        if checkpointing is None or save is None or it + 1 == run.steps_per_epoch:
            continue  # the epoch's end saves anyway
        save_now, stop = checkpointing.decide(log_step)
        if save_now:
            save(it + 1, {"epoch_log": log.state_dict(), "guard": guard.state_dict(),
                          "threads": torch.get_num_threads() if adapter is not None else None})
            checkpointing.saved()
        if stop:
            log.close()
            return None
    run.sampler.skip = 0
    return log.close()


def pretrain(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
    max_epochs: int | None = None,
    splits: DatasetSplits | None = None,
) -> Path:
    """Stage 1 into run directory ``out``; returns the path of ``checkpoints/last.pt``.

    ``resume``: continue ``out`` from its checkpoint (the CLI's ``--resume auto`` passes whether ``out``
    holds one, :func:`dscl.run.has_stage1`). ``max_epochs`` stops after that many
    epochs of *this call* (used to test exact resume); the schedule still spans ``cfg.optim.epochs``.
    ``splits``: the datasets of ``cfg.data`` if already built (``dscl run`` builds them once for all
    stages). SIGTERM / SIGUSR1 finish the current step, save a mid-epoch checkpoint and raise
    :class:`~dscl.runtime.Preempted`; ``--resume`` continues it exactly.
    """
    dev = dist.init(device)
    require_trackers(cfg)  # a tracker asked for but not installed: stop now, not at the first log line
    dtype = amp_dtype(cfg.optim.amp, dev)  # refuses a precision this device cannot run, before any work
    configure_backends(dev, deterministic=cfg.optim.deterministic)  # before the first CUDA kernel
    # Refuse a bad --out at once, but create nothing until the data and the model are known to be
    # usable, so a failed start never leaves a directory that blocks the corrected retry.
    out = prepare_run_dir(out, resume=resume, overwrite=overwrite, check_only=True)
    run = setup_stage1(cfg, out, dev, dtype, progress=progress, splits=splits)
    prepare_run_dir(out, resume=resume, overwrite=overwrite)
    start_epoch, wall_before, mid = 0, 0.0, None
    if resume:
        state = load_stage1(out)
        restore_stage1(run, state)
        start_epoch, wall_before = state.epoch, state.wall_seconds
        mid = _Resume(state) if state.position else None
        if mid is None:  # a mid-epoch state restores its streams once the epoch's iterator exists
            restore_streams(run, state)
        record_resume(out, cfg, epochs_done=start_epoch)  # refuses changes that alter stage 1; logs the rest
        if start_epoch >= cfg.optim.epochs:
            return _already_finished(run, state)
        where = f"step {state.position + 1}/{run.steps_per_epoch} of " if state.position else ""
        say(f"resuming {out} at {where}epoch {start_epoch + 1}/{cfg.optim.epochs}")
    else:
        if dist.is_main():
            dump_config(cfg, out / "config.yaml")
        torch.manual_seed(cfg.optim.seed + 1000 * dist.rank())  # different augmentation stream per rank
    _announce(run)
    with StopSignals(what=f"in {out}") as signals:
        return _train(run, start_epoch, wall_before, mid, max_epochs, signals, progress=progress)


def _train(run: Stage1, start_epoch: int, wall_before: float, mid: _Resume | None, max_epochs: int | None,
           signals: StopSignals, *, progress: bool) -> Path:
    """The epochs of stage 1 from ``start_epoch`` (part-way into it for ``mid``), each saved at its end."""
    cfg, out = run.cfg, run.out
    end_epoch = cfg.optim.epochs if max_epochs is None else min(cfg.optim.epochs, start_epoch + max_epochs)
    t_start = time.perf_counter()
    guard = NonFiniteGuard(run.device, tolerate=run.scaler is not None)
    # fewer compute threads while other jobs use these CPUs (dscl.threads; off for GPUs / deterministic)
    adapter = thread_adapter(run.device, deterministic=cfg.optim.deterministic)
    checkpointing = Checkpointing(run.device, cfg.optim.checkpoint_every_minutes, signals)
    for epoch in range(start_epoch, end_epoch):

        def save_mid(position: int, extra: dict[str, Any], epoch: int = epoch) -> None:
            state = stage1_state(run, epoch, wall_before + time.perf_counter() - t_start, position, extra)
            if dist.is_main():
                save_stage1(out, state)
            dist.barrier()

        means = train_epoch(run, epoch, guard, adapter, progress=progress, resume=mid,
                            checkpointing=checkpointing, save=save_mid)
        mid = None
        if means is None:
            raise Preempted(f"stage 1 of {out} stopped on {signals.requested} inside epoch {epoch + 1} after saving "
                            f"{out / STAGE1_FILE}")
        wall = wall_before + time.perf_counter() - t_start
        state = stage1_state(run, epoch + 1, wall)
        if dist.is_main():
            save_stage1(out, state)
            MetricsLog(out / "metrics.jsonl").write(stage="pretrain_epoch", epoch=epoch + 1,
                                                    wall_seconds=round(wall, 2), **means)
            # mean epoch time of this call (so far) x epochs left; 0:00 at the last epoch
            eta = (time.perf_counter() - t_start) / (epoch + 1 - start_epoch) * (cfg.optim.epochs - epoch - 1)
            tqdm.write(f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {means['loss']:.4f}  "
                       f"(con {means['loss_con']:.4f}, pbsd {means['loss_pbsd']:.4f})  {wall:.0f}s  "
                       f"ETA stage 1 {format_duration(eta)}")
        checkpointing.saved()
        dist.barrier()
        stop = checkpointing.decide(log_step=True)[1]  # a signal in the epoch's last step (any rank)
        if stop and epoch + 1 < cfg.optim.epochs:
            raise Preempted(f"stage 1 of {out} stopped on {signals.requested} after epoch {epoch + 1}, saved in "
                            f"{out / STAGE1_FILE}")
    return out / STAGE1_FILE


def _already_finished(run: Stage1, state: Stage1State) -> Path:
    """A resume of a stage 1 that has trained ``optim.epochs`` epochs: mark it finished, train nothing."""
    epochs = run.cfg.optim.epochs
    if not state.finished and dist.is_main():  # optim.epochs lowered to the epochs done
        save_stage1(run.out, dataclasses.replace(state, epochs=epochs, finished=True))
    dist.barrier()
    say(f"stage 1 of {run.out} is already finished ({state.epoch}/{epochs} epochs)")
    return run.out / STAGE1_FILE


def _announce(run: Stage1) -> None:
    cfg, splits = run.cfg, run.splits
    if dist.is_main():
        say(
            f"stage 1: {method_name(cfg)} on {splits.name} ({len(run.train)} train images, "
            f"{splits.num_classes} classes), backbone {run.spec.qualified_name}, {cfg.optim.epochs} epochs x "
            f"{run.steps_per_epoch} steps, global batch {cfg.optim.batch_size} on {dist.world_size()} process(es), "
            f"lr {run.base_lr:g}, device {run.device}"
        )
        if run.spec.family != "builtin" or run.spec.input_source == "pretrained":
            say(f"inputs of {run.spec.qualified_name}: {run.spec.describe_inputs()}")
