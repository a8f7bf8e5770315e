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
weights in ``classifier.pt``), 2 (facts, data and weights in their own entries), 3 (this one: plus the
backbone spec, :class:`~dscl.backbones.BackboneSpec` as plain containers). All load; a state read from
version 1 or 2 has ``spec`` None (a built-in backbone: :func:`dscl.model.recorded_spec` derives its spec
from the config and the data).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch import Tensor

from dscl import dist
from dscl.backbones import BackboneSpec, network_spec
from dscl.config import Config, ConfigError, config_from_dict, config_from_file, dump_config, flat_config, method_name
from dscl.errors import CheckpointError, DsclError
from dscl.io import atomic_write, write_json, write_text
from dscl.runtime import say
from dscl.trackers import TRACKER_FILES, close_run, forward

CHECKPOINT_VERSION = 4
STAGE1_FILE = Path("checkpoints") / "last.pt"
SUMMARY_FILE = Path("checkpoints") / "last.json"
CLASSIFIER_FILE = Path("checkpoints") / "classifier.pt"


#: Everything dscl writes into a run directory (files and folders). ``--overwrite`` removes exactly
#: these (plus the temp files of an interrupted atomic write of one of them), never anything else.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "report.json", "report.md", "per_class.csv",
             "confusion.csv", "predictions.csv", "plots", "val", "analysis", *TRACKER_FILES)
#: What a start that stopped before its first checkpoint can leave behind (see :func:`failed_start`).
STARTUP_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")
#: Config keys a resumed run may change: none of them changes what stage 1 optimises (``section.*`` =
#: every key of the section; stage 2 and evaluation have not run yet or are run again).
RESUMABLE_KEYS = ("optim.epochs", "optim.log_every", "optim.deterministic", "optim.checkpoint_every_minutes",
                  "model.pretrained", "data.num_workers", "data.data_root", "data.list_dir", "data.check_files",
                  "model.channels_last", "model.grad_checkpointing", "views.augment_on", "classifier.*", "eval.*",
                  "log.*")


class RunDirError(DsclError, ValueError):
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


def foreign_files(out: Path) -> list[str]:
    """The names in folder ``out`` when it holds something but nothing dscl writes (:data:`RUN_FILES`, the
    temp files of their atomic writes): e.g. the ``slurm-%j.out`` a job opened there before dscl started.
    Empty for a missing or empty folder and for one with dscl files."""
    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir())
    return [] if any(n in RUN_FILES or _is_temp_of(n, RUN_FILES) for n in names) else names


def name_some(names: Sequence[str], shown: int = 3) -> str:
    """``a, b, c and 4 more``: a few file names for a one-line message."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _decide(out: Path, *, resume: bool, overwrite: bool, resumable: bool = True) -> tuple[str, str]:
    """What :func:`prepare_run_dir` does with ``out``: ``(action, message)``, action one of ``error``,
    ``resume``, ``create``, ``replace-failed`` or ``overwrite``."""
    if resume and overwrite:
        return "error", "--resume and --overwrite contradict each other; pass one of them"
    problem = out_path_problem(out, folder=True)
    if problem:
        return "error", problem
    if resume:
        if has_stage1(out):
            return "resume", ""
        if foreign_files(out):
            return "error", (f"cannot resume: {out} holds no dscl run, only {name_some(foreign_files(out))}; "
                             f"--resume auto starts a new run there and keeps those files (or choose another --out)")
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
    if foreign_files(out):
        start = "--resume auto" if resumable else "--overwrite (it removes only dscl's own files)"
        return "error", (f"--out {out} holds no dscl run but other files ({name_some(foreign_files(out))}); pass "
                         f"{start} to start the run there and keep them, or choose another --out")
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
        make_out_dir(out)
    dist.barrier()
    return out


def resume_refusal(out: str | Path) -> str | None:
    """Why ``--resume`` cannot continue ``out`` (what :func:`prepare_run_dir` would say), or None when it can."""
    action, message = _decide(Path(out), resume=True, overwrite=False)
    return message if action == "error" else None


def has_stage1(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a stage-1 checkpoint (finished or not)."""
    return (Path(run_dir) / STAGE1_FILE).is_file()


