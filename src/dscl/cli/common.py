"""Pieces every command shares: argument groups, config assembly, exit codes, rank-0 printing."""

from __future__ import annotations

import argparse
import copy
import re
import shlex
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130
#: A stage stopped on SIGTERM / SIGUSR1 after saving: requeue the job and run the same command with --resume auto
EXIT_PREEMPTED = 3
#: A bug in dscl (an exception that is not a :class:`~dscl.errors.DsclError` or an OS error); Python's own code for
#: an uncaught exception, so scripts that only check "non-zero" see no change
EXIT_INTERNAL = 1

#: ``--profile`` choices: the keys of :data:`dscl.config.PROFILES` (not imported here: the parser stays light;
#: tests/test_policies.py checks they agree)
PROFILE_NAMES = ("default", "official", "gpaco", "bcl")

#: A ``section.key=value`` config override (what ``main`` collects from anywhere on the command line).
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*=")
#: Shortcut flags of the configuration group and the config key each one sets.
FLAG_KEYS = (("dataset", "data.dataset"), ("train_list", "data.train_list"), ("val_list", "data.val_list"),
             ("test_list", "data.test_list"), ("data_root", "data.data_root"), ("seed", "optim.seed"),
             ("pretrained", "model.pretrained"), ("skip_file_check", "data.check_files"))


def config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", default=None,
                   help="preset name (default fmnist-lt; see `dscl presets`)")
    g.add_argument("--profile", choices=PROFILE_NAMES, default=None,
                   help="official: the official code's conventions in both stages over the preset (per-slot "
                        "patch BatchNorm, roi_align aligned=False, a random full queue at the start, the "
                        "official stage-2 protocol on raw features); see README 'Deliberate differences'. "
                        "gpaco / bcl: those peers' augmentation recipe in both stages (RandAugment on both "
                        "views and the classifier's; not the paper's); see README 'Augmentation recipes'")
    g.add_argument("--config", default=None, metavar="FILE", help="YAML file applied over the preset")
    g.add_argument("--dataset", default=None,
                   help="fmnist-lt, cifar10-lt, cifar100-lt, split or folder (same as data.dataset=NAME)")
    g.add_argument("--train-list", default=None, metavar="FILE", help="same as data.train_list=FILE")
    g.add_argument("--val-list", default=None, metavar="FILE", help="same as data.val_list=FILE")
    g.add_argument("--test-list", default=None, metavar="FILE", help="same as data.test_list=FILE")
    g.add_argument("--data-root", default=None, metavar="DIR",
                   help="dataset folder (same as data.data_root=DIR; default $DSCL_DATA or the standard place)")
    g.add_argument("--seed", type=int, default=None, help="training seed (same as optim.seed=N)")
    g.add_argument("--pretrained", default=None, metavar="PATH",
                   help="backbone weights to start from: a local file (.pth / .safetensors ...; e.g. ImageNet "
                        "weights for Places-LT) or folder, or hf-hub:ORG/NAME for timm: / open_clip: backbones "
                        "(same as model.pretrained=PATH; a local file downloads nothing)")
    g.add_argument("--skip-file-check", action="store_const", const="false", default=None,
                   help="do not check before training that every listed image file exists and opens "
                        "(same as data.check_files=false; for trusted data where the check is slow)")
    g.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, anywhere on the command line (before or after options), e.g. "
                        "optim.epochs=5 loss.alpha=0.2 model.backbone=resnet18; later ones win. KEY=none clears a "
                        "key that may be unset (e.g. data.n_max=none: the dataset's default); an empty value "
                        "(KEY=) is refused. Numbers take any Python spelling (5e-4, 1E-2, .5)")


DEVICES = "auto, cpu, cuda, cuda:N (N = GPU index) or mps"


def device_arg(value: str) -> str:
    """``--device`` value check: refuse a name torch would answer with its whole device list."""
    if value in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not a device dscl can use; use {DEVICES}")


def runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", type=device_arg,
                   help="auto (cuda if available), cpu, cuda, cuda:N (GPU N) or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log files still written)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def out_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--out", required=required, default=None, metavar="DIR",
                   help="run directory (refused if it exists and is not empty, unless --resume/--overwrite)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from checkpoints/last.pt; `--resume auto`: continue if --out holds "
                        "a checkpoint, start otherwise (the same command for a job that is requeued)")
    p.add_argument(RESUME_AUTO, dest="resume", action="store_const", const="auto", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help="replace the dscl files of an existing run in --out")


def config_overrides(args: argparse.Namespace, extra: list[str] | None = None) -> list[str]:
    """The ``section.key=value`` overrides a command line asks for: its overrides, then the shortcut
    flags (``--dataset``, ``--data-root``, ``--seed`` ...), then ``extra``; later ones win."""
    overrides = list(getattr(args, "overrides", None) or [])
    for flag, key in FLAG_KEYS:
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides + list(extra or [])


def load_cfg(args: argparse.Namespace, extra: list[str] | None = None):
    from dscl.config import load_config

    return load_config(args.preset, args.config, config_overrides(args, extra), profile=getattr(args, "profile", None))


RESUME_AUTO = "--resume-auto"  # what `--resume auto` / `--resume=auto` become before parsing


