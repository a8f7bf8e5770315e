"""open_clip backbones (``model.backbone=open_clip:<arch>``): the image tower of a CLIP model.

The tower is open_clip's own ``VisionTransformer``, built from the architecture's ``vision_cfg`` (what
``open_clip.create_model(arch).visual`` is, without building the text tower), with ``spec.args``
overriding ``vision_cfg`` fields (``width``, ``layers``, ``image_size``, ...) plus ``embed_dim`` and
``quick_gelu``. Under the backbone contract:

* ``forward_features``: the patch tokens after the tower's final LayerNorm (``ln_post``) as a grid; the
  class token is dropped. The position embedding is interpolated to each input's grid
  (:func:`~dscl.backbones.base.resample_position_embedding`), so one set of weights takes small patch
  crops and large views.
* ``forward``: the mean of the patch tokens (``pool="cls"``: the class token after ``ln_post``). Both are
  ``width``-dimensional: the tower's projection into CLIP's joint image-text space (``proj``) is not part
  of a backbone and is removed.
* Input settings of CLIP weights: ``open_clip.OPENAI_DATASET_MEAN`` / ``STD`` and bicubic resizes, unless
  the architecture's or the weights' ``preprocess_cfg`` says otherwise (SigLIP-style 0.5 / 0.5, ...).

Only ViT towers are supported: ``RN50``-style towers (ModifiedResNet) and towers with a timm trunk are
refused with the ``timm:`` name to use instead. ``import open_clip`` happens only here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from dscl.backbones.base import Backbone, first_line, import_optional, resample_position_embedding, tokens_to_map
from dscl.backbones.spec import INTERPOLATIONS, BackboneSpec
from dscl.backbones.weights import read_weights_file
from dscl.config import ConfigError

HUB_PREFIX = "hf-hub:"
#: spec.args that are not vision_cfg fields
MODEL_ARGS: tuple[str, ...] = ("embed_dim", "quick_gelu")


def _open_clip(arch: str) -> ModuleType:
    return import_optional("open_clip", "open_clip", needed_for=f"model.backbone=open_clip:{arch}")


class OpenClipBackbone(Backbone):
    """An open_clip ``VisionTransformer`` image tower (``self.model``) under the backbone contract.

    Args:
        visual: the tower; its ``proj`` is set to None (see the module docstring).
        pool: ``avg`` (mean of the patch tokens) or ``cls`` (class token).
        arch: the open_clip architecture name (for pretrained tags and messages).
    """

    weights_attr = "model"

    def __init__(self, visual: Any, *, pool: str = "avg", arch: str = "") -> None:
        super().__init__()
        visual.proj = None  # CLIP's projection to the joint embedding: not part of the feature map
        self.model: Any = visual
        self.pool = pool
        self.arch = arch
        self.quick_gelu = False  # whether the tower was built with QuickGELU (build_open_clip; a tag must agree)
        self.num_features = int(visual.conv1.out_channels)
        self.stride = int(visual.patch_size[0])
        self.patch_size = self.stride

    def forward_with_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.model
        x = v.conv1(x)  # (B, width, rows, cols)
        b, c, rows, cols = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, rows*cols, width)
        cls = v.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(x.dtype)
        pos = resample_position_embedding(v.positional_embedding, (rows, cols), v.grid_size, num_prefix=1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        x = v.ln_post(v.transformer(v.ln_pre(x)))
        fmap = tokens_to_map(x[:, 1:], (rows, cols))
        pooled = x[:, 0] if self.pool == "cls" else fmap.mean(dim=(2, 3))
        return pooled, fmap

    @torch.jit.export  # the tower is scriptable: keep the map in a scripted backbone
    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_with_map(x)[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_map(x)[0]

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A CLIP model's ``visual.*`` subtree (or a tower's own keys), without ``proj``, with the position
        embedding resampled to this tower's grid when the weights were trained at another resolution."""
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        state = {k: v for k, v in state.items() if k != "proj"}
        pos = state.get("positional_embedding")
        mine = self.model.positional_embedding
        if pos is not None and pos.dim() == 2 and pos.shape[1] == mine.shape[1] and pos.shape[0] != mine.shape[0]:
            side = round((pos.shape[0] - 1) ** 0.5)
            if side * side == pos.shape[0] - 1:
                state["positional_embedding"] = resample_position_embedding(pos, tuple(self.model.grid_size),
                                                                            (side, side), num_prefix=1)
        return state

    def named_weights(self, source: str) -> dict[str, Tensor]:
        """``hf-hub:ORG/NAME`` (open_clip's hub code) or a pretrained tag of the architecture (``openai``,
        ``laion2b_s34b_b88k``, ...: ``open_clip.list_pretrained_tags_by_model``); the Hugging Face cache is
        used first, and with ``HF_HUB_OFFLINE=1`` only it."""
        oc = _open_clip(self.arch)
        from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

        try:
            if source.startswith(HUB_PREFIX):
                path = download_pretrained_from_hf(source[len(HUB_PREFIX):])
            else:
                cfg = oc.get_pretrained_cfg(self.arch, source)
                if not cfg:
                    tags = oc.list_pretrained_tags_by_model(self.arch)
                    raise ConfigError(f"model.pretrained={source}: neither a file nor a pretrained tag of open_clip "
                                      f"{self.arch} (tags: {', '.join(tags) or 'none'}; or pass a local file)")
                if bool(cfg.get("quick_gelu")) != self.quick_gelu:
                    want = bool(cfg.get("quick_gelu"))
                    raise ConfigError(
                        f"model.pretrained={source}: open_clip's {self.arch} '{source}' weights were trained with "
                        f"{'QuickGELU' if want else 'GELU'}, but the tower was built with "
                        f"{'GELU' if want else 'QuickGELU'} (its features would silently differ); set "
                        f"'model.backbone_args={{quick_gelu: {str(want).lower()}}}'")
                path = download_pretrained(cfg)
        except ConfigError:
            raise
        except Exception as exc:  # network, cache miss, missing repo: one line with the way out
            raise ConfigError(f"model.pretrained={source}: open_clip could not load it from the hub or its cache "
                              f"({type(exc).__name__}: {first_line(exc)}); on a machine without internet, download "
                              "it elsewhere and copy the Hugging Face cache, or pass the weight file itself") from None
        return read_weights_file(Path(path))


