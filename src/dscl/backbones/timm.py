"""timm backbones (``model.backbone=timm:<name>``): any timm model under the backbone contract.

The model is ``timm.create_model(name, pretrained=False, num_classes=0, **args)``: no classifier, nothing
downloaded (weights come from :func:`~dscl.backbones.pretrained.load_pretrained`). Its
``forward_features`` output becomes the map of the contract:

* CNNs (ResNet, ConvNeXt, EfficientNet, ...): the NCHW map as it is; NHWC models (timm's Swin and its
  ``output_fmt = "NHWC"`` kin) are permuted to NCHW.
* Token models (ViT, DeiT with its distillation token, ViTs with register tokens, EVA, ...): the
  ``model.num_prefix_tokens`` leading tokens are dropped and the patch tokens reshaped to their grid
  (``patch_embed.dynamic_feat_size``, the grid timm itself computes for the input size).
* Models that accept it are built with ``dynamic_img_size=True`` (unless ``args`` says otherwise), so one
  set of weights takes the small patch crops and the large views: timm interpolates the position
  embedding to each input's grid.

``forward`` is the mean of the map (= the mean of the patch tokens: the space the PBSD teacher's ROI
pooling lives in); ``pool="cls"`` gives the class token instead, a deliberate difference for models
pretrained with a class-token head. The final norm of timm's ``forward_features`` is part of the map;
parameters that only timm's pooled head uses (ConvNeXt's ``head.norm``, the ``fc_norm`` of ViTs with
average pooling, MobileNetV3's ``conv_head``) never reach the map and are frozen (``requires_grad=False``:
they still load from timm files, but no optimiser or DDP bucket waits for a gradient they cannot get).

Relies on timm >= 1.0: ``create_model``, ``num_prefix_tokens``, ``patch_embed.dynamic_feat_size``,
``pretrained_cfg`` (``classifier``, ``first_conv``), ``timm.data.resolve_data_config``, each model
module's ``checkpoint_filter_fn`` and ``timm.models.load_state_dict_from_hf`` /
``load_model_config_from_hf``. ``import timm`` happens only here, when such a backbone is built.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor

from dscl.backbones.base import Backbone, first_line, import_optional, tokens_to_map, unreached_parameters
from dscl.backbones.spec import INTERPOLATIONS, BackboneSpec
from dscl.config import ConfigError

HUB_PREFIX = "hf-hub:"


def _timm(spec_name: str) -> ModuleType:
    return import_optional("timm", "timm", needed_for=f"model.backbone=timm:{spec_name}")


class TimmBackbone(Backbone):
    """A timm model (``self.model``) seen through the backbone contract (see the module docstring).

    Args:
        model: a timm model built with ``num_classes=0``.
        pool: ``avg`` (mean of the map) or ``cls`` (class token; token models with a class token only).
        in_chans: image channels, for the build-time shape probe.
        label: ``timm:<name>``, for messages.
    """

    weights_attr = "model"

    def __init__(self, model: Any, *, pool: str = "avg", in_chans: int = 3, label: str = "timm") -> None:
        super().__init__()
        self.model: Any = model  # timm's own attributes (pretrained_cfg, patch_embed, ...) are read below
        self.pool = pool
        self.label = label
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        if pool == "cls" and getattr(model, "cls_token", None) is None:
            raise ConfigError(f"{label}: pool='cls' needs a model with a class token; this one has none "
                              "(use pool 'avg', the mean of the patch tokens)")
        self.stride = _reduction(model)
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if hasattr(model, "num_prefix_tokens") and patch is not None:  # a token model: its grid must be whole
            self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_features = int(model.num_features)
        unreached, out_shape = unreached_parameters(self, in_chans, _probe_size(model))
        if out_shape and out_shape[-1] != self.num_features:
            self.num_features = int(out_shape[-1])  # the map's channels are what the contract promises
        for name in unreached:
            self.get_parameter(name).requires_grad_(False)
        #: parameters frozen because the feature map never reaches them (timm's pooled-head norms)
        self.unreached = tuple(unreached)

    def forward_with_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.forward_features(x)
        if out.dim() == 4:
            fmap = out.permute(0, 3, 1, 2) if self.nhwc else out
            return fmap.mean(dim=(2, 3)), fmap
        if out.dim() != 3:
            raise ValueError(f"{self.label}: forward_features gave shape {tuple(out.shape)}, neither a map nor tokens")
        fmap = tokens_to_map(out[:, self.num_prefix_tokens:], self._grid(x, out.shape[1] - self.num_prefix_tokens))
        pooled = out[:, 0] if self.pool == "cls" else fmap.mean(dim=(2, 3))
        return pooled, fmap

    def _grid(self, x: Tensor, n: int) -> tuple[int, int]:
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
            rows, cols = patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
            return int(rows), int(cols)
        rows = max(1, round((n * x.shape[-2] / x.shape[-1]) ** 0.5))  # same aspect ratio as the image
        return rows, n // rows

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_with_map(x)[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_map(x)[0]

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Drop the classifier, then timm's own conversion for the model family (``checkpoint_filter_fn``:
        other layouts such as open_clip's ``visual.*`` or DINOv2's, position-embedding and patch-size
        resampling), and adapt the first convolution to ``in_chans`` as timm does."""
        state = self._drop_classifier(state)
        filter_fn: Callable[..., dict[str, Tensor]] | None = getattr(
            sys.modules.get(type(self.model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            # a converter meeting another family's file fails (KeyError, ...): then the keys stay as they
            # are, so the fit check names what is missing and which layout the file has
            with contextlib.suppress(Exception):
                state = filter_fn(state, self.model)
        state = self._drop_classifier(state)
        return self._adapt_first_conv(state)

    def _drop_classifier(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        names = self.model.pretrained_cfg.get("classifier") or ()
        heads = tuple(f"{c}." for c in ((names,) if isinstance(names, str) else names))
        kept = set(self.model.state_dict())
        return {k: v for k, v in state.items() if k in kept or not heads or not k.startswith(heads)}

    def _adapt_first_conv(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        first = self.model.pretrained_cfg.get("first_conv")
        if not first:
            return state
        expected = self.model.state_dict()
        for conv in (first,) if isinstance(first, str) else first:
            key = f"{conv}.weight"
            if key in state and key in expected and state[key].dim() == 4 and \
                    state[key].shape[1] != expected[key].shape[1] and state[key].shape[0] == expected[key].shape[0]:
                from timm.models import adapt_input_conv  # timm's sum / repeat rule for in_chans != 3

                state[key] = adapt_input_conv(int(expected[key].shape[1]), state[key])
        return state

    def named_weights(self, source: str) -> dict[str, Tensor]:
        """``hf-hub:ORG/NAME[@revision]``: the weights timm's own hub code finds (the Hugging Face cache
        first; with ``HF_HUB_OFFLINE=1`` nothing else)."""
        if not source.startswith(HUB_PREFIX):
            return super().named_weights(source)
        from timm.models import load_state_dict_from_hf

        model_id = source[len(HUB_PREFIX):]
        try:
            return dict(load_state_dict_from_hf(model_id))
        except Exception as exc:  # network, cache miss, missing repo: one line with the way out
            raise ConfigError(f"model.pretrained={source}: timm could not load it from the Hugging Face hub or its "
                              f"cache ({type(exc).__name__}: {first_line(exc)}); on a machine without internet, "
                              "download it elsewhere (it lands in ~/.cache/huggingface/hub) and copy that cache, or "
                              "pass the model.safetensors file itself") from None


def _reduction(model: Any) -> int:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and "reduction" in info[-1]:
        return int(info[-1]["reduction"])
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        return int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    return 32  # the usual stride of a 5-stage CNN; documentation only


def _probe_size(model: Any) -> tuple[int, int]:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a fixed-size ViT's own size
    if size is None:
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def build_timm(spec: BackboneSpec) -> TimmBackbone:
    """``timm.create_model(spec.name, pretrained=False, num_classes=0, **spec.args)`` under the contract.

    ``dynamic_img_size=True`` is passed to models that accept it unless ``spec.args`` sets it.

    Raises:
        ConfigError: timm missing, unknown model, arguments the model does not take, token dropout
            (``patch_drop_rate`` > 0 removes patches, so there is no grid to give back).
    """
    timm = _timm(spec.name)
    if float(spec.args.get("patch_drop_rate") or 0) > 0:
        raise ConfigError(f"{spec.qualified_name}: patch_drop_rate > 0 drops patch tokens, so the feature map has "
                          "holes; leave it at 0")
    if spec.name.split(":")[0] != "hf-hub" and not timm.is_model(spec.name):
        close = timm.list_models(f"*{spec.name.split('.')[0][:12]}*")[:8]
        raise ConfigError(f"model.backbone={spec.qualified_name}: timm {timm.__version__} has no model "
                          f"{spec.name!r}" + (f"; similar: {', '.join(close)}" if close else "")
                          + " (timm.list_models() lists them)")
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, **spec.args}
    try:
        if "dynamic_img_size" in spec.args:
            model = timm.create_model(spec.name, **kwargs)
        else:
            try:
                model = timm.create_model(spec.name, dynamic_img_size=True, **kwargs)
            except TypeError:  # a model without variable input size (most CNNs need none)
                model = timm.create_model(spec.name, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ConfigError(f"model.backbone={spec.qualified_name} with model.backbone_args {spec.args}: timm could "
                          f"not build it ({type(exc).__name__}: {first_line(exc)})") from None
    return TimmBackbone(model, pool=spec.pool, in_chans=spec.in_chans, label=spec.qualified_name)


def timm_input_settings(spec: BackboneSpec, source: str) -> dict[str, Any]:
    """Mean, std, interpolation and crop fraction of the pretrained weights ``source`` (timm's own rule,
    ``timm.data.resolve_data_config``), from the hub's ``config.json`` for ``hf-hub:`` names, from a
    ``config.json`` next to a local file (a copied hub snapshot), else from ``spec.name``'s pretrained_cfg."""
    timm = _timm(spec.name)
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg, load_model_config_from_hf

    cfg: dict[str, Any] | None = None
    try:
        if source.startswith(HUB_PREFIX):
            cfg = load_model_config_from_hf(source[len(HUB_PREFIX):])[0]
        elif (Path(source).parent / "config.json").is_file():  # timm's hub format (save_for_hf)
            saved = json.loads((Path(source).parent / "config.json").read_text(encoding="utf-8"))
            cfg = saved.get("pretrained_cfg", saved) if isinstance(saved, dict) else None
    except Exception as exc:  # a missing or foreign config.json: say so, do not guess silently
        raise ConfigError(f"model.pretrained={source}: timm could not read the weights' config.json "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    if cfg is None:
        named = get_pretrained_cfg(spec.name, allow_unregistered=True) if timm.is_model(spec.name) else None
        cfg = named.to_dict() if named is not None else {}
    data = resolve_data_config(pretrained_cfg=dict(cfg))
    interpolation = data.get("interpolation", "bicubic")
    return {"mean": tuple(data["mean"]), "std": tuple(data["std"]), "crop_pct": float(data.get("crop_pct", 1.0)),
            # timm's PIL-only modes (lanczos, box, ...) have no torch resize: bicubic is their closest
            "interpolation": interpolation if interpolation in INTERPOLATIONS else "bicubic"}