def check_output_file(out: Path, *, overwrite: bool) -> Path:
    """Refuse to replace an existing output file (unless ``overwrite``), a directory, or a path under a
    file (:func:`out_path_problem`); create its folder."""
    problem = out_path_problem(out, folder=False)
    if problem:
        raise RunDirError(problem)
    if out.exists() and not overwrite:
        raise RunDirError(f"--out {out} exists; pass --overwrite to replace it, or choose another file")
    make_out_dir(out.parent, out)
    return out


def out_path_problem(out: Path, *, folder: bool) -> str | None:
    """Why ``--out`` cannot become the folder (``folder``) or the file it names, as a one-line message, or
    None: a file where the folder should be, a folder where the file should be, or a file among the folders
    above it (nothing can be created under a file)."""
    if folder and out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder; choose another --out (or move the file away)"
    if not folder and out.is_dir():
        return f"--out {out} is a directory; give a file name"
    for parent in out.parents:
        if parent.exists():  # the nearest one that exists decides
            if not parent.is_dir():
                return (f"--out {out}: {parent} is a file, not a folder, so nothing can be created under it; "
                        f"choose another --out")
            break
    return None


def make_out_dir(folder: Path, out: Path | None = None) -> Path:
    """Create ``folder`` and its parents: the folder ``--out`` names, or (``out`` given) the folder of the
    file it names. What stands in the way (a file, a permission) is one :class:`RunDirError`."""
    problem = out_path_problem(folder, folder=True) if out is None else out_path_problem(out, folder=False)
    if problem:
        raise RunDirError(problem)
    out = folder if out is None else out
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--out {out}: cannot create the folder {folder} ({exc.strerror or exc}); "
                          f"choose another --out") from exc
    return folder


def load_run_config(run_dir: str | Path) -> Config:
    """The run's ``config.yaml``, checked against what its stage-1 checkpoint records
    (:func:`check_run_config`): a hand edit that contradicts how the model was trained is refused."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: {run_dir} is not a dscl run directory")
    cfg = config_from_file(path)
    check_run_config(run_dir, cfg, path)
    return cfg


def recorded_summary(run_dir: str | Path) -> Stage1Summary | None:
    """Stage 1's summary from ``checkpoints/last.json`` when the run has one (None: no stage 1 yet, or a
    run from before the summary file; the multi-hundred-megabyte ``last.pt`` is not read for a check)."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY_FILE).is_file() or not has_stage1(run_dir):
        return None
    try:
        return stage1_summary(run_dir)
    except (CheckpointError, ValueError, KeyError, TypeError):
        return None  # an unreadable summary: the commands that load the checkpoint say what is wrong


def _recorded_config(summary: Stage1Summary) -> dict[str, Any] | None:
    """The flat recorded config of ``summary`` (keys added since default, as in ``config.yaml``), or None
    when there is none or this dscl cannot read it (a newer dscl's key): the facts are checked then."""
    if summary.config is None:
        return None
    try:
        return flat_config(config_from_dict(summary.config, "the recorded config"))
    except ConfigError:
        return None


#: The keys :func:`dscl.config.method_name` reads, as a checkpoint without a recorded config names them
METHOD_KEYS = "the method (loss.loss, loss.pbsd_weight, views.num_patches)"


