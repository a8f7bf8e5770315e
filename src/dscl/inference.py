"""Turning a finished run into a model: :func:`load_run` -> :class:`Predictor` (the ONE way to do it).

``dscl evaluate``, ``dscl analyze``, ``dscl predict`` / ``embed`` / ``export`` / ``ensemble`` all load a
run through :func:`load_run`, so the backbone, the linear classifier, the input conversion and the
class names are the same everywhere.

```python
from dscl import load_run
p = load_run("runs/a")                 # Predictor (reads config.yaml + checkpoints/classifier.pt)
p.class_names, p.train_counts
probs = p.predict(["a.png", pil_image])  # (N, C) probabilities
feats = p.embed(batch_uint8_nhwc)        # (N, D) L2-normalised backbone features
```

Everything :func:`load_run` needs is inside the run directory: ``classifier.pt`` stores the class
names, the training counts and the normalisation statistics, so a run copied to a machine without
the dataset still predicts. Runs made before those keys existed fall back to reading the dataset once.

Input conversion ("converted exactly as the run's training data was"): every image is decoded to
uint8 RGB by :func:`dscl.data.core.decode_image` (the decoder the training data goes through). A run
trained on grey data (Fashion-MNIST, ``input_mode == "L"``) converts colour inputs to grey with
PIL's ``convert("L")`` weights (ITU-R 601-2 luma, L = (19595 R + 38470 G + 7471 B + 2^15) >> 16)
and replicates the grey channel three times, which is what its training images were; a grey image
fed to a colour-trained run is replicated to three channels, as PIL's ``convert("RGB")`` does. Then
the evaluation view of :class:`dscl.data.EvalTransform`: for ``image_size >= 128`` the shorter side
is resized to ``round(image_size * 256 / 224)`` and the centre ``image_size`` square cropped, for
smaller sizes the image is resized to ``image_size x image_size``; antialiased bilinear, then
``(x / 255 - mean) / std``. :class:`Preprocess` does all of it as one TorchScript-able module that
the evaluation, the predictor and the exported files share.
"""

# no ``from __future__ import annotations``: TorchScript reads the class annotations of Preprocess
import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dscl.backbones import build_backbone
from dscl.checkpoint import CheckpointError, load_checkpoint
from dscl.config import Config
from dscl.data import DataError
from dscl.data.core import decode_image
from dscl.metrics import logit_adjust, ncm_logits, tau_norm_logits
from dscl.rundir import RunDirError, load_finished_stage1, load_run_config
from dscl.runtime import say

VARIANTS: tuple[str, ...] = ("plain", "logit-adjust", "tau-norm", "ncm")
# Datasets whose training images are single-channel (replicated to RGB by LTDataset.load).
GREY_DATASETS: frozenset[str] = frozenset({"fmnist-lt"})
META_KEYS = ("class_names", "train_counts", "mean", "std")
INFO_KEYS = ("stage", "protocol", "selection", "selected_epoch", "wall_seconds", "imported", "method")


def input_mode(dataset: str) -> str:
    """``"L"`` for datasets whose training images are grey (replicated to 3 channels), else ``"RGB"``."""
    return "L" if dataset in GREY_DATASETS else "RGB"


def _half_even(d: int) -> int:
    """``round(d / 2)`` with Python's round-half-to-even, in integers (TorchScript has no such round)."""
    q = d // 2
    if d % 2 == 0 or q % 2 == 0:
        return q
    return q + 1


