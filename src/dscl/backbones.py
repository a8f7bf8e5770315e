"""Backbones: convolutional trunks exposing their last conv-stage map through ``forward_features``.

Every backbone returned by :func:`build_backbone` is a :class:`Backbone`:

* ``forward_features(x)`` -> ``(B, C, H, W)``: the last conv-stage map, un-pooled. PBSD's teacher
  ROI-pools this map (METHOD.md A.7); it is an explicit method, never a forward hook (the official
  code's hook on ``layer4`` is overwritten by the next forward, METHOD.md A.3).
* ``forward(x)`` -> ``(B, C)``: the global-average-pooled map (stage 2 classifies these features).
* ``num_features`` (= C) and ``stride`` (nominal input pixels per map cell; documentation only, the
  ROI pooling derives its scale from the actual sizes).

Names (:data:`BACKBONES`):

* ``convnet``: four conv-BN-ReLU stages (widths 32-64-128-256) with 2x2 max-pools between them, made
  for 28-32 px images on a CPU (~1,400-1,700 img/s fwd+bwd at 28 px, batch 128, on 2 CPU cores; ~2,000 in
  channels_last). 28 px -> 4x4 map, 32 px -> 4x4, 14-16 px patches -> 2x2, 224 px -> 28x28.
  Max-pools use ``ceil_mode`` so odd sizes (7 -> 4) keep their border and a 1 px input still gives a
  1x1 map. No residual blocks, so ``zero_init_residual`` has nothing to act on.
* ``resnet32``: the CIFAR ResNet-32 of the long-tailed literature (LDAM, BBN, PaCo): 3x3 stem with 16
  channels and no max-pool, three stages of five BasicBlocks (16/32/64 channels, strides 1/2/2).
  Shortcuts use option B (1x1 conv + BN where the shape changes) rather than the zero-padding option A
  of the original CIFAR ResNet; both are common in LT code. 32 px -> 8x8 map, 64 features.
* ``resnet18``, ``resnet50``, ``resnet152``, ``resnext50_32x4d``: the torchvision models without
  ``avgpool``/``fc``; the submodule names are torchvision's, so torchvision (or MoCo-style) state dicts
  load with :func:`load_pretrained`. 224 px -> 7x7 map.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

BACKBONES: tuple[str, ...] = ("convnet", "resnet32", "resnet18", "resnet50", "resnet152", "resnext50_32x4d")

# Prefixes left by DistributedDataParallel ("module.") and by wrappers that hold the trunk as
# ``.backbone`` (this package's Encoder, many SSL codebases); stripped in any order and repetition.
_STRIP_PREFIXES = ("module.", "backbone.")


class Backbone(nn.Module):
    """Base class: subclasses implement ``forward_features`` and set ``num_features`` and ``stride``."""

    num_features: int
    stride: int

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, h, w)`` images -> ``(B, C, H, W)`` last conv-stage map."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, h, w)`` images -> ``(B, C)`` global-average-pooled features."""
        return self.forward_features(x).mean(dim=(2, 3))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ConvNet(Backbone):
    """Small 4-stage conv net for 28-32 px inputs (see the module docstring for sizes and speed)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            layers += _conv_bn_relu(c_in, width)
            c_in = width
        self.stages = nn.Sequential(*layers)
        self.num_features = c_in
        self.stride = 2 ** (len(widths) - 1)
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv + BN, option B) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """CIFAR ResNet-(6n+2): 3x3 stem, three stages of ``n`` BasicBlocks, no max-pool (n=5: ResNet-32)."""

    def __init__(self, blocks_per_stage: int = 5, widths: tuple[int, int, int] = (16, 32, 64),
                 zero_init_residual: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c_in = widths[0]
        stages = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = c_in
        self.stride = 4
        _init_weights(self)
        if zero_init_residual:
            # Each block starts as the identity (Goyal et al. 2017), as torchvision's option does.
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


class TorchvisionResNet(Backbone):
    """A torchvision ResNet/ResNeXt without ``avgpool`` and ``fc``; submodule names are torchvision's."""

    def __init__(self, model: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1 = model.conv1
        self.bn1 = model.bn1
        self.relu = model.relu
        self.maxpool = model.maxpool
        self.layer1 = model.layer1
        self.layer2 = model.layer2
        self.layer3 = model.layer3
        self.layer4 = model.layer4
        self.num_features = model.fc.in_features
        self.stride = 32

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _init_weights(module: nn.Module) -> None:
    # torchvision's ResNet initialisation, so every backbone starts from the same convention.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


_TORCHVISION: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "resnet152": torchvision.models.resnet152,
    "resnext50_32x4d": torchvision.models.resnext50_32x4d,
}


def build_backbone(name: str, *, zero_init_residual: bool = True, pretrained: str | None = None) -> Backbone:
    """Build a backbone by name.

    Args:
        name: one of :data:`BACKBONES`.
        zero_init_residual: zero the last BN gamma of every residual block (METHOD.md A.3; the
            official code always does). Ignored by ``convnet``, which has no residual blocks.
        pretrained: path of a local state-dict file loaded with :func:`load_pretrained`; nothing is
            ever downloaded.

    Returns:
        A :class:`Backbone` (``forward_features`` -> ``(B, C, H, W)``, ``forward`` -> ``(B, C)``).

    Raises:
        ValueError: unknown name, or a pretrained file that is missing or does not fit.
    """
    if name == "convnet":
        backbone: Backbone = ConvNet()
    elif name == "resnet32":
        backbone = CifarResNet(5, zero_init_residual=zero_init_residual)
    elif name in _TORCHVISION:
        backbone = TorchvisionResNet(_TORCHVISION[name](weights=None, zero_init_residual=zero_init_residual))
    else:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    if pretrained is not None:
        load_pretrained(backbone, pretrained)
    return backbone


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _first(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_pretrained(backbone: nn.Module, path: str | Path) -> None:
    """Load a local state-dict file into ``backbone`` (strictly, apart from classifier keys).

    Accepted files: a plain state dict, or a dict holding one under ``"state_dict"`` or ``"model"``
    (MoCo / timm / torchvision-reference checkpoints). ``module.`` and ``backbone.`` prefixes are
    stripped; ``fc.*`` keys (the ImageNet classifier) are ignored; BatchNorm ``num_batches_tracked``
    counters may be absent (old torchvision weights lack them). The file is read with
    ``weights_only=True``: only tensors and plain containers, never arbitrary pickled objects.

    Raises:
        ValueError: missing or unreadable file, missing / unexpected keys or shape mismatches (the
            message names the file and the first offending keys).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained weights file not found: {path}")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means "not a state dict we can read"
        raise ValueError(f"cannot read pretrained weights {path}: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"pretrained weights {path} do not hold a state dict of tensors")
    state = {_strip(k): v for k, v in obj.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_first(mismatched)}")
    if problems:
        raise ValueError(f"pretrained weights {path} do not fit the backbone; " + "; ".join(problems))
    for k, v in expected.items():
        state.setdefault(k, v)
    backbone.load_state_dict(state, strict=True)
