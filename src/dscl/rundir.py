"""Run directories: create / refuse / overwrite / resume, ``config.yaml``, ``metrics.jsonl``, and
reading back what a finished stage left behind (``checkpoints/last.pt``).

Layout of a run directory (DESIGN.md): ``config.yaml`` (fully resolved), ``metrics.jsonl`` (one JSON
object per logged step/epoch), ``checkpoints/last.pt`` (stage 1), ``checkpoints/classifier.pt``
(stage 2), ``report.json``, ``report.md``, ``per_class.csv``, ``confusion.csv``, ``predictions.csv``,
``plots/*.png``, ``val/`` (the same reports on the validation split) and ``analysis/`` (``dscl analyze``).
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any, cast

import yaml
from torch import nn

from dscl import dist
from dscl.backbones import build_backbone
from dscl.checkpoint import CheckpointError, load_checkpoint
from dscl.config import Config, config_from_dict, flat_config
from dscl.runtime import say

#: Everything dscl writes into a run directory (files and folders). ``--overwrite`` removes exactly
#: these (plus the temp files of an interrupted atomic write of one of them), never anything else.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "report.json", "report.md", "per_class.csv",
             "confusion.csv", "predictions.csv", "plots", "val", "analysis")
#: What a start that stopped before its first checkpoint can leave behind (see :func:`failed_start`).
STARTUP_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")
#: Config keys a resumed run may change: none of them changes what stage 1 optimises (``section.*`` =
#: every key of the section; stage 2 and evaluation have not run yet or are run again).
RESUMABLE_KEYS = ("optim.epochs", "optim.log_every", "optim.deterministic", "data.num_workers", "data.data_root",
                  "data.list_dir", "data.check_files", "model.channels_last", "views.augment_on", "classifier.*",
                  "eval.*")


class RunDirError(ValueError):
    """An output directory that cannot be used as asked (exists, missing stage, wrong contents)."""


# ----------------------------------------------------------------------------------------------
# run directory


def _is_temp_of(name: str, names: tuple[str, ...]) -> bool:
    """``.report.json.k3j2.tmp``: the temp file of an interrupted atomic write of one of ``names``."""
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in names)


def failed_start(out: Path) -> bool:
    """True when ``out`` holds only what an attempt that stopped before its first checkpoint leaves
    (``config.yaml``, ``metrics.jsonl``, a ``checkpoints/`` folder without ``last.pt``): nothing that
    can be resumed or read, so the same command may simply replace it."""
    if not out.is_dir():
        return False
    entries = list(out.iterdir())
    if not entries:
        return False
    for p in entries:
        if p.name == "checkpoints" and p.is_dir():
            if any(not _is_temp_of(q.name, ("last.pt",)) for q in p.iterdir()):
                return False
        elif not (p.is_file() and (p.name in STARTUP_FILES or _is_temp_of(p.name, STARTUP_FILES))):
            return False
    return True


def remove_run_files(out: Path) -> None:
    """Delete every file and folder dscl writes (:data:`RUN_FILES`) from ``out``; keep everything else."""
    for p in out.iterdir():
        if p.name in RUN_FILES or _is_temp_of(p.name, RUN_FILES):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _decide(out: Path, *, resume: bool, overwrite: bool, resumable: bool = True) -> tuple[str, str]:
    """What :func:`prepare_run_dir` does with ``out``: ``(action, message)``, action one of ``error``,
    ``resume``, ``create``, ``replace-failed`` or ``overwrite``."""
    if resume and overwrite:
        return "error", "--resume and --overwrite contradict each other; pass one of them"
    if out.exists() and not out.is_dir():
        return "error", f"--out {out} exists and is a file, not a directory"
    if resume:
        if (out / "checkpoints" / "last.pt").is_file():
            return "resume", ""
        if failed_start(out):
            return "error", (f"cannot resume: {out} holds no checkpoint (the earlier attempt stopped before its "
                             f"first epoch ended, so nothing was saved); run the same command without --resume, "
                             f"it replaces dscl's files there")
        return "error", (f"cannot resume: {out / 'checkpoints' / 'last.pt'} does not exist "
                         f"(start a new run without --resume)")
    if not out.exists() or not any(out.iterdir()):
        return "create", ""
    if failed_start(out):
        return "replace-failed", (f"{out} holds only the files of an attempt that stopped before its first "
                                  f"checkpoint; replacing them")
    if overwrite:
        return "overwrite", ""
    if not resumable:  # a command without --resume (ensemble) must not suggest it
        return "error", f"--out {out} exists and is not empty; pass --overwrite to replace it, or choose another --out"
    return "error", (f"--out {out} exists and is not empty; pass --resume to continue that run, "
                     f"--overwrite to replace it, or choose another --out")


def prepare_run_dir(out: str | Path, *, resume: bool, overwrite: bool, check_only: bool = False,
                    resumable: bool = True) -> Path:
    """Create or validate a run directory; never delete anything that is not a dscl run file.

    A non-empty directory is refused unless ``resume`` (continue from ``checkpoints/last.pt``) or
    ``overwrite`` (the dscl files in it, :data:`RUN_FILES`, are removed first; anything else in it is
    left alone). A directory holding only the files of an attempt that stopped before its first
    checkpoint (:func:`failed_start`) is replaced without ``overwrite``. ``check_only`` raises the
    same errors but creates and deletes nothing.

    Under torchrun, rank 0 alone looks at the directory and broadcasts its decision: a rank that
    looked after rank 0 had deleted the old files would otherwise take another branch and enter a
    different number of barriers, and every later collective would be mismatched (a deadlock).
    Every rank then raises the same error or passes the same single barrier.
    """
    out = Path(out)
    decision = _decide(out, resume=resume, overwrite=overwrite, resumable=resumable) if dist.is_main() else None
    action, message = cast(tuple[str, str], dist.broadcast_object(decision))
    if action == "error":
        raise RunDirError(message)
    if check_only or action == "resume":
        return out
    if dist.is_main():
        if action == "replace-failed":
            say(message)
        if action in ("overwrite", "replace-failed"):
            remove_run_files(out)
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: {run_dir} is not a dscl run directory")
    return config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))


def stage1_command(run_dir: Path) -> str:
    """A command that trains stage 1 of ``run_dir`` with the configuration saved there (it is accepted:
    a directory left by a failed start is replaced; anything else needs ``--overwrite``)."""
    d = shlex.quote(str(run_dir))
    if not (run_dir / "config.yaml").is_file():
        return f"dscl pretrain --out {d} --overwrite"
    cmd = f"dscl pretrain --config {shlex.quote(str(run_dir / 'config.yaml'))} --out {d}"
    return cmd if failed_start(run_dir) else cmd + " --overwrite"


#: Keys stage 2 may change in a run's config (``dscl classify``): stage 2, the report, where the data is read.
STAGE2_KEYS = ("classifier.*", "eval.*", "data.data_root", "data.list_dir", "data.num_workers", "data.check_files")


def key_allowed(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``section.key`` is one of ``patterns`` (``section.*`` = the whole section)."""
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in patterns)


