"""Running a frozen backbone over a dataset: pooled features, BatchNorm re-estimation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dscl import dist
from dscl.backbones import Backbone, BackboneSpec, build_backbone_from_spec
from dscl.data import LTDataset
from dscl.errors import CheckpointError
from dscl.runtime import autocast, make_loader, to_device


def frozen_backbone(spec: BackboneSpec, weights: Mapping[str, torch.Tensor], where: Path) -> Backbone:
    """The backbone a checkpoint's ``spec`` describes, with ``weights`` (its state dict) from checkpoint ``where``.

    Raises:
        CheckpointError: weights that do not fit the spec's network (the first keys named).
    """
    backbone = build_backbone_from_spec(spec)
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{where} does not fit backbone {spec.qualified_name}: "
                              f"{' '.join(line.strip() for line in first[:3])}") from exc
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
    loader = make_loader(shard, batch_size, sampler=None, workers=workers, device=device, drop_last=False)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, unit="batch", leave=False,
                          disable=not (progress and dist.is_main()), dynamic_ncols=True):
        with autocast(device, dtype):
            f = backbone(to_device(images, device, channels_last=True))
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
    loader = make_loader(dataset, batch_size, sampler=None, workers=workers, device=device, drop_last=False)
    for images, _ in tqdm(loader, desc="bn statistics", unit="batch", leave=False,
                          disable=not (progress and dist.is_main()), dynamic_ncols=True):
        backbone(to_device(images, device, channels_last=True))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    backbone.eval()  # every rank saw the whole training set, so the statistics agree without a sync

