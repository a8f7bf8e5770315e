"""Evaluation of a classified run: top-1 / top-5, Many / Medium / Few, post-hoc variants, report files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dscl import dist
from dscl.backbones import build_backbone
from dscl.checkpoint import CheckpointError, load_checkpoint
from dscl.config import Config, method_name
from dscl.data import EvalTransform, build_datasets
from dscl.features import extract_features
from dscl.metrics import confusion_matrix, logit_adjust, ncm_logits, summarize, tau_normalize
from dscl.report import build_report, write_report
from dscl.rundir import RunDirError, load_run_config
from dscl.runtime import amp_dtype, num_workers


def evaluate(run_dir: str | Path, *, split: str = "test", cfg: Config | None = None, device: str = "auto",
             progress: bool = True) -> dict[str, Any]:
    """Evaluate the stage-2 classifier (plus its post-hoc variants) and write the report files.

    ``split="test"`` writes into the run directory; ``split="val"`` into ``run_dir/val/``.
    Returns the report dictionary (on every rank).
    """
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
        target = run_dir if split == "test" else run_dir / "val"
        target.mkdir(parents=True, exist_ok=True)
        conf = confusion_matrix(logits.argmax(1), labels, splits.num_classes)
        write_report(target, report, confusion=conf, class_names=splits.class_names)
    dist.barrier()
    return report
