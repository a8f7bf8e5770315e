"""The backbone contract every family implements, and the small helpers the families share.

A :class:`Backbone` maps ``(B, in_chans, h, w)`` images to

* ``forward_features(x)`` -> ``(B, C, H, W)``: the last feature map, un-pooled. PBSD's teacher ROI-pools
  this map (METHOD.md A.7); it is an explicit method, never a forward hook (the official code's hook on
  ``layer4`` is overwritten by the next forward, METHOD.md A.3). Vision transformers give their patch
  tokens reshaped to the patch grid (class / distillation / register tokens dropped).
* ``forward(x)`` -> ``(B, C)``: the pooled feature stage 2 classifies: the mean of the map (= the mean of
  the patch tokens of a ViT, the space the PBSD teacher's ROI pooling lives in), or with ``pool="cls"``
  a ViT's class token.
* ``forward_with_map(x)`` -> ``(pooled, map)`` from one forward pass (both of the above).
* ``num_features`` (= C) and ``stride`` (nominal input pixels per map cell; documentation only: the ROI
  pooling derives its scale from the actual sizes); ``patch_size`` for ViTs (image sides must be multiples).

The optional families (timm, open_clip) import their package only when one of their backbones is built;
a missing package is a one-line :class:`~dscl.config.ConfigError` naming the pip command
(:func:`install_hint`).
"""

import importlib
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dscl.config import ConfigError

#: The distribution name on PyPI (the extras are installed as ``DISTRIBUTION[extra]``).
DISTRIBUTION = "dscl-lt"


def install_hint(extra: str) -> str:
    """The pip command that installs the optional ``extra`` (e.g. ``pip install 'dscl-lt[timm]'``)."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def first_line(exc: BaseException) -> str:
    """The first line of a third-party library's message (timm's and open_clip's span several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def import_optional(module: str, extra: str, *, needed_for: str) -> ModuleType:
    """``import module``, or a one-line ConfigError saying which extra to install for ``needed_for``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{needed_for} needs the optional package {module!r}, which is not installed "
                          f"({exc}); install it with: {install_hint(extra)}") from None


class Backbone(nn.Module):
    """Base class: subclasses implement ``forward_features`` and set ``num_features`` and ``stride``.

    Families whose weights live in a wrapped module (timm, open_clip) name it in ``weights_attr``, so
    weight files in that module's own key layout load into it (:mod:`dscl.backbones.pretrained`).
    """

    num_features: int
    stride: int
    #: token models (ViTs): the side of a patch in px; image sides must be multiples of it (a remainder would be
    #: cut off, so the map would no longer cover the image the ROI boxes live in). None for CNNs.
    patch_size: int | None = None
    #: attribute holding the module whose state dict pretrained files describe ("" = the backbone itself)
    weights_attr: str = ""

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, h, w)`` images -> ``(B, C, H, W)`` last feature map."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, h, w)`` images -> ``(B, C)`` global-average-pooled features."""
        return self.forward_features(x).mean(dim=(2, 3))

    @torch.jit.export  # a scripted backbone keeps it (scripting compiles forward and what it calls)
    def forward_with_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 3, h, w)`` -> ``(pooled (B, C), map (B, C, H, W))`` from one forward pass."""
        fmap = self.forward_features(x)
        return fmap.mean(dim=(2, 3)), fmap

    def weights_module(self) -> nn.Module:
        """The module pretrained weight files are loaded into."""
        return getattr(self, self.weights_attr) if self.weights_attr else self

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A weight file's state dict (wrapper prefixes already stripped) -> keys of :meth:`weights_module`.

        The default drops ``fc.*``, the ImageNet classifier of torchvision-layout files (and the MLP head
        of MoCo's ``encoder_q``); families override it with their own conversions.
        """
        return {k: v for k, v in state.items() if not k.startswith("fc.")}

    def named_weights(self, source: str) -> dict[str, Tensor]:
        """Weights named by ``source`` (a hub name, a pretrained tag) rather than by a local file."""
        raise ConfigError(f"pretrained weights file not found: {source} (a local .pth / .pt / .bin / .safetensors "
                          "file is expected; hub names like hf-hub:ORG/NAME work with timm: and open_clip: "
                          "backbones)")


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, H*W, C)`` patch tokens in row-major grid order -> ``(B, C, H, W)`` (a view, channels-last strides)."""
    b, n, c = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    return tokens.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)


def resample_position_embedding(pos: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                                num_prefix: int) -> Tensor:
    """Interpolate a learned position embedding to another patch grid (prefix tokens kept as they are).

    A ViT trained at one resolution takes another by resampling its grid of position embeddings
    (bicubic, antialiased when shrinking, as timm and open_clip do for their own models).

    Args:
        pos: ``(num_prefix + gh*gw, C)`` or ``(1, num_prefix + gh*gw, C)``.
        new_grid, old_grid: ``(rows, cols)`` of patches.
        num_prefix: leading tokens (class token) that have no grid position.

    Returns:
        The same layout as ``pos`` with ``num_prefix + new_rows*new_cols`` tokens; ``pos`` itself when the
        grids agree.
    """
    new_grid, old_grid = (int(new_grid[0]), int(new_grid[1])), (int(old_grid[0]), int(old_grid[1]))
    if new_grid == old_grid:
        return pos
    squeeze = pos.dim() == 2
    seq = pos.unsqueeze(0) if squeeze else pos
    prefix, grid = seq[:, :num_prefix], seq[:, num_prefix:]
    c = seq.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2).float()
    shrink = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=shrink)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c).to(seq.dtype)
    out = torch.cat([prefix, grid], dim=1)
    return out.squeeze(0) if squeeze else out


def unreached_parameters(module: nn.Module, in_chans: int, size: tuple[int, int]) -> tuple[list[str], tuple[int, ...]]:
    """Trainable parameters that ``module(x)`` never reaches, found by a forward on the meta device.

    The meta device computes shapes only (no memory, no arithmetic, no random numbers), so this costs
    well under a second even for large models. Used to freeze what a wrapped model holds beyond the
    feature path (e.g. timm's pooled-head norms), so every trainable parameter gets a gradient (which
    DistributedDataParallel requires).

    Returns:
        ``(names, output shape)``; ``([], ())`` when some operation has no meta kernel (nothing is frozen).
    """
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    meta = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
            for n, p in module.named_parameters()}
    meta.update({n: torch.empty_like(b, device="meta") for n, b in module.named_buffers()})
    was_training = module.training
    module.eval()  # no dropout, no BatchNorm statistics updates
    try:
        with torch.enable_grad():
            out = torch.func.functional_call(module, meta, (torch.empty(1, in_chans, *size, device="meta"),))
            leaves = [meta[n] for n in trainable]
            grads = torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)
    except Exception:  # an op without a meta kernel: keep every parameter trainable
        return [], ()
    finally:
        module.train(was_training)
    return [n for n, g in zip(trainable, grads, strict=True) if g is None], tuple(out.shape)
