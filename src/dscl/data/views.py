"""The DSCL multi-view transform (METHOD.md A.2) and the evaluation / stage-2 transforms.

Every transform takes a ``torch.uint8`` image ``(3, H, W)`` (``LTDataset.load``; a PIL image or a
``(H, W)`` / ``(1, H, W)`` grey tensor is accepted too) and returns normalised float32 tensors.

Why not a chain of torchvision transforms: at 28 px a torchvision ``ColorJitter`` costs ~0.4 ms per
image on one CPU core, i.e. ~2 ms for the 5 images of one DSCL sample, which is slower than the
training step itself. Here all the pieces of one sample are augmented together:

* Crops are resized with separable antialiased-bilinear weight matrices (the same weights as
  ``torch.nn.functional.interpolate(..., antialias=True)`` and PIL's BILINEAR), one batched matmul
  for both global crops and one for all L patches; flips are a reversed weight matrix. Large images
  (side > ``_MATRIX_MAX``) use ``interpolate`` per crop instead, where it is cheaper.
* The photometric ops run on the pixels of all views at once (flattened into one (3, P) tensor with
  per-image parameters), with torchvision's semantics: ColorJitter = brightness, contrast,
  saturation, hue in a random order per image (``adjust_*`` formulas, clamped to [0, 1]);
  grayscale = ITU-R 601 luma; Gaussian blur with sigma ~ U(0.1, 2) (PIL's ``radius`` is the std),
  kernel truncated at 3 sigma, reflect padding.

Randomness comes from ``torch.rand`` (one call per sample) on ``generator`` if given, else on torch's
global RNG, which DataLoader seeds differently in every worker. Do not pass a generator to a
transform used with ``num_workers > 0``: every worker would get a copy of the same generator state.
The uniforms become parameters in :func:`draw_view_params` (crop boxes, flips, jitter factors and
order, grayscale, blur sigma), written once for numpy arrays and torch tensors alike: the batched
pipeline on the training device (:mod:`dscl.data.batched_views`, ``views.augment_on``) draws its
parameters with the same function, so both paths follow the same distributions.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dscl.config import ViewConfig
from dscl.data.core import DataError
from dscl.data.policies import (
    NO_POLICY,
    Policy,
    PolicyParams,
    apply_policy_one,
    draw_policy,
    erase_one,
    policy_from,
    policy_uniforms,
)
from dscl.data.preprocess import Preprocess

if TYPE_CHECKING:
    from dscl.backbones import BackboneSpec

_MATRIX_MAX = 96  # largest side (px) resized with weight matrices; above it interpolate() is faster
_TRIES = 10  # RandomResizedCrop attempts before the fallback
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_U_PHOTO = 12  # uniforms per image for the photometric parameters
_SIGMA_MAX = 2.0  # blur sigma ~ U(0.1, _SIGMA_MAX) (MoCo v2 / the official code)

Array: TypeAlias = Any  # a numpy array or a torch tensor (the parameter functions accept both)


class DSCLViews(NamedTuple):
    """One training sample of DSCL + PBSD (METHOD.md A.2 step 5).

    query: (3, S, S) strong view (anchor, "global view 2"); key: (3, S, S) weak view for the momentum
    encoder; patches: (L, 3, p, p) small views cut from the query crop before its colour augmentation;
    boxes: (L, 4) float ``(x1, y1, x2, y2)`` of each patch in pixels of the (flipped) query view.
    ``default_collate`` batches the fields to (B, 3, S, S), (B, L, 3, p, p), (B, L, 4).
    """

    query: torch.Tensor
    key: torch.Tensor
    patches: torch.Tensor
    boxes: torch.Tensor


class _Recipe(NamedTuple):
    """Photometric augmentation of one view (jitter strengths as in torchvision's ColorJitter)."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    p_jitter: float
    p_gray: float
    p_blur: float


_OFF = _Recipe(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _strong(blur: bool) -> _Recipe:
    # MoCo-v2 style (query view, patches, stage-2 strong): jitter(0.4,0.4,0.4,0.1) p 0.8, grey 0.2, blur 0.5
    return _Recipe(0.4, 0.4, 0.4, 0.1, 0.8, 0.2, 0.5 if blur else 0.0)


_WEAK = _Recipe(0.4, 0.4, 0.4, 0.0, 1.0, 0.0, 0.0)  # key view (TSC/KCL): jitter(0.4,0.4,0.4,0) always


# ------------------------------------------------------------------------------------------ geometry


def _as_uint8_chw(image: torch.Tensor | Image.Image | np.ndarray) -> torch.Tensor:
    if isinstance(image, Image.Image):
        image = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        image = torch.from_numpy(image.copy())
        if image.ndim == 3 and image.shape[-1] in (1, 3) and image.shape[0] not in (1, 3):
            image = image.permute(2, 0, 1)
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.dtype != torch.uint8:
        raise ValueError(f"expected a torch.uint8 image, got {image.dtype}")
    return image


def _xp(a: Array) -> Any:
    """The array module of ``a``: numpy for arrays, torch for tensors."""
    return torch if isinstance(a, torch.Tensor) else np


def _is_array(a: object) -> bool:
    return isinstance(a, (np.ndarray, torch.Tensor))


def _as_int64(a: Array) -> Array:
    return a.long() if isinstance(a, torch.Tensor) else a.astype(np.int64)


def _table_like(a: Array, rows: tuple[Any, ...]) -> Array:
    """``rows`` (a tuple of floats or of float tuples) as a read-only float64 array of ``a``'s kind and
    device. Cached: a fresh table costs a per-sample transform a few microseconds, and copying one
    to a GPU on every batch would wait for the device."""
    return _cached_table(rows, a.device if isinstance(a, torch.Tensor) else None)


@functools.lru_cache(maxsize=256)
def _cached_table(rows: tuple[Any, ...], device: torch.device | None) -> Array:
    if device is not None:
        return torch.tensor(rows, dtype=torch.float64, device=device)
    table = np.asarray(rows, dtype=np.float64)
    table.flags.writeable = False
    return table


def _fallback_size(height: Any, width: Any, ratio: tuple[float, float], fallback: str) -> tuple[Any, Any]:
    """(h, w) of the crop used when no try fits: torchvision's central crop with the ratio clamped
    ("center") or the whole image ("whole"); python numbers in, python numbers out, else arrays."""
    if fallback == "whole":
        return height, width
    if fallback == "none":
        return 0.0 * height, 0.0 * width
    lo, hi = min(ratio), max(ratio)
    if not (_is_array(height) or _is_array(width)):
        if width / height < lo:
            return int(round(width / lo)), width
        if width / height > hi:
            return height, int(round(height * hi))
        return height, width
    xp = _xp(height if _is_array(height) else width)
    aspect = width / height
    return xp.where(aspect < lo, xp.round(width / lo), height), xp.where(aspect > hi, xp.round(height * hi), width)


def sample_boxes(
    u: Array, height: Any, width: Any, scale: tuple[float, float], ratio: tuple[float, float], fallback: str,
    strict: bool = False,
) -> Array:
    """RandomResizedCrop boxes ``(..., 4)`` as int64 ``(i, j, h, w)`` (top, left, height, width).

    One function for both pipelines: ``u`` is a numpy array (per-sample transform, CPU) or a torch
    tensor (batched transform, any device) of shape ``(..., 2 * _TRIES + 2)`` uniforms in [0, 1);
    ``height`` / ``width`` are numbers or arrays of the same kind broadcastable to ``u.shape[:-1]``.
    Area fraction ~ U(scale), aspect ratio log-uniform in ``ratio``, ``w = round(sqrt(area * s * r))``,
    ``h = round(sqrt(area * s / r))``; the first of ``_TRIES`` tries that fits is used, else
    ``fallback`` ("center": torchvision's central crop with the ratio clamped; "whole": the whole
    image, as the official patch sampler does; "none": an empty box, h = w = 0, at (0, 0): random
    erasing's "no erasing"). ``strict``: a try fits only strictly inside (h < H and w < W, torchvision's
    RandomErasing). The position of a fitting box is uniform
    (``u[..., -2]``, ``u[..., -1]``); the fallback is centred. All float64 and branch-free (no
    host-device synchronisation on a GPU); (h, w) pairs are handled together so that a per-sample
    call is a few dozen small numpy operations.
    """
    xp = _xp(u)
    if _is_array(height):
        sizes = xp.stack([height + 0.0 * width, width + 0.0 * height], -1)  # (..., 2): (H, W) per row
        area = (height * width)[..., None]  # broadcast over the tries
    else:
        sizes = _table_like(u, (float(height), float(width)))
        area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    tries = u[..., : 2 * _TRIES]
    target = area * (scale[0] + tries[..., 0::2] * (scale[1] - scale[0]))  # (..., T)
    aspect = xp.exp(log_lo + tries[..., 1::2] * (log_hi - log_lo))
    # (..., T, 2): h = round(sqrt(area s / r)), w = round(sqrt(area s r)); half to even, as round()
    hw = xp.round(xp.sqrt(xp.stack([target / aspect, target * aspect], -1)))
    fits = ((hw > 0) & ((hw < sizes[..., None, :]) if strict else (hw <= sizes[..., None, :]))).all(-1)  # (..., T)
    first = fits & (fits.cumsum(-1) == 1)  # one-hot of the first try that fits
    found = fits.any(-1)[..., None]
    fall_h, fall_w = _fallback_size(height, width, ratio, fallback)
    fall = (xp.stack([fall_h + 0.0 * fall_w, fall_w + 0.0 * fall_h], -1) if _is_array(fall_h) or _is_array(fall_w)
            else _table_like(u, (float(fall_h), float(fall_w))))
    hw = xp.where(found, (hw * first[..., None]).sum(-2), fall)  # (..., 2)
    free = sizes - hw
    ij = xp.where(found, xp.minimum(xp.floor(u[..., -2:] * (free + 1.0)), free),
                  0.0 * free if fallback == "none" else xp.floor(free / 2.0))
    return _as_int64(xp.concatenate([ij, hw], -1))


def _resize_weights(starts: np.ndarray, lengths: np.ndarray, in_size: int, out_size: int,
                    flips: np.ndarray | None = None) -> np.ndarray:
    """Antialiased bilinear weights (n, out_size, in_size) resizing ``[start, start + length)`` to out_size.

    Same filter as PIL BILINEAR / ``interpolate(mode="bilinear", antialias=True, align_corners=False)``:
    a triangle of half-width ``max(1, scale)`` centred at ``(o + 0.5) * scale``, renormalised at the
    crop edges. ``flips[k]`` reverses the output axis of crop k (a horizontal flip when used for x).
    """
    scale = (lengths / out_size)[:, None, None]  # (n,1,1)
    support = np.maximum(scale, 1.0)
    centre = (np.arange(out_size)[None, :, None] + 0.5) * scale  # (n,out,1)
    local = np.arange(in_size)[None, None, :] - starts[:, None, None]  # (n,1,in)
    weights = np.maximum(1.0 - np.abs(local + 0.5 - centre) / support, 0.0)
    weights *= (local >= 0) & (local < lengths[:, None, None])
    weights /= weights.sum(axis=2, keepdims=True)
    if flips is not None and flips.any():
        weights = np.where(flips[:, None, None], weights[:, ::-1], weights)
    return weights


def resized_crops(image: torch.Tensor | np.ndarray, boxes: np.ndarray, size: int, flips: np.ndarray) -> np.ndarray:
    """Crops ``boxes`` (n, 4) ``(i, j, h, w)`` of ``image`` (3, H, W; uint8 in [0, 255] or float in [0, 1]),
    each resized to (size, size) with antialiased bilinear and flipped where ``flips``:
    float32 array (n, 3, size, size) in [0, 1]."""
    _, height, width = image.shape
    is_uint8 = image.dtype in (torch.uint8, np.uint8)
    to_unit = 1.0 / 255.0 if is_uint8 else 1.0
    if max(height, width, size) <= _MATRIX_MAX:
        n = len(boxes)
        if height == width:  # one call for both axes
            both = _resize_weights(np.concatenate([boxes[:, 0], boxes[:, 1]]),
                                   np.concatenate([boxes[:, 2], boxes[:, 3]]), height, size,
                                   np.concatenate([np.zeros(n, bool), flips]))
            wy, wx = both[:n], both[n:]
        else:
            wy = _resize_weights(boxes[:, 0], boxes[:, 2], height, size)
            wx = _resize_weights(boxes[:, 1], boxes[:, 3], width, size, flips)
        wy, wx = wy.astype(np.float32), (wx * to_unit).astype(np.float32)
        source = np.asarray(image, dtype=np.float32)
        return wy[:, None] @ source[None] @ wx.transpose(0, 2, 1)[:, None]  # out[c] = Wy . img[c] . Wx^T
    source_t = torch.as_tensor(image)
    out = np.empty((len(boxes), 3, size, size), dtype=np.float32)
    for k, (i, j, h, w) in enumerate(boxes.tolist()):
        crop = source_t[:, i : i + h, j : j + w]
        if is_uint8:  # torchvision's uint8 resize kernel is the fastest path for big images
            resized = TF.resize(crop, [size, size], antialias=True).to(torch.float32).mul_(to_unit)
        else:
            resized = F.interpolate(crop.unsqueeze(0), size=(size, size), mode="bilinear",
                                    align_corners=False, antialias=True)[0]
        out[k] = (resized.flip(-1) if flips[k] else resized).numpy()
    return out


# --------------------------------------------------------------------------------------- photometric
# numpy, not torch: the views are tiny (28-64 px) and numpy's per-call overhead is 2-5x lower.


class _PhotoParams(NamedTuple):
    """Per-image photometric parameters: arrays (numpy or torch) of shape ``(...)`` (``order``: ``(..., 4)``)."""

    brightness: Array
    contrast: Array
    saturation: Array
    hue: Array
    order: Array  # (..., 4) permutation of (brightness, contrast, saturation, hue)
    gray: Array  # bool
    sigma: Array  # 0 = no blur


@functools.lru_cache(maxsize=64)
def _photo_table(recipes: tuple[_Recipe, ...]) -> tuple[tuple[float, ...], ...]:
    """Per recipe: lowest jitter factors (3), their spans (3), hue strength, p_jitter, p_gray, p_blur."""
    rows = []
    for r in recipes:
        strength = (r.brightness, r.contrast, r.saturation)
        lo = tuple(max(0.0, 1.0 - x) for x in strength)  # ColorJitter: factor ~ U(max(0, 1 - s), 1 + s)
        rows.append(lo + tuple(1.0 + x - low for x, low in zip(strength, lo, strict=True))
                    + (r.hue, r.p_jitter, r.p_gray, r.p_blur))
    return tuple(rows)


def draw_photometric(u: Array, recipes: list[_Recipe]) -> _PhotoParams:
    """Parameters from uniforms ``u`` (..., M, _U_PHOTO), one recipe per image m (numpy or torch).

    ColorJitter with probability ``p_jitter``: brightness, contrast and saturation factors
    ~ U(max(0, 1 - s), 1 + s), hue shift ~ U(-h, h), applied in a uniformly random order (else
    identity factors); grayscale with ``p_gray``; blur sigma ~ U(0.1, 2) with ``p_blur`` (else 0).
    """
    xp = _xp(u)
    t = _table_like(u, _photo_table(tuple(recipes)))  # (M, 10)
    jitter = u[..., 0] < t[:, 7]
    factors = xp.where(jitter[..., None], t[:, 0:3] + u[..., 1:4] * t[:, 3:6], 1.0)  # (..., M, 3)
    return _PhotoParams(
        brightness=factors[..., 0],
        contrast=factors[..., 1],
        saturation=factors[..., 2],
        hue=xp.where(jitter, t[:, 6] * (2.0 * u[..., 4] - 1.0), 0.0),
        order=u[..., 5:9].argsort(-1),
        gray=u[..., 9] < t[:, 8],
        sigma=xp.where(u[..., 10] < t[:, 9], 0.1 + (_SIGMA_MAX - 0.1) * u[..., 11], 0.0),
    )


class ViewParams(NamedTuple):
    """The random parameters of N DSCL samples (numpy arrays or torch tensors).

    One drawing function (:func:`draw_view_params`) serves the per-sample transform (numpy, N = 1)
    and the batched one (torch, on the training device), so both draw from the same distributions.

    crops: (N, 2, 4) int64 RandomResizedCrop boxes ``(i, j, h, w)`` of the query (0) and the key (1)
        in pixels of the source image;
    flips: (N, 2) bool horizontal flips of query and key;
    boxes: (N, L, 4) int64 patch boxes ``(i, j, h, w)`` in pixels of the (flipped) query view;
    patch_flips: (N, L) bool;
    photo: photometric parameters of shape (N, 2 + L), images in the order key, query, patches;
    policy: the augmentation policy's parameters (RandAugment & co., random erasing) of shape (N, 2 + L, ...),
        same image order; None when ``views`` has no policy (:mod:`dscl.data.policies`).
    """

    crops: Array
    flips: Array
    boxes: Array
    patch_flips: Array
    photo: _PhotoParams
    policy: PolicyParams | None = None


def _uniform_layout(num_patches: int) -> tuple[int, int, int, int]:
    """Uniforms per sample: global boxes, global flips, patch boxes + flips, photometric."""
    return 2 * (2 * _TRIES + 2), 2, num_patches * (2 * _TRIES + 3), (2 + num_patches) * _U_PHOTO


def view_uniforms(num_patches: int) -> int:
    """How many uniforms :func:`draw_view_params` reads per sample without a policy (:func:`sample_uniforms`)."""
    return sum(_uniform_layout(num_patches))


#: the view kinds of a sample in the image order of ViewParams.photo / .policy (patches repeat)
VIEW_KINDS = ("key", "query", "patches")


def _policy_setup(views: ViewConfig, image_size: int) -> tuple[Policy, tuple[int, ...], tuple[bool, ...],
                                                               tuple[bool, ...]]:
    """A sample's policy, the side of each of its images (key, query, patches) and where the policy and
    erasing apply (``views.policy_on`` / ``views.erasing_on``)."""
    return _policy_layout(policy_from(views), int(image_size), int(views.num_patches), int(views.patch_size),
                          tuple(views.policy_on), tuple(views.erasing_on))


@functools.lru_cache(maxsize=64)
def _policy_layout(policy: Policy, image_size: int, n: int, patch_size: int, policy_on: tuple[str, ...],
                   erasing_on: tuple[str, ...]) -> tuple[Policy, tuple[int, ...], tuple[bool, ...], tuple[bool, ...]]:
    kinds = ("key", "query") + ("patches",) * n
    widths = (image_size, image_size) + (patch_size,) * n
    return policy, widths, tuple(k in policy_on for k in kinds), tuple(k in erasing_on for k in kinds)


def sample_uniforms(views: ViewConfig) -> int:
    """How many uniforms :func:`draw_view_params` reads per sample: the views' and, appended when
    ``views`` has a policy, the policy's (so that without one every draw is what it always was)."""
    n = int(views.num_patches)
    return view_uniforms(n) + (2 + n) * policy_uniforms(policy_from(views))


def view_recipes(views: ViewConfig) -> list[_Recipe]:
    """Photometric recipe of each image of a sample: key (weak), query and patches (strong)."""
    return list(_view_recipes(bool(views.blur), int(views.num_patches)))


@functools.lru_cache(maxsize=64)
def _view_recipes(blur: bool, num_patches: int) -> tuple[_Recipe, ...]:
    return (_WEAK,) + (_strong(blur),) * (1 + num_patches)


def draw_view_params(u: Array, height: Any, width: Any, image_size: int, views: ViewConfig) -> ViewParams:
    """Random parameters of N samples from uniforms ``u`` (METHOD.md A.2).

    Args:
        u: float64 uniforms in [0, 1) (N, :func:`sample_uniforms`), numpy or torch (the result has the same
            kind and device).
        height, width: source image size in pixels: numbers, or arrays of ``u``'s kind of shape (N, 1).
        image_size: side S of the global views (the patch boxes live in that frame).
        views: the ViewConfig (scales, ratios, number of patches, blur).
    """
    n_patches = views.num_patches
    n_global, n_flip, n_patch, _ = _uniform_layout(n_patches)
    n = u.shape[0]
    u_global = u[:, :n_global].reshape(n, 2, 2 * _TRIES + 2)
    u_flip = u[:, n_global : n_global + n_flip]
    start = n_global + n_flip
    u_patch = u[:, start : start + n_patch].reshape(n, n_patches, 2 * _TRIES + 3)
    crops = sample_boxes(u_global, height, width, views.global_scale, (3 / 4, 4 / 3), "center")
    boxes = sample_boxes(u_patch[..., :-1], image_size, image_size, views.patch_scale,
                         (views.patch_ratio[0], views.patch_ratio[1]), "whole")
    end = start + n_patch + (2 + n_patches) * _U_PHOTO
    u_photo = u[:, start + n_patch : end].reshape(n, 2 + n_patches, _U_PHOTO)
    policy, widths, on, erase_on = _policy_setup(views, int(image_size))
    drawn = None
    if policy.active:
        drawn = draw_policy(u[:, end:].reshape(n, 2 + n_patches, policy_uniforms(policy)), policy, widths, on,
                            erase_on)
    # the query is flipped inside the crop op (before the patches are cut); the key's flip commutes
    return ViewParams(crops, u_flip < 0.5, boxes, u_patch[..., -1] < 0.5,
                      draw_photometric(u_photo, list(_view_recipes(bool(views.blur), n_patches))), drawn)


_GRAY_NP = np.asarray(_GRAY, dtype=np.float32)
_HUE_N = np.asarray([[5.0], [3.0], [1.0]], dtype=np.float32)


def _clip01(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, 0.0, out=x), 1.0, out=x)


def _hue_shift(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """torchvision ``adjust_hue`` on pixels ``x`` (3, P) in [0, 1] with per-pixel ``shift`` (P,) in [-0.5, 0.5].

    HSV hue h6 in [0, 6) from the max channel; output channel n in (R, G, B) = (5, 3, 1) is
    ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h6 + 6 * shift) mod 6``.
    """
    r, g, b = x
    maxc = x.max(axis=0)
    chroma = maxc - x.min(axis=0)
    # hexcone hue times chroma: (g - b) if R is the max, (b - r) + 2C if G, (r - g) + 4C if B
    h6 = np.where(maxc == r, g - b, np.where(maxc == g, (b - r) + 2.0 * chroma, (r - g) + 4.0 * chroma))
    h6 = h6 / np.maximum(chroma, 1e-12) + 6.0 * shift
    k = _HUE_N + h6
    k -= 6.0 * np.floor(k * (1.0 / 6.0))
    t = _clip01(np.minimum(k, 4.0 - k))
    return maxc - chroma * t


def _span(images: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> tuple[int, int] | None:
    """Pixel range [lo, hi) covering the listed images (None if none)."""
    if len(images) == 0:
        return None
    return int(starts[images[0]]), int(starts[images[-1]] + sizes[images[-1]])


def _color(x: np.ndarray, p: _PhotoParams, sizes: np.ndarray) -> np.ndarray:
    """ColorJitter (random op order per image, as torchvision) then RandomGrayscale on pixels (3, P)."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ops = p.order.T  # (4 stages, N): which op each image applies at each stage
    scale = np.stack([p.brightness, p.contrast, p.saturation, np.ones_like(p.hue)])[ops, np.arange(len(p.hue))]
    mean_w = np.where(ops == 1, 1.0 - p.contrast, 0.0)  # contrast: blend with the image's mean grey
    gray_mix = np.where(ops == 2, 1.0 - p.saturation, 0.0)  # saturation: blend with the pixel's grey
    hue = np.where(ops == 3, p.hue, 0.0)
    any_mean, any_gray, any_scale = (mean_w != 0).any(1), (gray_mix != 0).any(1), (scale != 1).any(1)
    stages = [(bool(any_scale[k] or any_mean[k] or any_gray[k]), mean_w[k] if any_mean[k] else None,
               bool(any_gray[k]), _span(np.flatnonzero(hue[k]), starts, sizes)) for k in range(4)]
    per_pixel = np.repeat(np.stack([scale, gray_mix, hue], axis=1).reshape(12, -1).astype(np.float32),
                          sizes, axis=1)  # rows 3k, 3k+1, 3k+2: scale, grey mix, hue shift of stage k
    for k, (linear, stage_mean, use_gray, use_hue) in enumerate(stages):
        if linear:
            grey = np.dot(_GRAY_NP, x)  # grey before this op (cheap: one 3-vector dot)
            x = x * per_pixel[3 * k]
            if stage_mean is not None:
                means = np.add.reduceat(grey, starts) / sizes
                x += np.repeat((stage_mean * means).astype(np.float32), sizes)
            if use_gray:
                x += per_pixel[3 * k + 1] * grey
            x = _clip01(x)
        if use_hue is not None:  # only the pixel span of the images whose hue moves (the key never does)
            lo, hi = use_hue
            x[:, lo:hi] = _hue_shift(x[:, lo:hi], per_pixel[3 * k + 2, lo:hi])
    if p.gray.any():
        flag = np.repeat(p.gray, sizes)
        x = np.where(flag, np.dot(_GRAY_NP, x), x)
    return x


def _gaussian_kernels(sigma: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """(n, 2r+1) normalised Gaussian taps (a delta where sigma == 0), r = min(ceil(3 max sigma), size - 1).

    Each image's kernel is truncated at its own ``min(ceil(3 sigma), size - 1)`` (zero taps beyond),
    so it does not depend on which other images share the call (the batched pipeline's kernels are
    the same).
    """
    radius = min(int(math.ceil(3.0 * float(sigma.max()))), size - 1)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    safe = np.where(sigma > 0, sigma, 1.0)[:, None]
    taps = np.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    taps *= np.abs(offsets)[None, :] <= np.minimum(np.ceil(3.0 * sigma), size - 1)[:, None]
    taps[sigma <= 0] = offsets[None, :] == 0
    taps /= taps.sum(axis=1, keepdims=True)
    return taps.astype(np.float32), radius


def _blur_matrices(taps: np.ndarray, radius: int, size: int) -> np.ndarray:
    """(n, size, size) matrices B with ``B @ row`` = the reflect-padded convolution of a length-``size`` row."""
    n = len(taps)
    j = np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None, :]  # (size, 2r+1)
    j = np.abs(j)
    j = np.where(j > size - 1, 2 * (size - 1) - j, j)
    mats = np.zeros((n, size, size), dtype=np.float32)
    rows = np.broadcast_to(np.arange(size)[:, None], j.shape)
    for k in range(n):
        np.add.at(mats[k], (rows, j), taps[k][None, :])
    return mats


def _blur(group: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of images (n, 3, h, w) with per-image sigma (0 = untouched), reflect padding."""
    n, c, h, w = group.shape
    if not (sigma > 0).any() or min(h, w) < 2:
        return group
    taps, radius = _gaussian_kernels(sigma, min(h, w))
    if max(h, w) <= _MATRIX_MAX:
        by = _blur_matrices(taps, radius, h)
        bx = by if w == h else _blur_matrices(taps, radius, w)
        return by[:, None] @ group @ bx.transpose(0, 2, 1)[:, None]
    weight = torch.from_numpy(taps).repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    x = torch.from_numpy(np.ascontiguousarray(group)).reshape(1, n * c, h, w)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), weight[:, None, :, None], groups=n * c)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), weight[:, None, None, :], groups=n * c)
    return x.reshape(n, c, h, w).numpy()


