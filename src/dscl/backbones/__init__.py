"""Backbones: the contract (:mod:`~dscl.backbones.base`), the typed spec (:mod:`~dscl.backbones.spec`),
the families (:mod:`~dscl.backbones.builtin`, :mod:`~dscl.backbones.timm`, :mod:`~dscl.backbones.open_clip`)
and pretrained weights (:mod:`~dscl.backbones.pretrained`).

One constructor, :func:`build_backbone_from_spec`; :func:`build_backbone` takes a ``model.backbone`` name.
timm and open_clip are optional extras, imported only when one of their backbones is built.
"""

from __future__ import annotations

from dscl.backbones.base import DISTRIBUTION, Backbone, install_hint, resample_position_embedding
from dscl.backbones.build import build_backbone, build_backbone_from_spec, network_spec, spec_from_config
from dscl.backbones.builtin import BACKBONES, BasicBlock, CifarResNet, ConvNet, TorchvisionResNet
from dscl.backbones.pretrained import load_pretrained, resolve_input_settings
from dscl.backbones.spec import FAMILIES, INPUT_SOURCES, INTERPOLATIONS, POOLS, BackboneSpec, parse_backbone_name

__all__ = [
    "BACKBONES", "DISTRIBUTION", "FAMILIES", "INPUT_SOURCES", "INTERPOLATIONS", "POOLS", "Backbone", "BackboneSpec",
    "BasicBlock", "CifarResNet", "ConvNet", "TorchvisionResNet", "build_backbone", "build_backbone_from_spec",
    "install_hint", "load_pretrained", "network_spec", "parse_backbone_name", "resample_position_embedding",
    "resolve_input_settings", "spec_from_config",
]
