"""The DSCL views of a whole batch at once, on the training device (issue #15).

With ``views.augment_on=device`` the DataLoader only delivers uint8 images (:class:`CanvasTransform`,
collated to a :class:`Canvas`), and :class:`BatchedDSCLTransform` makes the 2 global views and L
patches of every image in a few batched torch ops on the device the model trains on. The random
parameters come from the same function as the per-sample transform's
(:func:`dscl.data.views.draw_view_params`), so the distributions are the same by construction; given
the same parameters the two paths give the same views to float tolerance (tests/test_batched_views.py).

The pixel operations are those of :mod:`dscl.data.views`, written for batches:

* crops and patches: separable antialiased-bilinear weight matrices (PIL / ``interpolate(antialias=
  True)`` weights), one batched matmul per axis for all global crops and one for all patches; a
  flip is a reversed weight matrix;
* ColorJitter (random op order per image), grayscale: per-image parameters broadcast over pixels;
* Gaussian blur: a per-image kernel truncated at its own 3 sigma, one grouped convolution per axis
  with reflect padding.

Nothing reads a device value on the host: no synchronisation, so a GPU step does not stall.

What differs from the per-sample path (``views.augment_on=loader``):

* In-memory datasets (Fashion-MNIST, CIFAR): nothing. The loader passes the stored images and the
  crops are cut from them, as the per-sample path does.
* File datasets (ImageNet-LT, iNaturalist, Places-LT, folders): the loader decodes each image and
  resizes it, ignoring its aspect ratio, to a square "canvas" of ``round(views.working_scale *
  image_size)`` pixels (antialiased), so that a batch can be stacked. The crop boxes are still drawn
  in the original image's pixel frame (same area fractions and aspect ratios, same fallback) and
  mapped onto the canvas, so every view shows the same region with the same shape as before; only
  the resolution it is resampled from changes: a crop covering a fraction ``f`` of the image's width
  gets ``f * working_size`` source pixels across instead of ``f * width``. At 224 px with the default
  1.5 (a 336 px canvas), crops of area >= 44% are downsampled either way; smaller ones are upsampled
  from a little less detail than a ~375 px-tall ImageNet image had (a 0.08-area crop: 95 instead of
  106 source pixels across). Boxes on the canvas are fractional; edge pixels they cut are included.

Randomness: one ``torch.rand`` call per batch on ``generator`` (a generator on the training device,
seeded per rank by the training loop and saved in its checkpoints), else on the device's default
generator.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from dscl.config import ViewConfig
from dscl.data.policies import PolicyParams, apply_policy_batch, erase_batch
from dscl.data.views import (
    _GRAY,
    _SIGMA_MAX,
    DSCLViews,
    ViewParams,
    _as_uint8_chw,
    _PhotoParams,
    _Recipe,
    draw_view_params,
    sample_uniforms,
    view_recipes,
)

__all__ = [
    "BatchedDSCLTransform", "Canvas", "CanvasTransform", "augment_on_device", "params_from_numpy", "working_size",
]

# On a CPU the batched path wins at small image sizes (the per-sample numpy path's overhead is per
# call, the batched path's per batch): ~3x less CPU time per sample than a worker at 28-32 px
# (benchmarks/view_speed.py), and no worker process competing with the training threads. At 64 px
# it is about even (1.2x) while a worker runs beside the step, and at 224 px it loses 4x (the
# per-sample resize works on a crop, the batched one multiplies dense weights over the canvas).
AUTO_CPU_MAX_SIZE = 32


class Canvas(NamedTuple):
    """What the DataLoader delivers for the batched path; ``default_collate`` stacks the fields.

    image: uint8 (3, h, w) at the working size (batched: (B, 3, h, w));
    size: int64 (2,) ``(height, width)`` of the source image the crop boxes are drawn for (batched: (B, 2)).
    """

    image: Tensor
    size: Tensor


class CanvasTransform:
    """DataLoader side of the batched path: uint8 image -> :class:`Canvas`.

    Args:
        working_size: side of the square canvas every image is resized to (antialiased, aspect ratio
            not kept; the views undo the squeeze, see the module docstring); None keeps the image as
            it is (in-memory datasets, whose images all have one size).
    """

    def __init__(self, working_size: int | None = None) -> None:
        if working_size is not None and working_size < 1:
            raise ValueError(f"working_size must be >= 1 pixel or None, got {working_size}")
        self.working_size = working_size

    def __call__(self, image: Tensor) -> Canvas:
        img = _as_uint8_chw(image)
        height, width = int(img.shape[1]), int(img.shape[2])
        side = self.working_size
        if side is not None and (height, width) != (side, side):
            img = TF.resize(img, [side, side], antialias=True)
        return Canvas(img.contiguous(), torch.tensor([height, width], dtype=torch.int64))

    def __repr__(self) -> str:
        return f"CanvasTransform(working_size={self.working_size})"


def working_size(image_size: int, views: ViewConfig, in_memory: bool) -> int | None:
    """The canvas side the loader resizes to: None (no resize) for in-memory datasets, else
    ``round(views.working_scale * image_size)``."""
    return None if in_memory else int(round(views.working_scale * image_size))


def augment_on_device(setting: str, device: torch.device, image_size: int) -> bool:
    """Whether ``views.augment_on`` = ``setting`` makes the training views on the device (batched).

    ``auto``: yes on CUDA; on a CPU only for ``image_size <= AUTO_CPU_MAX_SIZE`` (32 px: the
    Fashion-MNIST and CIFAR presets), where it was measured faster (benchmarks/view_speed.py; from
    64 px on, the per-sample path in DataLoader workers beside the step is as fast or faster on a
    CPU); other devices (mps, ...) use the loader.
    """
    if setting == "device":
        return True
    if setting == "loader":
        return False
    if setting != "auto":
        raise ValueError(f"views.augment_on must be auto, loader or device, got {setting!r}")
    if device.type == "cuda":
        return True
    return device.type == "cpu" and image_size <= AUTO_CPU_MAX_SIZE


# ------------------------------------------------------------------------------------------ geometry


def _resize_weights(starts: Tensor, lengths: Tensor, in_size: int, out_size: int,
                    flips: Tensor | None = None) -> Tensor:
    """Antialiased bilinear weights (n, out_size, in_size) float32 resizing ``[start, start + length)``.

    The batched twin of :func:`dscl.data.views._resize_weights` (same filter: a triangle of half-width
    ``max(1, scale)`` centred at ``start + (o + 0.5) * scale``, renormalised over the pixels the box
    covers); ``starts`` / ``lengths`` (n,) float64 may be fractional (canvas boxes), integer boxes
    give exactly the per-sample weights. ``flips[k]`` reverses output axis of crop k.
    """
    scale = (lengths / out_size)[:, None, None]  # (n, 1, 1)
    support = scale.clamp(min=1.0)
    centre = (torch.arange(out_size, device=starts.device, dtype=torch.float64)[None, :, None] + 0.5) * scale
    local = torch.arange(in_size, device=starts.device, dtype=torch.float64)[None, None, :] - starts[:, None, None]
    weights = (1.0 - (local + 0.5 - centre).abs() / support).clamp(min=0.0)  # (n, out, in)
    weights = weights * ((local > -1.0) & (local < lengths[:, None, None]))  # pixels the box touches
    weights = weights / weights.sum(dim=2, keepdim=True)
    if flips is not None:
        weights = torch.where(flips[:, None, None], weights.flip(1), weights)
    return weights.float()


def _resized_crops(images: Tensor, wy: Tensor, wx: Tensor) -> Tensor:
    """``out[n, k, c] = wy[n, k] @ images[n, c] @ wx[n, k]^T``: k crops per image, resized and flipped.

    ``images`` (N, 3, H, W), ``wy`` (N, k, S, H), ``wx`` (N, k, S, W) -> (N, k, 3, S, S). Two bmm calls
    with the channels (and the k crops) laid side by side: at 28 px that is 4x faster on a CPU than
    one broadcast matmul per crop and channel (fewer, larger matrix products).
    """
    n, _, height, width = images.shape
    k, size = wy.shape[1], wy.shape[2]
    if n * k == 0:
        return images.new_zeros(n, k, 3, size, size)
    cols = torch.bmm(images.reshape(n, 3 * height, width),  # (N, 3H, W) @ (N, W, kS): every x resize
                     wx.permute(0, 3, 1, 2).reshape(n, width, k * size))
    cols = cols.view(n, 3, height, k, size).permute(0, 3, 2, 1, 4).reshape(n * k, height, 3 * size)
    out = torch.bmm(wy.reshape(n * k, size, height), cols)  # (Nk, S, H) @ (Nk, H, 3S): every y resize
    return out.view(n, k, size, 3, size).permute(0, 1, 3, 2, 4)


# --------------------------------------------------------------------------------------- photometric


def _hue_shift(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision ``adjust_hue`` of images (M, 3, h, w) in [0, 1] by ``shift`` (M, 1, 1, 1) in [-0.5, 0.5].

    Same formula as :func:`dscl.data.views._hue_shift`: output channel n in (R, G, B) = (5, 3, 1) is
    ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h6 + 6 * shift) mod 6``.
    """
    r, g, b = x.unbind(1)  # (M, h, w) each
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    h6 = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r) + 2.0 * chroma, (r - g) + 4.0 * chroma))
    h6 = h6 / chroma.clamp(min=1e-12) + 6.0 * shift[:, 0]
    k = torch.stack([h6 + 5.0, h6 + 3.0, h6 + 1.0], dim=1)
    k = k - 6.0 * torch.floor(k * (1.0 / 6.0))
    t = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return maxc[:, None] - chroma[:, None] * t


