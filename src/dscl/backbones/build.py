"""The one backbone constructor: a :class:`~dscl.backbones.spec.BackboneSpec` (plus optional pretrained
weights) in, a :class:`~dscl.backbones.base.Backbone` out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dscl.backbones.base import Backbone
from dscl.backbones.builtin import build_builtin
from dscl.backbones.open_clip import build_open_clip
from dscl.backbones.pretrained import load_pretrained, resolve_input_settings
from dscl.backbones.spec import BackboneSpec
from dscl.backbones.timm import build_timm
from dscl.config import Config, ModelConfig


def network_spec(model: ModelConfig) -> BackboneSpec:
    """The architecture ``model.backbone`` / ``backbone_args`` / ``pool`` describe (no input settings): what a
    checkpoint's stored spec is compared with (:meth:`BackboneSpec.same_network`). A built-in started with
    ``model.zero_init_residual=false`` records it among its arguments."""
    args = dict(model.backbone_args)
    spec = BackboneSpec.from_name(model.backbone, args=args, pool=model.pool)
    if spec.family == "builtin" and not model.zero_init_residual and "zero_init_residual" not in args:
        spec = BackboneSpec.from_name(model.backbone, args={**args, "zero_init_residual": False}, pool=model.pool)
    return spec


def spec_from_config(cfg: Config, *, mean: Sequence[float], std: Sequence[float], grey: bool,
                     pretrained: str | Path | None) -> BackboneSpec:
    """THE place a config becomes a run's :class:`BackboneSpec`: the architecture of ``cfg.model``
    (:func:`network_spec`) and the input settings of :func:`~dscl.backbones.pretrained.resolve_input_settings`
    (``data.image_size``; the pretrained weights' configuration when ``pretrained`` has one, else the
    dataset's ``mean`` / ``std``; ``grey``: the dataset's images are grey, replicated to RGB).

    ``pretrained`` is where the weights come from (``model.pretrained`` for stage 1, the imported file for
    ``dscl import``), None when nothing is loaded (or for runs written before specs were stored).
    """
    return resolve_input_settings(network_spec(cfg.model), pretrained=pretrained, image_size=cfg.data.image_size,
                                  mean=mean, std=std, grey=grey)


def build_backbone_from_spec(spec: BackboneSpec, pretrained: str | Path | None = None) -> Backbone:
    """Build the backbone ``spec`` describes; with ``pretrained``, load those weights into it.

    Only the spec's architecture fields (family, name, args, pool) matter here; its input settings are
    for the preprocessing. Random initialisation draws from the global torch RNG, so a seeded rebuild
    gives the same weights.

    Args:
        spec: what to build.
        pretrained: a local weight file, or a hub name / tag the family resolves
            (:func:`~dscl.backbones.pretrained.load_pretrained`).

    Raises:
        ConfigError: an unknown name or argument, a missing optional package, an unknown weights source.
        CheckpointError: weights that cannot be read or do not fit.
    """
    if spec.family == "builtin":
        backbone: Backbone = build_builtin(spec)
    elif spec.family == "timm":
        backbone = build_timm(spec)
    else:
        backbone = build_open_clip(spec)
    if pretrained is not None:
        load_pretrained(backbone, spec, pretrained)
    return backbone


def build_backbone(name: str, *, zero_init_residual: bool = True, pretrained: str | Path | None = None,
                   args: Mapping[str, Any] | None = None, pool: str = "avg") -> Backbone:
    """Build a backbone from its ``model.backbone`` name (a built-in, ``timm:NAME`` or ``open_clip:ARCH``).

    Args:
        name: a built-in name (:data:`~dscl.backbones.builtin.BACKBONES`) or ``family:name``.
        zero_init_residual: built-ins only: zero the last BN gamma of every residual block (METHOD.md
            A.3; the official code always does). Ignored by ``convnet``, which has no residual blocks.
        pretrained: local weight file or hub name (:func:`~dscl.backbones.pretrained.load_pretrained`).
        args: constructor arguments (:attr:`BackboneSpec.args`).
        pool: ``avg`` or ``cls`` (:attr:`BackboneSpec.pool`).

    Returns:
        A :class:`Backbone` (``forward_features`` -> ``(B, C, H, W)``, ``forward`` -> ``(B, C)``).

    Raises:
        ConfigError / CheckpointError (both ``ValueError``): see :func:`build_backbone_from_spec`.
    """
    spec = BackboneSpec.from_name(name, args=args, pool=pool)
    if spec.family == "builtin" and "zero_init_residual" not in spec.args:
        spec = BackboneSpec(spec.family, spec.name, {**spec.args, "zero_init_residual": zero_init_residual},
                            pool=spec.pool)
    return build_backbone_from_spec(spec, pretrained)
