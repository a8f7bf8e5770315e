"""Stage 1: DSCL (+ PBSD) representation learning — one step and the epoch loop.

The functions here take objects (configs, models, datasets, paths), never argv; ``cli.py`` is the
only caller that parses arguments or picks exit codes. The pretrain step spells the algorithm out
in the order of METHOD.md A.9: momentum update, forward of both encoders and the patches, losses,
weighted sum, backward, optimiser step, enqueue of the gathered keys and labels.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dscl import dist
from dscl.checkpoint import (
    CheckpointError,
    derived_seed,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from dscl.config import Config, LossConfig, ViewConfig, dump_config, method_name, uses_pbsd
from dscl.data import DatasetSplits, DSCLTransform, LTDataset, build_datasets, check_files_before_training
from dscl.data.batched_views import BatchedDSCLTransform, CanvasTransform, augment_on_device, working_size
from dscl.losses import dscl_loss, pbsd_loss, supcon_loss
from dscl.model import DSCLModel, build_model, momentum_update
from dscl.report import format_duration
from dscl.rundir import MetricsLog, check_compatible, prepare_run_dir, record_resume
from dscl.runtime import (
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
    ce_head: nn.Module | None = None,
    num_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """One stage-1 iteration (METHOD.md A.9 with our deliberate differences). Returns detached losses.

    ``loss_cfg.loss`` picks the contrastive term: ``dscl`` (Eq. 9 of the paper), ``scl`` (the paper's
    SupCon baseline over the same queue), or ``ce`` (cross-entropy through ``ce_head``; no momentum
    encoder or queue). PBSD is added with weight ``loss_cfg.pbsd_weight`` when patches are given.

    The step never reads a value back from the device, so a GPU is never stalled by the host
    (fp16's ``GradScaler.step`` keeps its own one read of the overflow flag). Hence it does not check
    the loss: a non-finite loss is the caller's to detect (:class:`NonFiniteGuard`, at log steps).
    With ``scaler`` (fp16) the gradients of all ranks are averaged while still scaled and then
    unscaled, so every rank's scaler sees the same gradients, takes the same skip/step decision and
    keeps the same scale. ``num_classes`` (the dataset's class count) lets the contrastive losses
    skip ``torch.unique`` over the labels, which would wait for the GPU once per step.
    """
    device = batch.query.device
    for group in optimizer.param_groups:
        group["lr"] = lr
    image_size = (batch.query.shape[-2], batch.query.shape[-1])
    use_pbsd = loss_cfg.loss != "ce" and loss_cfg.pbsd_weight > 0 and batch.patches.shape[1] > 0
    zero = torch.zeros((), device=device)
    if loss_cfg.loss == "ce":
        if ce_head is None:
            raise ValueError("loss ce needs a ce_head (a linear classifier on the backbone features)")
        with autocast(device, dtype):
            logits = ce_head(model.online.features(batch.query))
        loss_con = F.cross_entropy(logits.float(), batch.labels)
        loss_pbsd, keys = zero, None
    else:
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
                     if use_pbsd else zero)
    loss = loss_con + loss_cfg.pbsd_weight * loss_pbsd
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    skipped = None
    if scaler is not None:
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
        if scale_before is not None and scaler._scale is not None:
            skipped = scaler._scale < scale_before
    else:
        loss.backward()
        dist.average_gradients(params)
        optimizer.step()
    if keys is not None:
        # every rank holds the same per-rank batch in stage 1, so the gathers need no size exchange
        model.queue.enqueue(dist.all_gather_cat(keys.float(), equal_sizes=True),
                            dist.all_gather_cat(batch.labels, equal_sizes=True))
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
            raise FloatingPointError(
                f"stage-1 loss became inf/NaN ({n} of the {window} steps up to step {step}); the weights are "
                f"no longer finite, so nothing is saved and checkpoints/last.pt keeps the last finished epoch. "
                f"Lower optim.base_lr (or use optim.amp=none after a bf16 run) and continue with --resume"
            )
        if worst >= self.max_streak:
            raise FloatingPointError(
                f"fp16 stage-1 steps were skipped for {worst} steps in a row (inf/NaN loss or gradients, up to step "
                f"{step}): the gradient scaler skips such steps, but this many means the run diverged or float16 "
                f"overflows in the "
                f"forward pass. Use optim.amp=bf16 (Ampere or newer) or optim.amp=none, or lower "
                f"optim.base_lr, and continue from checkpoints/last.pt with --resume"
            )
        return n


def _restore_rng(state: dict, seed: int, epoch: int, steps_per_epoch: int) -> None:
    """Continue every rank's random streams from a stage-1 checkpoint, whatever world size saved it.

    Same world size: each rank restores its own state, and the resume is bit-exact (on a GPU only
    with ``optim.deterministic``). Another world size: ranks that existed restore theirs, new ranks
    get :func:`~dscl.checkpoint.derived_seed`. The model, optimiser, scaler, queue and schedule
    position are exact, and each global step still trains on the same images (the sampler shuffles
    the same global order; the global batch and steps per epoch do not depend on the world size), but
    the split of a global batch over ranks (so shuffle-BN groups and BatchNorm batch statistics), the
    augmentations and the order of the keys a step adds to the queue differ: the run is not bit-identical
    to an uninterrupted one. Refuses a checkpoint whose steps per epoch differ (the schedule would jump).
    """
    world, rank = dist.world_size(), dist.rank()
    rngs = state["rng"]
    saved_world = state.get("world_size", len(rngs))
    saved_steps = state.get("steps_per_epoch")
    if saved_steps is not None and saved_steps != steps_per_epoch:
        raise CheckpointError(
            f"the checkpoint was saved at {saved_steps} steps per epoch but this run has {steps_per_epoch} "
            f"(optim.batch_size or the training set changed), so the learning-rate schedule would jump; "
            f"resume with the original global batch and data"
        )
    if rank < len(rngs):
        set_rng_state(rngs[rank])
    else:
        seed_everything(derived_seed(seed, rank, epoch))
    if saved_world != world:
        say(f"resuming a {saved_world}-process run with {world} process(es): model, optimiser, queue and "
            f"schedule continue exactly (same global batch, {steps_per_epoch} steps per epoch); the "
            f"augmentations and the split of each global batch over processes differ, so the result is not "
            f"bit-identical to an uninterrupted run")


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
    cfg: Config, splits: DatasetSplits, views: ViewConfig, device: torch.device
) -> tuple[LTDataset, BatchedDSCLTransform | None]:
    """The training set with its DataLoader-side transform, and the batched on-device transform.

    ``views.augment_on`` (see :func:`dscl.data.batched_views.augment_on_device`): per sample in the
    loader (returns ``(set with DSCLTransform, None)``), or batched on ``device``: the loader delivers
    uint8 canvases and the returned :class:`BatchedDSCLTransform` (its generator seeded per rank)
    makes the views.
    """
    if not augment_on_device(views.augment_on, device, cfg.data.image_size):
        return splits.train.with_transform(DSCLTransform(cfg.data.image_size, views, splits.mean, splits.std)), None
    generator = torch.Generator(device=device)
    generator.manual_seed(_view_seed(cfg.optim.seed, dist.rank()))
    augment = BatchedDSCLTransform(cfg.data.image_size, views, splits.mean, splits.std, device=device,
                                   generator=generator)
    canvas = CanvasTransform(working_size(cfg.data.image_size, views, splits.train.in_memory))
    return splits.train.with_transform(canvas), augment


def _batches(loader: DataLoader, device: torch.device, channels_last: bool,
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


def pretrain(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
    max_epochs: int | None = None,
) -> Path:
    """Stage 1 into run directory ``out``; returns the path of ``checkpoints/last.pt``.

    ``max_epochs`` stops after that many epochs of *this call* (used to test exact resume); the
    schedule still spans ``cfg.optim.epochs``.
    """
    dev = dist.init(device)
    dtype = amp_dtype(cfg.optim.amp, dev)  # refuses a precision this device cannot run, before any work
    configure_backends(dev, deterministic=cfg.optim.deterministic)  # before the first CUDA kernel
    # Refuse a bad --out at once, but create nothing until the data and the model are known to be
    # usable, so a failed start never leaves a directory that blocks the corrected retry.
    out = prepare_run_dir(out, resume=resume, overwrite=overwrite, check_only=True)
    seed_everything(cfg.optim.seed)  # same on every rank: identical initial weights
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    check_files_before_training(splits, enabled=cfg.data.check_files, progress=progress)  # issue #12: fail in seconds
    world, rank = dist.world_size(), dist.rank()
    if cfg.optim.batch_size % world:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} must be divisible by the {world} processes")
    per_rank = cfg.optim.batch_size // world
    # without PBSD no patch is cut, augmented or transferred (the data side of "no patch work")
    views = cfg.views if uses_pbsd(cfg) else dataclasses.replace(cfg.views, num_patches=0)
    train, augment = _training_views(cfg, splits, views, dev)
    if len(train) < cfg.optim.batch_size:
        raise ValueError(
            f"the training set has {len(train)} images, fewer than optim.batch_size "
            f"{cfg.optim.batch_size}; lower the batch size"
        )
    sampler: DistributedSampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.optim.seed, drop_last=True)
    workers = num_workers(cfg.data.num_workers)
    if augment is not None and train.in_memory and cfg.data.num_workers < 0:
        workers = 0  # the loader only copies uint8 arrays out of memory: a worker process costs more than that
    loader = make_loader(train, per_rank, sampler=sampler, workers=workers, device=dev, drop_last=True)
    steps_per_epoch = len(loader)
    total_steps = cfg.optim.epochs * steps_per_epoch
    # a run shorter than the preset's warm-up (e.g. optim.epochs=2) warms up over the whole run
    warmup_steps = min(round(cfg.optim.warmup_epochs * steps_per_epoch), total_steps)
    base_lr = cfg.optim.base_lr * cfg.optim.batch_size / 256  # linear scaling by the global batch

    model = build_model(cfg, splits.num_classes)  # model.queue_init=random draws from the seeded RNG
    ce_head = nn.Linear(model.online.backbone.num_features, splits.num_classes) if cfg.loss.loss == "ce" else None
    model.to(dev)
    if ce_head is not None:
        ce_head.to(dev)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    dist.broadcast_module(model)
    params = list(model.online.parameters()) + (list(ce_head.parameters()) if ce_head is not None else [])
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    prepare_run_dir(out, resume=resume, overwrite=overwrite)
    ckpt_path = out / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt_path) if resume else None
    if state is None and dist.is_main():
        dump_config(cfg, out / "config.yaml")
    log = MetricsLog(out / "metrics.jsonl")
    start_epoch, wall_before = 0, 0.0
    if state is not None:
        check_compatible(state, cfg, splits.num_classes, ckpt_path)
        model.load_state_dict(state["model"])
        if ce_head is not None:
            ce_head.load_state_dict(state["ce_head"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, wall_before = state["epoch"], state.get("wall_seconds", 0.0)
        record_resume(out, cfg, epochs_done=start_epoch)  # refuses changes that alter stage 1; logs the rest
        _restore_rng(state, cfg.optim.seed, start_epoch, steps_per_epoch)
        if augment is not None and augment.generator is not None:  # the batched views' own stream
            saved = state.get("view_rng") or []
            # a state of another generator kind (a CPU run resumed on a GPU) cannot be restored
            if rank < len(saved) and saved[rank].numel() == augment.generator.get_state().numel():
                augment.generator.set_state(saved[rank])
            else:
                augment.generator.manual_seed(_view_seed(cfg.optim.seed, rank, start_epoch))
        if start_epoch >= cfg.optim.epochs:
            if not state.get("finished") and dist.is_main():  # optim.epochs lowered to the epochs done
                save_checkpoint(ckpt_path, {**state, "epochs": cfg.optim.epochs, "finished": True})
            dist.barrier()
            say(f"stage 1 of {out} is already finished ({start_epoch}/{cfg.optim.epochs} epochs)")
            return ckpt_path
        say(f"resuming {out} at epoch {start_epoch + 1}/{cfg.optim.epochs}")
    else:
        torch.manual_seed(cfg.optim.seed + 1000 * rank)  # different augmentation stream per rank

    if dist.is_main():
        say(
            f"stage 1: {method_name(cfg)} on {splits.name} ({len(train)} train images, "
            f"{splits.num_classes} classes), backbone {cfg.model.backbone}, {cfg.optim.epochs} epochs x "
            f"{steps_per_epoch} steps, global batch {cfg.optim.batch_size} on {world} process(es), "
            f"lr {base_lr:g}, device {dev}"
        )
    end_epoch = cfg.optim.epochs if max_epochs is None else min(cfg.optim.epochs, start_epoch + max_epochs)
    train_fingerprint = splits.train.fingerprint()
    t_start = time.perf_counter()
    guard = NonFiniteGuard(dev, tolerate=scaler is not None)
    # fewer compute threads while other jobs use these CPUs (dscl.threads; off for GPUs / deterministic)
    adapter = thread_adapter(dev, deterministic=cfg.optim.deterministic)
    for epoch in range(start_epoch, end_epoch):
        sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(total=steps_per_epoch, desc=f"pretrain {epoch + 1}/{cfg.optim.epochs}", unit="step",
                   disable=not (progress and dist.is_main()), leave=False, dynamic_ncols=True)
        t_log, seen, sums = time.perf_counter(), 0, {"loss": 0.0, "loss_con": 0.0, "loss_pbsd": 0.0}
        epoch_sums, epoch_n = dict.fromkeys(sums, 0.0), 0
        for it, batch in enumerate(_batches(loader, dev, cfg.model.channels_last, augment)):
            step = epoch * steps_per_epoch + it
            lr = warmup_cosine(step, total_steps, warmup_steps, base_lr)
            parts = pretrain_step(model, batch, optimizer, lr=lr, m=cfg.model.momentum, loss_cfg=cfg.loss,
                                  scaler=scaler, dtype=dtype, ce_head=ce_head, num_classes=splits.num_classes)
            guard.update(parts["loss"], parts.get("scaler_skipped"))
            if adapter is not None:
                adapter.tick()
            seen += batch.query.shape[0] * world
            bar.update(1)
            if (it + 1) % cfg.optim.log_every == 0 or it + 1 == steps_per_epoch:
                skipped = guard.check(step + 1)  # raises (on every rank) before a bad epoch is saved
                values = {k: float(v) for k, v in parts.items() if k != "scaler_skipped"}
                now = time.perf_counter()
                ips = seen / max(now - t_log, 1e-9)
                log.write(stage="pretrain", epoch=epoch + 1, step=step + 1, lr=lr, momentum=cfg.model.momentum,
                          img_per_s=round(ips, 1), queue_fill=len(model.queue), threads=torch.get_num_threads(),
                          queue_rejected=int(model.queue.rejected),  # non-finite keys kept out, since the start
                          **values,
                          **({"skipped_steps": skipped} if scaler is not None else {}))
                bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{ips:.0f}")
                t_log, seen = now, 0
                for k in sums:
                    epoch_sums[k] += values[k]
                epoch_n += 1
        bar.close()
        wall = wall_before + time.perf_counter() - t_start
        finished = epoch + 1 == cfg.optim.epochs
        rngs = dist.gather_objects(rng_state())
        view_rngs = (dist.gather_objects(augment.generator.get_state())
                     if augment is not None and augment.generator is not None else None)
        if dist.is_main():
            save_checkpoint(ckpt_path, {
                "stage": "pretrain", "epoch": epoch + 1, "epochs": cfg.optim.epochs, "finished": finished,
                "backbone": cfg.model.backbone, "num_classes": splits.num_classes, "dim": cfg.model.dim,
                "model": model.state_dict(), "ce_head": ce_head.state_dict() if ce_head is not None else None,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "rng": rngs, "view_rng": view_rngs, "wall_seconds": wall, "method": method_name(cfg),
                "steps_per_epoch": steps_per_epoch,  # with world_size: checked when resuming elsewhere
                # what reports need to make runs comparable (report.json "stage1")
                "global_batch": cfg.optim.batch_size, "world_size": world, "lr": base_lr,
                "precision": {"none": "fp32"}.get(cfg.optim.amp, cfg.optim.amp), "device": str(dev),
                "torch_version": str(torch.__version__), "train_fingerprint": train_fingerprint,
                # what dscl.inference.load_run needs without the dataset (a run copied elsewhere)
                "class_names": list(splits.class_names), "train_counts": list(splits.train_counts),
                "mean": list(splits.mean), "std": list(splits.std),
            })
            means = {k: v / max(epoch_n, 1) for k, v in epoch_sums.items()}
            log.write(stage="pretrain_epoch", epoch=epoch + 1, wall_seconds=round(wall, 2), **means)
            # mean epoch time of this call (so far) x epochs left; 0:00 at the last epoch
            eta = (time.perf_counter() - t_start) / (epoch + 1 - start_epoch) * (cfg.optim.epochs - epoch - 1)
            tqdm.write(f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {means['loss']:.4f}  "
                       f"(con {means['loss_con']:.4f}, pbsd {means['loss_pbsd']:.4f})  {wall:.0f}s  "
                       f"ETA stage 1 {format_duration(eta)}")
        dist.barrier()
    return ckpt_path