class Preprocess(nn.Module):
    """Images -> the run's normalised evaluation view, as one TorchScript-able module.

    Input: a uint8 batch ``(N, H, W, C)`` (decoded pixels, channels last, C = 1 or 3) or a float batch
    ``(N, C, H, W)`` with values in [0, 1]. Output: float32 ``(N, 3, S, S)``, ``S = image_size``.
    For uint8 input the result equals :class:`dscl.data.EvalTransform` bit for bit (same resize kernel
    with the same uint8 rounding); float input is resized in float (no rounding).

    Args:
        image_size: S, the run's ``data.image_size``.
        mean, std: per-channel normalisation of [0, 1] images.
        grey: the run was trained on grey images (see the module docstring).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], grey: bool) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.grey = bool(grey)
        self.resize_short = int(round(self.image_size * 256 / 224))  # ImageNet convention: 256 -> 224 crop
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def _interpolate(self, x: Tensor, h: int, w: int) -> Tensor:
        if x.dtype == torch.uint8:
            if x.device.type == "cpu":  # torch's native uint8 antialias kernel, as torchvision uses on the CPU
                return F.interpolate(x, size=[h, w], mode="bilinear", align_corners=False, antialias=True)
            y = F.interpolate(x.to(torch.float32), size=[h, w], mode="bilinear", align_corners=False, antialias=True)
            return y.round().to(torch.uint8)
        return F.interpolate(x, size=[h, w], mode="bilinear", align_corners=False, antialias=True)

    def _resize(self, x: Tensor) -> Tensor:
        s = self.image_size
        h, w = x.shape[-2], x.shape[-1]
        if s >= 128:
            r = self.resize_short
            if w <= h:
                nh, nw = int(r * h / w), r
            else:
                nh, nw = r, int(r * w / h)
            if nh != h or nw != w:
                x = self._interpolate(x, nh, nw)
            top, left = _half_even(nh - s), _half_even(nw - s)
            return x[:, :, top:top + s, left:left + s]
        if h != s or w != s:
            x = self._interpolate(x, s, s)
        return x

    def _channels(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if c == 3 and self.grey:
            # PIL's RGB -> L weights in 1/65536 (Pillow Convert.c): uint8 results equal convert("L") exactly
            if x.dtype == torch.uint8:
                xi = x.to(torch.int32)
                y = (xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 32768) >> 16
                x = y.to(torch.uint8)
            else:
                x = (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471) / 65536.0
            c = 1
        if c == 1:
            return x.expand(-1, 3, -1, -1).contiguous()
        if c != 3:
            raise ValueError("images must have 1 (grey) or 3 (RGB) channels")
        return x

    def forward(self, x: Tensor) -> Tensor:
        """uint8 ``(N, H, W, C)`` or float ``(N, C, H, W)`` in [0, 1] -> normalised float32 ``(N, 3, S, S)``."""
        if x.dim() != 4:
            raise ValueError("expected a batch: uint8 (N, H, W, C) or float (N, C, H, W)")
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2)
        elif not x.is_floating_point():
            raise ValueError("expected uint8 pixels (N, H, W, C) or floats in [0, 1] (N, C, H, W)")
        x = self._resize(self._channels(x))
        x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        return self.normalise(x)

    def normalise(self, x: Tensor) -> Tensor:
        """Float ``(N, 3, S, S)`` in [0, 1] -> ``(x - mean) / std``."""
        return (x - self.mean) / self.std


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


ImageLike = Any  # a path (str / Path), a PIL image, a uint8 tensor (3, H, W) / (H, W), or a numpy array


def to_uint8_hwc(image: ImageLike) -> Tensor:
    """One image -> uint8 ``(H, W, C)`` tensor, C in {1, 3}; files and PIL images via ``decode_image``.

    Raises:
        DataError: a missing or unreadable file, or an array that is not an image.
    """
    if isinstance(image, (str, Path, Image.Image)):
        return decode_image(image).permute(1, 2, 0)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
        if image.ndim == 3 and image.shape[-1] in (1, 3):
            image = image.permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise DataError(f"cannot use a {type(image).__name__} as an image: give a path, a PIL image, "
                        "or a uint8 tensor (3, H, W)")
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3) or image.dtype != torch.uint8:
        raise DataError(f"an image tensor must be uint8 (3, H, W), (1, H, W) or (H, W); got {image.dtype} "
                        f"{tuple(image.shape)} (use a 4-D batch for several images)")
    return image.permute(1, 2, 0)


class ImageTransform:
    """One image -> normalised float32 ``(3, S, S)`` through a CPU :class:`Preprocess`.

    The dataset transform of evaluation and of ``dscl predict``: small and picklable, so DataLoader
    workers get a copy of the conversion only (never the model).
    """

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image: ImageLike) -> Tensor:
        with torch.no_grad():
            return self.preprocess(to_uint8_hwc(image).unsqueeze(0))[0]

    def __repr__(self) -> str:
        p = self.preprocess
        return f"ImageTransform(image_size={p.image_size}, grey={p.grey})"


def _as_items(images: Any) -> list[Any] | Tensor:
    if isinstance(images, np.ndarray) and images.ndim == 4:  # a numpy batch is a batch, like a tensor one
        images = torch.from_numpy(np.ascontiguousarray(images))
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"a tensor of images must be a batch: uint8 (N, H, W, C) or float (N, C, H, W) in "
                             f"[0, 1]; got shape {tuple(images.shape)} (wrap one image in a list)")
        return images
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    return list(images)


@dataclass
class RunMeta:
    """What a run knows about its data, stored in its checkpoints: names, counts, normalisation."""

    class_names: list[str]
    train_counts: list[int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def run_meta(state: dict[str, Any], cfg: Config, where: Path) -> RunMeta:
    """The :class:`RunMeta` stored in a checkpoint, or for older runs read once from the dataset."""
    if all(state.get(k) is not None for k in META_KEYS):
        return RunMeta([str(n) for n in state["class_names"]], [int(c) for c in state["train_counts"]],
                       tuple(float(v) for v in state["mean"]),  # type: ignore[arg-type]
                       tuple(float(v) for v in state["std"]))  # type: ignore[arg-type]
    from dscl.data import build_datasets

    try:
        splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    except DataError as exc:
        raise RunDirError(
            f"{where} predates stored class names and training counts, so they come from the dataset, "
            f"which cannot be read here ({exc}). To use the run here, make the dataset available once, or re-run "
            f"`dscl classify --run {where.parent.parent}` where the data is (it stores them in the run)"
        ) from exc
    return RunMeta(list(splits.class_names), list(splits.train_counts), splits.mean, splits.std)


def meta_dict(class_names: Sequence[str], train_counts: Sequence[int], mean: Sequence[float],
              std: Sequence[float]) -> dict[str, Any]:
    """The checkpoint entries :func:`run_meta` reads (stored by classify, pretrain and import)."""
    return {"class_names": [str(n) for n in class_names], "train_counts": [int(c) for c in train_counts],
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


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
        preprocess: the :class:`Preprocess` module (input conversion, on the CPU).
        image_transform: one image -> ``(3, S, S)``, picklable (the dataset transform of evaluation).
        source: the checkpoint the weights come from.
        info: that checkpoint's bookkeeping (``selection``, ``wall_seconds``, ``protocol``, ``imported``).
        feature_stats: ``(mean, std)`` of the standardisation folded into ``fc`` (``classifier.standardize``),
            or None; the ``tau-norm`` variant works in that space.
    """

    def __init__(self, run_dir: Path, cfg: Config, backbone: nn.Module, fc: nn.Linear | None,
                 class_means: Tensor | None, meta: RunMeta, source: Path, device: torch.device,
                 info: dict[str, Any] | None = None,
                 feature_stats: tuple[Tensor, Tensor] | None = None) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.device = device
        self.backbone = backbone.to(device).eval()
        self.fc = fc.to(device).eval() if fc is not None else None
        self.class_means = class_means
        self.class_names = meta.class_names
        self.train_counts = meta.train_counts
        self.mean, self.std = meta.mean, meta.std
        self.input_mode = input_mode(cfg.data.dataset)
        # on the CPU always: evaluation converts in loader workers, so every path converts identically
        self.preprocess = Preprocess(cfg.data.image_size, meta.mean, meta.std, self.input_mode == "L").eval()
        self.image_transform = ImageTransform(self.preprocess)
        self.source = source
        self.info = dict(info or {})
        # (mean, std) the classifier's features were z-scored with (classifier.standardize), for tau-norm
        self.feature_stats = feature_stats

    # ------------------------------------------------------------------------------------ properties

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def num_features(self) -> int:
        return int(getattr(self.backbone, "num_features", 0))

    # ---------------------------------------------------------------------------------- input side

    def transform(self, image: ImageLike) -> Tensor:
        """One image -> normalised float32 ``(3, S, S)`` on the CPU (``image_transform``, the dataset
        transform of evaluation)."""
        return self.image_transform(image)

    def prepare(self, images: Any) -> Tensor:
        """Images (see the class docstring) -> normalised float32 ``(N, 3, S, S)`` on the CPU."""
        items = _as_items(images)
        with torch.no_grad():
            if isinstance(items, Tensor):
                return self.preprocess(items.cpu())
            if not items:
                return torch.zeros(0, 3, self.image_size, self.image_size)
            return torch.cat([self.preprocess(to_uint8_hwc(im).unsqueeze(0)) for im in items])

    # --------------------------------------------------------------------------------- model side

    @torch.no_grad()
    def features_of(self, x: Tensor) -> Tensor:
        """Normalised views ``(N, 3, S, S)`` -> pooled backbone features ``(N, D)`` float32 (not normalised)."""
        return self.backbone(x.to(self.device)).float()

    def logits_from_features(self, feats: Tensor, variant: str = "plain") -> Tensor:
        """Pooled features ``(N, D)`` -> logits ``(N, C)`` of one variant.

        ``plain``: the linear classifier; ``logit-adjust``: minus ``tau * log(prior)`` of the training
        counts (``classifier.logit_adjust_tau``); ``tau-norm``: the classifier with tau-normalised weights
        (``classifier.tau_norm``) in the space it was trained in, bias kept, so tau = 0 is ``plain``
        (:func:`dscl.metrics.tau_norm_logits`); ``ncm``: cosine to the class means of clean training features.
        """
        if variant not in VARIANTS:
            raise ValueError(f"--variant {variant!r}: use one of {', '.join(VARIANTS)}")
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
        """Prepared views (:meth:`prepare`, or a batch of :func:`iter_files`) -> logits ``(N, C)``."""
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
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = _as_items(images)
        for lo in range(0, len(items), batch_size):
            yield self.prepare(items[lo:lo + batch_size])

    def features(self, images: Any, *, batch_size: int = 256) -> Tensor:
        """Images -> pooled backbone features ``(N, D)`` float32 on the CPU (not normalised)."""
        out = [self.features_of(x).cpu() for x in self._batches(images, batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.num_features)

    def embed(self, images: Any, *, batch_size: int = 256) -> Tensor:
        """Images -> L2-normalised backbone features ``(N, D)`` float32 on the CPU (cosine = dot product)."""
        return F.normalize(self.features(images, batch_size=batch_size), dim=1)

    def logits(self, images: Any, *, variant: str = "plain", batch_size: int = 256) -> Tensor:
        """Images -> logits ``(N, C)`` float32 on the CPU (see :meth:`logits_from_features` for variants)."""
        self._require_fc()
        feats = self.features(images, batch_size=batch_size)
        return self.logits_from_features(feats, variant)

    def predict(self, images: Any, *, variant: str = "plain", batch_size: int = 256) -> Tensor:
        """Images -> class probabilities ``(N, C)`` (softmax of :meth:`logits`), float32 on the CPU."""
        return torch.softmax(self.logits(images, variant=variant, batch_size=batch_size), dim=1)

    def classifier_module(self) -> ImageClassifier:
        """A CPU copy of preprocess + backbone + fc as one module (images -> logits), for export."""
        fc = self._require_fc()
        return ImageClassifier(_cpu_copy(self.preprocess), _cpu_copy(self.backbone), _cpu_copy(fc)).eval()

    def __repr__(self) -> str:
        return (f"Predictor({self.run_dir}, {self.cfg.model.backbone}, {self.num_classes} classes, "
                f"{self.image_size} px {self.input_mode}, classifier={'yes' if self.fc is not None else 'no'})")


def _cpu_copy(module: nn.Module) -> Any:
    return copy.deepcopy(module).cpu().eval()


def _backbone_from(state: dict[str, Tensor], cfg: Config, where: Path) -> nn.Module:
    backbone = build_backbone(cfg.model.backbone, zero_init_residual=cfg.model.zero_init_residual)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{where} does not fit backbone {cfg.model.backbone}: {exc}") from exc
    return backbone


ENSEMBLE_FILE = "ensemble.json"  # written by `dscl ensemble`: the member runs, so the ensemble is usable


class _EnsembleTransform:
    """One image -> every member's evaluation view, flattened and concatenated (members may differ in
    image size and grey / colour conversion); the file is decoded once. Picklable for loader workers."""

    def __init__(self, transforms: list[ImageTransform]) -> None:
        self.transforms = transforms

    def __call__(self, image: ImageLike) -> Tensor:
        hwc = to_uint8_hwc(image).unsqueeze(0)
        with torch.no_grad():
            return torch.cat([t.preprocess(hwc)[0].reshape(-1) for t in self.transforms])


class EnsemblePredictor:
    """An ensemble made by ``dscl ensemble`` as a model: the equal-weight average of its members' softmax
    outputs. ``predict`` / ``logits`` (log of the averaged probabilities) and ``dscl predict`` work as for
    one run; ``embed`` and ``export`` do not (the members have no common feature space).

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
        self.info = {"selection": f"equal-weight average of the softmax outputs of {len(members)} runs"}
        self.class_means = None
        self.image_transform = _EnsembleTransform([m.image_transform for m in members])
        self._sizes = [3 * m.image_size * m.image_size for m in members]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def require_classifier(self) -> None:
        for m in self.members:
            m.require_classifier()

    def prepare(self, images: Any) -> Tensor:
        """Images -> ``(N, sum of the members' 3*S*S)``: every member's view, flattened side by side.
        Files are decoded once, not once per member."""
        items = _as_items(images)
        if not isinstance(items, Tensor):
            items = [to_uint8_hwc(im).permute(2, 0, 1) for im in items]  # uint8 (C, H, W): decoded
        return torch.cat([m.prepare(items).flatten(1) for m in self.members], dim=1)

    def features_of(self, x: Tensor) -> list[Tensor]:
        """The rows of :meth:`prepare` / the loader -> one pooled-feature tensor per member."""
        chunks = x.split(self._sizes, dim=1)
        return [m.features_of(c.reshape(len(c), 3, m.image_size, m.image_size))
                for m, c in zip(self.members, chunks, strict=True)]

    def logits_from_features(self, feats: list[Tensor], variant: str = "plain") -> Tensor:
        """``log`` of the members' averaged softmax (so its softmax is the ensemble's probabilities)."""
        probs = torch.stack([torch.softmax(m.logits_from_features(f, variant), dim=1)
                             for m, f in zip(self.members, feats, strict=True)]).mean(dim=0)
        return torch.log(probs.clamp_min(1e-30))

    def batch_logits(self, x: Tensor, variant: str = "plain") -> Tensor:
        """Prepared views (:meth:`prepare`, or a batch of :func:`iter_files`) -> logits ``(N, C)``."""
        return self.logits_from_features(self.features_of(x), variant)

    def logits(self, images: Any, *, variant: str = "plain", batch_size: int = 256) -> Tensor:
        x = self.prepare(images)
        return torch.cat([self.batch_logits(x[i:i + batch_size], variant)
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, self.num_classes)

    def predict(self, images: Any, *, variant: str = "plain", batch_size: int = 256) -> Tensor:
        return torch.softmax(self.logits(images, variant=variant, batch_size=batch_size), dim=1)

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
    if isinstance(device, str):
        device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                              "cpu" if device == "auto" else device)
    cls_path = run_dir / "checkpoints" / "classifier.pt"
    fc: nn.Linear | None = None
    class_means: Tensor | None = None
    feature_stats: tuple[Tensor, Tensor] | None = None
    if cls_path.is_file():
        state = load_checkpoint(cls_path)
        if state.get("backbone_name") != cfg.model.backbone:
            raise CheckpointError(f"{cls_path} holds a {state.get('backbone_name')} classifier, but the run's "
                                  f"config.yaml says model.backbone={cfg.model.backbone}")
        backbone = _backbone_from(state["backbone"], cfg, cls_path)
        weight = state["fc"]["weight"]
        fc = nn.Linear(weight.shape[1], weight.shape[0])
        fc.load_state_dict(state["fc"])
        class_means = state.get("class_means")
        stats = state.get("feature_stats")
        feature_stats = (stats["mean"], stats["std"]) if stats else None
        if "feature_stats" not in state and state.get("protocol") == "cached" and cfg.classifier.standardize:
            say(f"{cls_path} was saved before the standardisation statistics were stored (issue #21): its "
                f"tau-norm variant works on the folded layer, not in the space the classifier was trained in; "
                f"run `dscl classify --run {run_dir}` again for the right tau-norm numbers")
        source = cls_path
    elif stage1_ok:
        state = load_finished_stage1(run_dir)
        source = run_dir / "checkpoints" / "last.pt"
        if state.get("backbone") != cfg.model.backbone:
            raise CheckpointError(f"{source} holds a {state.get('backbone')} backbone, but the run's config.yaml "
                                  f"says model.backbone={cfg.model.backbone}")
        prefix = "online.backbone."
        backbone = _backbone_from({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)},
                                  cfg, source)
    else:
        raise RunDirError(f"{cls_path} does not exist: the run has no classifier yet; run stage 2 first "
                          f"(dscl classify --run {run_dir})")
    meta = run_meta(state, cfg, source)
    if fc is not None and fc.out_features != len(meta.class_names):
        raise CheckpointError(f"{source}: the classifier has {fc.out_features} outputs but the run has "
                              f"{len(meta.class_names)} class names")
    info = {k: state[k] for k in INFO_KEYS if k in state}
    return Predictor(run_dir, cfg, backbone, fc, class_means, meta, source, device, info,
                     feature_stats=feature_stats)


# ------------------------------------------------------------------------------------------------
# files in, rows out: what `dscl predict` / `dscl embed` stream over

LIST_SUFFIXES = (".txt", ".json")  # split lists (OLTR txt "path label" lines, BBN json)


@dataclass
class Inputs:
    """Image files to run on, in order; ``labels[i]`` is known for entries that come from a labelled list.
    ``notes``: what a reader should know about how labels were read (e.g. an index-to-class mapping)."""

    paths: list[str]
    labels: list[int | None]
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return any(label is not None for label in self.labels)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_labelled_list(path: Path, root: Path, class_names: Sequence[str]) -> Inputs:
    """A path list for predict / embed / evaluate: one image per line, optionally with its class.

    A line is ``path``, ``path label`` (the label is the last whitespace-separated field, a path may hold
    spaces), ``path<TAB>label`` (the label may hold spaces), or shell-quoted ``"path" "label with spaces"``.
    A label is a class **name** of the run or a class **index** (the run's class order, as ``dscl
    predict`` prints it). Paths are relative to ``root``. Blank lines and ``#`` comments are skipped.
    When indices are used and the run's classes have names, a note says which mapping was used.

    Raises:
        DataError: a label that is neither a class name nor an index in range, or a malformed line,
            with the file and line.
    """
    import shlex

    index_of = {name: i for i, name in enumerate(class_names)}
    paths: list[str] = []
    labels: list[int | None] = []
    used_indices = False
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the list {path}: {exc}") from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}, line {lineno}"
        label: str | None
        if "\t" in stripped:
            rel, label = (part.strip() for part in stripped.rsplit("\t", 1))
        elif '"' in stripped or "'" in stripped:
            try:
                parts = shlex.split(stripped)
            except ValueError as exc:
                raise DataError(f"{where}: {exc} in {stripped!r}; quote a path or label holding spaces") from None
            if len(parts) not in (1, 2):
                raise DataError(f"{where}: expected 'path' or 'path label', got {len(parts)} fields in {stripped!r}; "
                                "quote a path or label that holds spaces, or separate them with a tab")
            rel, label = parts[0], parts[1] if len(parts) == 2 else None
        else:
            fields = stripped.rsplit(None, 1)
            if len(fields) == 2 and (fields[1] in index_of or _is_int(fields[1])):
                rel, label = fields
            else:
                rel, label = stripped, None  # an unlabelled path (it may hold spaces)
        value: int | None = None
        if label is not None and label != "":
            if label in index_of:
                value = index_of[label]
            elif _is_int(label) and 0 <= int(label) < len(class_names):
                value, used_indices = int(label), True
            else:
                shown = ", ".join(list(class_names)[:10]) + (", ..." if len(class_names) > 10 else "")
                raise DataError(f"{where}: label {label!r} is neither a class of the run ({shown}) nor a class "
                                f"index in [0, {len(class_names)})")
        full = Path(rel) if Path(rel).is_absolute() else root / rel
        paths.append(str(full))
        labels.append(value)
    notes = []
    if used_indices and list(class_names) != [str(i) for i in range(len(class_names))]:
        mapping = ", ".join(f"{i} = {n}" for i, n in enumerate(list(class_names)[:10]))
        notes.append(f"{path}: labels read as class indices in the run's class order ({mapping}"
                     f"{', ...' if len(class_names) > 10 else ''}); write class names to be explicit")
    return Inputs(paths, labels, notes)


def collect_inputs(inputs: Sequence[str | Path], *, num_classes: int, data_root: str | Path | None = None,
                   class_names: Sequence[str] | None = None) -> Inputs:
    """Expand command-line inputs: image files (kept even when missing, to become error rows),
    folders (every image file below them, recursively, sorted; hidden entries skipped) and lists
    (``.txt``: one path per line, optionally labelled by class name or index, see
    :func:`read_labelled_list`; BBN ``.json`` with indices), paths relative to ``data_root``, default the
    list's folder.

    Raises:
        DataError: an empty folder, a malformed list, or a list label that is not one of the run's classes.
    """
    from dscl.data.readers import IMAGE_EXTENSIONS, image_files, read_list

    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    out = Inputs([], [])
    for item in inputs:
        path = Path(item)
        root = Path(data_root) if data_root is not None else path.parent
        if path.is_dir():
            found = sorted(str(f) for f in image_files(path))
            if not found:
                raise DataError(f"folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            out.paths += found
            out.labels += [None] * len(found)
        elif path.is_file() and path.suffix.lower() == ".txt":
            listed = read_labelled_list(path, root, names)
            out.paths += listed.paths
            out.labels += listed.labels
            out.notes += listed.notes
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            split = read_list(path, root)
            for where, label in zip(split.where, split.labels, strict=True):
                if not 0 <= label < num_classes:
                    raise DataError(f"{where}: label {label} is outside [0, {num_classes}) (the run's classes)")
            out.paths += split.paths
            out.labels += list(split.labels)
        else:
            out.paths.append(str(path))
            out.labels.append(None)
    return out


@dataclass
class FileBatch:
    """One batch of input files: ``paths[i]`` decoded into ``images[ok[i]]`` or failed with ``errors[i]``."""

    indices: list[int]
    paths: list[str]
    errors: list[str | None]
    images: Tensor  # (n_ok, 3, S, S) normalised, in the order of the entries whose error is None


class _FileSet(Dataset):
    def __init__(self, paths: Sequence[str], transform: Any) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        try:
            return i, self.transform(self.paths[i]), None
        except (DataError, ValueError, OSError) as exc:
            return i, None, str(exc)


def _collate(items: list[tuple[int, Tensor | None, str | None]]) -> tuple[list[int], list[Tensor], list[str | None]]:
    return [i for i, _, _ in items], [x for _, x, _ in items if x is not None], [e for _, _, e in items]


def iter_files(predictor: Predictor | EnsemblePredictor, paths: Sequence[str], *, batch_size: int = 64,
               workers: int = 0) -> Iterator[FileBatch]:
    """Decode and convert ``paths`` in batches (``workers`` loader processes); a file that cannot be
    read becomes an error entry instead of stopping the others."""
    loader = DataLoader(_FileSet(paths, predictor.image_transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate)
    for indices, images, errors in loader:
        stacked = torch.stack(images) if images else predictor.prepare([])
        yield FileBatch(indices, [paths[i] for i in indices], errors, stacked)