def augment_and_normalise(
    groups: list[np.ndarray], params: _PhotoParams | None, mean: np.ndarray, std: np.ndarray
) -> list[torch.Tensor]:
    """Photometric augmentation (if ``params``) and normalisation of image groups (n_g, 3, h_g, w_g) in [0, 1].

    Images are numbered across groups in order; ``params`` holds one entry per image.
    """
    shapes = [(g.shape[0], g.shape[2], g.shape[3]) for g in groups]
    x = np.concatenate([g.transpose(1, 0, 2, 3).reshape(3, -1) for g in groups], axis=1)  # (3, P)
    if params is not None:
        sizes = np.asarray([h * w for n, h, w in shapes for _ in range(n)], dtype=np.int64)
        x = _color(x, params, sizes)
    x = x * (1.0 / std)[:, None] + (-mean / std)[:, None]
    out, start, first = [], 0, 0
    for n, h, w in shapes:
        g = x[:, start : start + n * h * w].reshape(3, n, h, w).transpose(1, 0, 2, 3)
        if params is not None:
            g = _blur(g, params.sigma[first : first + n])  # linear, weights sum to 1: commutes with normalise
        out.append(torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32)))
        start += n * h * w
        first += n
    return out


# -------------------------------------------------------------------------------------------- public


