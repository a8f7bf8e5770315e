"""Pretrained weights into a backbone, and the input settings that come with them.

:func:`load_pretrained` takes a local file (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``, or a folder
holding one: a copied hub snapshot) in any of these layouts, or a name the backbone's family resolves with
its own code:

* torchvision / timm (plain state dicts, optionally under ``state_dict`` / ``model`` / ...);
* open_clip (a whole CLIP model: its ``visual.*`` image tower is used; or the tower alone);
* MoCo v1/v2 and the official DSCL (``module.encoder_q.*``), MoCo v3 (``base_encoder.*``);
* dscl: a run's ``checkpoints/last.pt`` (``online.backbone.*``), ``classifier.pt``, the state-dict export;
* ``hf-hub:ORG/NAME`` for timm and open_clip backbones, and open_clip's pretrained tags (``openai``, ...):
  fetched by timm / open_clip / huggingface_hub as they always are (their cache first; nothing else with
  ``HF_HUB_OFFLINE=1``).

Wrapper prefixes are stripped (:func:`~dscl.backbones.weights.strip_wrappers`), the family converts the
rest (:meth:`~dscl.backbones.base.Backbone.adapt_state_dict`: classifier keys dropped, timm's converters,
position embeddings resampled), and then every weight must fit: a missing, unexpected or wrongly shaped
key is a :class:`~dscl.errors.CheckpointError` that names the file, the first offending keys and the layout
the file looks like. BatchNorm ``num_batches_tracked`` counters may be absent (old torchvision files).

:func:`resolve_input_settings` fills a spec's input settings: the pretrained weights' configuration when
there is one (timm's ``pretrained_cfg``, CLIP's mean/std and bicubic resizes), else the dataset's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from dscl.backbones.base import Backbone
from dscl.backbones.open_clip import open_clip_input_settings
from dscl.backbones.spec import BackboneSpec
from dscl.backbones.timm import timm_input_settings
from dscl.backbones.weights import WEIGHT_SUFFIXES, describe_layout, locate_weights, read_weights_file, strip_wrappers
from dscl.errors import CheckpointError, listed


def _looks_like_path(source: str) -> bool:
    """A local path (rather than a hub name or a pretrained tag): a weight suffix or a directory part."""
    if source.startswith("hf-hub:"):
        return False
    return source.lower().endswith(WEIGHT_SUFFIXES) or "/" in source or "\\" in source or Path(source).exists()


def read_pretrained(backbone: Backbone, source: str | Path) -> tuple[dict[str, Tensor], str]:
    """The raw state dict ``source`` names (a local file, or a name the backbone's family resolves),
    and how to call it in messages."""
    text = str(source)
    if _looks_like_path(text):
        path = locate_weights(Path(text).expanduser())
        return read_weights_file(path), str(path)
    return backbone.named_weights(text), text


def load_pretrained(backbone: Backbone, spec: BackboneSpec, source: str | Path) -> None:
    """Load the weights ``source`` names into ``backbone`` (built from ``spec``); every weight must fit.

    Raises:
        ConfigError: a file that does not exist, a hub name or tag that cannot be resolved.
        CheckpointError: an unreadable file, or weights that do not fit (missing / unexpected keys, shape
            mismatches: the message names the file, the first keys and the layout the file looks like).
    """
    raw, where = read_pretrained(backbone, source)
    state = strip_wrappers(raw)
    prefix = f"{backbone.weights_attr}." if backbone.weights_attr else ""
    if prefix and state and all(k.startswith(prefix) for k in state):  # dscl's own layout of a wrapped model
        state = {k[len(prefix):]: v for k, v in state.items()}
    state = backbone.adapt_state_dict(state)
    target = backbone.weights_module()
    expected = target.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {listed(missing, 5)}")
    if unexpected:
        problems.append(f"unexpected keys: {listed(unexpected, 5)}")
    if mismatched:
        problems.append(f"shape mismatches: {listed(mismatched, 3)}")
    if problems:
        raise CheckpointError(f"pretrained weights {where} do not fit backbone {spec.qualified_name}; "
                              + "; ".join(problems) + f"; the file looks like {describe_layout(list(raw))}")
    for k, v in expected.items():
        state.setdefault(k, v)
    target.load_state_dict(state, strict=True)


def dataset_crop_pct(image_size: int) -> float:
    """The evaluation crop of dataset-normalised runs (every run before backbone specs): from 128 px up the
    ImageNet convention (shorter side to ``round(S * 256 / 224)``, centre ``S`` crop: 224 / 256), below it
    the whole image (a 28-32 px image has no border to spare)."""
    return 224 / 256 if int(image_size) >= 128 else 1.0


def resolve_input_settings(spec: BackboneSpec, *, pretrained: str | Path | None, image_size: int,
                           mean: Sequence[float], std: Sequence[float], grey: bool) -> BackboneSpec:
    """``spec`` with its input settings filled in.

    ``image_size`` (the run's ``data.image_size``) and ``grey`` (grey images are replicated to RGB) always
    come from the data. Normalisation, interpolation and crop fraction come from the pretrained weights'
    configuration for timm and open_clip weights (``input_source="pretrained"``), else from the dataset:
    ``mean`` / ``std``, bilinear resizes and :func:`dataset_crop_pct` (``input_source="dataset"``; the
    built-ins, also with pretrained weights, exactly as before).
    """
    settings: dict[str, object] | None = None
    if pretrained is not None and _looks_like_path(str(pretrained)):
        pretrained = locate_weights(Path(str(pretrained)).expanduser())  # its folder may hold the config
    if pretrained is not None and spec.family == "timm":
        settings = timm_input_settings(spec, str(pretrained))
    elif pretrained is not None and spec.family == "open_clip":
        settings = open_clip_input_settings(spec, str(pretrained))
    if settings is None:
        return dataclasses.replace(spec, image_size=int(image_size), mean=tuple(mean), std=tuple(std),
                                   interpolation="bilinear", crop_pct=dataset_crop_pct(image_size),
                                   grey_to_rgb=bool(grey), input_source="dataset")
    return dataclasses.replace(spec, image_size=int(image_size), grey_to_rgb=bool(grey), input_source="pretrained",
                               **settings)  # type: ignore[arg-type]
