"""Stage 2: a class-balanced linear classifier on the frozen stage-1 backbone (METHOD.md B).

Two protocols: ``cached`` (features of clean and augmented copies extracted once, the classifier
trained on them) and ``official`` (the backbone runs every epoch on strongly augmented images, as the
official code does). The epoch is selected on a validation split when there is one, never on test.
After selection one temperature T is fitted by NLL on the validation split (temperature scaling,
:func:`fit_classifier_temperature`) and stored in ``classifier.pt``; without a validation split none is.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dscl import dist
from dscl.backbones import BackboneSpec
from dscl.config import Config
from dscl.data import ClassBalancedSampler, DatasetSplits, LTDataset, build_datasets
from dscl.data.policies import policy_from
from dscl.data.views import EvalTransform, classifier_transform_for, eval_transform_for
from dscl.errors import DivergedError
from dscl.features import extract_features, recompute_bn
from dscl.metrics import class_means
from dscl.model import backbone_spec, recorded_spec, stage1_backbone
from dscl.rng import seed_everything
from dscl.run import (
    CLASSIFIER_FILE,
    STAGE1_FILE,
    ClassifierState,
    DataMeta,
    MetricsLog,
    check_compatible,
    load_finished_stage1,
    load_run_config,
    save_classifier,
)
from dscl.runtime import StopSignals, autocast, frozen_dtype, make_loader, num_workers, say, to_device
from dscl.schedules import step_decay
from dscl.trackers import require_trackers


def balanced_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    pred = logits.argmax(1)
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).float()
    total = torch.bincount(labels, minlength=num_classes).float()
    present = total > 0
    return float((correct[present] / total[present]).mean() * 100)


def new_classifier(width: int, num_classes: int, seed: int) -> nn.Linear:
    """The stage-2 linear layer, initialised as the official code does: W ~ N(0, 0.01^2), b = 0."""
    fc = nn.Linear(width, num_classes)
    with torch.no_grad():
        fc.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        fc.bias.zero_()
    return fc


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation (N, D) -> ((D,), (D,)); a constant dimension gets std 1."""
    mean = feats.mean(dim=0)
    std = feats.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def standardize(feats: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """z-score features with :func:`feature_stats` of the clean training features."""
    mean, std = stats
    return (feats - mean) / std


def fold_standardization(fc: nn.Linear, stats: tuple[torch.Tensor, torch.Tensor]) -> nn.Linear:
    """A linear layer on raw features equal to ``fc`` on standardised ones:
    ``W (x - m) / s + b = (W / s) x + (b - (W / s) m)``."""
    mean, std = stats
    folded = nn.Linear(fc.in_features, fc.out_features)
    with torch.no_grad():
        folded.weight.copy_(fc.weight / std[None, :])
        folded.bias.copy_(fc.bias - folded.weight @ mean)
    return folded


def train_linear_cached(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: Config, *, epoch_size: int,
    val: tuple[torch.Tensor, torch.Tensor] | None, progress: bool, log: MetricsLog | None = None,
) -> tuple[nn.Linear, int, list[dict[str, float]]]:
    """Class-balanced linear classifier on cached features (SGD, no weight decay, step decay).

    Every rank trains the same classifier from the same seed on the same gathered features, so
    no communication is needed. Returns (classifier, selected epoch (1-based), per-epoch history).
    """
    cc = cfg.classifier
    fc = new_classifier(feats.shape[1], num_classes, cfg.optim.seed)
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
                record["val_balanced_top1"] = balanced_accuracy(fc(val[0]), val[1], num_classes)
            if best is None or record["val_balanced_top1"] > best[0]:
                best = (record["val_balanced_top1"], epoch + 1,
                        {k: v.clone() for k, v in fc.state_dict().items()})
        history.append(record)
        if log is not None:
            log.write(stage="classify", **record)
        if not math.isfinite(record["train_loss"]):
            raise DivergedError(f"classifier loss became {record['train_loss']}; lower classifier.lr")
    if best is not None:
        fc.load_state_dict(best[2])
        return fc, best[1], history
    return fc, cc.epochs, history


def train_linear_official(
    backbone: nn.Module, splits: DatasetSplits, cfg: Config, *, device: torch.device, progress: bool,
    val: LTDataset | None, log: MetricsLog | None = None, spec: BackboneSpec | None = None,
) -> tuple[nn.Linear, int, list[dict[str, float]]]:
    """The official stage 2: backbone frozen but run every epoch on strongly augmented images,
    BatchNorm statistics updated (``classifier.update_bn``), class-balanced sampling. Images are
    normalised and evaluated as the backbone ``spec`` says (default: the config's built-in convention).

    Under torchrun each rank sees its own shard, so with ``update_bn`` the ranks' BatchNorm running
    statistics would drift apart while only rank 0's backbone is saved, and the validation features
    (encoded shard by shard) would mix differently normalised images. After every epoch the
    statistics are pooled over ranks (:func:`dscl.dist.average_batchnorm_stats`: every rank's images
    count, unlike a broadcast of rank 0's), so epoch selection, class means and the saved backbone
    all use the same, identical statistics on every rank.
    """
    cc = cfg.classifier
    world, rank = dist.world_size(), dist.rank()
    num_classes = splits.num_classes
    for p in backbone.parameters():
        p.requires_grad_(False)
    width: int = backbone.num_features  # type: ignore[assignment]
    fc = new_classifier(width, num_classes, cfg.optim.seed).to(device)
    dist.broadcast_module(fc)
    opt = torch.optim.SGD(fc.parameters(), lr=cc.lr, momentum=cc.momentum, weight_decay=cc.weight_decay)
    spec = spec if spec is not None else backbone_spec(cfg, splits.mean, splits.std)
    train = splits.train.with_transform(classifier_transform_for(spec, policy_from(cfg.classifier)))
    sampler = ClassBalancedSampler(train.targets, seed=cfg.optim.seed, rank=rank, world_size=world)
    batch = max(1, cc.batch_size // world)
    loader = make_loader(train, batch, sampler=sampler, workers=num_workers(cfg.data.num_workers),
                     device=device, drop_last=False)
    dtype = frozen_dtype(cfg.optim.amp, device)  # the device's own precision, whatever trained stage 1
    val_ds = val.with_transform(eval_transform_for(spec)) if val else None
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
            images, y = to_device(images, device, channels_last=True), y.to(device)
            with torch.no_grad(), autocast(device, dtype):
                f = backbone(images)
            loss = F.cross_entropy(fc(f.float()), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(list(fc.parameters()))
            opt.step()
            total += loss.item() * len(y)
            n += len(y)
        if cc.update_bn:
            dist.average_batchnorm_stats(backbone)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": total / max(n, 1)}
        if val_ds is not None:
            vf, vy = extract_features(backbone, val_ds, batch_size=batch, device=device,
                                      workers=num_workers(cfg.data.num_workers), progress=False, desc="val")
            with torch.no_grad():
                record["val_balanced_top1"] = balanced_accuracy(fc.cpu()(vf), vy, num_classes)
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


def selection_sentence(splits: DatasetSplits, epoch: int, epochs: int, select: str = "val") -> str:
    """One sentence for reports: which classifier epoch is reported and which split chose it."""
    if select == "last":
        return (f"the last classifier epoch ({epoch}/{epochs}) is reported (classifier.select=last); "
                f"no epoch was selected on the test set")
    if splits.val is None:
        return (f"no validation split: the last classifier epoch ({epoch}/{epochs}) is reported; "
                f"no epoch was selected on the test set")
    return (f"classifier epoch {epoch}/{epochs} selected by class-balanced top-1 on {splits.val_description()} "
            f"({len(splits.val)} images); the test set was not used")


def fit_classifier_temperature(backbone: nn.Module, fc: nn.Linear, splits: DatasetSplits, *,
                               transform: EvalTransform, batch_size: int, device: torch.device, workers: int,
                               progress: bool, val_features: tuple[torch.Tensor, torch.Tensor] | None = None,
                               ) -> tuple[float | None, dict[str, Any]]:
    """Temperature scaling of the selected classifier (Guo et al. 2017): one scalar T > 0 minimising the NLL
    of ``softmax(fc(features) / T)`` on the **validation** split (:func:`dscl.calibration.fit_temperature`),
    never on the test set. Features are float32 from the evaluation view, as evaluation computes them, so
    ``dscl evaluate``'s validation logits give the same T.

    Args:
        backbone: the final evaluation backbone (selected epoch, BatchNorm as saved).
        fc: the selected linear layer on raw features (standardisation folded in).
        splits: the run's datasets; ``splits.val`` None means no T.
        transform: the evaluation transform of the backbone's spec.
        val_features: the validation split's raw float32 features and labels when stage 2 already extracted
            them with ``transform`` (the cached protocol without autocast); None extracts them here.

    Returns:
        ``(T, fit record)``: the record is ``{"split": "val", "description", "n", "nll_before",
        "nll_after", "method"}``, or ``(None, {"split": None, "reason"})`` without a validation split.
    """
    from dscl.calibration import TEMPERATURE_BOUNDS, fit_temperature, nll_from_logits

    if splits.val is None:
        return None, {"split": None, "reason": (
            f"{splits.name} has no validation split to fit a temperature on (fitting it on the test set would "
            "report an optimistic calibration); set data.val_fraction > 0 (or data.val_per_class) and re-run "
            "dscl classify to fit one")}
    feats, labels = val_features or extract_features(
        backbone, splits.val.with_transform(transform), batch_size=batch_size, device=device, workers=workers,
        progress=progress, desc="val features (temperature)")  # float32, as evaluation
    with torch.no_grad():
        logits = fc.cpu()(feats)
    t = fit_temperature(logits, labels)
    before, after = nll_from_logits(logits, labels), nll_from_logits(logits / t, labels)
    lo, hi = TEMPERATURE_BOUNDS
    # the NLL is unimodal in log T: a T on the search interval's edge means the best T lies beyond it
    at_bound = bool(abs(math.log(t / lo)) < 1e-3 or abs(math.log(t / hi)) < 1e-3)
    say(f"temperature scaling: T = {t:.4f} fitted on {splits.val_description()} ({len(labels)} images; "
        f"NLL {before:.4f} -> {after:.4f})" + (f"; T is at the edge of the search interval [{lo:g}, {hi:g}]"
                                               if at_bound else ""))
    return t, {"split": "val", "description": splits.val_description(), "n": len(labels),
               "nll_before": round(before, 6), "nll_after": round(after, 6), "at_bound": at_bound,
               "method": f"golden-section search on log T in [{lo:g}, {hi:g}] minimising the NLL of the plain "
                         "classifier's logits"}


def classify(run_dir: str | Path, *, cfg: Config | None = None, device: str = "auto",
             progress: bool = True, splits: DatasetSplits | None = None) -> Path:
    """Stage 2 for a finished stage-1 run; writes ``checkpoints/classifier.pt`` and returns its path.
    ``splits``: the datasets of ``cfg.data`` if already built."""
    with StopSignals(immediate=True, what="in stage 2 (it reruns from its start, with the same result)"):
        return _classify(Path(run_dir), cfg, device, progress, splits)


def _classify(run_dir: Path, cfg: Config | None, device: str, progress: bool,
              splits: DatasetSplits | None) -> Path:
    dev = dist.init(device)
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    require_trackers(cfg)
    t0 = time.perf_counter()
    seed_everything(cfg.optim.seed)
    splits = splits or build_datasets(cfg.data, seed=cfg.optim.seed)
    stage1 = load_finished_stage1(run_dir)
    check_compatible(stage1, cfg, splits.num_classes, run_dir / STAGE1_FILE)
    spec = recorded_spec(stage1.spec, cfg, splits.mean, splits.std)
    backbone = stage1_backbone(cfg, spec, stage1, run_dir / STAGE1_FILE).to(dev)  # LoRA merged, base re-loaded
    del stage1
    backbone.to(memory_format=torch.channels_last)
    cc = cfg.classifier
    workers = num_workers(cfg.data.num_workers)
    eval_t = eval_transform_for(spec)
    clean_train = splits.train.with_transform(eval_t)
    fbatch = max(64, min(512, cc.batch_size))
    log = MetricsLog(run_dir / "metrics.jsonl")
    say(f"stage 2 ({cc.protocol} protocol): class-balanced linear classifier on {splits.name}")
    if cc.update_bn and cc.protocol == "cached":
        recompute_bn(backbone, clean_train, batch_size=fbatch, device=dev, workers=workers, progress=progress)
    dtype = frozen_dtype(cfg.optim.amp, dev)  # the device's own precision, whatever trained stage 1
    if cc.protocol == "cached":
        feats, labels = extract_features(backbone, clean_train, batch_size=fbatch, device=dev, workers=workers,
                                         progress=progress, desc="features", dtype=dtype)
        bank_f, bank_y = [feats], [labels]
        aug = splits.train.with_transform(classifier_transform_for(spec, policy_from(cfg.classifier)))
        for c in range(cc.augmented_copies):
            f, y = extract_features(backbone, aug, batch_size=fbatch, device=dev, workers=workers,
                                    progress=progress, desc=f"augmented copy {c + 1}/{cc.augmented_copies}",
                                    dtype=dtype)
            bank_f.append(f)
            bank_y.append(y)
        val_pair = raw_val = None
        if splits.val is not None and cc.select == "val":
            val_pair = extract_features(backbone, splits.val.with_transform(eval_t), batch_size=fbatch,
                                        device=dev, workers=workers, progress=progress, desc="val features",
                                        dtype=dtype)
            raw_val = val_pair if dtype is None else None  # float32 as evaluation: the temperature fit reuses it
        bank = torch.cat(bank_f)
        stats = feature_stats(feats) if cc.standardize else None
        if stats is not None:
            bank = standardize(bank, stats)
            if val_pair is not None:
                val_pair = (standardize(val_pair[0], stats), val_pair[1])
        fc, chosen, history = train_linear_cached(
            bank, torch.cat(bank_y), splits.num_classes, cfg, epoch_size=len(labels),
            val=val_pair, progress=progress, log=log)
        if stats is not None:
            fc = fold_standardization(fc, stats)  # the saved layer takes raw features, like any other
        train_feats, train_labels = feats, labels
    else:
        stats = raw_val = None
        fc, chosen, history = train_linear_official(backbone, splits, cfg, device=dev, progress=progress,
                                                    val=splits.val if cc.select == "val" else None, log=log,
                                                    spec=spec)
        train_feats, train_labels = extract_features(backbone, clean_train, batch_size=fbatch, device=dev,
                                                     workers=workers, progress=progress, desc="features")
    # after selection, on every rank (extract_features gathers): one T for the plain classifier's logits
    temperature, temperature_fit = fit_classifier_temperature(backbone, fc, splits, transform=eval_t,
                                                              batch_size=fbatch, device=dev, workers=workers,
                                                              progress=progress, val_features=raw_val)
    path = run_dir / CLASSIFIER_FILE
    if dist.is_main():
        save_classifier(run_dir, ClassifierState(
            protocol=cc.protocol, backbone_name=spec.qualified_name, num_classes=splits.num_classes, spec=spec,
            selected_epoch=chosen, selection=selection_sentence(splits, chosen, cc.epochs, cc.select),
            history=history, wall_seconds=time.perf_counter() - t0,
            # what dscl.inference.load_run needs without the dataset (a run copied elsewhere)
            data=DataMeta.of(splits.class_names, splits.train_counts, splits.mean, splits.std),
            backbone={k: v.cpu() for k, v in backbone.state_dict().items()}, fc=fc.state_dict(),
            class_means=class_means(train_feats, train_labels, splits.num_classes),
            # the z-scoring folded into fc (classifier.standardize): tau-norm works in that space
            feature_stats=(stats[0].cpu(), stats[1].cpu()) if stats is not None else None,
            temperature=temperature, temperature_fit=temperature_fit))
    dist.barrier()
    return path