class DSCLTransform:
    """uint8 image (3, H, W) -> ``DSCLViews`` (METHOD.md A.2, official ``loader_roi.py`` semantics).

    Two independent RandomResizedCrop global crops (area ``views.global_scale``, ratio 3/4..4/3,
    bilinear, ``image_size``). Crop 0 is flipped with p 0.5, then ``views.num_patches`` boxes are drawn
    on it (area ``views.patch_scale`` of the query view, ratio ``views.patch_ratio``, whole-view
    fallback) and cut to ``views.patch_size`` before any colour augmentation. Query and each patch
    (own flip p 0.5): ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, blur p 0.5 if
    ``views.blur``. Key (crop 1): ColorJitter(0.4, 0.4, 0.4, 0) always, flip p 0.5.
    ``views.photometric=False`` keeps only crops and flips. Finally /255 and (x - mean) / std.

    Args:
        image_size: side S of the global views in pixels.
        views: the ViewConfig.
        mean, std: per-channel normalisation of [0, 1] images (``DatasetSplits.mean/std``).
        generator: optional torch.Generator for reproducible draws (see the module note on workers).
    """

    def __init__(self, image_size: int, views: ViewConfig, mean: tuple[float, ...], std: tuple[float, ...],
                 generator: torch.Generator | None = None) -> None:
        self.image_size = int(image_size)
        self.views = views
        self.num_patches = int(views.num_patches)
        self.patch_size = int(views.patch_size)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.generator = generator
        self._uniforms = sample_uniforms(views)

    def draw(self, height: int, width: int) -> ViewParams:
        """Random parameters of one sample from a ``height`` x ``width`` image (a batch of N = 1, numpy)."""
        u = torch.rand(self._uniforms, generator=self.generator, dtype=torch.float64).numpy()
        return draw_view_params(u[None], height, width, self.image_size, self.views)

    def apply(self, image: torch.Tensor, params: ViewParams) -> DSCLViews:
        """The views of uint8 ``image`` (3, H, W) for the given parameters (N = 1; deterministic)."""
        size, psize = self.image_size, self.patch_size
        globals_ = resized_crops(image, params.crops[0], size, params.flips[0])  # (2,3,S,S) in [0,1]: query, key
        boxes = params.boxes[0]
        patches = resized_crops(globals_[0], boxes, psize, params.patch_flips[0])
        drawn = params.policy
        if drawn is not None and drawn.ops.shape[-1]:  # after the patches are cut, as the colour augmentation
            ops, mag = drawn.ops[0], drawn.magnitude[0]  # images key, query, patches
            pair_in = torch.from_numpy(np.ascontiguousarray(globals_[::-1]))
            globals_ = apply_policy_one(pair_in, ops[:2], mag[:2]).numpy()[::-1]
            patches = apply_policy_one(torch.from_numpy(patches), ops[2:], mag[2:]).numpy()
        photo = _PhotoParams(*(a[0] for a in params.photo)) if self.views.photometric else None
        pair, patch_t = augment_and_normalise([globals_[::-1], patches], photo, self.mean, self.std)
        if drawn is not None and self.views.erasing > 0:  # on the normalised views, as RandomErasing after Normalize
            pair = erase_one(pair, drawn.erase[0][:2])
            patch_t = erase_one(patch_t, drawn.erase[0][2:])
        xyxy = np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]], 1)
        return DSCLViews(pair[1], pair[0], patch_t,
                         torch.from_numpy(xyxy.astype(np.float32)).reshape(self.num_patches, 4))

    def __call__(self, image: torch.Tensor) -> DSCLViews:
        img = _as_uint8_chw(image)
        return self.apply(img, self.draw(img.shape[1], img.shape[2]))

    def __repr__(self) -> str:
        return (f"DSCLTransform(image_size={self.image_size}, num_patches={self.num_patches}, "
                f"patch_size={self.patch_size}, photometric={self.views.photometric}, blur={self.views.blur})")