def _vision_cfg(oc: ModuleType, spec: BackboneSpec) -> tuple[dict[str, Any], int, bool]:
    cfg = oc.get_model_config(spec.name)
    if cfg is None:
        close = [m for m in oc.list_models() if spec.name.lower()[:5] in m.lower()][:8]
        raise ConfigError(f"model.backbone={spec.qualified_name}: open_clip has no architecture {spec.name!r}"
                          + (f"; similar: {', '.join(close)}" if close else "") + " (open_clip.list_models())")
    cfg = copy.deepcopy(cfg)
    vision, embed_dim, quick_gelu = dict(cfg["vision_cfg"]), int(cfg["embed_dim"]), bool(cfg.get("quick_gelu", False))
    from open_clip.model import CLIPVisionCfg

    fields = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    for key, value in spec.args.items():
        if key == "embed_dim":
            embed_dim = int(value)
        elif key == "quick_gelu":
            quick_gelu = bool(value)
        elif key in fields:
            vision[key] = value
        else:
            raise ConfigError(f"{spec.qualified_name}: unknown argument {key!r}; open_clip towers take "
                              f"{', '.join(MODEL_ARGS)} and the vision_cfg fields {', '.join(sorted(fields))}")
    return vision, embed_dim, quick_gelu


def build_open_clip(spec: BackboneSpec) -> OpenClipBackbone:
    """The image tower of open_clip architecture ``spec.name`` (random weights) under the contract.

    Raises:
        ConfigError: open_clip missing, unknown architecture or argument, a tower that is not a plain
            ViT (ModifiedResNet, timm trunk, attentional pooling) or one with token dropout.
    """
    oc = _open_clip(spec.name)
    vision, embed_dim, quick_gelu = _vision_cfg(oc, spec)
    if vision.get("timm_model_name"):
        raise ConfigError(f"{spec.qualified_name} has a timm trunk ({vision['timm_model_name']}); use "
                          f"model.backbone=timm:{vision['timm_model_name']} (timm loads open_clip weights)")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ConfigError(f"{spec.qualified_name} is a ResNet tower; only ViT image towers are supported "
                          "(for a CNN use resnet50 or timm:<cnn>)")
    if vision.get("attentional_pool"):
        raise ConfigError(f"{spec.qualified_name} pools with attention (CoCa); only towers with a class token "
                          "are supported")
    if float(vision.get("patch_dropout") or 0) > 0:
        raise ConfigError(f"{spec.qualified_name}: patch_dropout > 0 drops patch tokens, so the feature map has "
                          "holes; set it to 0")
    from open_clip.model import _build_vision_tower  # the tower alone, as create_model builds it

    try:
        visual = _build_vision_tower(embed_dim, vision, quick_gelu=quick_gelu)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"{spec.qualified_name} with arguments {spec.args}: open_clip could not build the tower "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    backbone = OpenClipBackbone(visual, pool=spec.pool, arch=spec.name)
    backbone.quick_gelu = quick_gelu  # checked against a pretrained tag's activation (named_weights)
    return backbone


def open_clip_input_settings(spec: BackboneSpec, source: str) -> dict[str, Any]:
    """Mean, std and interpolation of CLIP weights: open_clip's defaults (OpenAI's mean/std, bicubic),
    overridden by the architecture's ``preprocess_cfg``, then by the weights' own (the hub's or a local
    ``open_clip_config.json`` next to the file, or the pretrained tag's). Resizes keep the whole image."""
    oc = _open_clip(spec.name)
    settings: dict[str, Any] = {"mean": tuple(oc.OPENAI_DATASET_MEAN), "std": tuple(oc.OPENAI_DATASET_STD),
                                "interpolation": "bicubic"}
    layers = [(oc.get_model_config(spec.name) or {}).get("preprocess_cfg") or {}]
    try:
        if source.startswith(HUB_PREFIX):
            from open_clip.factory import _get_hf_config

            layers.append(_get_hf_config(source[len(HUB_PREFIX):]).get("preprocess_cfg") or {})
        elif (Path(source).parent / "open_clip_config.json").is_file():
            text = (Path(source).parent / "open_clip_config.json").read_text(encoding="utf-8")
            layers.append(json.loads(text).get("preprocess_cfg") or {})
        elif not Path(source).suffix:
            layers.append(oc.get_pretrained_cfg(spec.name, source) or {})
    except Exception as exc:  # a missing or foreign config: say so, do not guess silently
        raise ConfigError(f"model.pretrained={source}: open_clip could not read the weights' preprocessing "
                          f"config ({type(exc).__name__}: {first_line(exc)})") from None
    for layer in layers:
        settings.update({k: layer[k] for k in ("mean", "std", "interpolation") if layer.get(k) is not None})
    if settings["interpolation"] not in INTERPOLATIONS:
        settings["interpolation"] = "bicubic"
    return {"mean": tuple(settings["mean"]), "std": tuple(settings["std"]),
            "interpolation": settings["interpolation"], "crop_pct": 1.0}
