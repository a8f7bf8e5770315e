"""Encoder (backbone + MoCo-v2 projection head) and DSCLModel (online + momentum encoders + queue).

The model computes features only; losses live in :mod:`dscl.losses` and the training loop spells out
the step order of METHOD.md A.9 (momentum update, forwards, losses, backward, step, enqueue).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dscl.backbones import Backbone, BackboneSpec, build_backbone_from_spec, network_spec, spec_from_config
from dscl.config import Config, ConfigError, uses_pbsd
from dscl.data.preprocess import input_mode
from dscl.patches import ALIGNED_DEFAULT, pool_boxes
from dscl.queue import LabeledQueue

#: How the PBSD student's BatchNorm layers see the L patch slots (``model.patch_bn``).
#: ``per-slot``: each slot's B crops are normalised with that slot's own batch statistics and the
#: running statistics are updated once per slot, in slot order — exactly the paper's L separate
#: forwards (METHOD.md A.9 step 3), with the convolutions still batched over all L*B crops.
#: ``joint``: one set of statistics over all L*B crops and one running-statistics update per step.
PATCH_BN = ("per-slot", "joint")


def _per_slot_forward(bn: nn.modules.batchnorm._BatchNorm, slots: int, x: Tensor) -> Tensor:
    """``bn`` applied to each of ``slots`` equal consecutive row blocks of ``x`` on its own."""
    # Only batch statistics depend on the grouping; with running statistics (eval) it is one call.
    if not (bn.training or (bn.running_mean is None and bn.running_var is None)):
        return type(bn).forward(bn, x)
    if x.shape[0] % slots:
        raise ValueError(f"per-slot BatchNorm: {x.shape[0]} rows do not split into {slots} equal slots")
    # type(bn).forward on each block is the module's own forward (momentum, momentum=None's cumulative
    # average, num_batches_tracked, track_running_stats): block j updates the running statistics after
    # block j-1, as the j-th of `slots` separate forwards would. Blocks of dim 0 are contiguous in both
    # memory formats, so each call runs the fused kernel on the very data a separate forward would get.
    return torch.cat([type(bn).forward(bn, block) for block in x.chunk(slots)])


@contextmanager
def per_slot_batchnorm(module: nn.Module, slots: int) -> Iterator[None]:
    """Inside the block, every BatchNorm layer of ``module`` treats its input as ``slots`` stacked batches.

    A forward of ``(slots * B, ...)`` rows (slot-major) then gives exactly what ``slots`` separate
    forwards of ``B`` rows give: per-slot batch statistics in training, and one running-statistics
    update per slot in slot order (the sequential momentum updates of METHOD.md A.9 step 3). Outside
    the block the layers are untouched (their class, parameters and state dict never change).

    Args:
        module: a model holding ``BatchNorm{1,2,3}d`` (or ``SyncBatchNorm``) layers.
        slots: number of stacked batches; 1 leaves the layers as they are.
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if slots > 1 else []
    for bn in layers:
        # an instance attribute shadows the class's forward for this module only, until deleted below
        bn.forward = functools.partial(_per_slot_forward, bn, slots)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for bn in layers:
            del bn.forward