class EvalTransform:
    """Deterministic test-time view: with ``crop_pct < 1`` resize the shorter side to
    ``round(image_size / crop_pct)`` and centre-crop ``image_size``, else resize to (image_size, image_size)
    if needed (``crop_pct`` None: ``224 / 256`` for ``image_size >= 128``, 1 below, the convention of every run
    before backbone specs). Returns a normalised float (3, S, S).

    The evaluation view has one implementation, :class:`dscl.data.preprocess.Preprocess` (colour, as
    ``LTDataset.load`` gives images), which a run's predictor and its exported files use as well; a run
    passes its backbone spec's settings (:func:`eval_transform_for`)."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 crop_pct: float | None = None, interpolation: str = "bilinear") -> None:
        self.image_size = int(image_size)
        self.preprocess = Preprocess(self.image_size, mean, std, grey=False, crop_pct=crop_pct,
                                     interpolation=interpolation)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.preprocess.one(_as_uint8_chw(image).permute(1, 2, 0))

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size})"


def _inputs(spec: BackboneSpec) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    if spec.image_size is None or spec.mean is None or spec.std is None:
        raise DataError(f"backbone spec {spec.qualified_name} has no input settings")
    return spec.image_size, spec.mean, spec.std


def eval_transform_for(spec: BackboneSpec) -> EvalTransform:
    """The evaluation view of a run's backbone spec (its size, crop, interpolation, mean and std)."""
    size, mean, std = _inputs(spec)
    return EvalTransform(size, mean, std, crop_pct=spec.crop_pct, interpolation=spec.interpolation)