def _color(x: Tensor, p: _PhotoParams, recipe: _Recipe) -> Tensor:
    """ColorJitter (per-image random op order, torchvision formulas) then RandomGrayscale, batched.

    ``x`` (M, 3, h, w) in [0, 1]; ``p`` arrays (M,) (order (M, 4)). Each of the four stages applies
    one op per image: brightness ``x * b``, contrast ``x * c + (1 - c) * mean(grey)``, saturation
    ``x * s + (1 - s) * grey``, each clamped to [0, 1], or hue. Ops the recipe never draws (the key's
    hue and grayscale) are skipped.
    """
    def grey_of(y: Tensor) -> Tensor:  # (M, 1, h, w); python weights: no tensor is sent to the device
        return _GRAY[0] * y[:, 0:1] + _GRAY[1] * y[:, 1:2] + _GRAY[2] * y[:, 2:3]

    def per_image(a: Tensor) -> Tensor:
        return a.to(x.dtype).view(-1, 1, 1, 1)

    b, c, s, h = per_image(p.brightness), per_image(p.contrast), per_image(p.saturation), per_image(p.hue)
    one, zero = torch.ones_like(b), torch.zeros_like(b)
    use_hue = recipe.p_jitter > 0 and recipe.hue > 0
    for stage in range(4):
        op = p.order[:, stage].view(-1, 1, 1, 1)
        scale = torch.where(op == 0, b, torch.where(op == 1, c, torch.where(op == 2, s, one)))
        mean_w = torch.where(op == 1, 1.0 - c, zero)
        gray_mix = torch.where(op == 2, 1.0 - s, zero)
        grey = grey_of(x)  # before this op
        x = torch.addcmul(x * scale + mean_w * grey.mean(dim=(2, 3), keepdim=True), gray_mix, grey).clamp_(0.0, 1.0)
        if use_hue:
            shift = torch.where(op == 3, h, zero)
            if x.device.type == "cpu":  # only the images whose hue moves at this stage (a quarter)
                moved = (shift.view(-1) != 0).nonzero().view(-1)
                x[moved] = _hue_shift(x[moved], shift[moved])
            else:  # all of them, masked: selecting would read the mask on the host (a GPU sync)
                x = torch.where(shift != 0, _hue_shift(x, shift), x)
    if recipe.p_gray > 0:
        x = torch.where(per_image(p.gray) > 0, grey_of(x).expand_as(x), x)
    return x


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur of (M, 3, h, w) with per-image ``sigma`` (M,) (0 = untouched), reflect padding.

    Kernels as :func:`dscl.data.views._gaussian_kernels`: each image's taps end at its own
    ``min(ceil(3 sigma), size - 1)``; the common width is the largest possible (sigma <= 2: 13 taps),
    fixed so that no device value is read.
    """
    m, c, h, w = x.shape
    size = min(h, w)
    if size < 2 or m == 0:
        return x
    radius = min(int(math.ceil(3.0 * _SIGMA_MAX)), size - 1)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    sigma = sigma.to(torch.float64)
    safe = torch.where(sigma > 0, sigma, 1.0)[:, None]
    taps = torch.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    taps = taps * (offsets.abs()[None, :] <= torch.ceil(3.0 * sigma).clamp(max=size - 1)[:, None])
    taps = torch.where((sigma > 0)[:, None], taps, (offsets == 0).to(torch.float64)[None, :])
    taps = (taps / taps.sum(dim=1, keepdim=True)).to(x.dtype).repeat_interleave(c, dim=0)  # (M*3, 2r+1)
    y = x.reshape(1, m * c, h, w)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), taps[:, None, :, None], groups=m * c)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), taps[:, None, None, :], groups=m * c)
    return y.reshape(m, c, h, w)


# -------------------------------------------------------------------------------------------- public


class BatchedDSCLTransform:
    """uint8 images (B, 3, h, w) on the training device -> batched ``DSCLViews`` (METHOD.md A.2).

    The same views as :class:`dscl.data.views.DSCLTransform` (see its docstring for the recipe),
    made for the whole batch with torch ops on ``device``: query and key (B, 3, S, S), patches
    (B, L, 3, p, p), boxes (B, L, 4) ``(x1, y1, x2, y2)`` in query-view pixels.

    Args:
        image_size: side S of the global views in pixels.
        views: the ViewConfig.
        mean, std: per-channel normalisation of [0, 1] images.
        device: where the parameters are drawn (the images passed in must be there too).
        generator: a torch.Generator on ``device`` for reproducible draws (None: the device's default).
    """

    def __init__(self, image_size: int, views: ViewConfig, mean: tuple[float, ...], std: tuple[float, ...],
                 *, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> None:
        self.image_size = int(image_size)
        self.views = views
        self.num_patches = int(views.num_patches)
        self.patch_size = int(views.patch_size)
        self.device = torch.device(device)
        self.generator = generator
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._uniforms = sample_uniforms(views)
        self._recipes = view_recipes(views)  # key, query, patches

    def draw(self, source_size: Tensor) -> ViewParams:
        """Random parameters (tensors on the device) for images of ``source_size`` (N, 2) ``(height, width)``."""
        n = source_size.shape[0]
        u = torch.rand((n, self._uniforms), generator=self.generator, device=self.device, dtype=torch.float64)
        hw = source_size.to(self.device, torch.float64, non_blocking=True)
        return draw_view_params(u, hw[:, :1], hw[:, 1:], self.image_size, self.views)

    def apply(self, images: Tensor, params: ViewParams, source_size: Tensor | None = None) -> DSCLViews:
        """The views of ``images`` (N, 3, h, w) uint8 for ``params`` (deterministic).

        ``source_size`` (N, 2): the ``(height, width)`` the crop boxes were drawn for, when the images
        are canvases resized from them (None: the images themselves).
        """
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, 3, h, w), got {images.dtype} {tuple(images.shape)}")
        n, _, height, width = images.shape
        dev, size, psize, n_patches = images.device, self.image_size, self.patch_size, self.num_patches
        crops = params.crops.to(dev, torch.float64)  # (N, 2, 4) (i, j, h, w) in source pixels
        if source_size is not None:  # map source-pixel boxes onto the canvas
            src = source_size.to(dev, torch.float64)
            sy, sx = height / src[:, 0], width / src[:, 1]
            crops = crops * torch.stack([sy, sx, sy, sx], dim=1)[:, None, :]
        wy = _resize_weights(crops[..., 0].reshape(-1), crops[..., 2].reshape(-1), height, size)
        wx = _resize_weights(crops[..., 1].reshape(-1), crops[..., 3].reshape(-1), width, size,
                             params.flips.to(dev).reshape(-1)) * (1.0 / 255.0)
        # both crops of every image, resized, flipped and scaled to [0, 1]: (N, 2, 3, S, S)
        pair = _resized_crops(images.to(torch.float32), wy.view(n, 2, size, height), wx.view(n, 2, size, width))
        boxes = params.boxes.to(dev, torch.float64)  # (N, L, 4) in query-view pixels
        py = _resize_weights(boxes[..., 0].reshape(-1), boxes[..., 2].reshape(-1), size, psize)
        px = _resize_weights(boxes[..., 1].reshape(-1), boxes[..., 3].reshape(-1), size, psize,
                             params.patch_flips.to(dev).reshape(-1))
        # patches are cut from the flipped query crop before its colour augmentation: (N, L, 3, p, p)
        patches = _resized_crops(pair[:, 0], py.view(n, n_patches, psize, size), px.view(n, n_patches, psize, size))
        photo = _PhotoParams(*(a.to(dev) for a in params.photo))  # (N, 2 + L): key, query, patches
        drawn = PolicyParams(*(a.to(dev) for a in params.policy)) if params.policy is not None else None
        query = self._finish(pair[:, 0], photo, drawn, slice(1, 2), self._recipes[1])
        key = self._finish(pair[:, 1], photo, drawn, slice(0, 1), self._recipes[0])
        flat = self._finish(patches.reshape(n * n_patches, 3, psize, psize), photo, drawn,
                            slice(2, 2 + n_patches), self._recipes[2] if n_patches else self._recipes[1])
        i, j, h, w = boxes.unbind(-1)
        xyxy = torch.stack([j, i, j + w, i + h], dim=-1).to(torch.float32)
        return DSCLViews(query, key, flat.reshape(n, n_patches, 3, psize, psize), xyxy)

    def _finish(self, x: Tensor, photo: _PhotoParams, drawn: PolicyParams | None, columns: slice,
                recipe: _Recipe) -> Tensor:
        """Policy, photometric augmentation (images of ``columns`` of ``photo`` / ``drawn``, image-major),
        normalisation and random erasing."""
        def pick(a: Tensor) -> Tensor:
            return a[:, columns].reshape(-1, *a.shape[2:])

        if drawn is not None and drawn.ops.shape[-1]:
            x = apply_policy_batch(x, pick(drawn.ops), pick(drawn.magnitude))
        if self.views.photometric and x.shape[0]:
            # a slice, never a Python list: list indexing builds an index tensor on the host and copies it
            # to the device with a blocking copy (the host would wait for the GPU three times per step)
            picked = _PhotoParams(*(pick(a) for a in photo))
            x = _color(x, picked, recipe)
            if recipe.p_blur > 0:
                x = _blur(x, picked.sigma)
        x = (x - self.mean) / self.std
        if drawn is not None and self.views.erasing > 0:
            x = erase_batch(x, pick(drawn.erase))
        return x

    def __call__(self, canvas: Canvas) -> DSCLViews:
        images = canvas.image.to(self.device, non_blocking=True)
        # the sizes cross to the device once, without blocking; draw and apply use that copy
        size = canvas.size.to(self.device, non_blocking=True)
        return self.apply(images, self.draw(size), size)

    def __repr__(self) -> str:
        return (f"BatchedDSCLTransform(image_size={self.image_size}, num_patches={self.num_patches}, "
                f"patch_size={self.patch_size}, photometric={self.views.photometric}, blur={self.views.blur}, "
                f"device={self.device})")


def params_from_numpy(params: list[ViewParams]) -> ViewParams:
    """Stack per-sample (numpy, N = 1 each) parameters into one batch of torch tensors (CPU)."""
    def cat(arrays: list[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.concatenate(arrays))

    photo = _PhotoParams(*(cat([getattr(p.photo, f) for p in params]) for f in _PhotoParams._fields))
    policy = None
    if params and params[0].policy is not None:
        policy = PolicyParams(*(cat([getattr(p.policy, f) for p in params]) for f in PolicyParams._fields))
    return ViewParams(crops=cat([p.crops for p in params]), flips=cat([p.flips for p in params]),
                      boxes=cat([p.boxes for p in params]), patch_flips=cat([p.patch_flips for p in params]),
                      photo=photo, policy=policy)
