"""Encoder (backbone + MoCo-v2 projection head) and DSCLModel (online + momentum encoders + queue).

The model computes features only; losses live in :mod:`dscl.losses` and the training loop spells out
the step order of METHOD.md A.9 (momentum update, forwards, losses, backward, step, enqueue).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dscl.adapters import FinetunePlan, apply_finetune, base_digest, merge_lora, weights_module
from dscl.backbones import Backbone, BackboneSpec, build_backbone_from_spec, network_spec, spec_from_config
from dscl.config import Config, ConfigError, uses_pbsd
from dscl.data.preprocess import input_mode
from dscl.errors import CheckpointError
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
        #: backbone submodules kept in eval mode while training (frozen parts of a partial fine-tune,
        #: :func:`dscl.adapters.apply_finetune`); empty for ``full``
        self.held_eval: tuple[str, ...] = ()
        self.finetune_plan: FinetunePlan | None = None

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for name in self.held_eval:
            self.backbone.get_submodule(name).eval()
        return self

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
        # frozen tensors (a partial fine-tune's base) are the same storage in both encoders: one copy in memory
        shared = {id(p): p for p in encoder.parameters() if not p.requires_grad}
        self.momentum = copy.deepcopy(encoder, memo=shared)
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

    Only parameters are averaged, and only those ``online`` trains (``requires_grad``): the frozen part of
    a partial fine-tune is never changed (and is one storage with the online encoder's). Buffers
    (BatchNorm running statistics) of the momentum encoder are its own, accumulated from its own forwards
    on the key views, as in MoCo; they are not copied.

    Args:
        online: the trained module (theta_q).
        momentum: the EMA module (theta_k), same architecture; updated in place.
        m: momentum in [0, 1]; 1 leaves ``momentum`` unchanged, 0 copies ``online``.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m}")
    pairs = list(zip(online.parameters(), momentum.parameters(), strict=False))
    n_q, n_k = sum(1 for _ in online.parameters()), sum(1 for _ in momentum.parameters())
    if n_q != n_k:
        raise ValueError(f"online has {n_q} parameter tensors but momentum has {n_k}")
    if m == 1.0:
        return
    q: list[Tensor] = [a for a, _ in pairs if a.requires_grad]
    k: list[Tensor] = [b for a, b in pairs if a.requires_grad]
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

    ``pretrained``: load ``model.pretrained`` (stage 1's start, and the frozen base a partial fine-tune's
    checkpoint is loaded over); False when every weight comes from a checkpoint. ``model.finetune`` is
    applied (:func:`dscl.adapters.apply_finetune`: LoRA adapters, frozen parts held in eval). A ViT's
    ``data.image_size`` and ``views.patch_size`` must be multiples of its patch size
    (:func:`check_patch_grid`).
    """
    spec = spec if spec is not None else network_spec(cfg.model)
    backbone = build_backbone_from_spec(spec, cfg.model.pretrained if pretrained else None)
    check_patch_grid(backbone, cfg)
    plan = apply_finetune(backbone, cfg.model)  # model.finetune: what trains (full: everything, untouched)
    if cfg.model.grad_checkpointing:
        enable_grad_checkpointing(backbone, cfg.model.backbone)
    encoder = Encoder(backbone, dim=cfg.model.dim)
    encoder.held_eval = tuple(plan.held_eval)
    encoder.finetune_plan = plan
    return encoder


def enable_grad_checkpointing(backbone: Backbone, name: str) -> None:
    """``model.grad_checkpointing``: the model's own block checkpointing (timm's and open_clip's
    ``set_grad_checkpointing``, both non-reentrant, so adapters behind frozen layers still get gradients).

    Raises:
        ConfigError: the backbone has no such switch, or has BatchNorm (recomputing its forward would update
            the running statistics a second time).
    """
    model = weights_module(backbone)
    switch = getattr(model, "set_grad_checkpointing", None)
    if not callable(switch):
        raise ConfigError(f"model.grad_checkpointing: {name} has no gradient checkpointing (timm and open_clip "
                          "models have it); set model.grad_checkpointing=false, or lower the batch size / use "
                          "model.finetune=lora or frozen to save memory")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(f"model.grad_checkpointing: {name} has BatchNorm layers, whose running statistics the "
                          "recomputed forward would update twice; set model.grad_checkpointing=false")
    switch(True)


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


