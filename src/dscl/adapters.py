"""What of a pretrained backbone stage 1 trains (``model.finetune``), and the learning rate of each part.

Modes (README "Fine-tuning a pretrained backbone"):

* ``full``: every parameter trains (the paper; nothing here touches the model).
* ``lora``: low-rank adapters (LoRA, injected by ``peft``) on the layers ``model.lora_targets`` names, the
  base weights frozen. Default targets per family (:func:`default_lora_targets`): a ViT's attention input
  and output projections (timm ``blocks.N.attn.qkv`` / ``.proj``; open_clip's ``nn.MultiheadAttention``,
  whose in-projection and ``out_proj`` peft adapts); a CNN's spatial convolutions (every ungrouped
  convolution with a kernel larger than 1x1, the stem excepted).
* ``last:K``: the last K blocks (:func:`block_groups`) and what follows them (the final norm).
* ``frozen``: no backbone tensor trains: a linear probe's features through the same pipeline.

In every mode the projection head trains. Outside ``full``, every backbone submodule that holds no trained
parameter runs in eval mode during training (:attr:`FinetunePlan.held_eval`): frozen BatchNorm layers keep
the loaded statistics and dropout is off there, so a frozen part computes exactly what the loaded weights
compute. The momentum encoder holds the frozen tensors as the same storage as the online encoder and
averages only the trained ones (:class:`dscl.model.DSCLModel`).

``peft`` is imported only when a ``lora`` model is built (``pip install 'dscl-lt[lora]'``).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dscl.config import ConfigError

FINETUNE_MODES = ("full", "lora", "last:K", "frozen")


@dataclass(frozen=True)
class Finetune:
    """A parsed ``model.finetune``: ``mode`` full / lora / last / frozen, ``last`` = K for ``last:K``."""

    mode: str
    last: int = 0

    @classmethod
    def parse(cls, text: str) -> Finetune:
        head, _, k = str(text).partition(":")
        if text in ("full", "lora", "frozen"):
            return cls(text)
        if head == "last" and k.isdigit() and int(k) >= 1:
            return cls("last", int(k))
        raise ConfigError(f"model.finetune={text!r} is not a fine-tuning mode; use full (every parameter), lora "
                          "(low-rank adapters), last:K (the last K blocks, e.g. last:2) or frozen (a linear probe)")

    @property
    def partial(self) -> bool:
        """Whether part of the backbone stays as loaded (every mode but ``full``)."""
        return self.mode != "full"


@dataclass
class FinetunePlan:
    """What :func:`apply_finetune` did to a backbone (names relative to the backbone)."""

    finetune: Finetune
    trained: list[str] = field(default_factory=list)  # backbone parameters that train
    frozen: list[str] = field(default_factory=list)  # backbone parameters kept as loaded
    held_eval: list[str] = field(default_factory=list)  # submodules held in eval mode while training
    lora_targets: str | list[str] | None = None  # what peft adapted (lora only)

    def describe(self, backbone: nn.Module) -> str:
        params = dict(backbone.named_parameters())
        n_trained = sum(params[n].numel() for n in self.trained)
        n_all = sum(p.numel() for p in params.values())
        return (f"fine-tuning {self.finetune.mode}{':' + str(self.finetune.last) if self.finetune.last else ''}: "
                f"{n_trained:,} of {n_all:,} backbone parameters train ({100 * n_trained / max(n_all, 1):.2f}%)")


# ----------------------------------------------------------------------------------------------
# blocks


def weights_module(backbone: nn.Module) -> nn.Module:
    """The module pretrained files (and peft's module names) describe: a Backbone's ``weights_module()``."""
    get = getattr(backbone, "weights_module", None)
    return get() if callable(get) else backbone


def _groups_by_starts(names: list[str], starts: list[str]) -> list[list[str]]:
    """Parameter ``names`` (in registration order) cut at the first parameter of each block in ``starts``:
    group 0 = everything before the first block (the stem), group i = block i-1 and whatever follows it
    before the next block (so the last group holds the final norm)."""
    groups: list[list[str]] = [[] for _ in range(len(starts) + 1)]
    index = {s: i for i, s in enumerate(starts)}
    current = 0
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            j = index.get(".".join(parts[:cut]))
            if j is not None:
                current = j + 1
                break
        groups[current].append(name)
    return groups


def _timm_groups(backbone: nn.Module, names: list[str]) -> list[list[str]] | None:
    """timm's fine parameter grouping (``group_matcher(coarse=False)``: stem, then one group per block, the
    final norm with the last block), via ``timm.models.group_parameters``; None if the model has none."""
    model = weights_module(backbone)
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return None
    from timm.models import group_parameters

    prefix = getattr(backbone, "weights_attr", "")
    prefix = f"{prefix}." if prefix else ""
    wanted = set(names)
    grouped = group_parameters(model, matcher(coarse=False))
    groups = [[prefix + n for n in grouped[k] if prefix + n in wanted] for k in sorted(grouped)]
    return [g for g in groups if g]


def block_groups(backbone: nn.Module, names: Iterable[str] | None = None) -> list[list[str]]:
    """The backbone's parameter names in depth order: ``[stem, block 1, ..., block n]``, the last group
    holding the final norm. ``names``: the parameters to group (default: all of them).

    Blocks per family: timm's own fine grouping (``group_matcher``); open_clip's residual attention blocks
    (``transformer.resblocks.N``); the built-in ResNets' residual blocks (``layerN.M``); the built-in
    convnet's conv-BN units.

    Raises:
        ConfigError: a model without a block structure dscl knows.
    """
    all_names = [n for n, _ in backbone.named_parameters()]
    names = all_names if names is None else [n for n in all_names if n in set(names)]
    groups: list[list[str]] | None = None
    family = type(backbone).__name__
    if family == "TimmBackbone":
        groups = _timm_groups(backbone, names)
    else:
        modules = dict(backbone.named_modules())
        starts: list[str] = []
        if family == "OpenClipBackbone":
            starts = [n for n, m in modules.items() if re.fullmatch(r"model\.transformer\.resblocks\.\d+", n)]
        elif family in ("TorchvisionResNet", "CifarResNet"):
            starts = [n for n in modules if re.fullmatch(r"layer\d+\.\d+", n)]
        elif family == "ConvNet":
            starts = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        if starts:
            groups = _groups_by_starts(names, starts)
    if not groups or len(groups) < 2:
        raise ConfigError(f"{family}: dscl does not know its blocks, so model.finetune=last:K and optim.layer_decay "
                          "cannot be used with it; use model.finetune=full, lora or frozen and optim.layer_decay=1")
    return groups


# ----------------------------------------------------------------------------------------------
# LoRA


def default_lora_targets(backbone: nn.Module) -> str | list[str]:
    """peft ``target_modules`` for the backbone's weights module (see the module docstring).

    Raises:
        ConfigError: nothing to adapt (set ``model.lora_targets``).
    """
    model = weights_module(backbone)
    modules = dict(model.named_modules())
    if any(re.fullmatch(r".*\.attn\.qkv", n) for n in modules):  # timm ViTs (plain 'proj' would hit patch_embed)
        return r".*\.attn\.(qkv|proj)"
    mha = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    if mha:  # open_clip's residual attention blocks
        return mha
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups == 1
             and tuple(m.kernel_size) != (1, 1)]
    if len(convs) > 1:  # the stem (the first convolution) stays as loaded
        return convs[1:]
    raise ConfigError(f"{type(backbone).__name__}: no default LoRA targets (no attention projections or spatial "
                      "convolutions found); set model.lora_targets to a regular expression over its module names")


def _peft() -> Any:
    from dscl.backbones.base import import_optional

    return import_optional("peft", "lora", needed_for="model.finetune=lora")


def inject_lora(backbone: nn.Module, *, rank: int, alpha: float, dropout: float,
                targets: str | list[str] | None) -> str | list[str]:
    """Add LoRA adapters (peft) to the backbone's weights module in place; returns the targets used."""
    peft = _peft()
    model = weights_module(backbone)
    targets = targets or default_lora_targets(backbone)
    for module in model.modules():  # peft's MultiheadAttention merge re-registers parameters: keep their order
        module.__dict__["_dscl_param_order"] = tuple(module._parameters)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on experimental layers (MultiheadAttention)
            peft.inject_adapter_in_model(config, model)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"model.lora_targets={targets!r} matches no layer of {type(backbone).__name__} "
                          f"({first}); give a regular expression over its module names") from None
    return targets


