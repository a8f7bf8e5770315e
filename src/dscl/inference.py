"""Turning a finished run into a model: :func:`load_run` -> :class:`Predictor` (the ONE way to do it).

``dscl evaluate``, ``dscl analyze``, ``dscl predict`` / ``embed`` / ``export`` / ``ensemble`` all load a
run through :func:`load_run`, so the backbone, the linear classifier, the input conversion and the
class names are the same everywhere.

```python
from dscl import load_run
p = load_run("runs/a")                 # Predictor (reads config.yaml + checkpoints/classifier.pt)
p.class_names, p.train_counts
probs = p.predict(["a.png", pil_image])  # (N, C) probabilities
calibrated = p.predict(["a.png"], calibrated=True)  # softmax(logits / p.temperature), T fitted on val
feats = p.embed(batch_uint8_nhwc)        # (N, D) L2-normalised backbone features
```

Everything :func:`load_run` needs is inside the run directory: ``classifier.pt`` stores the class
names, the training counts and the normalisation statistics, so a run copied to a machine without
the dataset still predicts. Runs made before those keys existed fall back to reading the dataset once.

Input conversion ("converted exactly as the run's training data was"): :attr:`Predictor.transform`, an
:class:`dscl.data.preprocess.ImageTransform` around :class:`~dscl.data.preprocess.Preprocess`, the one
implementation of the evaluation view that :class:`dscl.data.EvalTransform`, evaluation, prediction and
the exported files share (``dscl.inference.Preprocess`` is the same class). Streaming files for
``dscl predict`` / ``embed`` / ``evaluate DATA`` is :mod:`dscl.data.inputs`.
"""

# no ``from __future__ import annotations``: TorchScript reads ImageClassifier's annotations (export)
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dscl.backbones import BackboneSpec
from dscl.config import Config
from dscl.data import DataError
from dscl.data.preprocess import ImageLike, ImageTransform, Preprocess, image_items, preprocess_for, to_uint8_hwc
from dscl.dist import resolve_device
from dscl.errors import UsageError
from dscl.features import frozen_backbone
from dscl.metrics import logit_adjust, ncm_logits, tau_norm_logits
from dscl.model import recorded_spec, stage1_backbone
from dscl.run import (
    CLASSIFIER_FILE,
    STAGE1_FILE,
    CheckpointError,
    ClassifierRecord,
    DataMeta,
    RunDirError,
    check_same_network,
    load_classifier,
    load_finished_stage1,
    load_run_config,
)
from dscl.runtime import say

VARIANTS: tuple[str, ...] = ("plain", "logit-adjust", "tau-norm", "ncm")


