"""Stage 1 (DSCL + PBSD representation learning) and stage 2 (class-balanced classifier).

The functions here take objects (configs, models, datasets, paths), never argv; ``cli.py`` is the
only caller that parses arguments or picks exit codes. The pretrain step spells the algorithm out
in the order of METHOD.md A.9: momentum update, forward of both encoders and the patches, losses,
weighted sum, backward, optimiser step, enqueue of the gathered keys and labels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dscl import dist
from dscl.backbones import build_backbone
from dscl.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from dscl.config import Config, LossConfig, config_from_dict, dump_config
from dscl.data import (
    ClassBalancedSampler,
    ClassifierTransform,
    DatasetSplits,
    DSCLTransform,
    EvalTransform,
    LTDataset,
    build_datasets,
)
from dscl.losses import dscl_loss, pbsd_loss, supcon_loss
from dscl.model import DSCLModel, Encoder, momentum_update
from dscl.schedules import step_decay, warmup_cosine

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "report.json", "report.md", "plots", "val")


class RunDirError(ValueError):
    """An output directory that cannot be used as asked (exists, missing stage, wrong contents)."""


# ----------------------------------------------------------------------------------------------
# run directory


def prepare_run_dir(out: str | Path, *, resume: bool, overwrite: bool, check_only: bool = False) -> Path:
    """Create or validate a run directory; never delete anything that is not a dscl run file.

    A non-empty directory is refused unless ``resume`` (continue from ``checkpoints/last.pt``) or
    ``overwrite`` (the dscl files in it are removed first; anything else in it is left alone).
    ``check_only`` raises the same errors but creates and deletes nothing.
    """
    out = Path(out)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is a file, not a directory")
    if resume:
        if not (out / "checkpoints" / "last.pt").is_file():
            raise RunDirError(
                f"cannot resume: {out / 'checkpoints' / 'last.pt'} does not exist "
                f"(start a new run without --resume)"
            )
        return out
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"--out {out} exists and is not empty; pass --resume to continue that run, "
                f"--overwrite to replace it, or choose another --out"
            )
        if check_only:
            return out
        if dist.is_main():
            for name in RUN_FILES:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        dist.barrier()
    if check_only:
        return out
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: {run_dir} is not a dscl run directory")
    return config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))


class MetricsLog:
    """Append-only ``metrics.jsonl`` (rank 0 writes; other ranks are no-ops)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        if not dist.is_main():
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# devices, loaders


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("optim.amp=fp16 needs a CUDA device; use bf16 on the CPU")
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def num_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, dist.world_size()) - 1))


def _loader(dataset: Any, batch: int, *, sampler: Any, workers: int, device: torch.device,
            drop_last: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )


