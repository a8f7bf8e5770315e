"""What every ``dscl analyze`` command needs: open a finished run, pick classes, write results atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dscl.backbones import Backbone, BackboneSpec
from dscl.config import Config
from dscl.data import DatasetSplits, build_datasets
from dscl.errors import DsclError
from dscl.inference import Predictor, load_run
from dscl.metrics import shot_groups
from dscl.model import DSCLModel, base_record, build_encoder, load_trained, recorded_spec
from dscl.rng import seed_everything
from dscl.run import STAGE1_FILE, RunDirError, Stage1State, load_finished_stage1, load_run_config


class AnalysisError(DsclError, ValueError):
    """Bad input to an analysis command (the message says what, where and how to fix it)."""


@dataclass
class RunArtifacts:
    """A finished stage-1 run: its directory, config, data splits, the stage-1 checkpoint state and
    the run as a model (:func:`dscl.inference.load_run`: evaluation backbone and input conversion)."""

    run_dir: Path
    cfg: Config
    splits: DatasetSplits
    stage1: Stage1State
    predictor: Predictor

    @property
    def spec(self) -> BackboneSpec:
        """Stage 1's backbone spec (derived from the config and data for checkpoints written before specs)."""
        return recorded_spec(self.stage1.spec, self.cfg, self.splits.mean, self.splits.std)

    @property
    def train_counts(self) -> list[int]:
        return list(self.splits.train_counts)

    def groups(self) -> dict[str, list[int]]:
        """Many / Medium / Few class indices with the run's thresholds."""
        return shot_groups(self.splits.train_counts, self.cfg.eval.many_threshold, self.cfg.eval.few_threshold)


def open_run(run_dir: str | Path) -> RunArtifacts:
    """Open a run directory whose stage 1 has finished; clear errors otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist (give the --out folder of a dscl run)")
    cfg = load_run_config(run_dir)
    state = load_finished_stage1(run_dir)
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    return RunArtifacts(run_dir, cfg, splits, state, load_run(run_dir, cfg=cfg, stage1_ok=True))


def stage1_model(art: RunArtifacts, *, initial: bool = False) -> DSCLModel:
    """The run's stage-1 model (online + momentum encoder + queue), in eval mode on the CPU.

    ``initial=True`` gives the same model at initialisation: same seed, spec and construction as training
    (so the same initial weights: ``model.pretrained`` loaded again), with an empty queue.
    """
    cfg = art.cfg
    if initial:
        seed_everything(cfg.optim.seed)
    stored = art.stage1.spec if art.stage1 is not None else None  # None: the config's (built-in) architecture
    base = art.stage1.base if art.stage1 is not None else None  # a partial fine-tune's checkpoint: load its base
    model = DSCLModel(build_encoder(cfg, stored, pretrained=initial or base is not None),
                      queue_size=cfg.model.queue_size, patch_bn=cfg.model.patch_bn, roi_aligned=cfg.model.roi_aligned)
    if not initial:
        if cfg.loss.loss == "ce":
            raise AnalysisError(
                f"{art.run_dir} was trained with cross-entropy (no projection head or queue to analyse); "
                "use a contrastive run (scl, dscl, ...)"
            )
        imported = art.stage1.facts.imported or {}
        if imported and not imported.get("head"):
            raise AnalysisError(
                f"{art.run_dir} was imported from {imported.get('from')} ({imported.get('format')} format), which has "
                "no projection head; this analysis needs the stage-1 head (import an official stage-1 checkpoint)"
            )
        load_trained(model, art.stage1.model, stored=base, built=base_record(cfg, model.online),
                     where=art.run_dir / STAGE1_FILE)
    return model.eval()


def eval_backbone(art: RunArtifacts) -> Backbone:
    """The backbone used for evaluation (:func:`dscl.inference.load_run`), in eval mode on the CPU.

    The stage-2 checkpoint's copy when there is one (its BatchNorm statistics were re-estimated on
    clean training images), else the stage-1 online backbone.
    """
    return art.predictor.backbone.cpu().eval()  # type: ignore[return-value]


GROUP_WORDS = {"many": "head", "medium": "medium", "few": "tail"}


def default_classes(art: RunArtifacts) -> str:
    """``"head,tail"`` when the run has Many and Few classes; otherwise its most and least frequent
    non-empty shot groups (e.g. ``"medium,tail"`` on the smoke preset, which has no Many class), or
    the one group it has. Defaults must fit the run: a fixed ``head,tail`` fails on such runs."""
    groups = art.groups()
    present = [GROUP_WORDS[g] for g in ("many", "medium", "few") if groups[g]]
    if not present:
        return "all"
    return ",".join(dict.fromkeys([present[0], present[-1]]))


def resolve_classes(spec: str, art: RunArtifacts) -> list[int]:
    """Class indices from a comma list of class names, indices, or the words head/many, medium, tail/few, all.

    The words expand to the run's shot groups; names match case-insensitively. Order is kept, duplicates dropped.
    """
    names = art.splits.class_names
    groups = art.groups()
    words = {"head": groups["many"], "many": groups["many"], "medium": groups["medium"],
             "tail": groups["few"], "few": groups["few"], "all": list(range(art.splits.num_classes))}
    lower = {n.lower(): i for i, n in enumerate(names)}
    out: list[int] = []
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise AnalysisError(f"--classes {spec!r} is empty; give class names, indices or head/medium/tail/all")
    for tok in tokens:
        if tok.lower() in words:
            picked = words[tok.lower()]
            if not picked:
                raise AnalysisError(f"--classes {tok!r}: the run has no classes in that shot group")
        elif tok.lower() in lower:
            picked = [lower[tok.lower()]]
        elif tok.lstrip("-").isdigit():
            i = int(tok)
            if not 0 <= i < len(names):
                raise AnalysisError(f"--classes {tok!r}: class index out of range 0..{len(names) - 1}")
            picked = [i]
        else:
            raise AnalysisError(
                f"--classes {tok!r} is not a class of {art.splits.name}; valid: head, medium, tail, all, "
                f"indices 0..{len(names) - 1}, or names: {', '.join(names)}"
            )
        out += [i for i in picked if i not in out]
    return out


def analysis_dir(art: RunArtifacts, out: str | Path | None) -> Path:
    """``out`` or ``RUN/analysis``, created."""
    from dscl.run import make_out_dir

    return make_out_dir(Path(out) if out is not None else art.run_dir / "analysis")