class ImageClassifier(nn.Module):
    """Preprocess + backbone + linear layer: images -> logits ``(N, num_classes)`` (what export writes)."""

    def __init__(self, preprocess: Preprocess, backbone: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.backbone = backbone
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        """uint8 ``(N, H, W, C)`` or float ``(N, C, H, W)`` in [0, 1] -> logits ``(N, num_classes)``."""
        return self.fc(self.backbone(self.preprocess(x)))


def run_meta(data: DataMeta | None, cfg: Config, where: Path) -> DataMeta:
    """The :class:`~dscl.run.DataMeta` stored in a checkpoint, or for older runs read once from the dataset."""
    if data is not None:
        return data
    from dscl.data import build_datasets

    try:
        splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    except DataError as exc:
        raise RunDirError(
            f"{where} predates stored class names and training counts, so they come from the dataset, "
            f"which cannot be read here ({exc}). To use the run here, make the dataset available once, or re-run "
            f"`dscl classify --run {where.parent.parent}` where the data is (it stores them in the run)"
        ) from exc
    return DataMeta.of(splits.class_names, splits.train_counts, splits.mean, splits.std)


class Predictor:
    """A finished run as a model: backbone + linear classifier + the run's input conversion.

    Built by :func:`load_run`. ``images`` arguments accept a list of paths / PIL images / uint8
    tensors ``(3, H, W)`` (any size, any PIL mode), a single path or PIL image, or a batch tensor:
    uint8 ``(N, H, W, C)`` or float ``(N, C, H, W)`` with values in [0, 1].

    Attributes:
        run_dir: the run directory.
        cfg: its configuration.
        backbone: the evaluation backbone (eval mode) on ``device``.
        fc: the stage-2 linear layer, or None for a stage-1-only run (then only ``embed`` works).
        class_means: ``(C, D)`` class means of clean training features for the ``ncm`` variant, or None.
        class_names, train_counts: per class, in label order.
        transform: the run's input conversion, on the CPU (:class:`dscl.data.preprocess.ImageTransform`):
            ``transform(image)`` -> ``(3, S, S)``, picklable (the dataset transform of evaluation and of
            :func:`dscl.data.inputs.iter_files`); ``transform.batch(images)`` -> ``(N, 3, S, S)``;
            ``transform.preprocess``: its :class:`Preprocess` module (what export scripts).
        source: the checkpoint the weights come from.
        record: how the classifier was made (:class:`~dscl.run.ClassifierRecord`: ``selection``,
            ``wall_seconds``, ``protocol``, ``imported``), or None for a stage-1-only run.
        feature_stats: ``(mean, std)`` of the standardisation folded into ``fc`` (``classifier.standardize``),
            or None; the ``tau-norm`` variant works in that space.
        spec: the :class:`~dscl.backbones.BackboneSpec` the backbone was rebuilt from (the checkpoint's;
            derived for checkpoints written before specs); ``mean``, ``std``, ``input_mode`` and ``transform``
            follow its input settings.
        temperature: T of temperature scaling (``softmax(logits / T)`` are the calibrated probabilities of
            ``predict(..., calibrated=True)``), fitted on the validation split by ``dscl classify``; None
            where the run has none (:meth:`temperature_note` says why).
    """

    def __init__(self, run_dir: Path, cfg: Config, backbone: nn.Module, fc: nn.Linear | None,
                 class_means: Tensor | None, meta: DataMeta, source: Path, device: torch.device,
                 record: ClassifierRecord | None = None,
                 feature_stats: tuple[Tensor, Tensor] | None = None, spec: BackboneSpec | None = None) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.device = device
        self.backbone = backbone.to(device).eval()
        self.fc = fc.to(device).eval() if fc is not None else None
        self.class_means = class_means
        self.class_names = meta.class_names
        self.train_counts = meta.train_counts
        #: the backbone spec the network was rebuilt from; its input settings are the run's input conversion
        self.spec = recorded_spec(spec, cfg, meta.mean, meta.std)
        if self.spec.mean is None or self.spec.std is None:
            raise CheckpointError(f"{source}: the stored backbone spec has no input settings (mean / std)")
        self.mean, self.std = self.spec.mean, self.spec.std
        self.input_mode = "L" if self.spec.grey_to_rgb else "RGB"
        # on the CPU always: evaluation converts in loader workers, so every path converts identically
        self.transform = ImageTransform(preprocess_for(self.spec).eval())
        self.source = source
        self.record = record
        # (mean, std) the classifier's features were z-scored with (classifier.standardize), for tau-norm
        self.feature_stats = feature_stats

    # ------------------------------------------------------------------------------------ properties

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def temperature(self) -> float | None:
        """The classifier's fitted temperature T, or None (see :meth:`temperature_note`)."""
        return self.record.temperature if self.record is not None else None

    def temperature_note(self) -> str:
        """One sentence on the temperature: how it was fitted, or why the run has none and how to get one."""
        record = self.record
        if record is None:
            return (f"{self.run_dir} has no classifier yet, hence no temperature; run stage 2 "
                    f"(dscl classify --run {self.run_dir}) on a dataset with a validation split")
        fit = record.temperature_fit or {}
        if record.temperature is not None:
            edge = ("; T is at the edge of the search interval, so the NLL would fall further beyond it (the "
                    "logits are far from calibrated)" if fit.get("at_bound") else "")
            return (f"T = {record.temperature:.4f} fitted by minimising the NLL of the plain classifier's logits on "
                    f"{fit.get('description') or 'the validation split'} ({fit.get('n', '?')} images) after the "
                    f"classifier was selected; the test set was not used{edge}")
        if fit.get("reason"):
            return f"no temperature for {self.source}: {fit['reason']}"
        if record.imported:
            return (f"no temperature for {self.source}: the classifier was imported, not trained by dscl; run "
                    f"`dscl classify --run {self.run_dir}` on a dataset with a validation split to train one and "
                    "fit its temperature")
        return (f"no temperature for {self.source}: it was written before dscl fitted temperatures; re-run "
                f"`dscl classify --run {self.run_dir}` (on a dataset with a validation split) to fit one")

    def require_temperature(self) -> float:
        """The fitted temperature T; a clear error (which run, why, how to fix) when the run has none.

        Raises:
            CheckpointError: the classifier has no temperature.
        """
        if self.temperature is None:
            raise CheckpointError(f"calibrated probabilities need a temperature: {self.temperature_note()}")
        return self.temperature

    def calibrate(self, logits: Tensor, variant: str = "plain") -> Tensor:
        """``logits / T`` (temperature scaling): their softmax is the calibrated probabilities; the argmax is
        unchanged. T was fitted for the plain classifier's logits only.

        Raises:
            UsageError: a post-hoc variant (T is not fitted for it).
            CheckpointError: the run has no temperature (:meth:`require_temperature`).
        """
        from dscl.calibration import apply_temperature

        if variant != "plain":
            raise UsageError(f"calibrated probabilities are for the plain classifier: the temperature of "
                             f"{self.source} was fitted on its logits, not on the {variant!r} variant's; drop "
                             f"--variant {variant} (or calibrated=True)")
        return apply_temperature(logits, self.require_temperature())

    @property
    def image_size(self) -> int:
        return self.transform.image_size

    @property
    def num_features(self) -> int:
        return int(getattr(self.backbone, "num_features", 0))

    # --------------------------------------------------------------------------------- model side

    @torch.no_grad()
    def features_of(self, x: Tensor) -> Tensor:
        """Normalised views ``(N, 3, S, S)`` -> pooled backbone features ``(N, D)`` float32 (not normalised)."""
        return self.backbone(x.to(self.device)).float()

    def logits_from_features(self, feats: Tensor, variant: str = "plain") -> Tensor:
        """Pooled features ``(N, D)`` -> logits ``(N, C)`` of one variant.

        ``plain``: the linear classifier; ``logit-adjust``: minus ``tau * log(prior)`` of the training
        counts (``classifier.logit_adjust_tau``); ``tau-norm``: each class's weight row and bias divided by the
        row's norm to the power ``classifier.tau_norm``, in the space it was trained in, so tau = 0 is ``plain``
        (:func:`dscl.metrics.tau_norm_logits`); ``ncm``: cosine to the class means of clean training features.
        """
        if variant not in VARIANTS:
            raise UsageError(f"--variant {variant!r}: use one of {', '.join(VARIANTS)}")
        if variant == "ncm":
            if self.class_means is None:
                raise CheckpointError(f"{self.source} holds no class means (an imported classifier); "
                                      f"run `dscl classify --run {self.run_dir}` for the ncm variant")
            return ncm_logits(feats.float().cpu(), self.class_means.float().cpu())
        fc = self._require_fc()
        with torch.no_grad():
            feats = feats.to(fc.weight.device, torch.float32)
            if variant == "tau-norm":
                return tau_norm_logits(feats, fc.weight, fc.bias, self.cfg.classifier.tau_norm,
                                       self.feature_stats).cpu()
            logits = fc(feats).cpu()
        if variant == "logit-adjust":
            return logit_adjust(logits, self.train_counts, self.cfg.classifier.logit_adjust_tau)
        return logits

    def batch_logits(self, x: Tensor, variant: str = "plain") -> Tensor:
        """Converted views (``transform.batch``, or a batch of :func:`dscl.data.inputs.iter_files`) -> logits
        ``(N, C)``."""
        return self.logits_from_features(self.features_of(x), variant)

    def require_classifier(self) -> nn.Linear:
        """The linear layer; a clear error for a run without stage 2."""
        return self._require_fc()

    def _require_fc(self) -> nn.Linear:
        if self.fc is None:
            raise RunDirError(f"{self.run_dir / 'checkpoints' / 'classifier.pt'} does not exist: the run has no "
                              f"classifier yet; run stage 2 first (dscl classify --run {self.run_dir})")
        return self.fc

    def _batches(self, images: Any, batch_size: int) -> Iterator[Tensor]:
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        items = image_items(images)
        for lo in range(0, len(items), batch_size):
            yield self.transform.batch(items[lo:lo + batch_size])

    def features(self, images: Any, *, batch_size: int = 256) -> Tensor:
        """Images -> pooled backbone features ``(N, D)`` float32 on the CPU (not normalised)."""
        out = [self.features_of(x).cpu() for x in self._batches(images, batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.num_features)

    def embed(self, images: Any, *, batch_size: int = 256) -> Tensor:
        """Images -> L2-normalised backbone features ``(N, D)`` float32 on the CPU (cosine = dot product)."""
        return F.normalize(self.features(images, batch_size=batch_size), dim=1)

    def logits(self, images: Any, *, variant: str = "plain", batch_size: int = 256,
               calibrated: bool = False) -> Tensor:
        """Images -> logits ``(N, C)`` float32 on the CPU (see :meth:`logits_from_features` for variants);
        ``calibrated``: divided by the run's temperature (:meth:`calibrate`; plain variant only)."""
        self._require_fc()
        if calibrated:  # refuse before any image is read
            self.calibrate(torch.zeros(0, self.num_classes), variant)
        feats = self.features(images, batch_size=batch_size)
        logits = self.logits_from_features(feats, variant)
        return self.calibrate(logits, variant) if calibrated else logits

    def predict(self, images: Any, *, variant: str = "plain", batch_size: int = 256,
                calibrated: bool = False) -> Tensor:
        """Images -> class probabilities ``(N, C)`` (softmax of :meth:`logits`), float32 on the CPU.

        ``calibrated=True``: ``softmax(logits / T)`` with the temperature T fitted on the validation split
        (:attr:`temperature`); same argmax, better-calibrated confidences. Raises :class:`CheckpointError`
        for a run without a temperature and :class:`UsageError` for a post-hoc variant.
        """
        logits = self.logits(images, variant=variant, batch_size=batch_size, calibrated=calibrated)
        return torch.softmax(logits, dim=1)

    def classifier_module(self) -> ImageClassifier:
        """A CPU copy of preprocess + backbone + fc as one module (images -> logits), for export."""
        fc = self._require_fc()
        return ImageClassifier(_cpu_copy(self.transform.preprocess), _cpu_copy(self.backbone),
                               _cpu_copy(fc)).eval()

    def __repr__(self) -> str:
        return (f"Predictor({self.run_dir}, {self.spec.qualified_name}, {self.num_classes} classes, "
                f"{self.image_size} px {self.input_mode}, classifier={'yes' if self.fc is not None else 'no'})")


def _cpu_copy(module: nn.Module) -> Any:
    return copy.deepcopy(module).cpu().eval()


ENSEMBLE_FILE = "ensemble.json"  # written by `dscl ensemble`: the member runs, so the ensemble is usable

#: why an ensemble has no temperature scaling (report.md's sentence, ``dscl predict --calibrated``'s refusal)
ENSEMBLE_TEMPERATURE_NOTE = ("an ensemble has no fitted temperature: each member's temperature calibrates that "
                             "member, not the average of their probabilities, and dscl fits none for the average")


class _EnsembleTransform:
    """One image -> every member's evaluation view, flattened and concatenated (members may differ in
    image size and grey / colour conversion); the file is decoded once. Picklable for loader workers."""

    def __init__(self, transforms: list[ImageTransform]) -> None:
        self.transforms = transforms

    def __call__(self, image: ImageLike) -> Tensor:
        hwc = to_uint8_hwc(image).unsqueeze(0)
        with torch.no_grad():
            return torch.cat([t.preprocess(hwc)[0].reshape(-1) for t in self.transforms])

    def batch(self, images: Any) -> Tensor:
        """Images -> ``(N, sum of the members' 3*S*S)``: every member's view, flattened side by side.
        Files are decoded once, not once per member."""
        items = image_items(images)
        if not isinstance(items, Tensor):
            items = [to_uint8_hwc(im).permute(2, 0, 1) for im in items]  # uint8 (C, H, W): decoded
        return torch.cat([t.batch(items).flatten(1) for t in self.transforms], dim=1)


class EnsemblePredictor:
    """An ensemble made by ``dscl ensemble`` as a model: the equal-weight average of its members' softmax
    outputs. ``predict`` / ``logits`` (log of the averaged probabilities) and ``dscl predict`` work as for
    one run; ``embed`` and ``export`` do not (the members have no common feature space). ``transform``:
    every member's input conversion at once (``transform(image)``, ``transform.batch(images)``: the
    members' views flattened side by side; files decoded once).

    Attributes:
        members: the member :class:`Predictor` objects; ``run_dir``: the ensemble folder; ``cfg``: the first
        member's config (its Many / Few thresholds); ``class_names``, ``train_counts``: the members' (equal).
    """

    def __init__(self, run_dir: Path, members: list[Predictor]) -> None:
        self.run_dir = run_dir
        self.members = members
        first = members[0]
        for m in members[1:]:
            if m.class_names != first.class_names:
                raise RunDirError(f"{run_dir}: member {m.run_dir} has other classes than {first.run_dir}")
        self.cfg = first.cfg
        self.class_names, self.train_counts = first.class_names, first.train_counts
        self.source = run_dir / ENSEMBLE_FILE
        self.class_means = None
        self.transform = _EnsembleTransform([m.transform for m in members])
        self._sizes = [3 * m.image_size * m.image_size for m in members]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    #: an ensemble has no fitted temperature (:meth:`temperature_note`)
    temperature: float | None = None

    def temperature_note(self) -> str:
        """Why an ensemble has no temperature scaling."""
        return f"{self.run_dir} is an ensemble of runs; {ENSEMBLE_TEMPERATURE_NOTE}"

    def require_temperature(self) -> float:
        """Always refused: see :meth:`temperature_note`.

        Raises:
            UsageError: calibrated probabilities were asked of an ensemble.
        """
        raise UsageError(f"calibrated probabilities are not available: {self.temperature_note()}; predict "
                         "without --calibrated, or with one of its member runs")

    def calibrate(self, logits: Tensor, variant: str = "plain") -> Tensor:
        """Refused (:meth:`require_temperature`)."""
        self.require_temperature()
        return logits

    def require_classifier(self) -> None:
        for m in self.members:
            m.require_classifier()

    def features_of(self, x: Tensor) -> list[Tensor]:
        """The rows of ``transform.batch`` / the loader -> one pooled-feature tensor per member."""
        chunks = x.split(self._sizes, dim=1)
        return [m.features_of(c.reshape(len(c), 3, m.image_size, m.image_size))
                for m, c in zip(self.members, chunks, strict=True)]

    def logits_from_features(self, feats: list[Tensor], variant: str = "plain") -> Tensor:
        """``log`` of the members' averaged softmax (so its softmax is the ensemble's probabilities)."""
        probs = torch.stack([torch.softmax(m.logits_from_features(f, variant), dim=1)
                             for m, f in zip(self.members, feats, strict=True)]).mean(dim=0)
        return torch.log(probs.clamp_min(1e-30))

    def batch_logits(self, x: Tensor, variant: str = "plain") -> Tensor:
        """Converted views (``transform.batch``, or a batch of :func:`dscl.data.inputs.iter_files`) -> logits
        ``(N, C)``."""
        return self.logits_from_features(self.features_of(x), variant)

    def logits(self, images: Any, *, variant: str = "plain", batch_size: int = 256,
               calibrated: bool = False) -> Tensor:
        """Images -> ``log`` of the averaged member probabilities ``(N, C)``; ``calibrated`` is refused
        (:meth:`require_temperature`)."""
        if calibrated:
            self.require_temperature()
        x = self.transform.batch(images)
        return torch.cat([self.batch_logits(x[i:i + batch_size], variant)
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, self.num_classes)

    def predict(self, images: Any, *, variant: str = "plain", batch_size: int = 256,
                calibrated: bool = False) -> Tensor:
        """Images -> the averaged member probabilities ``(N, C)``; ``calibrated`` is refused."""
        return torch.softmax(self.logits(images, variant=variant, batch_size=batch_size, calibrated=calibrated),
                             dim=1)

    def __repr__(self) -> str:
        return f"EnsemblePredictor({self.run_dir}, {len(self.members)} runs, {self.num_classes} classes)"


def load_ensemble(run_dir: str | Path, *, device: str | torch.device = "cpu") -> EnsemblePredictor:
    """The ensemble folder written by ``dscl ensemble`` (``ensemble.json`` naming its member runs)."""
    run_dir = Path(run_dir)
    try:
        spec = json.loads((run_dir / ENSEMBLE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {run_dir / ENSEMBLE_FILE}: {exc}") from exc
    members = [Path(m) for m in spec.get("members", [])]
    missing = [str(m) for m in members if not m.is_dir()]
    if missing or len(members) < 2:
        raise RunDirError(f"{run_dir / ENSEMBLE_FILE}: member run(s) {', '.join(missing) or '(none listed)'} not "
                          f"found; an ensemble folder uses its member runs where they were when it was made")
    return EnsemblePredictor(run_dir, [load_run(m, device=device) for m in members])


def is_ensemble(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is an ensemble folder of ``dscl ensemble`` rather than a run."""
    return (Path(run_dir) / ENSEMBLE_FILE).is_file() and not (Path(run_dir) / "config.yaml").is_file()


def load_model(run_dir: str | Path, *, device: str | torch.device = "cpu") -> Predictor | EnsemblePredictor:
    """A classified run (:func:`load_run`) or an ensemble folder (:func:`load_ensemble`), for prediction."""
    return load_ensemble(run_dir, device=device) if is_ensemble(run_dir) else load_run(run_dir, device=device)


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu", cfg: Config | None = None,
             stage1_ok: bool = False) -> Predictor:
    """Load a finished run directory as a :class:`Predictor`.

    Args:
        run_dir: the run directory (``config.yaml`` + ``checkpoints/classifier.pt``).
        device: where the model runs (``cpu``, ``cuda``, ``cuda:1``; ``auto`` = cuda if available).
        cfg: the run's config if already loaded (default: read ``config.yaml``).
        stage1_ok: without ``classifier.pt``, use the stage-1 online backbone of ``last.pt`` (no
            classifier: ``embed`` works, ``predict`` explains that stage 2 is missing).

    Raises:
        RunDirError: not a run directory, or no classifier (and not ``stage1_ok``), or an old run
            whose dataset is needed but missing.
        CheckpointError: a checkpoint that does not match the run's config.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist (give the --out folder of a dscl run)")
    if cfg is None and is_ensemble(run_dir):
        raise RunDirError(f"{run_dir} is an ensemble of runs (dscl ensemble): it predicts (dscl predict, "
                          f"dscl.inference.load_ensemble) but has no single backbone to embed, export or "
                          f"evaluate; use one of its member runs for that")
    cfg = cfg or load_run_config(run_dir)
    device = resolve_device(device)
    cls_path = run_dir / CLASSIFIER_FILE
    fc: nn.Linear | None = None
    class_means: Tensor | None = None
    feature_stats: tuple[Tensor, Tensor] | None = None
    record: ClassifierRecord | None = None
    if cls_path.is_file():
        state = load_classifier(run_dir)
        check_same_network(state.spec, state.backbone_name, cfg, cls_path)
        meta = run_meta(state.data, cfg, cls_path)
        spec = recorded_spec(state.spec, cfg, meta.mean, meta.std)
        backbone = frozen_backbone(spec, state.backbone, cls_path)
        weight = state.fc["weight"]
        fc = nn.Linear(weight.shape[1], weight.shape[0])
        fc.load_state_dict(state.fc)
        class_means, feature_stats = state.class_means, state.feature_stats
        if not state.stats_recorded and state.protocol == "cached" and cfg.classifier.standardize:
            say(f"{cls_path} was saved before the standardisation statistics were stored (issue #21): its "
                f"tau-norm variant works on the folded layer, not in the space the classifier was trained in; "
                f"run `dscl classify --run {run_dir}` again for the right tau-norm numbers")
        source, record = cls_path, state.record()
    elif stage1_ok:
        stage1 = load_finished_stage1(run_dir)
        source = run_dir / STAGE1_FILE
        check_same_network(stage1.spec, stage1.facts.backbone, cfg, source)
        meta = run_meta(stage1.data, cfg, source)
        spec = recorded_spec(stage1.spec, cfg, meta.mean, meta.std)
        backbone = stage1_backbone(cfg, spec, stage1, source)
    else:
        raise RunDirError(f"{cls_path} does not exist: the run has no classifier yet; run stage 2 first "
                          f"(dscl classify --run {run_dir})")
    if fc is not None and fc.out_features != len(meta.class_names):
        raise CheckpointError(f"{source}: the classifier has {fc.out_features} outputs but the run has "
                              f"{len(meta.class_names)} class names")
    return Predictor(run_dir, cfg, backbone, fc, class_means, meta, source, device, record,
                     feature_stats=feature_stats, spec=spec)

