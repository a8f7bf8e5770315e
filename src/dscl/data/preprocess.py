"""The evaluation view as ONE implementation: :class:`Preprocess`, shared by evaluation, prediction and export.

Everything that turns an image into what a trained backbone sees at test time goes through
:class:`Preprocess`: :class:`dscl.data.EvalTransform` (evaluation and stage 2's clean views),
:class:`ImageTransform` (a run's input conversion: ``dscl.inference.Predictor.transform``,
``dscl predict`` / ``embed`` / ``evaluate DATA``) and the exported TorchScript / ONNX files.

Input conversion ("converted exactly as the run's training data was"): every image is decoded to
uint8 RGB by :func:`dscl.data.core.decode_image` (the decoder the training data goes through). A run
trained on grey data (Fashion-MNIST, ``input_mode == "L"``) converts colour inputs to grey with
PIL's ``convert("L")`` weights (ITU-R 601-2 luma, L = (19595 R + 38470 G + 7471 B + 2^15) >> 16)
and replicates the grey channel three times, which is what its training images were; a grey image
fed to a colour-trained run is replicated to three channels, as PIL's ``convert("RGB")`` does. Then
the evaluation view of the run's backbone spec (:class:`dscl.backbones.BackboneSpec`: ``image_size`` S,
``crop_pct``, ``interpolation``, ``mean`` / ``std``): with ``crop_pct < 1`` the shorter side is resized to
``round(S / crop_pct)`` and the centre ``S`` square cropped, with ``crop_pct = 1`` the image is resized to
``S x S``; antialiased (``bilinear`` / ``bicubic``), then ``(x / 255 - mean) / std``. (timm's own
evaluation transform floors ``S / crop_pct`` where this rounds it, the built-ins' convention: at 224 px and
``crop_pct`` 0.9 this resizes to 249 px, timm to 248; and timm resizes with PIL, this with torch.) Without a spec
(``crop_pct=None``) the dataset convention every run used before specs: ``crop_pct = 224 / 256`` for
``S >= 128`` (shorter side to ``round(S * 256 / 224)``), 1 below, bilinear.
"""

# no ``from __future__ import annotations``: TorchScript reads the class annotations of Preprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dscl.data.core import DataError, decode_image

if TYPE_CHECKING:
    from dscl.backbones import BackboneSpec

# Datasets whose training images are single-channel (replicated to RGB by LTDataset.load).
GREY_DATASETS: frozenset[str] = frozenset({"fmnist-lt"})


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
    uint8 input is resized with torch's uint8 antialiased kernel (torchvision's, with its rounding) and
    centre-cropped like torchvision's ``center_crop``; float input is resized in float (no rounding).

    Args:
        image_size: S, the run's ``data.image_size``.
        mean, std: per-channel normalisation of [0, 1] images.
        grey: the run was trained on grey images (see the module docstring).
        crop_pct: centre-crop fraction of the evaluation view (the spec's; None: the dataset convention).
        interpolation: ``bilinear``, ``bicubic`` or ``nearest`` resizes.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], grey: bool,
                 crop_pct: float | None = None, interpolation: str = "bilinear") -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.grey = bool(grey)
        if crop_pct is None:  # ImageNet convention from 128 px: 256 -> 224 crop (dscl.backbones.dataset_crop_pct)
            crop_pct = 224 / 256 if self.image_size >= 128 else 1.0
        if not 0.0 < crop_pct <= 1.0 or interpolation not in ("bilinear", "bicubic", "nearest"):
            raise DataError(f"Preprocess: crop_pct must be in (0, 1] and interpolation bilinear, bicubic or nearest; "
                            f"got {crop_pct!r}, {interpolation!r}")
        self.crop_pct = float(crop_pct)
        self.crop = self.crop_pct < 1.0
        # round(S / crop_pct): with 224 / 256, round(S * 256 / 224) exactly (both are S * 8 / 7 rounded once)
        self.resize_short = int(round(self.image_size / self.crop_pct)) if self.crop else self.image_size
        self.interpolation = interpolation
        self.antialias = interpolation != "nearest"  # torch antialiases bilinear and bicubic only
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def _interpolate(self, x: Tensor, h: int, w: int) -> Tensor:
        mode, aa = self.interpolation, self.antialias
        if x.dtype == torch.uint8:
            if x.device.type == "cpu" and mode == "bilinear":  # torch's native uint8 kernel, as torchvision's
                return F.interpolate(x, size=[h, w], mode=mode, align_corners=False, antialias=aa)
            # elsewhere (bicubic overshoots, and CUDA has no uint8 kernel): in float, rounded and clamped
            y = F.interpolate(x.to(torch.float32), size=[h, w], mode=mode, align_corners=None if mode == "nearest"
                              else False, antialias=aa)
            return y.round().clamp(0, 255).to(torch.uint8)
        return F.interpolate(x, size=[h, w], mode=mode, align_corners=None if mode == "nearest" else False,
                             antialias=aa)

    def _resize(self, x: Tensor) -> Tensor:
        s = self.image_size
        h, w = x.shape[-2], x.shape[-1]
        if self.crop:
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
            raise DataError("images must have 1 (grey) or 3 (RGB) channels")
        return x

    def forward(self, x: Tensor) -> Tensor:
        """uint8 ``(N, H, W, C)`` or float ``(N, C, H, W)`` in [0, 1] -> normalised float32 ``(N, 3, S, S)``."""
        if x.dim() != 4:
            raise DataError("expected a batch: uint8 (N, H, W, C) or float (N, C, H, W)")
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2)
        elif not x.is_floating_point():
            raise DataError("expected uint8 pixels (N, H, W, C) or floats in [0, 1] (N, C, H, W)")
        x = self._resize(self._channels(x))
        x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        return self.normalise(x)

    def normalise(self, x: Tensor) -> Tensor:
        """Float ``(N, 3, S, S)`` in [0, 1] -> ``(x - mean) / std``."""
        return (x - self.mean) / self.std

    def one(self, image_hwc: Tensor) -> Tensor:
        """One uint8 image ``(H, W, C)``, C in {1, 3} -> normalised float32 ``(3, S, S)``, without autograd.

        The per-image path of :class:`dscl.data.EvalTransform` and :class:`ImageTransform` (not scripted).
        ``forward`` directly: ``nn.Module.__call__`` costs more than the whole conversion of a 28 px image."""
        with torch.no_grad():
            return self.forward(image_hwc.unsqueeze(0))[0]


