"""The backbone spec: everything needed to rebuild a run's network and to feed it images.

A run's architecture used to be one string; a :class:`BackboneSpec` is the typed record that replaces it
(DESIGN.md style 13: a run stores the spec its network was built from, and every reload rebuilds from
that spec alone, as nanoGPT's ``model_args`` and timm's ``pretrained_cfg`` do):

* what to build: ``family`` (``builtin`` | ``timm`` | ``open_clip``), ``name`` and ``args`` (constructor
  arguments: ``timm.create_model(name, **args)``, open_clip ``vision_cfg`` overrides, the built-ins'
  ``zero_init_residual``), and ``pool`` (``avg``: mean of the feature map; ``cls``: a ViT's class token);
* how images enter it: ``image_size`` (px), ``mean`` / ``std`` (per channel, images in [0, 1]),
  ``interpolation`` of resizes, ``crop_pct`` (evaluation resize to ``image_size / crop_pct`` then centre
  crop; 1.0 = resize the whole image), ``grey_to_rgb`` (grey images replicated to three channels);
* where those input settings came from: ``input_source`` = ``pretrained`` (the pretrained weights'
  configuration: CLIP's mean/std and bicubic resizes, timm's ``pretrained_cfg``) or ``dataset``.

It holds plain containers only (:meth:`BackboneSpec.to_dict`), so it can live in checkpoints that are
read with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dscl.config import ConfigError

FAMILIES: tuple[str, ...] = ("builtin", "timm", "open_clip")
POOLS: tuple[str, ...] = ("avg", "cls")
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest")
INPUT_SOURCES: tuple[str, ...] = ("dataset", "pretrained")


def parse_backbone_name(text: str) -> tuple[str, str]:
    """``"timm:vit_tiny_patch16_224"`` -> ``("timm", "vit_tiny_patch16_224")``; a plain name is ``builtin``.

    Only the first ``:`` separates the family, so names that contain one (``timm:hf-hub:ORG/NAME``) survive.

    Raises:
        ConfigError: an unknown family prefix or an empty name.
    """
    family, sep, name = text.partition(":")
    if not sep:
        family, name = "builtin", text
    if family not in FAMILIES:
        raise ConfigError(f"model.backbone={text!r}: unknown backbone family {family!r}; use a built-in name "
                          "(convnet, resnet32, resnet50, ...), timm:<model> or open_clip:<arch>")
    if not name.strip():
        raise ConfigError(f"model.backbone={text!r}: the backbone name is empty; write e.g. "
                          f"{'resnet50' if family == 'builtin' else family + ':NAME'}")
    return family, name


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain containers (tuples become lists), or a ConfigError naming ``where``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"backbone argument {where}: keys must be strings, got {bad[0]!r}")
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"backbone argument {where}: {type(value).__name__} is not a plain value "
                      "(use numbers, strings, booleans, lists and mappings)")


def _channels(value: Any, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"backbone spec: {what} must be a list of numbers, got {value!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"backbone spec: {what} must be finite numbers, one per channel, got {value!r}")
    return out


def _rounded(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is and how images enter it (see the module docstring for each field)."""

    family: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    pool: str = "avg"
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    grey_to_rgb: bool = False
    input_source: str = "dataset"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"backbone spec: family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"backbone spec: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.args, Mapping):
            raise ConfigError(f"backbone spec: args must be a mapping of constructor arguments, got {self.args!r}")
        for what, value, choices in (("pool", self.pool, POOLS), ("interpolation", self.interpolation, INTERPOLATIONS),
                                     ("input_source", self.input_source, INPUT_SOURCES)):
            if value not in choices:
                raise ConfigError(f"backbone spec: {what} must be one of {', '.join(choices)}, got {value!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or isinstance(self.image_size, bool)
                                            or self.image_size < 1):
            raise ConfigError(f"backbone spec: image_size must be a positive whole number of px, "
                              f"got {self.image_size!r}")
        if not isinstance(self.crop_pct, (int, float)) or not 0.0 < float(self.crop_pct) <= 1.0:
            raise ConfigError(f"backbone spec: crop_pct must be in (0, 1], got {self.crop_pct!r}")
        mean, std = _channels(self.mean, "mean"), _channels(self.std, "std")
        if (mean is None) != (std is None) or (mean is not None and std is not None and len(mean) != len(std)):
            raise ConfigError(f"backbone spec: mean and std need one value per channel each, got {self.mean!r} "
                              f"and {self.std!r}")
        if std is not None and min(std) <= 0:
            raise ConfigError(f"backbone spec: std must be positive, got {self.std!r}")
        # frozen: normalised copies replace what the caller passed (lists -> tuples, tuples -> lists in args)
        object.__setattr__(self, "args", _plain(dict(self.args), "args"))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "grey_to_rgb", bool(self.grey_to_rgb))

    @classmethod
    def from_name(cls, text: str, *, args: Mapping[str, Any] | None = None, pool: str = "avg") -> BackboneSpec:
        """The spec of ``model.backbone`` text (``resnet50``, ``timm:NAME``, ``open_clip:ARCH``); no input settings."""
        family, name = parse_backbone_name(text)
        return cls(family, name, dict(args or {}), pool=pool)

    @property
    def qualified_name(self) -> str:
        """``model.backbone`` as a user writes it: the bare name for built-ins, else ``family:name``."""
        return self.name if self.family == "builtin" else f"{self.family}:{self.name}"

    @property
    def in_chans(self) -> int:
        """Image channels the network takes (timm's ``in_chans`` argument; 3 otherwise)."""
        return int(self.args.get("in_chans", 3)) if self.family == "timm" else 3

    @property
    def resize_short(self) -> int | None:
        """The evaluation view's shorter-side resize in px before the centre ``image_size`` crop
        (``round(image_size / crop_pct)``), or None when the whole image is resized (``crop_pct`` 1)."""
        if self.image_size is None or self.crop_pct >= 1.0:
            return None
        return int(round(self.image_size / self.crop_pct))

    def describe_inputs(self) -> str:
        """The input settings in words, for logs, reports and export recipes."""
        if self.image_size is None or self.mean is None or self.std is None:
            return "input settings not resolved"
        size = self.image_size
        view = (f"shorter side resized to {self.resize_short} px, centre {size} x {size} crop" if self.resize_short
                else f"resized to {size} x {size}")
        source = "the pretrained weights'" if self.input_source == "pretrained" else "the dataset's"
        grey = "; grey images replicated to RGB" if self.grey_to_rgb else ""
        return (f"{view} ({self.interpolation}, antialiased), normalised with {source} mean "
                f"{_rounded(self.mean)} and std {_rounded(self.std)}{grey}")

    def same_network(self, other: BackboneSpec) -> bool:
        """True when both specs build the same architecture (family, name, args, pool); input settings aside."""
        return (self.family, self.name, self.args, self.pool) == (other.family, other.name, other.args, other.pool)

    def to_dict(self) -> dict[str, Any]:
        """Plain containers only (str, int, float, bool, None, list, dict): safe for ``weights_only=True``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["args"] = _plain(self.args, "args")
        out["mean"] = None if self.mean is None else list(self.mean)
        out["std"] = None if self.std is None else list(self.std)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneSpec:
        """Inverse of :meth:`to_dict`; missing optional fields take their defaults, unknown ones are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"backbone spec: unknown field(s) {', '.join(unknown)} (written by a newer dscl?); "
                              f"known fields: {', '.join(sorted(names))}")
        missing = [k for k in ("family", "name") if k not in d]
        if missing:
            raise ConfigError(f"backbone spec: missing field(s) {', '.join(missing)}")
        return cls(**dict(d))