# ----------------------------------------------------------------------------------------------
# partial fine-tunes: what a checkpoint holds, and the base it was trained on


def frozen_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the frozen parameters of a partial fine-tune (both encoders of a DSCLModel, or
    one Encoder); empty for ``model.finetune=full`` (a checkpoint then holds every tensor)."""
    encoders = ([("online.", model.online), ("momentum.", model.momentum)] if isinstance(model, DSCLModel)
                else [("", model)])
    keys: set[str] = set()
    for prefix, enc in encoders:
        plan = getattr(enc, "finetune_plan", None)
        if plan is not None and plan.finetune.partial:
            keys.update(f"{prefix}backbone.{n}" for n in plan.frozen)
    return keys


def base_record(cfg: Config, encoder: Encoder) -> dict[str, object] | None:
    """Where the frozen base of a partial fine-tune came from: ``{finetune, source, sha256, tensors}``
    (stored in stage-1 checkpoints, checked when they are read); None for ``full``."""
    plan = encoder.finetune_plan
    if plan is None or not plan.finetune.partial:
        return None
    params = dict(encoder.backbone.named_parameters())
    frozen = {n: params[n] for n in plan.frozen}
    return {"finetune": cfg.model.finetune, "source": str(cfg.model.pretrained), "sha256": base_digest(frozen),
            "tensors": len(frozen)}


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without the frozen base (:func:`frozen_keys`): what a checkpoint stores."""
    skip = frozen_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def load_trained(model: nn.Module, state: Mapping[str, Tensor], *, stored: Mapping[str, object] | None,
                 built: Mapping[str, object] | None, where: Path | str) -> None:
    """Load a checkpoint's ``state`` into ``model``: every tensor (``full``), or the trained tensors over the
    freshly loaded base, after checking that base is the one the checkpoint was trained on.

    Args:
        stored: the checkpoint's base record (:func:`base_record`), None for ``full``.
        built: the base record of ``model`` as built now.
        where: the checkpoint, for messages.

    Raises:
        CheckpointError: the base changed or is missing, or the tensors do not fit.
    """
    if (stored is None) != (built is None):
        have = f"model.finetune={stored['finetune']}" if stored is not None else "model.finetune=full"
        raise CheckpointError(f"{where} was trained with {have}, which the model built now does not match; "
                              "train with the checkpoint's own model.finetune")
    if stored is not None and built is not None and stored.get("sha256") != built.get("sha256"):
        raise CheckpointError(
            f"{where} was trained on top of frozen weights from {stored.get('source')} (sha256 "
            f"{str(stored.get('sha256'))[:12]}...), but model.pretrained={built.get('source')} now gives other weights "
            f"(sha256 {str(built.get('sha256'))[:12]}...); the checkpoint holds only the trained tensors, so point "
            "model.pretrained at the original weights file (or hub name) again")
    try:
        missing, unexpected = model.load_state_dict(dict(state), strict=stored is None)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{where} does not fit the model: {' '.join(x.strip() for x in first[:3])}") from exc
    if stored is not None and (unexpected or set(missing) != frozen_keys(model)):
        extra = sorted(set(missing) - frozen_keys(model))[:3] + sorted(unexpected)[:3]
        raise CheckpointError(f"{where} does not fit the model: {', '.join(extra) or 'frozen tensors stored'}")


def stage1_backbone(cfg: Config, spec: BackboneSpec, state: Any, where: Path) -> Backbone:
    """The trained online backbone of a stage-1 checkpoint ``state`` (a :class:`dscl.run.Stage1State`), as
    plain weights: the stored backbone (``full``), or for a partial fine-tune the frozen base loaded again
    from ``model.pretrained`` (checked against the checkpoint's hash), the trained tensors over it and any
    LoRA adapter merged in. What stage 2, inference and every export see either way.
    """
    from dscl.features import frozen_backbone  # features imports this module's neighbours (data, runtime)

    if state.base is None:
        return frozen_backbone(spec, state.backbone_weights(), where)
    encoder = build_encoder(cfg, spec, pretrained=True)
    online = {k[len("online."):]: v for k, v in state.model.items() if k.startswith("online.")}
    load_trained(encoder, online, stored=state.base, built=base_record(cfg, encoder), where=where)
    return merge_lora(encoder.backbone)  # type: ignore[return-value]
