"""Weight files: read one safely, find the backbone's state dict inside it, and say what layout it has.

Files are ``.safetensors`` (read with the ``safetensors`` package) or anything ``torch.save`` wrote
(``.pth`` / ``.pt`` / ``.bin`` / ``.pth.tar``), read with ``weights_only=True``: only tensors and plain
containers, never arbitrary pickled objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dscl.backbones.base import import_optional
from dscl.config import ConfigError
from dscl.errors import CheckpointError

#: suffixes :func:`read_weights_file` reads (anything else is tried with ``torch.load``)
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin", ".tar", ".ckpt")

# Where checkpoints keep their state dict, in the order looked at: training scripts ("state_dict",
# "model", "model_state", "net", DeepSpeed's "module"), dscl's classifier.pt ("backbone_state") and
# `dscl export --format state-dict` ("backbone").
_CONTAINERS = ("state_dict", "model", "model_state", "net", "module", "backbone_state", "backbone")

# Wrappers around a backbone's own keys, outermost first, each selected as a subtree: a dscl run's
# DSCLModel ("online." = the online encoder), MoCo v1/v2 and the official DSCL ("encoder_q."), MoCo v3
# ("base_encoder."), and the Encoder of dscl and many SSL codebases ("backbone."). Whatever lies
# outside the chosen subtree (momentum encoder, queue, projection head) is not the backbone.
_SUBTREES = ("online.", "encoder_q.", "base_encoder.", "backbone.")

#: weight files looked for in a folder (a copied Hugging Face snapshot: timm's, then open_clip's names)
FOLDER_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                                 "open_clip_pytorch_model.bin")


def locate_weights(path: Path) -> Path:
    """``path`` itself when it is a file; in a folder (a copied hub snapshot) its weight file.

    Raises:
        ConfigError: nothing there, or a folder without one of :data:`FOLDER_FILES`.
    """
    if path.is_file():
        return path
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"pretrained weights folder {path} holds none of {', '.join(FOLDER_FILES)}; "
                          "point model.pretrained at the weight file itself")
    raise ConfigError(f"pretrained weights file not found: {path} (model.pretrained takes a local .pth / .pt / "
                      ".bin / .safetensors file or a folder holding one, or hf-hub:ORG/NAME for timm: and open_clip: "
                      "backbones)")


def _tensor_dict(obj: Any) -> dict[str, Tensor] | None:
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return dict(obj)
    return None


def read_weights_file(path: Path) -> dict[str, Tensor]:
    """The state dict of tensors held by a weight file (itself, or under one of the usual container keys).

    Raises:
        CheckpointError: unreadable file, or no state dict of tensors in it.
    """
    try:
        if path.suffix.lower() == ".safetensors":
            safetensors_torch = import_optional("safetensors.torch", "timm", needed_for=f"reading {path}")
            obj: Any = safetensors_torch.load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # any unpickling / format failure means "not weights we can read"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read pretrained weights {path}: {first} (expected a state dict saved with "
                              "torch.save, or a .safetensors file)") from None
    state = _tensor_dict(obj)
    if state is None and isinstance(obj, Mapping):
        for key in _CONTAINERS:
            state = _tensor_dict(obj.get(key))
            if state is not None:
                break
    if state is None:
        raise CheckpointError(f"pretrained weights {path} do not hold a state dict of tensors (looked at the file "
                              f"itself and at {', '.join(repr(k) for k in _CONTAINERS)})")
    return state


def strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``module.`` prefixes (DataParallel / DDP) and select the backbone subtree of known wrappers.

    ``module.`` is stripped wherever it repeats; then, outermost first, when some key starts with one of
    ``online.``, ``encoder_q.``, ``base_encoder.``, ``backbone.``, only those keys are kept, prefix removed.
    """
    out = dict(state)
    changed = True
    while changed:
        changed = False
        stripped = {}
        for k, v in out.items():
            while k.startswith("module."):
                k, changed = k[len("module."):], True
            stripped[k] = v
        out = stripped
        for prefix in _SUBTREES:
            if any(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
                changed = True
                break
    return out


def describe_layout(keys: list[str]) -> str:
    """A short guess of which code wrote a state dict, from its keys (for error messages)."""
    ks = [k.removeprefix("module.") for k in keys]

    def has(*prefixes: str) -> bool:
        return all(any(k.startswith(p) for k in ks) for p in prefixes)

    guesses = (
        (has("online.backbone."), "a dscl run checkpoint (online.backbone.*)"),
        (has("encoder_q."), "a MoCo / official DSCL stage-1 checkpoint (encoder_q.*)"),
        (has("base_encoder."), "a MoCo v3 checkpoint (base_encoder.*)"),
        (has("visual.", "transformer."), "an open_clip CLIP model (visual.* image tower, transformer.* text tower)"),
        (has("visual."), "an open_clip image tower inside a CLIP model (visual.*)"),
        (has("class_embedding", "transformer.resblocks."), "an open_clip ViT image tower"),
        (has("backbone.model.patch_embed.") or has("model.patch_embed."), "a dscl timm ViT backbone"),
        (has("patch_embed.", "blocks."), "a timm ViT (patch_embed.*, blocks.*)"),
        (has("stem.", "stages."), "a timm ConvNeXt-style CNN (stem.*, stages.*)"),
        (has("conv1.", "layer1.", "layer4."), "a ResNet in torchvision / timm names (conv1.*, layer1-4.*)"),
        (has("conv1.", "layer1.", "layer3."), "a CIFAR ResNet (dscl resnet32: conv1.*, layer1-3.*)"),
        (has("stages.0."), "the dscl convnet (stages.*)"),
    )
    for hit, text in guesses:
        if hit:
            return text
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"an unrecognised layout (first keys: {shown or 'none'})"