def preprocess_for(spec: "BackboneSpec") -> Preprocess:
    """A run's input conversion from its backbone spec: size, crop, interpolation, mean / std, and grey
    training images (``grey_to_rgb``: colour inputs are converted to grey, as the training images were)."""
    if spec.image_size is None or spec.mean is None or spec.std is None:
        raise DataError(f"backbone spec {spec.qualified_name} has no input settings")
    return Preprocess(spec.image_size, spec.mean, spec.std, spec.grey_to_rgb, crop_pct=spec.crop_pct,
                      interpolation=spec.interpolation)


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


def image_items(images: Any) -> list[Any] | Tensor:
    """``images`` as a batch tensor (uint8 ``(N, H, W, C)`` or float ``(N, C, H, W)``; numpy batches too)
    or a list of single images (a lone path, PIL image or numpy image becomes a list of one)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:  # a numpy batch is a batch, like a tensor one
        images = torch.from_numpy(np.ascontiguousarray(images))
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise DataError(f"a tensor of images must be a batch: uint8 (N, H, W, C) or float (N, C, H, W) in "
                             f"[0, 1]; got shape {tuple(images.shape)} (wrap one image in a list)")
        return images
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    return list(images)


class ImageTransform:
    """A run's input conversion through a CPU :class:`Preprocess`: one image, or many at once.

    ``transform(image)`` -> normalised float32 ``(3, S, S)``: the dataset transform of evaluation and of
    ``dscl predict``; small and picklable, so DataLoader workers get a copy of the conversion only
    (never the model). ``transform.batch(images)`` -> ``(N, 3, S, S)`` for the image arguments of
    :class:`dscl.inference.Predictor` (lists of paths / PIL images / arrays, or a batch tensor).
    """

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def __call__(self, image: ImageLike) -> Tensor:
        return self.preprocess.one(to_uint8_hwc(image))

    def batch(self, images: Any) -> Tensor:
        """Images (a list of single images, or a batch tensor, see :func:`image_items`) -> ``(N, 3, S, S)``."""
        items = image_items(images)
        with torch.no_grad():
            if isinstance(items, Tensor):
                return self.preprocess(items.cpu())
            if not items:
                return torch.zeros(0, 3, self.image_size, self.image_size)
            return torch.cat([self.preprocess(to_uint8_hwc(im).unsqueeze(0)) for im in items])

    def __repr__(self) -> str:
        p = self.preprocess
        return f"ImageTransform(image_size={p.image_size}, grey={p.grey})"
