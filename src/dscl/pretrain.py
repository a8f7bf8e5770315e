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
from dscl.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from dscl.config import Config, LossConfig, dump_config, method_name, uses_pbsd
from dscl.data import DSCLTransform, build_datasets
from dscl.losses import dscl_loss, pbsd_loss, supcon_loss
from dscl.model import DSCLModel, build_encoder, momentum_update
from dscl.rundir import MetricsLog, check_compatible, prepare_run_dir
from dscl.runtime import amp_dtype, autocast, make_loader, num_workers, say, to_device
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
) -> dict[str, torch.Tensor]:
    """One stage-1 iteration (METHOD.md A.9 with our deliberate differences). Returns detached losses.

    ``loss_cfg.loss`` picks the contrastive term: ``dscl`` (Eq. 9 of the paper), ``scl`` (the paper's
    SupCon baseline over the same queue), or ``ce`` (cross-entropy through ``ce_head``; no momentum
    encoder or queue). PBSD is added with weight ``loss_cfg.pbsd_weight`` when patches are given.
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
                                   temperature=loss_cfg.temperature)
        else:
            loss_con = dscl_loss(z, keys, batch.labels, queue, queue_labels,
                                 alpha=loss_cfg.alpha, temperature=loss_cfg.temperature)
        loss_pbsd = (pbsd_loss(teacher, student, keys, queue, temperature=loss_cfg.temperature)
                     if use_pbsd else zero)
    loss = loss_con + loss_cfg.pbsd_weight * loss_pbsd
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"stage-1 loss is {loss.item()} (contrastive {loss_con.item()}, pbsd {loss_pbsd.item()}); "
            f"lower optim.base_lr or use optim.amp=none"
        )
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        dist.average_gradients(params)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        dist.average_gradients(params)
        optimizer.step()
    if keys is not None:
        model.queue.enqueue(dist.all_gather_cat(keys.float()), dist.all_gather_cat(batch.labels))
    return {"loss": loss.detach(), "loss_con": loss_con.detach(), "loss_pbsd": loss_pbsd.detach()}


def _batches(loader: DataLoader, device: torch.device, channels_last: bool) -> Iterator[Batch]:
    for views, labels in loader:
        yield Batch(
            query=to_device(views.query, device, channels_last),
            key=to_device(views.key, device, channels_last),
            patches=to_device(views.patches, device),
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
    # Refuse a bad --out at once, but create nothing until the data and the model are known to be
    # usable, so a failed start never leaves a directory that blocks the corrected retry.
    out = prepare_run_dir(out, resume=resume, overwrite=overwrite, check_only=True)
    seed_everything(cfg.optim.seed)  # same on every rank: identical initial weights
    if cfg.optim.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    world, rank = dist.world_size(), dist.rank()
    if cfg.optim.batch_size % world:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} must be divisible by the {world} processes")
    per_rank = cfg.optim.batch_size // world
    # without PBSD no patch is cut, augmented or transferred (the data side of "no patch work")
    views = cfg.views if uses_pbsd(cfg) else dataclasses.replace(cfg.views, num_patches=0)
    transform = DSCLTransform(cfg.data.image_size, views, splits.mean, splits.std)
    train = splits.train.with_transform(transform)
    if len(train) < cfg.optim.batch_size:
        raise ValueError(
            f"the training set has {len(train)} images, fewer than optim.batch_size "
            f"{cfg.optim.batch_size}; lower the batch size"
        )
    sampler: DistributedSampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.optim.seed, drop_last=True)
    loader = make_loader(train, per_rank, sampler=sampler, workers=num_workers(cfg.data.num_workers),
                     device=dev, drop_last=True)
    steps_per_epoch = len(loader)
    total_steps = cfg.optim.epochs * steps_per_epoch
    # a run shorter than the preset's warm-up (e.g. optim.epochs=2) warms up over the whole run
    warmup_steps = min(round(cfg.optim.warmup_epochs * steps_per_epoch), total_steps)
    base_lr = cfg.optim.base_lr * cfg.optim.batch_size / 256  # linear scaling by the global batch

    model = DSCLModel(build_encoder(cfg), queue_size=cfg.model.queue_size if cfg.loss.loss != "ce" else 0)
    ce_head = nn.Linear(model.online.backbone.num_features, splits.num_classes) if cfg.loss.loss == "ce" else None
    model.to(dev)
    if ce_head is not None:
        ce_head.to(dev)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    dist.broadcast_module(model)
    params = list(model.online.parameters()) + (list(ce_head.parameters()) if ce_head is not None else [])
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    dtype = amp_dtype(cfg.optim.amp, dev)
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
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        if start_epoch >= cfg.optim.epochs:
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
    t_start = time.perf_counter()
    for epoch in range(start_epoch, end_epoch):
        sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(total=steps_per_epoch, desc=f"pretrain {epoch + 1}/{cfg.optim.epochs}", unit="step",
                   disable=not (progress and dist.is_main()), leave=False, dynamic_ncols=True)
        t_log, seen, sums = time.perf_counter(), 0, {"loss": 0.0, "loss_con": 0.0, "loss_pbsd": 0.0}
        epoch_sums, epoch_n = dict.fromkeys(sums, 0.0), 0
        for it, batch in enumerate(_batches(loader, dev, cfg.model.channels_last)):
            step = epoch * steps_per_epoch + it
            lr = warmup_cosine(step, total_steps, warmup_steps, base_lr)
            parts = pretrain_step(model, batch, optimizer, lr=lr, m=cfg.model.momentum, loss_cfg=cfg.loss,
                                  scaler=scaler, dtype=dtype, ce_head=ce_head)
            seen += batch.query.shape[0] * world
            bar.update(1)
            if (it + 1) % cfg.optim.log_every == 0 or it + 1 == steps_per_epoch:
                values = {k: float(v) for k, v in parts.items()}
                now = time.perf_counter()
                ips = seen / max(now - t_log, 1e-9)
                log.write(stage="pretrain", epoch=epoch + 1, step=step + 1, lr=lr, momentum=cfg.model.momentum,
                          img_per_s=round(ips, 1), queue_fill=len(model.queue), **values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{ips:.0f}")
                t_log, seen = now, 0
                for k in sums:
                    epoch_sums[k] += values[k]
                epoch_n += 1
        bar.close()
        wall = wall_before + time.perf_counter() - t_start
        finished = epoch + 1 == cfg.optim.epochs
        rngs = dist.gather_objects(rng_state())
        if dist.is_main():
            save_checkpoint(ckpt_path, {
                "stage": "pretrain", "epoch": epoch + 1, "epochs": cfg.optim.epochs, "finished": finished,
                "backbone": cfg.model.backbone, "num_classes": splits.num_classes, "dim": cfg.model.dim,
                "model": model.state_dict(), "ce_head": ce_head.state_dict() if ce_head is not None else None,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "rng": rngs, "wall_seconds": wall, "method": method_name(cfg),
            })
            means = {k: v / max(epoch_n, 1) for k, v in epoch_sums.items()}
            log.write(stage="pretrain_epoch", epoch=epoch + 1, wall_seconds=round(wall, 2), **means)
            tqdm.write(f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {means['loss']:.4f}  "
                       f"(con {means['loss_con']:.4f}, pbsd {means['loss_pbsd']:.4f})  {wall:.0f}s")
        dist.barrier()
    return ckpt_path