def check_run_config(run_dir: str | Path, cfg: Config, source: str | Path = "the config") -> None:
    """Refuse ``cfg`` (a run's ``config.yaml``, or a config handed to a stage) where it contradicts what
    stage 1's checkpoint recorded: every key but :data:`RESUMABLE_KEYS` (where the data is read, logging,
    stage 2 and the report's choices, and ``optim.epochs``, whose trained count the reports take from the
    checkpoint) must hold the value stage 1 was trained with. A checkpoint written before the config was
    recorded is checked on the facts it has (backbone, embedding size, method, global batch).

    Raises:
        ConfigError: naming every contradicting key, both values, ``source`` and the checkpoint.
    """
    summary = recorded_summary(run_dir)
    if summary is None:
        return
    where = Path(run_dir) / SUMMARY_FILE
    trained = _recorded_config(summary)
    if trained is not None:
        mine = flat_config(cfg)
        wrong = [(k, mine.get(k), trained.get(k)) for k in trained
                 if mine.get(k) != trained.get(k) and not _resumable(k)]
    else:
        facts = summary.facts
        wrong = [(k, a, b) for k, a, b in (("model.backbone", cfg.model.backbone, facts.backbone),
                                           ("model.dim", cfg.model.dim, facts.dim),
                                           (METHOD_KEYS, method_name(cfg), facts.method),
                                           ("optim.batch_size", cfg.optim.batch_size, facts.global_batch))
                 if b is not None and a != b and not (k == METHOD_KEYS and facts.imported)]
    if wrong:
        said = "; ".join(f"{k} is {a!r} there but stage 1 was trained with {b!r}" for k, a, b in wrong)
        them = "them" if len(wrong) > 1 else "it"
        raise ConfigError(f"{source} contradicts how {run_dir} was trained ({where}): {said}. Set {them} back to "
                          f"the trained value, or train a new run (another --out) for the new one")


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
    line ``{"stage": "resume", "epoch": epochs_done, "changes": {key: [old, new]}}``, after removing the
    records logged after the checkpoint (:func:`past_checkpoint`). Call it on every rank (each checks;
    rank 0 writes)."""
    changes = check_resume_config(load_run_config(run_dir), cfg, run_dir, epochs_done=epochs_done)
    if dist.is_main():
        if changes:
            dump_config(cfg, run_dir / "config.yaml")
        log = MetricsLog(run_dir / "metrics.jsonl")
        if has_stage1(run_dir):
            # what was logged after the checkpoint (Ctrl-C, kill -9) is trained and logged again: once per step
            dropped = log.drop(past_checkpoint(stage1_summary(run_dir)))
            steps = [r["step"] for r in dropped if isinstance(r.get("step"), int)]
            if dropped:
                say(f"{log.path}: {len(dropped)} stage-1 record(s) logged after the checkpoint"
                    f"{f' (steps {min(steps)}-{max(steps)})' if steps else ''} removed; they are trained and "
                    f"logged again")
        log.write(
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
    """Append-only ``metrics.jsonl`` (rank 0 writes; other ranks are no-ops), one JSON object a line.
    A last line without its newline is a record cut short by a killed process: no record (:meth:`read`
    skips it, the next :meth:`write` replaces it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        if not dist.is_main():
            return
        with self.path.open("a+b") as fh:
            _cut_torn_tail(fh)
            fh.write((json.dumps(record) + "\n").encode())
        forward(self.path.parent, record)  # log.trackers (dscl/trackers.py): nothing to do for jsonl only

    def _lines(self) -> tuple[list[str], bool]:
        """The complete lines, and whether a torn last one was left out."""
        text = self.path.read_text() if self.path.is_file() else ""
        lines = text.splitlines()
        torn = bool(lines) and not text.endswith("\n")
        return [line for line in (lines[:-1] if torn else lines) if line.strip()], torn

    def read(self, stage: str | None = None) -> list[dict[str, Any]]:
        """The records logged so far (only those of ``stage`` when given); none when there is no log."""
        records = [json.loads(line) for line in self._lines()[0]]
        return [r for r in records if stage is None or r.get("stage") == stage]

    def drop(self, select: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Remove the records ``select`` picks (and a torn last line): the file is rewritten atomically, the
        other lines kept as they are. Returns the records removed."""
        lines, torn = self._lines()
        records = [json.loads(line) for line in lines]
        dropped = [r for r in records if select(r)]
        if dropped or torn:
            write_text(self.path, "".join(line + "\n" for line, r in zip(lines, records, strict=True) if not select(r)))
        return dropped


def _cut_torn_tail(fh: IO[bytes]) -> None:
    """Cut off a last line without its newline from ``fh`` (open ``a+b``): the write a killed process left."""
    end = fh.seek(0, os.SEEK_END)
    if end == 0:
        return
    fh.seek(end - 1)
    if fh.read(1) == b"\n":
        return
    start = max(0, end - (1 << 20))  # a record is far shorter than 1 MiB
    fh.seek(start)
    newline = fh.read().rfind(b"\n")
    if newline >= 0 or start == 0:
        fh.truncate(start + newline + 1)
    else:
        fh.write(b"\n")


def past_checkpoint(state: Stage1Summary) -> Callable[[Mapping[str, Any]], bool]:
    """Whether a ``metrics.jsonl`` record is stage-1 training that checkpoint ``state`` has not kept: a
    step after its ``epoch`` epochs and ``position`` steps (or, without the steps per epoch, of a later
    epoch), or the means of a later epoch. A resume trains those steps again and logs them again."""
    per_epoch = state.facts.steps_per_epoch
    done = state.epoch * per_epoch + state.position if per_epoch else None

    def past(record: Mapping[str, Any]) -> bool:
        stage = record.get("stage")
        if stage == "pretrain" and done is not None and isinstance(record.get("step"), int):
            return record["step"] > done
        if stage in ("pretrain", "pretrain_epoch") and isinstance(record.get("epoch"), int):
            return record["epoch"] > state.epoch
        return False

    return past


# ----------------------------------------------------------------------------------------------
# checkpoint files


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (plus the checkpoint version) to ``path`` atomically: an interrupted save
    (Ctrl-C, a full disk) leaves the previous checkpoint untouched. Prefer :func:`save_stage1` /
    :func:`save_classifier`, which write the typed states."""
    payload = {"version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def numpy_array_globals() -> list[Any]:
    """What unpickling numpy's RNG state needs (a uint32 array; checkpoints written before the states were
    stored as plain lists hold one): the array rebuilder under numpy 2's and numpy 1's module names, the
    array and dtype classes and the uint32 dtype's class. Constructors of data, none of them runs code."""
    import importlib

    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # numpy 2
    except ImportError:  # numpy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
    rebuild = multiarray._reconstruct
    return [(rebuild, "numpy._core.multiarray._reconstruct"), (rebuild, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _global_name(item: Any) -> str:
    return item[1] if isinstance(item, tuple) else f"{item.__module__}.{item.__qualname__}"


def read_weights_only(path: str | Path, map_location: str | torch.device = "cpu",
                      allowed: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain containers, plus
    numpy's RNG arrays (:func:`numpy_array_globals`) and the globals in ``allowed`` (classes, or
    ``(class, "module.name")`` pairs). Unpickling any other object could run code the file's author chose
    (a copied run, a downloaded checkpoint), so such a file is refused without being loaded.

    Raises:
        CheckpointError: a missing file, a file holding other Python objects (named), or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    damage = damaged_checkpoint(path)
    if damage:
        raise CheckpointError(damage)
    safe = [*numpy_array_globals(), *allowed]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a file we will not read
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not even a zip checkpoint
            names = []
        known = {_global_name(item) for item in safe}
        objects = [n for n in names if n not in known]
        if objects:
            raise CheckpointError(
                f"cannot read checkpoint {path} as weights: it holds Python objects ({', '.join(objects[:5])}), "
                f"and unpickling them could run code; dscl reads checkpoints with torch.load(weights_only=True), "
                f"which refuses anything but tensors and plain containers. Use only files from a source you trust, "
                f"re-saved as tensors and plain containers") from exc
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a file torch.save wrote, or it is damaged "
                              f"({type(exc).__name__}); copy it again from where it was made") from exc


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save (since torch 1.6) and torch.jit.save both write zip archives


def damaged_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a whole checkpoint, as one complete sentence (empty, or a zip archive cut off as
    when a copy or download stopped early), before torch's own messages about such files; None otherwise."""
    import zipfile

    size = path.stat().st_size
    if size == 0:
        return f"cannot read checkpoint {path}: the file is empty (0 bytes); copy or download it again"
    with path.open("rb") as fh:
        if fh.read(4) != _ZIP_MAGIC:
            return None  # an older pickle-only torch file, or not torch at all: torch.load says which
    try:
        with zipfile.ZipFile(path):
            return None
    except zipfile.BadZipFile:
        return (f"cannot read checkpoint {path}: the file is incomplete ({size} bytes; its zip archive has no end, "
                "as when a copy or download stopped early); copy or download it again")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw dictionary of a checkpoint written by :func:`save_checkpoint`, its version checked, read
    with :func:`read_weights_only` (a file holding other Python objects is refused, never unpickled).
    Prefer :func:`load_stage1` / :func:`load_classifier`, which return the typed states."""
    path = Path(path)
    state = read_weights_only(path, map_location)
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
    #: the resolved config (:meth:`Config.to_dict`) stage 1 was training with when this checkpoint was
    #: saved: what a hand-edited ``config.yaml`` is checked against (:func:`check_run_config`); None for
    #: checkpoints written before it was recorded
    config: dict[str, Any] | None = None
    #: the spec the backbone was built from (architecture and input settings); None for checkpoint
    #: versions 1-2 (:func:`dscl.model.recorded_spec`)
    spec: BackboneSpec | None = None
    #: a partial fine-tune (model.finetune lora / last:K / frozen): where the frozen base came from and its
    #: hash (:func:`dscl.model.base_record`); ``model`` then holds only the trained tensors. None: every tensor.
    base: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"stage": "pretrain", "epoch": self.epoch, "epochs": self.epochs, "finished": self.finished,
                "wall_seconds": self.wall_seconds, "facts": self.facts.to_dict(),
                "data": self.data.to_dict() if self.data is not None else None, "position": self.position,
                "config": self.config, "spec": _spec_dict(self.spec), "base": self.base}

    @staticmethod
    def _common(d: Mapping[str, Any]) -> dict[str, Any]:
        if "facts" in d:  # version 2
            facts, data = RunFacts.from_dict(d["facts"]), DataMeta.from_dict(d.get("data"))
        else:  # version 1: flat keys, "backbone" the backbone's name
            facts, data = RunFacts.from_dict(d), DataMeta.from_dict(d)
        return {"epoch": int(d["epoch"]), "epochs": int(d["epochs"]), "finished": bool(d.get("finished")),
                "wall_seconds": float(d.get("wall_seconds") or 0.0), "facts": facts, "data": data,
                "position": int(d.get("position") or 0),
                "config": dict(d["config"]) if isinstance(d.get("config"), Mapping) else None,
                "spec": _spec_of(d.get("spec")), "base": dict(d["base"]) if d.get("base") else None}

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


def _spec_dict(spec: BackboneSpec | None) -> dict[str, Any] | None:
    return spec.to_dict() if spec is not None else None


def _spec_of(d: Any) -> BackboneSpec | None:
    """The stored spec (plain containers) as a :class:`BackboneSpec`; None for versions 1-2."""
    if d is None:
        return None
    try:
        return BackboneSpec.from_dict(d)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"the checkpoint's backbone spec cannot be read: {exc}") from None


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
    #: the spec of the evaluation backbone (architecture and input settings); None for versions 1-2
    spec: BackboneSpec | None = None
    #: temperature T of the plain classifier's logits (calibrated probabilities: ``softmax(logits / T)``),
    #: fitted by NLL on the validation split after the classifier was selected (Guo et al. 2017); None
    #: where there is none: no validation split, an imported classifier, or a checkpoint written before
    #: temperatures were fitted (``temperature_fit`` says which)
    temperature: float | None = None
    #: how ``temperature`` was fitted: ``{"split": "val", "description", "n", "nll_before", "nll_after",
    #: "method"}``, or ``{"split": None, "reason": ...}`` when none could be; None for older checkpoints
    temperature_fit: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"stage": "classify", "protocol": self.protocol, "backbone_name": self.backbone_name,
                "num_classes": self.num_classes, "selected_epoch": self.selected_epoch,
                "selection": self.selection, "history": self.history, "wall_seconds": self.wall_seconds,
                "imported": self.imported, "data": self.data.to_dict() if self.data is not None else None,
                "spec": _spec_dict(self.spec), "temperature": self.temperature,
                "temperature_fit": self.temperature_fit}

    @staticmethod
    def _common(d: Mapping[str, Any]) -> dict[str, Any]:
        return {"protocol": str(d.get("protocol", "")), "backbone_name": str(d.get("backbone_name")),
                "num_classes": int(d["num_classes"]), "selected_epoch": _optional(d, "selected_epoch", int),
                "selection": str(d.get("selection") or ""), "history": list(d.get("history") or []),
                "wall_seconds": float(d.get("wall_seconds") or 0.0),
                "imported": dict(d["imported"]) if d.get("imported") else None,
                "data": DataMeta.from_dict(d.get("data", d)),
                "stats_recorded": "feature_stats" in d, "spec": _spec_of(d.get("spec")),
                # absent from checkpoints written before temperature scaling (issue 31): None, no version bump
                "temperature": _optional(d, "temperature", float),
                "temperature_fit": dict(d["temperature_fit"]) if isinstance(d.get("temperature_fit"), Mapping)
                else None}


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
    return _typed(Stage1State.from_dict, run_dir / STAGE1_FILE)


def _typed(make: Callable[[dict[str, Any]], Any], path: Path) -> Any:
    """``make(checkpoint dict)``; a stored spec that cannot be read names the file."""
    raw = load_checkpoint(path)
    try:
        return make(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


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
    return _typed(ClassifierState.from_dict, run_dir / CLASSIFIER_FILE)


def check_compatible(state: Stage1Summary, cfg: Config, num_classes: int, path: Path) -> None:
    """Refuse a config whose backbone is not the checkpoint's network, or a dataset with other classes."""
    check_same_network(state.spec, state.facts.backbone, cfg, path)
    if state.facts.num_classes != num_classes:
        raise CheckpointError(
            f"{path} was trained on {state.facts.num_classes} classes but the dataset has {num_classes}"
        )


def check_same_inputs(stored: BackboneSpec | None, spec: BackboneSpec, path: Path) -> None:
    """Refuse to continue stage 1 (``--resume``) with other input settings than it started with: the
    network has learnt on those (a pretrained weights' configuration that changed in between, say)."""
    if stored is not None and stored != spec:
        raise CheckpointError(f"{path}: stage 1 started with inputs {stored.describe_inputs()}, but the config now "
                              f"gives {spec.describe_inputs()} (did model.pretrained or its configuration change?); "
                              "resume with the weights stage 1 started from, or start a new run")


def check_same_network(spec: BackboneSpec | None, name: str, cfg: Config, path: Path) -> None:
    """Refuse ``cfg`` when its architecture (``model.backbone``, ``backbone_args``, ``pool``) is not the one the
    checkpoint ``path`` stored (``spec``; ``name`` for versions 1-2, which recorded the built-in's name only)."""
    wanted = network_spec(cfg.model)
    same = spec.same_network(wanted) if spec is not None else name == cfg.model.backbone
    if not same:
        held = _arch_words(spec) if spec is not None else name
        raise CheckpointError(f"{path} holds a {held} backbone but the config asks for {_arch_words(wanted)}; "
                              "set model.backbone / model.backbone_args / model.pool back to the checkpoint's")


def _arch_words(spec: BackboneSpec) -> str:
    """``timm:vit_tiny_patch16_224 {'depth': 2} pool cls`` (arguments and pool only where given)."""
    return (spec.qualified_name + (f" {spec.args}" if spec.args else "")
            + (f" pool {spec.pool}" if spec.pool != "avg" else ""))


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
