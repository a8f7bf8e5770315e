"""What ``dscl presets`` shows beside each preset's description: the weights it starts from and an estimate of
the memory its stage-1 model state takes.

The estimate counts the backbone's parameters without allocating them: the backbone is built on PyTorch's
``meta`` device (shapes only), the preset's ``model.finetune`` is applied to it (LoRA adapters injected by
peft, frozen parts marked) and the projection head is added (:class:`dscl.model.Encoder`). Stage 1 then holds,
in float32 (``optim.amp`` keeps the master weights in float32):

* every frozen backbone parameter once: the online and the momentum encoder share its storage;
* every trained parameter (the backbone's trained tensors, the LoRA adapters, the projection head) four
  times: the online copy, the momentum (EMA) copy, its gradient and SGD's momentum buffer;
* the encoder's buffers (BatchNorm statistics) twice, online and momentum;
* the queue: ``model.queue_size`` x ``model.dim`` float32 features and as many int64 labels (no queue for the
  ``ce`` baseline).

Activations, the data pipeline's batches and the framework's own memory come on top and depend on the batch
size, the image size and ``optim.amp``: ``benchmarks/finetune_cost.py`` measures the whole step.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from dscl.config import Config, ConfigError, load_config, preset_description, preset_names

#: optional package and dscl-lt extra of each backbone family that needs one
FAMILY_EXTRAS: dict[str, tuple[str, str]] = {"timm": ("timm", "timm"), "open_clip": ("open_clip", "open_clip")}
#: what the estimate counts, and where to look for what it leaves out (the listing's last line)
ESTIMATE_NOTE = ("model state = float32 weights of both encoders (frozen ones shared), gradients, SGD momentum and "
                 "the queue; activations come on top: benchmarks/finetune_cost.py measures a whole step")


@dataclass(frozen=True)
class StateEstimate:
    """Sizes of a stage-1 model's state (see the module docstring)."""

    finetune: str
    trained: int  # parameters SGD updates: the backbone's trained tensors (LoRA adapters) and the head
    frozen: int  # backbone parameters kept as loaded (one copy, shared by both encoders)
    buffer_bytes: int  # the encoder's buffers (BatchNorm statistics), held by each encoder
    queue_size: int
    dim: int

    @property
    def queue_bytes(self) -> int:
        """float32 features and int64 labels of the queue."""
        return self.queue_size * (self.dim * 4 + 8)

    @property
    def bytes(self) -> int:
        """Bytes of the whole model state: 4 x (frozen + 4 x trained) + 2 x buffers + the queue."""
        return 4 * (self.frozen + 4 * self.trained) + 2 * self.buffer_bytes + self.queue_bytes

    def describe(self) -> str:
        queue = f", queue {self.queue_size:,} x {self.dim}" if self.queue_size else ""
        frozen = f"{human_count(self.frozen)} frozen + " if self.frozen else ""
        return (f"model state ~{human_bytes(self.bytes)} (weights, grads, optimiser; activations extra): "
                f"{frozen}{human_count(self.trained)} trained parameters ({self.finetune}){queue}")