def _tuner_layers(module: nn.Module) -> list[tuple[str, Any]]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters can be in the model
        return []
    return [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain base layer back (in place).

    Afterwards ``module`` is the architecture it was before :func:`inject_lora` with the same parameter
    names (peft's MultiheadAttention merge leaves the in-projection as a plain tensor; it is registered as
    a parameter again), computing what the adapted model computed (to float rounding).
    """
    layers = _tuner_layers(module)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, layer in layers:  # outermost first: merging an outer layer merges the ones inside it
            if not layer.merged:
                layer.merge()
        for name, layer in reversed(layers):  # innermost first, so the outer names stay valid
            parent_name, _, attr = name.rpartition(".")
            base = layer.get_base_layer()
            for sub in base.modules():
                for key, value in list(vars(sub).items()):
                    if isinstance(value, Tensor) and not isinstance(value, nn.Parameter) \
                            and key not in sub._buffers and not key.startswith("_"):
                        delattr(sub, key)
                        sub.register_parameter(key, nn.Parameter(value.detach().clone()))
                order = sub.__dict__.get("_dscl_param_order")
                if order is not None and set(order) == set(sub._parameters):
                    sub._parameters = {k: sub._parameters[k] for k in order}
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, base)
    return module


# ----------------------------------------------------------------------------------------------
# applying a mode


def _held_eval(backbone: nn.Module) -> list[str]:
    """The largest submodules of ``backbone`` with parameters / buffers / dropout and no trained parameter."""
    held: list[str] = []
    for name, module in backbone.named_modules():
        if not name or any(name.startswith(h + ".") for h in held):
            continue
        if any(p.requires_grad for p in module.parameters()):
            continue
        held.append(name)
    return held


def apply_finetune(backbone: nn.Module, model_cfg: Any) -> FinetunePlan:
    """Set which backbone tensors train, as ``model_cfg.finetune`` says (``model_cfg``: a ModelConfig).

    ``full`` changes nothing. Other modes freeze the backbone's parameters (``requires_grad=False``), then:
    ``lora`` injects the adapters (:func:`inject_lora`; only they train), ``last:K`` unfreezes the last K
    :func:`block_groups`. Parameters the backbone had already frozen (timm's head-only norms, unreached by
    the map) stay frozen.
    """
    ft = Finetune.parse(model_cfg.finetune)
    plan = FinetunePlan(ft)
    if ft.partial:
        was_frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
        for p in backbone.parameters():
            p.requires_grad_(False)
        if ft.mode == "lora":
            plan.lora_targets = inject_lora(backbone, rank=model_cfg.lora_rank, alpha=model_cfg.lora_alpha,
                                            dropout=model_cfg.lora_dropout, targets=model_cfg.lora_targets)
        elif ft.mode == "last":
            groups = block_groups(backbone, [n for n, _ in backbone.named_parameters() if n not in was_frozen])
            blocks = len(groups) - 1
            if ft.last > blocks:
                raise ConfigError(f"model.finetune=last:{ft.last}: {type(backbone).__name__} has {blocks} blocks; "
                                  f"use last:1 to last:{blocks}, or full")
            params = dict(backbone.named_parameters())
            for group in groups[-ft.last:]:
                for n in group:
                    params[n].requires_grad_(True)
        plan.held_eval = _held_eval(backbone)
    for n, p in backbone.named_parameters():
        (plan.trained if p.requires_grad else plan.frozen).append(n)
    return plan


def lr_scales(backbone: nn.Module, trained: list[str], *, backbone_lr: float, layer_decay: float) -> dict[str, float]:
    """Learning-rate scale of each trained backbone parameter: ``backbone_lr`` x ``layer_decay^(n - g)`` for
    a parameter of group g of n (:func:`block_groups`: the stem is 0, the last block n - 1; the projection
    head, scale 1, is layer n)."""
    if layer_decay == 1.0:
        return {n: backbone_lr for n in trained}
    groups = block_groups(backbone)
    depth = len(groups)
    scales = {}
    for g, group in enumerate(groups):
        for n in group:
            scales[n] = backbone_lr * layer_decay ** (depth - g)
    # adapter tensors (LoRA) sit inside the block of the layer they adapt: block_groups saw them there
    return {n: scales.get(n, backbone_lr) for n in trained}


# ----------------------------------------------------------------------------------------------
# the frozen base of a checkpoint


def base_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the names and bytes of ``tensors`` (sorted by name): identifies a frozen base."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["FINETUNE_MODES", "Finetune", "FinetunePlan", "apply_finetune", "base_digest", "block_groups",
           "default_lora_targets", "inject_lora", "lr_scales", "merge_lora"]
