"""The run on disk: the directory lifecycle (create / refuse / overwrite / resume / failed start),
``config.yaml``, ``metrics.jsonl``, and the TYPED states of its checkpoints. Nobody else reads or
writes a checkpoint dictionary: the stages build :class:`Stage1State` / :class:`ClassifierState` and
hand them to :func:`save_stage1` / :func:`save_classifier`; readers get them back from
:func:`load_stage1` / :func:`load_classifier` (any checkpoint version this dscl has written), and the
small facts of stage 1 (:class:`Stage1Summary`) from :func:`stage1_summary`, which reads a JSON file
instead of the multi-hundred-megabyte checkpoint.

Layout of a run directory (DESIGN.md): ``config.yaml`` (fully resolved), ``metrics.jsonl`` (one JSON
object per logged step/epoch), ``checkpoints/last.pt`` (stage 1) with ``checkpoints/last.json`` (its
summary), ``checkpoints/classifier.pt`` (stage 2), ``report.json``, ``report.md``, ``per_class.csv``,
``confusion.csv``, ``predictions.csv``, ``plots/*.png``, ``val/`` (the same reports on the validation
split) and ``analysis/`` (``dscl analyze``).

Checkpoint versions: 1 (flat keys; ``"backbone"`` was the backbone's name in ``last.pt`` and its
weights in ``classifier.pt``), 2 (this one: facts, data and weights in their own entries). Both load.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from dscl import dist
from dscl.config import Config, config_from_file, dump_config, flat_config
from dscl.io import atomic_write, write_json
from dscl.runtime import say
from dscl.trackers import TRACKER_FILES, close_run, forward

CHECKPOINT_VERSION = 2
STAGE1_FILE = Path("checkpoints") / "last.pt"
SUMMARY_FILE = Path("checkpoints") / "last.json"
CLASSIFIER_FILE = Path("checkpoints") / "classifier.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or from an incompatible run."""


#: Everything dscl writes into a run directory (files and folders). ``--overwrite`` removes exactly
#: these (plus the temp files of an interrupted atomic write of one of them), never anything else.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "report.json", "report.md", "per_class.csv",
             "confusion.csv", "predictions.csv", "plots", "val", "analysis", *TRACKER_FILES)
#: What a start that stopped before its first checkpoint can leave behind (see :func:`failed_start`).
STARTUP_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")
#: Config keys a resumed run may change: none of them changes what stage 1 optimises (``section.*`` =
#: every key of the section; stage 2 and evaluation have not run yet or are run again).
RESUMABLE_KEYS = ("optim.epochs", "optim.log_every", "optim.deterministic", "optim.checkpoint_every_minutes",
                  "data.num_workers", "data.data_root", "data.list_dir", "data.check_files", "model.channels_last",
                  "views.augment_on", "classifier.*", "eval.*", "log.*")


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
            if any(not _is_temp_of(q.name, ("last.pt", "last.json")) for q in p.iterdir()):
                return False
        elif p.name in TRACKER_FILES or _is_temp_of(p.name, TRACKER_FILES):  # what log.trackers wrote meanwhile
            continue
        elif not (p.is_file() and (p.name in STARTUP_FILES or _is_temp_of(p.name, STARTUP_FILES))):
            return False
    return True


def remove_run_files(out: Path) -> None:
    """Delete every file and folder dscl writes (:data:`RUN_FILES`) from ``out``; keep everything else."""
    close_run(out)  # log.trackers of this process that still write there: finished first
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
        if has_stage1(out):
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


