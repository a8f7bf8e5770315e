"""Augmentation policies of the peers' recipes (issue #32): RandAugment, TrivialAugmentWide, the
AutoAugment ImageNet policy and random erasing, on both view paths.

The ops and their magnitude spaces are torchvision's (``torchvision.transforms.v2.RandAugment`` /
``TrivialAugmentWide`` / ``AutoAugment``; nearest interpolation, zero fill), applied to float images
in [0, 1] with the semantics of ``torchvision.transforms.v2.functional`` on float tensors (posterize
quantises to ``2**bits`` levels of [0, 1], solarize's threshold is on [0, 1]). Random erasing is
``torchvision.transforms.v2.RandomErasing`` (area 0.02-0.33, aspect 0.3-3.3, value 0 after
normalisation, no erasing when none of 10 tries fits).

One drawing function (:func:`draw_policy`), written for numpy arrays and torch tensors alike like
:func:`dscl.data.views.draw_view_params`, turns uniforms into per-image parameters (an op id per
slot, its signed magnitude, an erasing box); so the per-sample path (DataLoader workers) and the
batched on-device path draw from the same distributions, and a different op sequence for every image.
Two appliers use them:

* :func:`apply_policy_one` / :func:`erase_one` (per sample): ``torchvision.transforms.v2.functional``
  ops called image by image with the drawn parameters;
* :func:`apply_policy_batch` / :func:`erase_batch` (batched): our own per-image-parameter ops on a
  whole batch (one ``grid_sample`` for every geometric op, blends with per-image factors, ...), equal
  to the torchvision ops image by image (tests/test_policies.py). On a CPU each op runs on the images
  that drew it; on other devices every op runs on every image and a mask keeps the drawn one, so that
  no device value is read on the host (no synchronisation).

Why not kornia's ``augmentation.auto.RandAugment``: it draws one op sequence per call and applies it to
the whole batch (README "Augmentation recipes"), where the recipes draw one per image.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

__all__ = [
    "NO_POLICY", "OPS", "Policy", "PolicyParams", "apply_policy_batch", "apply_policy_one", "draw_policy",
    "erase_batch", "erase_one", "policy_from", "policy_uniforms",
]

#: every op of the three policies; the index is the op id of :class:`PolicyParams`
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
_ID = {name: k for k, name in enumerate(OPS)}
_GEOMETRIC = (1, 2, 3, 4, 5)
_N_SEARCH = 14  # RandAugment and TrivialAugmentWide choose among OPS[:14] (no Invert)
_BINS = {"randaugment": 31, "trivialaugment": 31, "autoaugment": 10}  # torchvision's magnitude bins
_ERASE_SCALE = (0.02, 0.33)
_ERASE_RATIO = (0.3, 3.3)
_TRIES = 10  # erasing tries, as RandomResizedCrop's (dscl.data.views._TRIES)

#: AutoAugment's ImageNet policy (Cubuk et al. 2019, as torchvision lists it): 25 sub-policies of two
#: (op, probability, magnitude bin of 10)
_AUTOAUGMENT_IMAGENET = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


class Policy(NamedTuple):
    """What one transform applies (hashable: drawing tables are cached per policy).

    kind: none | randaugment | trivialaugment | autoaugment; num_ops, magnitude: RandAugment's N and
    M (M on torchvision's 0-30 scale); op_prob: probability that each RandAugment op applies (1 in
    torchvision; timm's RandAugment, which GPaCo and BCL use, 0.5); erasing: probability of random
    erasing (0 = off).
    """

    kind: str = "none"
    num_ops: int = 0
    magnitude: int = 0
    erasing: float = 0.0
    op_prob: float = 1.0

    @property
    def slots(self) -> int:
        """Op slots per image: RandAugment N, TrivialAugmentWide 1, AutoAugment 2 (a sub-policy)."""
        return {"none": 0, "randaugment": self.num_ops, "trivialaugment": 1, "autoaugment": 2}[self.kind]

    @property
    def active(self) -> bool:
        return self.slots > 0 or self.erasing > 0


NO_POLICY = Policy()


def policy_from(section: Any) -> Policy:
    """The :class:`Policy` of a config section holding ``randaugment``, ``trivialaugment``,
    ``autoaugment`` and ``erasing`` (``views`` or ``classifier``; validated by dscl.config)."""
    erasing = float(section.erasing)
    if section.randaugment is not None:
        n, m = section.randaugment
        return Policy("randaugment", int(n), int(m), erasing, float(section.randaugment_p))
    if section.trivialaugment:
        return Policy("trivialaugment", erasing=erasing)
    if section.autoaugment:
        return Policy("autoaugment", erasing=erasing)
    return Policy(erasing=erasing)


def describe(section: Any) -> str:
    """A config section's policy and erasing in words, for reports: ``RandAugment [2, 9] on query, patches;
    erasing p 0.25 on query`` (``views``: with the view kinds) or ``none``."""
    policy = policy_from(section)
    kinds = getattr(section, "policy_on", None)
    parts = []
    if policy.slots:
        name = {"randaugment": f"RandAugment [{policy.num_ops}, {policy.magnitude}]"
                               + (f" p {policy.op_prob:g}" if policy.op_prob < 1 else ""),
                "trivialaugment": "TrivialAugmentWide", "autoaugment": "AutoAugment (ImageNet policy)"}[policy.kind]
        parts.append(name + (f" on {', '.join(kinds)}" if kinds is not None else ""))
    if policy.erasing > 0:
        erase_kinds = getattr(section, "erasing_on", None)
        parts.append(f"erasing p {policy.erasing:g}" + (f" on {', '.join(erase_kinds)}" if erase_kinds is not None
                                                          else ""))
    return "; ".join(parts) or "none"


def policy_uniforms(policy: Policy) -> int:
    """Uniforms :func:`draw_policy` reads per image: 1 + 3 per op slot (if a policy), 1 + 2 * 10 + 2 for erasing."""
    ops = 1 + 3 * policy.slots if policy.slots else 0
    return ops + (1 + 2 * _TRIES + 2 if policy.erasing > 0 else 0)


class PolicyParams(NamedTuple):
    """Per-image parameters (numpy arrays or torch tensors) of shape ``(..., M, S)`` (S op slots).

    ops: int64 op ids (:data:`OPS`; 0 = identity, also for images the policy is off for);
    magnitude: float64 signed magnitudes (translations in pixels, truncated when applied; Posterize's
        bits; Solarize's threshold in [0, 1]);
    erase: ``(..., M, 4)`` int64 ``(i, j, h, w)`` boxes to zero after normalisation (h = 0: none).
    """

    ops: Any
    magnitude: Any
    erase: Any


def _linear(lo: float, hi: float, bins: int) -> list[float]:
    return [lo + (hi - lo) * b / (bins - 1) for b in range(bins)]


def _space(kind: str, width: int) -> tuple[tuple[tuple[float, ...], ...], tuple[bool, ...]]:
    """Magnitude table (len(OPS), bins) and signed flags of a policy's space for images ``width`` px wide."""
    bins = _BINS[kind]
    wide = kind == "trivialaugment"
    shear, rotate, enhance = (0.99, 135.0, 0.99) if wide else (0.3, 30.0, 0.9)
    translate = 32.0 if wide else 150.0 / 331.0 * width
    steps = 6 if wide else 4
    zero = [0.0] * bins
    rows = {
        "Identity": (zero, False), "ShearX": (_linear(0.0, shear, bins), True),
        "ShearY": (_linear(0.0, shear, bins), True), "TranslateX": (_linear(0.0, translate, bins), True),
        "TranslateY": (_linear(0.0, translate, bins), True), "Rotate": (_linear(0.0, rotate, bins), True),
        "Brightness": (_linear(0.0, enhance, bins), True), "Color": (_linear(0.0, enhance, bins), True),
        "Contrast": (_linear(0.0, enhance, bins), True), "Sharpness": (_linear(0.0, enhance, bins), True),
        # 8 - round(b / ((bins - 1) / steps)): no ties at these bin counts, so floor(x + 0.5) is round()
        "Posterize": ([float(8 - math.floor(b / ((bins - 1) / steps) + 0.5)) for b in range(bins)], False),
        "Solarize": (_linear(1.0, 0.0, bins), False),
        "AutoContrast": (zero, False), "Equalize": (zero, False), "Invert": (zero, False),
    }
    return tuple(tuple(rows[name][0]) for name in OPS), tuple(rows[name][1] for name in OPS)


class _Tables(NamedTuple):
    mags: Any  # (M, len(OPS), bins) magnitude of each op and bin, per image (translations depend on its width)
    signed: Any  # (M, len(OPS))
    on: Any  # (M,) the policy applies to image m
    erase_on: Any  # (M,) erasing applies to image m
    widths: Any  # (M,) float64
    image: Any  # (M, 1) int64 image index
    pair: Any  # (2,) int64: AutoAugment's two slots
    sub_ops: Any  # (25, 2) AutoAugment's sub-policies: op ids, probabilities, bins
    sub_prob: Any
    sub_bin: Any


def _tables(u: Any, policy: Policy, widths: tuple[int, ...], on: tuple[bool, ...],
            erase_on: tuple[bool, ...]) -> _Tables:
    """The drawing tables as arrays of ``u``'s kind and device (cached: a copy to a GPU on every batch
    would make the host wait for the device)."""
    return _cached_tables(policy, widths, on, erase_on, u.device if isinstance(u, Tensor) else None)


@functools.lru_cache(maxsize=64)
def _cached_tables(policy: Policy, widths: tuple[int, ...], on: tuple[bool, ...], erase_on: tuple[bool, ...],
                   device: torch.device | None) -> _Tables:
    kind = policy.kind if policy.slots else "randaugment"
    spaces = [_space(kind, w) for w in widths]
    subs = _AUTOAUGMENT_IMAGENET
    tables = _Tables(
        np.asarray([s[0] for s in spaces], dtype=np.float64), np.asarray([s[1] for s in spaces], dtype=bool),
        np.asarray(on, dtype=bool), np.asarray(erase_on, dtype=bool), np.asarray(widths, dtype=np.float64),
        np.arange(len(widths), dtype=np.int64)[:, None], np.arange(2, dtype=np.int64),
        np.asarray([[_ID[op] for op, _, _ in sub] for sub in subs], dtype=np.int64),
        np.asarray([[p for _, p, _ in sub] for sub in subs], dtype=np.float64),
        np.asarray([[b or 0 for _, _, b in sub] for sub in subs], dtype=np.int64))
    if device is not None:
        return _Tables(*(torch.from_numpy(a).to(device) for a in tables))
    for a in tables:
        a.flags.writeable = False
    return tables


def _floor_index(x: Any, n: int) -> Any:
    """``min(floor(x * n), n - 1)`` as int64 for uniforms ``x`` in [0, 1)."""
    if isinstance(x, Tensor):
        return (x * n).floor().clamp(max=n - 1).long()
    return np.minimum(np.floor(x * n), n - 1).astype(np.int64)


def draw_policy(u: Any, policy: Policy, widths: tuple[int, ...], on: tuple[bool, ...],
                erase_on: tuple[bool, ...]) -> PolicyParams:
    """Parameters of ``policy`` from uniforms ``u`` (..., M, :func:`policy_uniforms`) (numpy or torch).

    ``widths`` (M,): side of each image (square views); ``on`` / ``erase_on`` (M,): whether the policy /
    erasing applies to image m (an image it is off for gets the identity and no box, from the same
    uniforms, so the draws of the others do not depend on it).

    RandAugment: each of N slots picks one of 14 ops uniformly, at magnitude bin M of 31, negated with
    probability 1/2 for signed ops, and applies it with probability ``policy.op_prob``. TrivialAugmentWide:
    one op of 14 and a bin of 31, both uniform, sign as RandAugment. AutoAugment: one of the 25
    sub-policies uniformly, each of its two ops applied with its probability at its bin of 10.
    Erasing: with probability ``policy.erasing``, the first of 10 boxes (area fraction U(0.02, 0.33),
    aspect log-uniform in [0.3, 3.3]) that fits strictly inside.
    """
    from dscl.data.views import sample_boxes

    xp = torch if isinstance(u, Tensor) else np
    slots = policy.slots
    lead = u.shape[:-1]  # (..., M)
    t = _tables(u, policy, widths, on, erase_on)
    if slots:
        slot_u = u[..., 1 : 1 + 3 * slots].reshape(*lead, slots, 3)
        if policy.kind == "autoaugment":
            sub = _floor_index(u[..., 0], len(_AUTOAUGMENT_IMAGENET))[..., None]  # (..., M, 1)
            ops, bins, prob = t.sub_ops[sub, t.pair], t.sub_bin[sub, t.pair], t.sub_prob[sub, t.pair]
            ops = xp.where(slot_u[..., 0] < prob, ops, 0)
        else:
            ops = _floor_index(slot_u[..., 0], _N_SEARCH)
            if policy.kind == "trivialaugment":
                bins = _floor_index(slot_u[..., 1], _BINS[policy.kind])
            else:  # RandAugment: the second uniform decides whether the op applies (op_prob 1: always)
                bins = ops * 0 + policy.magnitude
                ops = xp.where(slot_u[..., 1] < policy.op_prob, ops, 0)
        ops = xp.where(t.on[:, None], ops, 0)
        magnitude = t.mags[t.image, ops, bins]
        magnitude = xp.where(t.signed[t.image, ops] & (slot_u[..., 2] < 0.5), -magnitude, magnitude)
    else:
        ops = (u[..., :0] * 0).long() if xp is torch else np.zeros((*lead, 0), dtype=np.int64)
        magnitude = u[..., :0] * 0.0
    if policy.erasing > 0:
        e = u[..., u.shape[-1] - (1 + 2 * _TRIES + 2):]
        boxes = sample_boxes(e[..., 1:], t.widths, t.widths, _ERASE_SCALE, (1 / _ERASE_RATIO[1], 1 / _ERASE_RATIO[0]),
                             "none", strict=True)
        keep = (e[..., 0] < policy.erasing) & t.erase_on
        erase = xp.where(keep[..., None], boxes, 0)
    else:
        erase = (u[..., :1] * 0).long().expand(*lead, 4) if xp is torch else np.zeros((*lead, 4), dtype=np.int64)
    return PolicyParams(ops, magnitude, erase)


# ----------------------------------------------------------------------------------- per sample (torchvision)


def _one_op(img: Tensor, op: int, mag: float) -> Tensor:
    """torchvision's op ``OPS[op]`` at signed magnitude ``mag`` on a float image (3, h, w) in [0, 1]."""
    name = OPS[op]
    nearest = InterpolationMode.NEAREST
    if name == "Identity":
        return img
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(mag))
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, interpolation=nearest, center=[0, 0],
                         shear=[shear, 0.0] if name == "ShearX" else [0.0, shear])
    if name in ("TranslateX", "TranslateY"):
        move = [int(mag), 0] if name == "TranslateX" else [0, int(mag)]
        return TF.affine(img, angle=0.0, translate=move, scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
    if name == "Rotate":
        return TF.rotate(img, mag, interpolation=nearest)
    if name == "Brightness":
        return TF.adjust_brightness(img, 1.0 + mag)
    if name == "Color":
        return TF.adjust_saturation(img, 1.0 + mag)
    if name == "Contrast":
        return TF.adjust_contrast(img, 1.0 + mag)
    if name == "Sharpness":
        return TF.adjust_sharpness(img, 1.0 + mag)
    if name == "Posterize":
        return TF.posterize(img, int(mag))
    if name == "Solarize":
        return TF.solarize(img, mag)
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    return TF.invert(img)


def apply_policy_one(images: Tensor, ops: np.ndarray, magnitude: np.ndarray) -> Tensor:
    """The drawn ops, slot after slot, on float images (M, 3, h, w) in [0, 1], one image at a time
    (``torchvision.transforms.v2.functional``); ``ops`` / ``magnitude`` (M, S) numpy."""
    out = []
    for img, row_ops, row_mag in zip(images, ops.tolist(), magnitude.tolist(), strict=True):
        for op, mag in zip(row_ops, row_mag, strict=True):
            img = _one_op(img, op, mag)
        out.append(img)
    return torch.stack(out) if out else images


def erase_one(images: Tensor, erase: np.ndarray) -> Tensor:
    """``torchvision.transforms.v2.functional.erase`` with value 0 of each image's box (M, 4) numpy (h = 0: none)."""
    zero = torch.zeros((), dtype=images.dtype)
    for k, (i, j, h, w) in enumerate(erase.tolist()):
        if h > 0:
            images[k] = TF.erase(images[k], i, j, h, w, zero)
    return images


# -------------------------------------------------------------------------------------------- batched


def _inverse_affine(op: Tensor, mag: Tensor, height: int, width: int) -> Tensor:
    """(M, 2, 3) float64 inverse affine matrices (torchvision's convention: output pixel -> input pixel,
    coordinates relative to the image centre) of the geometric ops; the identity for the others."""
    zero = torch.zeros_like(mag)
    shear = torch.rad2deg(torch.atan(mag))
    is_shx, is_shy = op == _ID["ShearX"], op == _ID["ShearY"]
    sx = torch.deg2rad(torch.where(is_shx, shear, zero))
    sy = torch.deg2rad(torch.where(is_shy, shear, zero))
    tx = torch.where(op == _ID["TranslateX"], mag.trunc(), zero)
    ty = torch.where(op == _ID["TranslateY"], mag.trunc(), zero)
    rot = torch.deg2rad(-torch.remainder(torch.where(op == _ID["Rotate"], mag, zero), 360.0))  # rotate uses -angle
    sheared = is_shx | is_shy  # shears turn about the top-left corner (center=[0, 0])
    cx = torch.where(sheared, zero - width * 0.5, zero)
    cy = torch.where(sheared, zero - height * 0.5, zero)
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([torch.stack([m0, m1, m2], -1), torch.stack([m3, m4, m5], -1)], -2)


def _warp(x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
    """Every geometric op of ``op`` at once: one nearest ``grid_sample`` with per-image matrices, zero fill
    (the grid as torchvision builds it: pixel centres relative to the image centre, then normalised)."""
    m, _, height, width = x.shape
    theta = _inverse_affine(op, mag, height, width).to(x.dtype)
    scale = torch.full((2,), 0.5 * width, dtype=x.dtype, device=x.device)  # filled there: no copy from the host
    scale[1] = 0.5 * height
    rt = theta.transpose(1, 2) / scale  # (M, 3, 2): the normalised grid is [x, y, 1] @ rt
    bx = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=x.device, dtype=x.dtype)
    by = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=x.device, dtype=x.dtype)
    # x * r0 + y * r1 + r2 as broadcasts: a (M, h*w, 3) @ (M, 3, 2) bmm is ~10x slower on a CPU (inner size 3)
    grid = (bx.view(1, 1, width, 1) * rt[:, None, None, 0, :] + by.view(1, height, 1, 1) * rt[:, None, None, 1, :]
            + rt[:, None, None, 2, :])
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _grey(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """torchvision's ``_blend`` with per-image ratios (M,): ``x * r + other * (1 - r)`` clamped to [0, 1]."""
    r = ratio.to(x.dtype).view(-1, 1, 1, 1)
    return (x * r + other * (1.0 - r)).clamp_(0.0, 1.0)


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """``adjust_sharpness`` with per-image factors: the interior blends with a 3x3 smoothing (5 at the
    centre, 1 around, / 13); the border rows and columns stay."""
    m, c, height, width = x.shape
    if height <= 2 or width <= 2:
        return x
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.full((m * c, 1, 3, 3), a, dtype=x.dtype, device=x.device)  # made there: no copy from the host
    kernel[:, :, 1, 1] = b
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]
    # the images side by side as channels of one image: a batch of depthwise convolutions is several times
    # slower on a CPU than one wide depthwise convolution
    smooth = F.conv2d(x.reshape(1, m * c, height, width), kernel, groups=m * c).view(m, c, height - 2, width - 2)
    inner.add_(smooth.sub_(inner).mul_((1.0 - factor.to(x.dtype)).view(-1, 1, 1, 1)))
    return out.clamp_(0.0, 1.0)


