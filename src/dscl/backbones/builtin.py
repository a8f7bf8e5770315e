"""The built-in backbones (family ``builtin``: plain names in ``model.backbone``): convolutional trunks
exposing their last conv-stage map through ``forward_features`` (the contract: :mod:`dscl.backbones.base`).

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
  load with :func:`~dscl.backbones.pretrained.load_pretrained` (and so does ``timm:resnet50``: the same
  network under timm's identical names). 224 px -> 7x7 map.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import Tensor, nn

from dscl.backbones.base import Backbone
from dscl.backbones.spec import BackboneSpec
from dscl.config import ConfigError

BACKBONES: tuple[str, ...] = ("convnet", "resnet32", "resnet18", "resnet50", "resnet152", "resnext50_32x4d")

#: constructor arguments (``BackboneSpec.args``) the built-ins take
BUILTIN_ARGS: tuple[str, ...] = ("zero_init_residual",)


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


def build_builtin(spec: BackboneSpec) -> Backbone:
    """The built-in backbone ``spec.name`` with random weights.

    ``spec.args`` may hold ``zero_init_residual`` (default True): zero the last BN gamma of every residual
    block (METHOD.md A.3; the official code always does). ``convnet`` has no residual blocks and ignores it.

    Raises:
        ConfigError: unknown name, unknown argument, or ``pool="cls"`` (a CNN has no class token).
    """
    if spec.name not in BACKBONES:
        raise ConfigError(f"unknown backbone {spec.name!r}; valid names: {', '.join(BACKBONES)} "
                          "(or timm:<model> / open_clip:<arch> with the optional extras)")
    unknown = sorted(set(spec.args) - set(BUILTIN_ARGS))
    if unknown:
        raise ConfigError(f"backbone {spec.name}: unknown argument(s) {', '.join(unknown)}; "
                          f"the built-in backbones take: {', '.join(BUILTIN_ARGS)}")
    if spec.pool != "avg":
        raise ConfigError(f"backbone {spec.name}: pool={spec.pool!r} needs a class token (a ViT); CNNs pool 'avg'")
    zero_init_residual = bool(spec.args.get("zero_init_residual", True))
    if spec.name == "convnet":
        return ConvNet()
    if spec.name == "resnet32":
        return CifarResNet(5, zero_init_residual=zero_init_residual)
    return TorchvisionResNet(_TORCHVISION[spec.name](weights=None, zero_init_residual=zero_init_residual))