class Encoder(nn.Module):
    """Backbone followed by the MoCo-v2 MLP head ``Linear(C, C) -> ReLU -> Linear(C, dim)`` (no BN).

    Args:
        backbone: a :class:`~dscl.backbones.Backbone` (``forward_features`` and ``num_features``).
        dim: embedding dimension (METHOD.md A.3: 128).
    """

    def __init__(self, backbone: Backbone, dim: int = 128) -> None:
        super().__init__()
        c = backbone.num_features
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, dim))
        self.dim = dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 3, h, w)`` -> ``(z (B, dim) L2-normalised, fmap (B, C, H, W))``.

        ``z`` projects the backbone's pooled feature (the mean of ``fmap``, or a ViT's class token with
        ``model.pool=cls``); ``fmap`` is returned so the PBSD teacher can ROI-pool it without a second
        forward or a hook.
        """
        pooled, fmap = self.backbone.forward_with_map(x)  # the pooled feature of model.pool, in the same pass
        return self.project(pooled), fmap

    def project(self, pooled: Tensor) -> Tensor:
        """``(N, C)`` pooled backbone features -> ``(N, dim)`` L2-normalised embeddings."""
        return F.normalize(self.head(pooled), dim=1)

    def features(self, x: Tensor) -> Tensor:
        """``(B, 3, h, w)`` -> ``(B, C)`` pooled backbone features (stage 2's input)."""
        return self.backbone(x)


class DSCLModel(nn.Module):
    """The online encoder, its momentum (EMA) copy and the labelled key queue.

    ``momentum`` starts as an exact copy of ``online`` with every parameter frozen
    (``requires_grad=False``); it is moved only by :func:`momentum_update`. As a submodule it follows
    ``train()``/``eval()``, so in training its BatchNorm layers use batch statistics (MoCo).

    Args:
        encoder: the online :class:`Encoder` (trained by SGD).
        queue_size: capacity K of the queue (METHOD.md A.4).
        patch_bn: ``per-slot`` (the paper's BatchNorm semantics for the L patch slots) or ``joint``;
            see :data:`PATCH_BN`.
        roi_aligned: roi_align convention of the PBSD teacher (``False`` = the paper's); see
            :mod:`dscl.patches`.
    """

    def __init__(self, encoder: Encoder, queue_size: int, *, patch_bn: str = "per-slot",
                 roi_aligned: bool = ALIGNED_DEFAULT) -> None:
        super().__init__()
        if patch_bn not in PATCH_BN:
            raise ValueError(f"patch_bn must be one of {', '.join(PATCH_BN)}, got {patch_bn!r}")
        self.patch_bn = patch_bn
        self.roi_aligned = bool(roi_aligned)
        self.online = encoder
        self.momentum = copy.deepcopy(encoder)
        for p in self.momentum.parameters():
            p.requires_grad_(False)
        self.queue = LabeledQueue(queue_size, encoder.dim)

    def patch_teacher(
        self,
        fmap: Tensor,
        boxes: Tensor,
        image_size: int | tuple[int, int],
        *,
        aligned: bool | None = None,
    ) -> Tensor:
        """PBSD teacher c = normalize(g(ROIPool(u, box))) (METHOD.md A.7), without autograd graph.

        The official code builds this branch with gradients and detaches only the soft target
        (METHOD.md C.2 item 8); since no gradient ever flows through it, it runs under ``no_grad``.

        Args:
            fmap: ``(B, C, H, W)`` online feature map of the query view (from :meth:`Encoder.forward`).
            boxes: ``(B, L, 4)`` patch boxes ``(x1, y1, x2, y2)`` in query-view pixels.
            image_size: query-view size ``h`` or ``(h, w)`` in pixels.
            aligned: roi_align convention, see :mod:`dscl.patches`; None = the model's ``roi_aligned``.

        Returns:
            ``(L, B, dim)`` L2-normalised teacher features.
        """
        with torch.no_grad():
            aligned = self.roi_aligned if aligned is None else aligned
            pooled = pool_boxes(fmap, boxes, image_size, aligned=aligned)  # (L, B, C)
            n_boxes, b, c = pooled.shape
            return self.online.project(pooled.reshape(n_boxes * b, c)).view(n_boxes, b, -1)

    def patch_student(self, patches: Tensor) -> Tensor:
        """PBSD student s = normalize(g(f(patch))) for all patches in one online-encoder forward.

        With ``patch_bn="per-slot"`` the BatchNorm layers normalise each slot on its own
        (:func:`per_slot_batchnorm`), so the result, its gradients and the running statistics are those
        of L separate forwards, one per slot (METHOD.md A.9 step 3).

        Args:
            patches: ``(B, L, 3, h, w)`` patch crops.

        Returns:
            ``(L, B, dim)`` L2-normalised student features (row ``l * B + b`` of the batched forward).
        """
        if patches.dim() != 5:
            raise ValueError(f"patches must be (B, L, 3, h, w), got shape {tuple(patches.shape)}")
        b, n_boxes = patches.shape[:2]
        flat = patches.transpose(0, 1).reshape(n_boxes * b, *patches.shape[2:])  # L-major
        with per_slot_batchnorm(self.online, n_boxes if self.patch_bn == "per-slot" else 1):
            z, _ = self.online(flat)
        return z.view(n_boxes, b, -1)


@torch.no_grad()
def momentum_update(online: nn.Module, momentum: nn.Module, m: float) -> None:
    """EMA of the parameters: theta_k <- m * theta_k + (1 - m) * theta_q (METHOD.md A.3, G 17).

    Only parameters are averaged. Buffers (BatchNorm running statistics) of the momentum encoder are
    its own, accumulated from its own forwards on the key views, as in MoCo; they are not copied.

    Args:
        online: the trained module (theta_q).
        momentum: the EMA module (theta_k), same architecture; updated in place.
        m: momentum in [0, 1]; 1 leaves ``momentum`` unchanged, 0 copies ``online``.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m}")
    q: list[Tensor] = list(online.parameters())
    k: list[Tensor] = list(momentum.parameters())
    if len(q) != len(k):
        raise ValueError(f"online has {len(q)} parameter tensors but momentum has {len(k)}")
    if m == 1.0:
        return
    torch._foreach_mul_(k, m)
    torch._foreach_add_(k, q, alpha=1.0 - m)


def build_model(cfg: Config, num_classes: int, *, queue_size: int | None = None,
                spec: BackboneSpec | None = None) -> DSCLModel:
    """The stage-1 model a config describes: :func:`build_encoder` (``spec``: the run's backbone spec,
    default the config's architecture), ``model.patch_bn``, ``model.roi_aligned``, and the queue
    (``model.queue_size``, none for the ``ce`` baseline) started as ``model.queue_init`` says (``random``:
    the paper's full queue of random unit features with labels uniform in ``[0, num_classes)``, drawn from
    the global torch RNG)."""
    if queue_size is None:
        queue_size = cfg.model.queue_size if cfg.loss.loss != "ce" else 0
    model = DSCLModel(build_encoder(cfg, spec), queue_size=queue_size, patch_bn=cfg.model.patch_bn,
                      roi_aligned=cfg.model.roi_aligned)
    if cfg.model.queue_init == "random":
        model.queue.fill_random(num_classes)
    return model


def build_encoder(cfg: Config, spec: BackboneSpec | None = None, *, pretrained: bool = True) -> Encoder:
    """The stage-1 online encoder: the backbone of ``spec`` (default: the config's architecture,
    :func:`~dscl.backbones.network_spec`) with a head of ``cfg.model.dim``.

    ``pretrained``: load ``model.pretrained`` (stage 1's start); False when the weights come from a
    checkpoint. A ViT's ``data.image_size`` and ``views.patch_size`` must be multiples of its patch size
    (:func:`check_patch_grid`).
    """
    spec = spec if spec is not None else network_spec(cfg.model)
    backbone = build_backbone_from_spec(spec, cfg.model.pretrained if pretrained else None)
    check_patch_grid(backbone, cfg)
    return Encoder(backbone, dim=cfg.model.dim)


def check_patch_grid(backbone: Backbone, cfg: Config) -> None:
    """Refuse image sides a ViT would cut short: its patch grid rounds down, so a remainder of pixels would be
    dropped and the PBSD boxes (in image pixels) would no longer match the map they are pooled from."""
    patch = backbone.patch_size
    if patch is None:
        return
    sizes = [("data.image_size", cfg.data.image_size)]
    if uses_pbsd(cfg):
        sizes.append(("views.patch_size", cfg.views.patch_size))
    for key, px in sizes:
        if px % patch:
            lower, upper = max(patch, px // patch * patch), (px // patch + 1) * patch
            raise ConfigError(f"{key}={px} is not a multiple of the {patch} px patches of {cfg.model.backbone}; use "
                              f"{lower} or {upper} (the patch grid would drop the last {px % patch} px)")


def backbone_spec(cfg: Config, mean: Sequence[float], std: Sequence[float], *,
                  pretrained: str | Path | None = None) -> BackboneSpec:
    """The run's backbone spec from its config and its dataset's normalisation (``mean`` / ``std``; grey
    datasets replicated to RGB): :func:`dscl.backbones.spec_from_config`, with ``pretrained`` the weights'
    source whose configuration gives the input settings (``model.pretrained`` in stage 1)."""
    return spec_from_config(cfg, mean=mean, std=std, grey=input_mode(cfg.data.dataset) == "L", pretrained=pretrained)


def recorded_spec(stored: BackboneSpec | None, cfg: Config, mean: Sequence[float],
                  std: Sequence[float]) -> BackboneSpec:
    """The spec a checkpoint stored, or for a checkpoint written before specs were (versions 1-2: always a
    built-in with the dataset's normalisation) the spec its config and data describe."""
    return stored if stored is not None else backbone_spec(cfg, mean, std)