def _translate(x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
    """TranslateX / TranslateY by whole pixels (``int(mag)``), zero fill, one image at a time by slicing: what
    the nearest ``grid_sample`` gives for an integer shift (every sample lands on a pixel centre), several
    times faster on a CPU. Reads the shifts on the host: the CPU path only."""
    out = torch.zeros_like(x)
    _, _, height, width = x.shape
    shifts = mag.trunc().long().tolist()
    for k, (is_x, t) in enumerate(zip((op == _ID["TranslateX"]).tolist(), shifts, strict=True)):
        if is_x:
            if abs(t) < width:
                out[k, :, :, max(t, 0) : width + min(t, 0)] = x[k, :, :, max(-t, 0) : width - max(t, 0)]
        elif abs(t) < height:
            out[k, :, max(t, 0) : height + min(t, 0)] = x[k, :, max(-t, 0) : height - max(t, 0)]
    return out


def _autocontrast(x: Tensor) -> Tensor:
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    span = torch.where(flat, torch.ones_like(high), high - low)
    return ((x - torch.where(flat, torch.zeros_like(low), low)) / span).clamp_(0.0, 1.0)


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    levels = torch.exp2(bits.to(x.dtype)).view(-1, 1, 1, 1)
    return torch.minimum((x * levels).floor(), levels - 1.0).clamp_(min=0.0) / levels


def _colour_op(k: int, x: Tensor, mag: Tensor) -> Tensor:
    """Op ``OPS[k]`` (not geometric) on images ``x`` (M, 3, h, w) with per-image magnitudes (M,)."""
    name = OPS[k]
    if name == "Brightness":  # _blend with a black image: x * factor (no second image to read)
        return (x * (1.0 + mag).to(x.dtype).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if name == "Color":
        return _blend(x, _grey(x), 1.0 + mag)
    if name == "Contrast":
        return _blend(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True), 1.0 + mag)
    if name == "Sharpness":
        return _sharpness(x, 1.0 + mag)
    if name == "Posterize":
        return _posterize(x, mag)
    if name == "Solarize":
        return torch.where(x >= mag.to(x.dtype).view(-1, 1, 1, 1), 1.0 - x, x)
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)  # torchvision's kernel is batched already (its histograms are per image)
    if name == "Invert":
        return 1.0 - x
    raise ValueError(f"{name} is not a colour op")


