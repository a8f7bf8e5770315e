"""Run directories: create / refuse / overwrite / resume, ``config.yaml``, ``metrics.jsonl``, and
reading back what a finished stage left behind (``checkpoints/last.pt``).

Layout of a run directory (DESIGN.md): ``config.yaml`` (fully resolved), ``metrics.jsonl`` (one JSON
object per logged step/epoch), ``checkpoints/last.pt`` (stage 1), ``checkpoints/classifier.pt``
(stage 2), ``report.json``, ``report.md``, ``plots/*.png``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from dscl import dist
from dscl.backbones import build_backbone
from dscl.checkpoint import CheckpointError, load_checkpoint
from dscl.config import Config, config_from_dict

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



def check_compatible(state: dict[str, Any], cfg: Config, num_classes: int, path: Path) -> None:
    if state.get("backbone") != cfg.model.backbone:
        raise CheckpointError(
            f"{path} holds a {state.get('backbone')} backbone but the config asks for {cfg.model.backbone}"
        )
    if state.get("num_classes") != num_classes:
        raise CheckpointError(
            f"{path} was trained on {state.get('num_classes')} classes but the dataset has {num_classes}"
        )


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
    check_compatible(state, cfg, num_classes, path)
    backbone = build_backbone(cfg.model.backbone, zero_init_residual=cfg.model.zero_init_residual)
    prefix = "online.backbone."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit backbone {cfg.model.backbone}: {exc}") from exc
    return backbone