def classifier_transform_for(spec: BackboneSpec, policy: Policy = NO_POLICY) -> ClassifierTransform:
    """Stage 2's training view of a run's backbone spec (its size, mean and std) with ``policy``
    (:func:`dscl.data.policies.policy_from` of the classifier config)."""
    return ClassifierTransform(*_inputs(spec), policy=policy)


class ClassifierTransform:
    """Stage-2 training view: RandomResizedCrop(scale 0.08-1) + flip, and with ``strong`` also
    ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2 and (for image_size >= 64) blur p 0.5;
    ``policy`` (``classifier.randaugment`` & co.) after the flip, random erasing after normalisation.
    Returns a normalised float (3, S, S)."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], strong: bool = True,
                 generator: torch.Generator | None = None, policy: Policy = NO_POLICY) -> None:
        self.image_size = int(image_size)
        self.strong = strong
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.generator = generator
        self.policy = policy
        self._recipe = _strong(blur=self.image_size >= 64) if strong else _OFF
        self._base = 2 * _TRIES + 3 + _U_PHOTO  # without a policy: the draws of every run before policies

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        img = _as_uint8_chw(image)
        u = torch.rand(self._base + policy_uniforms(self.policy), generator=self.generator,
                       dtype=torch.float64).numpy()
        box = sample_boxes(u[None, : 2 * _TRIES + 2], img.shape[1], img.shape[2], (0.08, 1.0), (3 / 4, 4 / 3),
                           "center")
        crop = resized_crops(img, box, self.image_size, u[2 * _TRIES + 2 : 2 * _TRIES + 3] < 0.5)
        drawn = None
        if self.policy.active:
            drawn = draw_policy(u[None, self._base:], self.policy, (self.image_size,), (True,), (True,))
            crop = apply_policy_one(torch.from_numpy(crop), drawn.ops, drawn.magnitude).numpy()
        params = draw_photometric(u[None, self._base - _U_PHOTO : self._base], [self._recipe]) if self.strong else None
        out = augment_and_normalise([crop], params, self.mean, self.std)[0]
        if drawn is not None and self.policy.erasing > 0:
            out = erase_one(out, drawn.erase)
        return out[0]