def apply_policy_batch(x: Tensor, ops: Tensor, magnitude: Tensor) -> Tensor:
    """The drawn ops, slot after slot, on float images ``x`` (M, 3, h, w) in [0, 1], batched: the same
    result as :func:`apply_policy_one` image by image. ``ops`` / ``magnitude`` (M, S) on x's device."""
    if x.shape[0] == 0 or ops.shape[1] == 0:
        return x
    on_cpu = x.device.type == "cpu"
    if on_cpu:
        x = x.clone()  # written in place below, image subsets at a time
    shifts = (_ID["TranslateX"], _ID["TranslateY"])
    for s in range(ops.shape[1]):
        op, mag = ops[:, s], magnitude[:, s]
        present = set(torch.unique(op).tolist()) if on_cpu else set(range(len(OPS)))
        if on_cpu:
            if present & set(shifts):
                idx = ((op == shifts[0]) | (op == shifts[1])).nonzero().view(-1)
                x[idx] = _translate(x[idx], op[idx], mag[idx])
            if present & (set(_GEOMETRIC) - set(shifts)):
                idx = ((op >= _GEOMETRIC[0]) & (op <= _GEOMETRIC[-1]) & (op != shifts[0]) & (op != shifts[1]))
                idx = idx.nonzero().view(-1)
                x[idx] = _warp(x[idx], op[idx], mag[idx])
        elif present & set(_GEOMETRIC):
            moved = (op >= _GEOMETRIC[0]) & (op <= _GEOMETRIC[-1])
            x = torch.where(moved.view(-1, 1, 1, 1), _warp(x, op, mag), x)
        for k in sorted(present - set(_GEOMETRIC) - {0}):
            chosen = op == k
            if on_cpu:
                idx = chosen.nonzero().view(-1)
                x[idx] = _colour_op(k, x[idx], mag[idx])
            else:
                safe = torch.where(chosen, mag, torch.full_like(mag, 8.0 if OPS[k] == "Posterize" else 0.0))
                x = torch.where(chosen.view(-1, 1, 1, 1), _colour_op(k, x, safe), x)
    return x


def erase_batch(x: Tensor, erase: Tensor) -> Tensor:
    """Zero each image's box ``erase`` (M, 4) ``(i, j, h, w)`` (h = 0: none), batched, no host sync."""
    if x.shape[0] == 0:
        return x
    _, _, height, width = x.shape
    i, j, h, w = (t.view(-1, 1, 1) for t in erase.to(x.device).unbind(-1))
    rows = torch.arange(height, device=x.device).view(1, -1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, -1)
    inside = (rows >= i) & (rows < i + h) & (cols >= j) & (cols < j + w)  # (M, h, w)
    return x.masked_fill(inside[:, None], 0.0)