def _to(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def build_encoder(cfg: Config) -> Encoder:
    backbone = build_backbone(
        cfg.model.backbone, zero_init_residual=cfg.model.zero_init_residual, pretrained=cfg.model.pretrained
    )
    return Encoder(backbone, dim=cfg.model.dim)


def uses_pbsd(cfg: Config) -> bool:
    return cfg.loss.loss != "ce" and cfg.loss.pbsd_weight > 0 and cfg.views.num_patches > 0


def method_name(cfg: Config) -> str:
    return cfg.loss.loss + ("+pbsd" if uses_pbsd(cfg) else "")


# ----------------------------------------------------------------------------------------------
# stage 1


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
            query=_to(views.query, device, channels_last),
            key=_to(views.key, device, channels_last),
            patches=_to(views.patches, device),
            boxes=_to(views.boxes, device),
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
    loader = _loader(train, per_rank, sampler=sampler, workers=num_workers(cfg.data.num_workers),
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
        _check_compatible(state, cfg, splits.num_classes, ckpt_path)
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
            _say(f"stage 1 of {out} is already finished ({start_epoch}/{cfg.optim.epochs} epochs)")
            return ckpt_path
        _say(f"resuming {out} at epoch {start_epoch + 1}/{cfg.optim.epochs}")
    else:
        torch.manual_seed(cfg.optim.seed + 1000 * rank)  # different augmentation stream per rank

    if dist.is_main():
        _say(
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


def _check_compatible(state: dict[str, Any], cfg: Config, num_classes: int, path: Path) -> None:
    if state.get("backbone") != cfg.model.backbone:
        raise CheckpointError(
            f"{path} holds a {state.get('backbone')} backbone but the config asks for {cfg.model.backbone}"
        )
    if state.get("num_classes") != num_classes:
        raise CheckpointError(
            f"{path} was trained on {state.get('num_classes')} classes but the dataset has {num_classes}"
        )


def _say(msg: str) -> None:
    if dist.is_main():
        tqdm.write(msg, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# stage 2


def load_finished_stage1(run_dir: Path) -> dict[str, Any]:
    """The state of ``run_dir/checkpoints/last.pt``, refusing a missing or unfinished stage 1."""
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: run stage 1 first (dscl pretrain --out {run_dir})")
    state = load_checkpoint(path)
    if not state.get("finished"):
        raise RunDirError(
            f"stage 1 of {run_dir} is not finished ({state.get('epoch')}/{state.get('epochs')} epochs in "
            f"{path}); continue it with: dscl pretrain --out {run_dir} --resume"
        )
    return state


def load_stage1_backbone(run_dir: Path, cfg: Config, num_classes: int) -> nn.Module:
    """The online backbone of a finished stage-1 run (projection head and momentum encoder dropped)."""
    state = load_finished_stage1(run_dir)
    path = run_dir / "checkpoints" / "last.pt"
    _check_compatible(state, cfg, num_classes, path)
    backbone = build_backbone(cfg.model.backbone, zero_init_residual=cfg.model.zero_init_residual)
    prefix = "online.backbone."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit backbone {cfg.model.backbone}: {exc}") from exc
    return backbone


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: LTDataset, *, batch_size: int, device: torch.device,
                     workers: int, progress: bool, desc: str,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features (N, C) float32 and labels (N,), in dataset order, on the CPU.

    Under torchrun each rank encodes a contiguous shard and the shards are gathered in order.
    """
    world, rank = dist.world_size(), dist.rank()
    n = len(dataset)
    lo, hi = n * rank // world, n * (rank + 1) // world
    shard = torch.utils.data.Subset(dataset, range(lo, hi))
    loader = _loader(shard, batch_size, sampler=None, workers=workers, device=device, drop_last=False)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, unit="batch", leave=False,
                          disable=not (progress and dist.is_main()), dynamic_ncols=True):
        with autocast(device, dtype):
            f = backbone(_to(images, device, channels_last=True))
        feats.append(f.float())
        labels.append(y.to(device))
    backbone.train(was_training)
    num_features = getattr(backbone, "num_features", 0)
    f_all = torch.cat(feats) if feats else torch.zeros(0, num_features, device=device)
    y_all = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return dist.all_gather_cat(f_all).cpu(), dist.all_gather_cat(y_all).cpu()


@torch.no_grad()
def recompute_bn(backbone: nn.Module, dataset: LTDataset, *, batch_size: int, device: torch.device,
                 workers: int, progress: bool) -> None:
    """Re-estimate BatchNorm running statistics on clean training images (cumulative average).

    Stage 1 accumulated them over strongly augmented query views *and* small patches, which are a
    different input distribution from the evaluation images.
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    backbone.train()
    loader = _loader(dataset, batch_size, sampler=None, workers=workers, device=device, drop_last=False)
    for images, _ in tqdm(loader, desc="bn statistics", unit="batch", leave=False,
                          disable=not (progress and dist.is_main()), dynamic_ncols=True):
        backbone(_to(images, device, channels_last=True))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    backbone.eval()  # every rank saw the whole training set, so the statistics agree without a sync


def _balanced_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    pred = logits.argmax(1)
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).float()
    total = torch.bincount(labels, minlength=num_classes).float()
    present = total > 0
    return float((correct[present] / total[present]).mean() * 100)


def _new_classifier(width: int, num_classes: int, seed: int) -> nn.Linear:
    """The stage-2 linear layer, initialised as the official code does: W ~ N(0, 0.01^2), b = 0."""
    fc = nn.Linear(width, num_classes)
    with torch.no_grad():
        fc.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        fc.bias.zero_()
    return fc


def train_linear_cached(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: Config, *, epoch_size: int,
    val: tuple[torch.Tensor, torch.Tensor] | None, progress: bool, log: MetricsLog | None = None,
) -> tuple[nn.Linear, int, list[dict[str, float]]]:
    """Class-balanced linear classifier on cached features (SGD, no weight decay, step decay).

    Every rank trains the same classifier from the same seed on the same gathered features, so
    no communication is needed. Returns (classifier, selected epoch (1-based), per-epoch history).
    """
    cc = cfg.classifier
    fc = _new_classifier(feats.shape[1], num_classes, cfg.optim.seed)
    opt = torch.optim.SGD(fc.parameters(), lr=cc.lr, momentum=cc.momentum, weight_decay=cc.weight_decay)
    sampler = ClassBalancedSampler(labels.tolist(), num_samples=epoch_size, seed=cfg.optim.seed)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, float]] = []
    for epoch in tqdm(range(cc.epochs), desc="classifier", unit="epoch", leave=False,
                      disable=not (progress and dist.is_main()), dynamic_ncols=True):
        lr = step_decay(epoch, cc.lr, cc.milestones, cc.gamma)
        for g in opt.param_groups:
            g["lr"] = lr
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.long)
        total, n = 0.0, 0
        for start in range(0, len(order), cc.batch_size):
            idx = order[start:start + cc.batch_size]
            loss = F.cross_entropy(fc(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": total / max(n, 1)}
        if val is not None:
            with torch.no_grad():
                record["val_balanced_top1"] = _balanced_accuracy(fc(val[0]), val[1], num_classes)
            if best is None or record["val_balanced_top1"] > best[0]:
                best = (record["val_balanced_top1"], epoch + 1,
                        {k: v.clone() for k, v in fc.state_dict().items()})
        history.append(record)
        if log is not None:
            log.write(stage="classify", **record)
        if not math.isfinite(record["train_loss"]):
            raise FloatingPointError(f"classifier loss became {record['train_loss']}; lower classifier.lr")
    if best is not None:
        fc.load_state_dict(best[2])
        return fc, best[1], history
    return fc, cc.epochs, history


def train_linear_official(
    backbone: nn.Module, splits: DatasetSplits, cfg: Config, *, device: torch.device, progress: bool,
    val: LTDataset | None, log: MetricsLog | None = None,
) -> tuple[nn.Linear, int, list[dict[str, float]]]:
    """The official stage 2: backbone frozen but run every epoch on strongly augmented images,
    BatchNorm statistics updated (``classifier.update_bn``), class-balanced sampling."""
    cc = cfg.classifier
    world, rank = dist.world_size(), dist.rank()
    num_classes = splits.num_classes
    for p in backbone.parameters():
        p.requires_grad_(False)
    width: int = backbone.num_features  # type: ignore[assignment]
    fc = _new_classifier(width, num_classes, cfg.optim.seed).to(device)
    dist.broadcast_module(fc)
    opt = torch.optim.SGD(fc.parameters(), lr=cc.lr, momentum=cc.momentum, weight_decay=cc.weight_decay)
    train = splits.train.with_transform(ClassifierTransform(cfg.data.image_size, splits.mean, splits.std))
    sampler = ClassBalancedSampler(train.targets, seed=cfg.optim.seed, rank=rank, world_size=world)
    batch = max(1, cc.batch_size // world)
    loader = _loader(train, batch, sampler=sampler, workers=num_workers(cfg.data.num_workers),
                     device=device, drop_last=False)
    dtype = amp_dtype(cfg.optim.amp, device)
    val_ds = val.with_transform(EvalTransform(cfg.data.image_size, splits.mean, splits.std)) if val else None
    best: tuple[float, int, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
    history: list[dict[str, float]] = []
    for epoch in range(cc.epochs):
        lr = step_decay(epoch, cc.lr, cc.milestones, cc.gamma)
        for g in opt.param_groups:
            g["lr"] = lr
        sampler.set_epoch(epoch)
        backbone.train(cc.update_bn)
        total, n = 0.0, 0
        for images, y in tqdm(loader, desc=f"classifier {epoch + 1}/{cc.epochs}", unit="batch", leave=False,
                              disable=not (progress and dist.is_main()), dynamic_ncols=True):
            images, y = _to(images, device, channels_last=True), y.to(device)
            with torch.no_grad(), autocast(device, dtype):
                f = backbone(images)
            loss = F.cross_entropy(fc(f.float()), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(list(fc.parameters()))
            opt.step()
            total += loss.item() * len(y)
            n += len(y)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": total / max(n, 1)}
        if val_ds is not None:
            vf, vy = extract_features(backbone, val_ds, batch_size=batch, device=device,
                                      workers=num_workers(cfg.data.num_workers), progress=False, desc="val")
            with torch.no_grad():
                record["val_balanced_top1"] = _balanced_accuracy(fc.cpu()(vf), vy, num_classes)
            fc.to(device)
            if best is None or record["val_balanced_top1"] > best[0]:
                best = (record["val_balanced_top1"], epoch + 1,
                        {k: v.detach().cpu().clone() for k, v in fc.state_dict().items()},
                        {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()})
        history.append(record)
        if log is not None:
            log.write(stage="classify", **record)
    backbone.eval()
    if best is not None:
        fc.load_state_dict(best[2])
        backbone.load_state_dict(best[3])
        return fc.cpu(), best[1], history
    return fc.cpu(), cc.epochs, history


def selection_sentence(val: LTDataset | None, carved: bool, epoch: int, epochs: int, select: str = "val") -> str:
    if select == "last":
        return (f"the last classifier epoch ({epoch}/{epochs}) is reported (classifier.select=last); "
                f"no epoch was selected on the test set")
    if val is None:
        return (f"no validation split: the last classifier epoch ({epoch}/{epochs}) is reported; "
                f"no epoch was selected on the test set")
    source = "a validation split carved from the training set" if carved else "the dataset's validation split"
    return f"classifier epoch {epoch}/{epochs} selected by class-balanced top-1 on {source}; the test set was not used"


def classify(run_dir: str | Path, *, cfg: Config | None = None, device: str = "auto",
             progress: bool = True) -> Path:
    """Stage 2 for a finished stage-1 run; writes ``checkpoints/classifier.pt`` and returns its path."""
    dev = dist.init(device)
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    t0 = time.perf_counter()
    seed_everything(cfg.optim.seed)
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    backbone = load_stage1_backbone(run_dir, cfg, splits.num_classes).to(dev)
    backbone.to(memory_format=torch.channels_last)
    cc = cfg.classifier
    workers = num_workers(cfg.data.num_workers)
    eval_t = EvalTransform(cfg.data.image_size, splits.mean, splits.std)
    clean_train = splits.train.with_transform(eval_t)
    fbatch = max(64, min(512, cc.batch_size))
    log = MetricsLog(run_dir / "metrics.jsonl")
    _say(f"stage 2 ({cc.protocol} protocol): class-balanced linear classifier on {splits.name}")
    if cc.update_bn and cc.protocol == "cached":
        recompute_bn(backbone, clean_train, batch_size=fbatch, device=dev, workers=workers, progress=progress)
    dtype = amp_dtype(cfg.optim.amp, dev)
    if cc.protocol == "cached":
        feats, labels = extract_features(backbone, clean_train, batch_size=fbatch, device=dev, workers=workers,
                                         progress=progress, desc="features", dtype=dtype)
        bank_f, bank_y = [feats], [labels]
        aug = splits.train.with_transform(ClassifierTransform(cfg.data.image_size, splits.mean, splits.std))
        for c in range(cc.augmented_copies):
            f, y = extract_features(backbone, aug, batch_size=fbatch, device=dev, workers=workers,
                                    progress=progress, desc=f"augmented copy {c + 1}/{cc.augmented_copies}",
                                    dtype=dtype)
            bank_f.append(f)
            bank_y.append(y)
        val_pair = None
        if splits.val is not None and cc.select == "val":
            val_pair = extract_features(backbone, splits.val.with_transform(eval_t), batch_size=fbatch,
                                        device=dev, workers=workers, progress=progress, desc="val features",
                                        dtype=dtype)
        fc, chosen, history = train_linear_cached(
            torch.cat(bank_f), torch.cat(bank_y), splits.num_classes, cfg, epoch_size=len(labels),
            val=val_pair, progress=progress, log=log)
        train_feats, train_labels = feats, labels
    else:
        fc, chosen, history = train_linear_official(backbone, splits, cfg, device=dev, progress=progress,
                                                    val=splits.val if cc.select == "val" else None, log=log)
        train_feats, train_labels = extract_features(backbone, clean_train, batch_size=fbatch, device=dev,
                                                     workers=workers, progress=progress, desc="features")
    from dscl.evaluate import class_means

    path = run_dir / "checkpoints" / "classifier.pt"
    if dist.is_main():
        save_checkpoint(path, {
            "stage": "classify", "protocol": cc.protocol, "backbone_name": cfg.model.backbone,
            "num_classes": splits.num_classes, "backbone": {k: v.cpu() for k, v in backbone.state_dict().items()},
            "fc": fc.state_dict(), "class_means": class_means(train_feats, train_labels, splits.num_classes),
            "selected_epoch": chosen, "selection": selection_sentence(splits.val, splits.val_is_carved, chosen,
                                                                      cc.epochs, cc.select),
            "history": history, "wall_seconds": time.perf_counter() - t0,
        })
    dist.barrier()
    return path


def evaluate(run_dir: str | Path, *, split: str = "test", cfg: Config | None = None, device: str = "auto",
             progress: bool = True) -> dict[str, Any]:
    """Evaluate the stage-2 classifier (plus its post-hoc variants) and write the report files.

    ``split="test"`` writes into the run directory; ``split="val"`` into ``run_dir/val/``.
    Returns the report dictionary (on every rank).
    """
    from dscl.evaluate import build_report, logit_adjust, ncm_logits, summarize, tau_normalize, write_report

    dev = dist.init(device)
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    t0 = time.perf_counter()
    cls_path = run_dir / "checkpoints" / "classifier.pt"
    if not cls_path.is_file():
        raise RunDirError(f"{cls_path} does not exist: run stage 2 first (dscl classify --run {run_dir})")
    state = load_checkpoint(cls_path)
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    if state.get("num_classes") != splits.num_classes or state.get("backbone_name") != cfg.model.backbone:
        raise CheckpointError(
            f"{cls_path} holds a {state.get('backbone_name')} classifier over {state.get('num_classes')} classes, "
            f"but the run's config is {cfg.model.backbone} over {splits.num_classes} classes"
        )
    if split == "val":
        if splits.val is None:
            raise RunDirError(
                f"dataset {splits.name} has no validation split; set data.val_fraction > 0 when training "
                f"to carve one, or evaluate --split test"
            )
        dataset = splits.val
    elif split == "test":
        dataset = splits.test
    else:
        raise ValueError(f"--split must be test or val, got {split!r}")
    backbone = build_backbone(cfg.model.backbone, zero_init_residual=cfg.model.zero_init_residual)
    backbone.load_state_dict(state["backbone"])
    backbone.to(dev).to(memory_format=torch.channels_last)
    eval_t = EvalTransform(cfg.data.image_size, splits.mean, splits.std)
    feats, labels = extract_features(backbone, dataset.with_transform(eval_t), batch_size=256, device=dev,
                                     workers=num_workers(cfg.data.num_workers), progress=progress,
                                     desc=f"{split} features", dtype=amp_dtype(cfg.optim.amp, dev))
    fc = nn.Linear(feats.shape[1], splits.num_classes)
    fc.load_state_dict(state["fc"])
    with torch.no_grad():
        logits = fc(feats)
        variants_logits = {
            f"+ logit adjustment (tau={cfg.classifier.logit_adjust_tau:g})":
                logit_adjust(logits, splits.train_counts, cfg.classifier.logit_adjust_tau),
            f"+ tau-normalisation (tau={cfg.classifier.tau_norm:g})":
                feats @ tau_normalize(fc.weight, cfg.classifier.tau_norm).T,
            "nearest class mean": ncm_logits(feats, state["class_means"]),
        }
    many, few = cfg.eval.many_threshold, cfg.eval.few_threshold
    summary = summarize(logits, labels, splits.train_counts, class_names=splits.class_names,
                        many_threshold=many, few_threshold=few)
    variants = []
    for name, lg in variants_logits.items():
        s = summarize(lg, labels, splits.train_counts, many_threshold=many, few_threshold=few)
        variants.append({"method": name, **{k: s[k] for k in ("top1", "top5", "top1_macro", "many", "medium",
                                                                  "few")}})
    stage1 = load_checkpoint(run_dir / "checkpoints" / "last.pt").get("wall_seconds", 0.0)
    wall = stage1 + state.get("wall_seconds", 0.0) + (time.perf_counter() - t0)
    report = build_report(summary, dataset=splits.name, method=method_name(cfg), seed=cfg.optim.seed,
                          epochs=cfg.optim.epochs, wall_seconds=round(wall, 1), split=split,
                          selection=state.get("selection", ""), variants=variants)
    if dist.is_main():
        from dscl.evaluate import confusion_matrix

        target = run_dir if split == "test" else run_dir / "val"
        target.mkdir(parents=True, exist_ok=True)
        conf = confusion_matrix(logits.argmax(1), labels, splits.num_classes)
        write_report(target, report, confusion=conf, class_names=splits.class_names)
    dist.barrier()
    return report