def _resumable(key: str) -> bool:
    return key_allowed(key, RESUMABLE_KEYS)


def config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old, new)}`` for every key whose value differs (``preset`` included)."""
    a, b = flat_config(old), flat_config(new)
    return {k: (a.get(k), b.get(k)) for k in {**a, **b} if a.get(k) != b.get(k)}


def check_resume_config(old: Config, new: Config, run_dir: Path, *, epochs_done: int | None = None,
                        ) -> dict[str, tuple[Any, Any]]:
    """The changes a resume of ``run_dir`` makes to its config; refuses every key not in
    :data:`RESUMABLE_KEYS` and an ``optim.epochs`` below the epochs already trained."""
    changes = config_changes(old, new)
    refused = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in changes.items() if not _resumable(k)]
    if refused:
        raise RunDirError(
            f"cannot resume {run_dir} with {', '.join(refused)}: a resumed run must optimise what it started "
            f"with. Keys that may change on --resume: {', '.join(RESUMABLE_KEYS)}. To train with the new "
            f"values start a new run (another --out, or --overwrite)"
        )
    if epochs_done is not None and new.optim.epochs < epochs_done:
        raise RunDirError(
            f"cannot resume {run_dir} with optim.epochs={new.optim.epochs}: {epochs_done} epochs are already "
            f"trained; use optim.epochs >= {epochs_done} ({epochs_done} ends stage 1 where it is)"
        )
    return changes


def record_resume(run_dir: Path, cfg: Config, *, epochs_done: int) -> dict[str, tuple[Any, Any]]:
    """Check ``cfg`` against the run's ``config.yaml`` (:func:`check_resume_config`), then record the
    resume: ``config.yaml`` rewritten (atomically) when something changed, and one ``metrics.jsonl``
    line ``{"stage": "resume", "epoch": epochs_done, "changes": {key: [old, new]}}``. Call it on every
    rank (each checks; rank 0 writes)."""
    changes = check_resume_config(load_run_config(run_dir), cfg, run_dir, epochs_done=epochs_done)
    if dist.is_main():
        if changes:
            from dscl.report import atomic_write  # report.py owns the atomic file writer

            text = yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
            atomic_write(run_dir / "config.yaml", lambda f: f.write(text))
        MetricsLog(run_dir / "metrics.jsonl").write(
            stage="resume", epoch=epochs_done, changes={k: [a, b] for k, (a, b) in sorted(changes.items())})
    return changes


def record_stage2_config(run_dir: Path, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Make ``config.yaml`` say what stage 2 is about to use: when ``cfg`` differs from the saved config
    only in ``classifier.*`` / ``eval.*`` / where the data is read from (e.g. ``dscl classify --protocol
    official``), rewrite it
    atomically and log ``{"stage": "config", "changes": {key: [old, new]}}`` to ``metrics.jsonl``.
    Any other difference is refused: stage 2 must not describe a stage 1 that was not trained."""
    saved = load_run_config(run_dir)
    changes = config_changes(saved, cfg)
    other = sorted(k for k in changes if not key_allowed(k, STAGE2_KEYS))
    if other:
        raise RunDirError(f"stage 2 of {run_dir} cannot change {', '.join(other)}: those keys describe stage 1")
    if changes and dist.is_main():
        from dscl.report import atomic_write

        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
        atomic_write(run_dir / "config.yaml", lambda f: f.write(text))
        MetricsLog(run_dir / "metrics.jsonl").write(
            stage="config", changes={k: [a, b] for k, (a, b) in sorted(changes.items())})
    return changes


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
        raise RunDirError(f"{path} does not exist: run stage 1 first ({stage1_command(run_dir)})")
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