def human_bytes(n: float) -> str:
    """``8.4 MB``, ``0.62 GB``, ``15 GB``: decimal units, from a tenth of the unit up."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= 0.1 * size:
            v = n / size
            return f"{v:.2f} {unit}" if v < 1 else f"{v:.1f} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


def human_count(n: int) -> str:
    """``85.8 M``, ``0.44 M``, ``12 k``."""
    if n >= 100_000:
        return f"{n / 1e6:.3g} M"
    if n >= 1_000:
        return f"{n / 1e3:.3g} k"
    return str(n)


def weights_needed(cfg: Config) -> str:
    """What ``model.pretrained`` asks for, in words: nothing, a local file, or a hub name / tag and the
    package that downloads it."""
    from dscl.backbones.base import install_hint
    from dscl.backbones.pretrained import _looks_like_path
    from dscl.backbones.spec import parse_backbone_name

    source = cfg.model.pretrained
    if not source:
        return "none set (trains from scratch unless you pass --pretrained PATH)"
    family, name = parse_backbone_name(cfg.model.backbone)
    if _looks_like_path(source):
        return f"the local file {source} (must exist where the run reads it)"
    if family == "builtin":
        return f"{source!r}: built-in backbones load only local files"
    package, extra = FAMILY_EXTRAS[family]
    if source.startswith("hf-hub:"):
        what = f"{source} from the Hugging Face hub"
    else:
        what = f"the {family} pretrained tag {source!r} of {name}"
    return f"{what}, downloaded by {package} on first use into its cache ({install_hint(extra)})"


def missing_extra(cfg: Config) -> str | None:
    """The dscl-lt extra an estimate of ``cfg`` needs and that is not installed (None if nothing is missing)."""
    from dscl.adapters import Finetune
    from dscl.backbones.spec import parse_backbone_name

    family, _ = parse_backbone_name(cfg.model.backbone)
    needs = [FAMILY_EXTRAS[family]] if family in FAMILY_EXTRAS else []
    if Finetune.parse(cfg.model.finetune).mode == "lora":
        needs.append(("peft", "lora"))
    for package, extra in needs:
        if importlib.util.find_spec(package) is None:
            return extra
    return None


def estimate_state(cfg: Config) -> StateEstimate:
    """Sizes of ``cfg``'s stage-1 model state, counted on a backbone built on the meta device (nothing is
    allocated or downloaded; ``model.pretrained`` is not read: the shapes are the architecture's).

    Raises:
        ConfigError: the backbone cannot be built (an unknown name or argument, a missing optional package).
    """
    import torch

    from dscl.adapters import apply_finetune
    from dscl.backbones import build_backbone_from_spec, network_spec
    from dscl.model import Encoder

    with torch.device("meta"):
        backbone = build_backbone_from_spec(network_spec(cfg.model))
        apply_finetune(backbone, cfg.model)
        encoder = Encoder(backbone, dim=cfg.model.dim)
    params = list(encoder.parameters())
    return StateEstimate(
        finetune=cfg.model.finetune,
        trained=sum(p.numel() for p in params if p.requires_grad),
        frozen=sum(p.numel() for p in params if not p.requires_grad),
        buffer_bytes=sum(b.numel() * b.element_size() for b in encoder.buffers()),
        queue_size=cfg.model.queue_size if cfg.loss.loss != "ce" else 0,
        dim=cfg.model.dim,
    )


def estimate_text(cfg: Config) -> str:
    """The memory line of ``dscl presets``: the estimate, or why there is none."""
    extra = missing_extra(cfg)
    if extra is not None:
        return f"model state: install dscl-lt[{extra}] for an estimate"
    try:
        return estimate_state(cfg).describe()
    except ConfigError as exc:
        return f"model state: no estimate ({exc})"


def preset_lines(name: str, *, estimate: bool = True) -> list[str]:
    """What ``dscl presets`` prints under a preset's name: its weights and (``estimate``) its memory."""
    cfg = load_config(name)
    lines = [f"weights: {weights_needed(cfg)}"]
    if estimate:
        lines.append(estimate_text(cfg))
    return lines


def presets_listing(*, estimate: bool = True) -> str:
    """The whole ``dscl presets`` listing: per preset its name and description, then indented its weights
    and memory estimate; with ``estimate``, a last line saying what the estimate counts."""
    out = []
    names = preset_names()
    width = max(len(n) for n in names)
    for name in names:
        out.append(f"{name:<{width}}  {preset_description(name)}")
        out.extend(f"{'':<{width}}    {line}" for line in preset_lines(name, estimate=estimate))
    if estimate:
        out.append(f"\n{ESTIMATE_NOTE}.")
    return "\n".join(out)