def has_stage1(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a stage-1 checkpoint (finished or not)."""
    return (Path(run_dir) / STAGE1_FILE).is_file()


def check_output_file(out: Path, *, overwrite: bool) -> Path:
    """Refuse to replace an existing output file (unless ``overwrite``) or a directory; create its folder."""
    if out.is_dir():
        raise RunDirError(f"--out {out} is a directory; give a file name")
    if out.exists() and not overwrite:
        raise RunDirError(f"--out {out} exists; pass --overwrite to replace it, or choose another file")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: {run_dir} is not a dscl run directory")
    return config_from_file(path)


def stage1_command(run_dir: Path) -> str:
    """A command that trains stage 1 of ``run_dir`` with the configuration saved there (it is accepted:
    a directory left by a failed start is replaced; anything else needs ``--overwrite``)."""
    d = shlex.quote(str(run_dir))
    if not (run_dir / "config.yaml").is_file():
        return f"dscl pretrain --out {d} --overwrite"
    cmd = f"dscl pretrain --config {shlex.quote(str(run_dir / 'config.yaml'))} --out {d}"
    return cmd if failed_start(run_dir) else cmd + " --overwrite"


#: Keys stage 2 may change in a run's config (``dscl classify``): stage 2, the report, where the data is read.
STAGE2_KEYS = ("classifier.*", "eval.*", "data.data_root", "data.list_dir", "data.num_workers", "data.check_files",
               "log.*")


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
            dump_config(cfg, run_dir / "config.yaml")
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
        dump_config(cfg, run_dir / "config.yaml")
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
        forward(self.path.parent, record)  # log.trackers (dscl/trackers.py): nothing to do for jsonl only

    def read(self, stage: str | None = None) -> list[dict[str, Any]]:
        """The records logged so far (only those of ``stage`` when given); none when there is no log."""
        if not self.path.is_file():
            return []
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in records if stage is None or r.get("stage") == stage]


# ----------------------------------------------------------------------------------------------
# checkpoint files


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (plus the checkpoint version) to ``path`` atomically: an interrupted save
    (Ctrl-C, a full disk) leaves the previous checkpoint untouched. Prefer :func:`save_stage1` /
    :func:`save_classifier`, which write the typed states."""
    payload = {"version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw dictionary of a checkpoint written by :func:`save_checkpoint`, its version checked.
    Prefer :func:`load_stage1` / :func:`load_classifier`, which return the typed states."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc}); it may be truncated") from exc
    if not is_checkpoint(state):
        raise CheckpointError(f"{path} is not a dscl checkpoint (no 'version' key)")
    if state["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state['version']}, newer than this dscl "
            f"({CHECKPOINT_VERSION}); upgrade dscl"
        )
    return cast(dict[str, Any], state)


def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a dscl checkpoint (any version)."""
    return isinstance(obj, Mapping) and "version" in obj


def checkpoint_stage(obj: Mapping[str, Any]) -> str | None:
    """``pretrain`` / ``classify`` for a dscl checkpoint's dictionary, else None."""
    stage = obj.get("stage") if is_checkpoint(obj) else None
    return stage if stage in ("pretrain", "classify") else None


# ----------------------------------------------------------------------------------------------
# typed states


def _optional(d: Mapping[str, Any], key: str, kind: type) -> Any:
    value = d.get(key)
    return None if value is None else kind(value)


@dataclass
class DataMeta:
    """What a run knows about its data without the dataset: class names, training counts and the
    normalisation, in label order. Stored in every checkpoint (a run copied elsewhere still predicts)."""

    class_names: list[str]
    train_counts: list[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def of(cls, class_names: Sequence[Any], train_counts: Sequence[Any], mean: Sequence[Any],
           std: Sequence[Any]) -> DataMeta:
        return cls([str(n) for n in class_names], [int(c) for c in train_counts],
                   tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def to_dict(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "train_counts": list(self.train_counts),
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DataMeta | None:
        """None when ``d`` lacks any of the four entries (checkpoints written before they were stored)."""
        keys = ("class_names", "train_counts", "mean", "std")
        if d is None or any(d.get(k) is None for k in keys):
            return None
        return cls.of(*(d[k] for k in keys))


@dataclass
class RunFacts:
    """How stage 1 was made, for reports that make runs comparable (``report.json`` run facts).
    Fields a checkpoint written before they were recorded lacks are None."""

    method: str | None
    backbone: str
    num_classes: int
    dim: int | None = None
    precision: str | None = None  # fp32 / bf16 / fp16 (None: imported, unknown)
    device: str | None = None
    torch_version: str | None = None
    global_batch: int | None = None
    world_size: int | None = None
    lr: float | None = None  # the effective learning rate, base_lr x global batch / 256
    steps_per_epoch: int | None = None
    train_fingerprint: str | None = None
    imported: dict[str, Any] | None = None  # the source checkpoint of `dscl import`, else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunFacts:
        return cls(method=d.get("method"), backbone=str(d["backbone"]), num_classes=int(d["num_classes"]),
                   dim=_optional(d, "dim", int), precision=d.get("precision"), device=d.get("device"),
                   torch_version=d.get("torch_version"), global_batch=_optional(d, "global_batch", int),
                   world_size=_optional(d, "world_size", int), lr=_optional(d, "lr", float),
                   steps_per_epoch=_optional(d, "steps_per_epoch", int),
                   train_fingerprint=d.get("train_fingerprint"),
                   imported=dict(d["imported"]) if d.get("imported") else None)


@dataclass
class Stage1Summary:
    """Where stage 1 stands and how it was made: everything of ``last.pt`` but the tensors.
    Saved next to it as ``checkpoints/last.json`` (:func:`stage1_summary` reads it)."""

    epoch: int  # epochs completed
    epochs: int
    finished: bool
    wall_seconds: float
    facts: RunFacts
    data: DataMeta | None
    #: steps of epoch ``epoch + 1`` already trained: 0 at an epoch's end, > 0 for a mid-epoch checkpoint
    #: (a preempted run, or optim.checkpoint_every_minutes)
    position: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"stage": "pretrain", "epoch": self.epoch, "epochs": self.epochs, "finished": self.finished,
                "wall_seconds": self.wall_seconds, "facts": self.facts.to_dict(),
                "data": self.data.to_dict() if self.data is not None else None, "position": self.position}

    @staticmethod
    def _common(d: Mapping[str, Any]) -> dict[str, Any]:
        if "facts" in d:  # version 2
            facts, data = RunFacts.from_dict(d["facts"]), DataMeta.from_dict(d.get("data"))
        else:  # version 1: flat keys, "backbone" the backbone's name
            facts, data = RunFacts.from_dict(d), DataMeta.from_dict(d)
        return {"epoch": int(d["epoch"]), "epochs": int(d["epochs"]), "finished": bool(d.get("finished")),
                "wall_seconds": float(d.get("wall_seconds") or 0.0), "facts": facts, "data": data,
                "position": int(d.get("position") or 0)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stage1Summary:
        return cls(**cls._common(d))


@dataclass
class Stage1State(Stage1Summary):
    """A stage-1 checkpoint (``checkpoints/last.pt``): the summary plus the model (online and momentum
    encoders, queue), the CE baseline's head, optimiser, gradient scaler and every rank's RNG states."""

    model: dict[str, Tensor] = field(default_factory=dict)
    ce_head: dict[str, Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: list[dict[str, Any]] = field(default_factory=list)  # one per rank
    view_rng: list[Tensor] | None = None  # the batched views' generators, one per rank
    #: mid-epoch checkpoints only: the epoch's logged-loss sums so far, the non-finite guard's counters,
    #: and the compute threads in use (the thread adapter's choice), so the continued epoch logs and
    #: computes exactly what an uninterrupted one would
    epoch_log: dict[str, Any] | None = None
    guard: dict[str, Any] | None = None
    threads: int | None = None

    def summary(self) -> Stage1Summary:
        return Stage1Summary(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Stage1Summary)})

    def backbone_weights(self) -> dict[str, Tensor]:
        """The online encoder's backbone (what stage 2 and inference use)."""
        return _strip_prefix(self.model, "online.backbone.")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "model": self.model, "ce_head": self.ce_head, "optimizer": self.optimizer,
                "scaler": self.scaler, "rng": self.rng, "view_rng": self.view_rng, "epoch_log": self.epoch_log,
                "guard": self.guard, "threads": self.threads}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stage1State:
        return cls(**cls._common(d), model=dict(d["model"]), ce_head=d.get("ce_head"),
                   optimizer=d.get("optimizer"), scaler=d.get("scaler") or None, rng=list(d.get("rng") or []),
                   view_rng=d.get("view_rng"), epoch_log=d.get("epoch_log"), guard=d.get("guard"),
                   threads=_optional(d, "threads", int))


def _strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class ClassifierRecord:
    """How the stage-2 classifier was made: everything of ``classifier.pt`` but the tensors."""

    protocol: str  # cached / official / imported
    backbone_name: str
    num_classes: int
    selected_epoch: int | None = None
    selection: str = ""  # the sentence reports print: which epoch, chosen on what
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    imported: dict[str, Any] | None = None
    data: DataMeta | None = None
    #: False for a checkpoint written before the standardisation statistics were stored (issue #21)
    stats_recorded: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"stage": "classify", "protocol": self.protocol, "backbone_name": self.backbone_name,
                "num_classes": self.num_classes, "selected_epoch": self.selected_epoch,
                "selection": self.selection, "history": self.history, "wall_seconds": self.wall_seconds,
                "imported": self.imported, "data": self.data.to_dict() if self.data is not None else None}

    @staticmethod
    def _common(d: Mapping[str, Any]) -> dict[str, Any]:
        return {"protocol": str(d.get("protocol", "")), "backbone_name": str(d.get("backbone_name")),
                "num_classes": int(d["num_classes"]), "selected_epoch": _optional(d, "selected_epoch", int),
                "selection": str(d.get("selection") or ""), "history": list(d.get("history") or []),
                "wall_seconds": float(d.get("wall_seconds") or 0.0),
                "imported": dict(d["imported"]) if d.get("imported") else None,
                "data": DataMeta.from_dict(d.get("data", d)),
                "stats_recorded": "feature_stats" in d}


@dataclass
class ClassifierState(ClassifierRecord):
    """A stage-2 checkpoint (``checkpoints/classifier.pt``): the record plus the evaluation backbone's
    weights, the linear layer, the class means (NCM) and the standardisation folded into the layer."""

    backbone: dict[str, Tensor] = field(default_factory=dict)
    fc: dict[str, Tensor] = field(default_factory=dict)
    class_means: Tensor | None = None
    feature_stats: tuple[Tensor, Tensor] | None = None  # (mean, std) of classifier.standardize, or None

    def record(self) -> ClassifierRecord:
        return ClassifierRecord(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ClassifierRecord)})

    def to_dict(self) -> dict[str, Any]:
        stats = self.feature_stats
        return {**super().to_dict(), "backbone_state": self.backbone, "fc": self.fc, "class_means": self.class_means,
                "feature_stats": {"mean": stats[0], "std": stats[1]} if stats is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassifierState:
        stats = d.get("feature_stats")
        weights = d["backbone_state"] if "backbone_state" in d else d["backbone"]  # version 1: "backbone"
        return cls(**cls._common(d), backbone=dict(weights), fc=dict(d["fc"]), class_means=d.get("class_means"),
                   feature_stats=(stats["mean"], stats["std"]) if stats else None)


def state_from_dict(obj: Mapping[str, Any]) -> Stage1State | ClassifierState:
    """The typed state of a loaded dscl checkpoint dictionary (e.g. a file given to ``dscl import``)."""
    stage = checkpoint_stage(obj)
    if stage == "pretrain":
        return Stage1State.from_dict(obj)
    if stage == "classify":
        return ClassifierState.from_dict(obj)
    raise CheckpointError("not a dscl stage-1 or stage-2 checkpoint (no 'stage' and 'version' entries)")


# ----------------------------------------------------------------------------------------------
# the run's checkpoints


def save_stage1(run_dir: Path, state: Stage1State) -> Path:
    """``checkpoints/last.pt``, then its summary ``checkpoints/last.json`` (both atomic)."""
    path = run_dir / STAGE1_FILE
    save_checkpoint(path, state.to_dict())
    write_json(run_dir / SUMMARY_FILE, {"version": CHECKPOINT_VERSION, **state.summary().to_dict()})
    return path


def load_stage1(run_dir: Path) -> Stage1State:
    return Stage1State.from_dict(load_checkpoint(run_dir / STAGE1_FILE))


def stage1_summary(run_dir: Path) -> Stage1Summary:
    """The facts of stage 1 from the small ``checkpoints/last.json`` (runs written before it existed:
    from ``last.pt``)."""
    path = run_dir / SUMMARY_FILE
    if path.is_file() and (run_dir / STAGE1_FILE).is_file():
        try:
            return Stage1Summary.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: the checkpoint itself says the same
    return load_stage1(run_dir).summary()


def save_classifier(run_dir: Path, state: ClassifierState) -> Path:
    path = run_dir / CLASSIFIER_FILE
    save_checkpoint(path, state.to_dict())
    return path


def load_classifier(run_dir: Path) -> ClassifierState:
    return ClassifierState.from_dict(load_checkpoint(run_dir / CLASSIFIER_FILE))


def check_compatible(state: Stage1Summary, cfg: Config, num_classes: int, path: Path) -> None:
    if state.facts.backbone != cfg.model.backbone:
        raise CheckpointError(
            f"{path} holds a {state.facts.backbone} backbone but the config asks for {cfg.model.backbone}"
        )
    if state.facts.num_classes != num_classes:
        raise CheckpointError(
            f"{path} was trained on {state.facts.num_classes} classes but the dataset has {num_classes}"
        )


def load_finished_stage1(run_dir: Path) -> Stage1State:
    """The state of ``run_dir/checkpoints/last.pt``, refusing a missing or unfinished stage 1."""
    path = run_dir / STAGE1_FILE
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: run stage 1 first ({stage1_command(run_dir)})")
    state = load_stage1(run_dir)
    if not state.finished:
        raise RunDirError(
            f"stage 1 of {run_dir} is not finished ({state.epoch}/{state.epochs} epochs in "
            f"{path}); continue it with: dscl pretrain --out {run_dir} --resume"
        )
    return state