def resume_auto_argv(argv: list[str]) -> list[str]:
    """``--resume auto`` (two words, or ``--resume=auto``) as one option, so that a plain ``--resume``
    followed by a ``section.key=value`` override keeps meaning what it did."""
    out: list[str] = []
    for tok in argv:
        if tok == "auto" and out and out[-1] == "--resume":
            out[-1] = RESUME_AUTO
        else:
            out.append(RESUME_AUTO if tok == "--resume=auto" else tok)
    return out


def resuming(args: argparse.Namespace) -> bool:
    """Whether this command continues its run: ``--resume``, or ``--resume auto`` when ``--out`` holds a
    stage-1 checkpoint (none: the run starts, as without --resume)."""
    from dscl.run import foreign_files, has_stage1, name_some
    from dscl.runtime import say

    if args.resume == "auto":
        if args.out is None or has_stage1(args.out):
            return args.out is not None
        others = foreign_files(Path(args.out))
        if others:  # e.g. the slurm-%j.out of the job that runs this: a first start, there
            say(f"--resume auto: {args.out} holds no dscl run, only {name_some(others)}: starting a new run there; "
                f"those files are kept")
            # replacing the dscl files of a folder that has none creates the run and deletes nothing
            args.overwrite = True
        return False
    return bool(args.resume)


def continue_command(args: argparse.Namespace) -> str:
    """The command line that continues this one after a preemption: the same arguments, with
    ``--resume auto`` instead of ``--resume`` / ``--overwrite``."""
    argv = [t for t in resume_auto_argv(list(getattr(args, "argv", []) or [])) if t not in ("--overwrite", "--resume",
                                                                                              RESUME_AUTO)]
    if hasattr(args, "resume") and getattr(args, "out", None) and "--out" not in argv \
            and not any(t.startswith("--out=") for t in argv):
        argv += ["--out", str(args.out)]  # dscl run without --out chose one (dscl job names its run in its file)
    resume = ["--resume", "auto"] if hasattr(args, "resume") else []  # stage 2 commands simply run again
    return shlex.join(["dscl", *argv, *resume])


def resume_cfg(args: argparse.Namespace):
    """On --resume the run's own config.yaml is the base. ``--config`` and overrides apply over it,
    but only keys that may change on resume (:data:`dscl.run.RESUMABLE_KEYS`) may differ from the
    run's; a different ``--preset`` is refused. Checked before anything is loaded or written."""
    from dscl.config import apply_mapping, parse_overrides, read_config_file, validate
    from dscl.run import RunDirError, check_resume_config, load_run_config, resume_refusal

    out = Path(args.out)
    refusal = resume_refusal(out)
    if refusal is not None:  # before config.yaml is read: say what is there, not "no config.yaml"
        raise RunDirError(refusal)
    old = load_run_config(out)
    if args.preset is not None and args.preset != old.preset:
        raise RunDirError(
            f"--preset {args.preset} on --resume: {out} was trained with preset {old.preset}, and a resumed run "
            f"keeps its configuration; drop --preset (or start a new run with another --out)"
        )
    profile = getattr(args, "profile", None)
    if profile is not None and profile != old.profile:
        raise RunDirError(
            f"--profile {profile} on --resume: {out} was trained with profile {old.profile}, and a resumed run "
            f"keeps its configuration; drop --profile (or start a new run with another --out)"
        )
    cfg = copy.deepcopy(old)
    if args.config:
        apply_mapping(cfg, read_config_file(args.config), args.config)
    overrides = config_overrides(args)
    if overrides:
        apply_mapping(cfg, parse_overrides(overrides), "override")
    validate(cfg)
    check_resume_config(old, cfg, out)
    return cfg


def table(report: dict) -> str:
    from dscl.report import format_table, report_rows

    return format_table(report_rows(report))


def print_main(text: str) -> None:
    from dscl import dist

    if dist.is_main():
        print(text, flush=True)


#: What ``dscl evaluate`` may change: the report's groups and post-hoc rows, where the data is read from.
EVALUATE_KEYS = ("eval.*", "classifier.tau_norm", "classifier.logit_adjust_tau", "data.data_root", "data.list_dir",
                 "data.num_workers", "data.check_files", "log.*")


def run_cfg_with_overrides(run: str, args: argparse.Namespace, allowed: tuple[str, ...], command: str,
                           extra: list[str] | None = None, *, data_root_key: bool = True):
    """The run's ``config.yaml`` with this command line's ``section.key=value`` overrides (and, with
    ``data_root_key``, ``--data-root`` as ``data.data_root``) applied; a key outside ``allowed``
    (``section.*`` = the whole section) is refused, because it would describe a training that did not
    happen."""
    from dscl.config import apply_mapping, parse_overrides, validate
    from dscl.run import RunDirError, config_changes, key_allowed, load_run_config

    saved = load_run_config(Path(run))
    cfg = copy.deepcopy(saved)
    items = list(getattr(args, "overrides", None) or []) + list(extra or [])
    if data_root_key and getattr(args, "data_root", None) is not None:
        items.append(f"data.data_root={args.data_root}")
    if not items:
        return cfg
    apply_mapping(cfg, parse_overrides(items), "override")
    validate(cfg)

    refused = sorted(k for k in config_changes(saved, cfg) if not key_allowed(k, allowed))
    if refused:
        raise RunDirError(f"dscl {command} cannot change {', '.join(refused)}: that would describe a training that "
                          f"did not happen; it may change {', '.join(allowed)}. Train a new run for the others")
    return cfg
