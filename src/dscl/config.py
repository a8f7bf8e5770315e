"""Typed configuration: one dataclass per concern, one name and one default per hyperparameter.

Presets live in ``dscl/configs/*.yaml`` (shipped inside the package so an installed ``dscl`` finds
them). A preset is a partial mapping ``{section: {field: value}}`` applied over the defaults below;
command-line overrides ``section.field=value`` are applied over the preset. The fully resolved
config is written to every run directory as ``config.yaml``.

Defaults are the official code's values (METHOD.md A.8 / B) unless a comment says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dscl.errors import DsclError
from dscl.io import write_text


class ConfigError(DsclError, ValueError):
    """A preset, config file or override that cannot be applied (unknown key, bad value)."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric key: ``low``..``high`` (None = unbounded), each end open or closed."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and not (value > self.low if self.open_low else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def text(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``, ... as the error messages say it."""

        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        low, high = self.low, self.high
        if high is None:
            return f"{'>' if self.open_low else '>='} {num(low)}" if low is not None else "finite"
        if low is None:
            return f"{'<' if self.open_high else '<='} {num(high)}"
        return f"in {'(' if self.open_low else '['}{num(low)}, {num(high)}{')' if self.open_high else ']'}"


def in_range(default: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False,
             open_high: bool = False) -> Any:
    """A numeric field whose value must lie in ``Range(low, high, open_low, open_high)`` (checked by validate)."""
    return field(default=default, metadata={"range": Range(low, high, open_low, open_high)})


def one_of(default: str, choices: tuple[str, ...], notes: Mapping[str, str] | None = None) -> Any:
    """A field whose value must be one of ``choices``; ``notes`` explain some of them in the error message."""
    return field(default=default, metadata={"choices": choices, "notes": dict(notes or {})})


def each_one_of(default: tuple[str, ...], choices: tuple[str, ...]) -> Any:
    """A list field whose every item must be one of ``choices`` (checked by validate)."""
    return field(default=default, metadata={"each_of": choices})


#: the view kinds of a DSCL sample that views.policy_on / views.erasing_on choose from
VIEW_KINDS = ("query", "key", "patches")


@dataclass
class DataConfig:
    """Which long-tailed dataset to read and how to make it long-tailed."""

    dataset: str = one_of("fmnist-lt", ("fmnist-lt", "cifar10-lt", "cifar100-lt", "split", "folder"))
    # Folder holding the data; None = $DSCL_DATA, then the dataset's standard location.
    data_root: str | None = None
    # Exponential/step profile for the generated LT sets (fmnist-lt, cifar*-lt). IF = n_max / n_min.
    imbalance_factor: float = in_range(100.0, 1)
    # Images of the head class; None = the dataset's convention (fmnist 1000, cifar10 5000, cifar100 500).
    n_max: int | None = in_range(None, 1)
    profile: str = one_of("exp", ("exp", "step"))
    # Seed choosing which images form the LT subset (0 = the IMBALANCECIFAR convention); numpy
    # RandomState's seed range.
    subset_seed: int = in_range(0, 0, 2**32 - 1)
    # Generated LT sets: keep only these classes of the source dataset, relabelled 0, 1, ... in the order
    # given (the first is the head of the long-tailed profile); the test set and the held-out validation
    # split keep the same classes. None = every class. E.g. [5, 6, 7, 8, 9]: Fashion-MNIST's last five.
    classes: tuple[int, ...] | None = None
    # Split-file datasets: list files (OLTR txt or BBN json); relative paths resolve against list_dir.
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    list_dir: str | None = None
    # Split-file datasets: class names, one per line (line k = label k; relative to list_dir); None =
    # the label ids "0", "1", ... Stored in the run, so predictions name classes without the dataset.
    class_names_file: str | None = None
    # Generated LT sets (fmnist-lt, cifar*-lt): a class-balanced validation split of this many images
    # per class, drawn from the training images the long-tailed subset did NOT use (so it costs no
    # training data), fixed by subset_seed. None = the dataset's default (fmnist-lt 200, cifar10-lt 500,
    # cifar100-lt 50); 0 = none. A class whose every image is in the subset (CIFAR's head class) gets
    # fewer (there are none left); `dscl data` shows the per-class counts.
    val_per_class: int | None = in_range(None, 0)
    # Carve a class-stratified validation split (this fraction of each class, at least 1 image
    # for classes with >= 2) from the training set when the dataset has none (no val list, no
    # held-out split); 0 = no carving. It costs training data: prefer a held-out or listed split.
    val_fraction: float = in_range(0.0, 0, 1, open_high=True)
    # Image pipeline sizes (global views, patches) in pixels; smaller images leave a zero-sized feature
    # map after the backbones' 4-5 downsamplings.
    image_size: int = in_range(224, 8)
    num_workers: int = in_range(-1, -1)  # -1 = sized to the machine (min(8, cpus - 1))
    # Before stage 1, open the header of every train/val/test image file (seconds for ImageNet-LT's
    # ~186k files on a local disk) so a missing or broken file stops the run before any compute;
    # false skips it on data you trust. `dscl data --check` is the thorough version (full decode).
    check_files: bool = True


@dataclass
class ViewConfig:
    """The DSCL multi-view transform (METHOD.md A.2)."""

    global_scale: tuple[float, float] = (0.08, 1.0)
    num_patches: int = in_range(5, 0)  # L; 0 disables PBSD's data work
    patch_size: int = in_range(64, 1)  # and <= data.image_size (validate)
    patch_scale: tuple[float, float] = (0.05, 0.6)  # area fraction of the query view (supp. Table 4)
    patch_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Photometric augmentation strength; False turns colour jitter/grayscale/blur off everywhere.
    photometric: bool = True
    blur: bool = True  # Gaussian blur (pointless at 28 px; presets for tiny images turn it off)
    # Where the training views are made (same distributions either way): "loader" = per sample in
    # the DataLoader workers (numpy); "device" = batched on the training device (torch; the loader
    # only delivers uint8 images); "auto" = device on CUDA and, on a CPU, for data.image_size <= 32
    # (the 28/32 px presets), where it measured faster (benchmarks/view_speed.py), else loader.
    # See dscl/data/batched_views.py.
    augment_on: str = one_of("auto", ("auto", "loader", "device"),
                             {"loader": "per sample, DataLoader workers", "device": "batched on the training device"})
    # augment_on=device with image files: the loader resizes every image to a square canvas of
    # round(working_scale * image_size) px, from which the crops are resampled (1.5: 336 px at 224;
    # a small crop then has about the detail it had in a ~375 px ImageNet image). Below 1 every crop
    # loses detail.
    working_scale: float = in_range(1.5, 1, 4)
    # The peers' augmentation policies (README "Augmentation recipes"; at most one of the three), applied to
    # the view kinds in policy_on after the crop and flip (patches are cut before) and before the colour
    # augmentation: randaugment = [N, M]: torchvision's RandAugment, N ops of 14 at magnitude M on its 0-30
    # scale (none = off); randaugment_p: the probability that each of the N ops applies (1 = torchvision;
    # 0.5 = timm's RandAugment, which GPaCo and BCL use); trivialaugment: TrivialAugmentWide; autoaugment:
    # AutoAugment's ImageNet policy. Without any, every draw is the same as before policies existed.
    randaugment: tuple[int, int] | None = None
    randaugment_p: float = in_range(1.0, 0, 1, open_low=True)
    trivialaugment: bool = False
    autoaugment: bool = False
    policy_on: tuple[str, ...] = each_one_of(("query", "patches"), VIEW_KINDS)
    # random erasing with this probability (torchvision RandomErasing: area 0.02-0.33, aspect 0.3-3.3, zeros
    # on the normalised view) on the view kinds in erasing_on; 0 = off
    erasing: float = in_range(0.0, 0, 1)
    erasing_on: tuple[str, ...] = each_one_of(("query", "patches"), VIEW_KINDS)


@dataclass
class ModelConfig:
    """Backbone, projection head and the momentum encoder / queue."""

    # a built-in (convnet, resnet32, resnet18, resnet50, resnet152, resnext50_32x4d), timm:<model> (any timm
    # model: pip install 'dscl-lt[timm]') or open_clip:<arch> (a CLIP image tower: 'dscl-lt[open_clip]')
    backbone: str = "resnet50"
    # constructor arguments of the backbone, e.g. {depth: 2, embed_dim: 64} (timm.create_model keywords,
    # open_clip vision_cfg fields; the built-ins take zero_init_residual); on the command line a flow
    # mapping: model.backbone_args='{depth: 2}'
    backbone_args: dict[str, Any] = field(default_factory=dict)
    # the pooled feature stage 2 classifies: avg = mean of the feature map (a ViT's patch tokens: the space
    # the PBSD teacher's ROI pooling lives in); cls = a ViT's class token (a deliberate difference: stage 1's
    # projection head then sees another feature than the PBSD teacher's)
    pool: str = one_of("avg", ("avg", "cls"), {"cls": "a ViT's class token"})
    # weights to start from: a local file (.pth / .pt / .bin / .safetensors, or a folder holding one) in
    # torchvision, timm, open_clip, MoCo / official DSCL or dscl layout, or a hub name timm / open_clip
    # resolve (hf-hub:ORG/NAME; open_clip's tags such as openai)
    pretrained: str | None = None
    # what of the backbone stage 1 trains (README "Fine-tuning a pretrained backbone"): full = every
    # parameter (the paper); lora = low-rank adapters (peft: pip install 'dscl-lt[lora]') on the layers
    # model.lora_targets names, the base frozen; last:K = the last K blocks and the final norm; frozen =
    # nothing (a linear probe through the same pipeline). The projection head always trains; every mode
    # but full needs model.pretrained.
    finetune: str = "full"
    lora_rank: int = in_range(8, 1)  # r of each adapter
    lora_alpha: float = in_range(16.0, 0, open_low=True)  # the adapter's update is scaled by alpha / r
    lora_dropout: float = in_range(0.0, 0, 1, open_high=True)  # dropout on the adapter's input
    # the layers that get adapters, a regular expression peft full-matches against the module names of the
    # backbone's weights (e.g. 'blocks\.\d+\.attn\.qkv'); empty = the family's default (README)
    lora_targets: str | None = None
    # gradient checkpointing of the backbone's blocks (timm / open_clip models that support it): the
    # online encoder keeps only each block's input and recomputes the rest in the backward pass, which trades
    # ~30% more compute for far less activation memory; the gradients are the same (recomputation repeats
    # the forward exactly, dropout's random state included). Refused for a backbone with BatchNorm, whose
    # recomputation would update the running statistics twice.
    grad_checkpointing: bool = False
    zero_init_residual: bool = True  # built-ins only (timm models take their own arguments)
    dim: int = in_range(128, 1)  # embedding dimension
    queue_size: int = in_range(65536, 0)  # K
    momentum: float = in_range(0.999, 0, 1)  # m of the EMA update
    channels_last: bool = True
    # BatchNorm over the L patch slots of the PBSD student: per-slot = each slot normalised with its own
    # batch statistics and the running statistics updated once per slot (the paper's L separate
    # forwards, METHOD.md A.9 step 3); joint = one set of statistics over all L*B patches (see README).
    patch_bn: str = one_of("per-slot", ("per-slot", "joint"),
                           {"per-slot": "the paper's: each patch slot normalised on its own"})
    # roi_align pixel convention of the PBSD teacher: true = pixel-exact boxes (ours); false = the
    # official aligned=False, which shifts every box by half a feature cell (dscl/patches.py).
    roi_aligned: bool = True
    # empty = only keys enqueued so far enter the losses (ours); random = the official start, a full
    # queue of random unit features with labels uniform in [0, num_classes) (METHOD.md A.4, C.2 item 1).
    queue_init: str = one_of("empty", ("empty", "random"), {"random": "the official start"})


@dataclass
class LossConfig:
    """Stage-1 objective: L = L_con + pbsd_weight * L_pbsd."""

    # dscl | scl (the paper's SupCon baseline) | ce (cross-entropy baseline)
    loss: str = one_of("dscl", ("dscl", "scl", "ce"))
    # weight of the own key; official beta = 8 -> alpha = 1/(1+beta)
    alpha: float = in_range(1 / 9, 0, 1, open_low=True)
    temperature: float = in_range(0.07, 0, open_low=True)
    pbsd_weight: float = in_range(1.5, 0)  # lambda; 0 = no patch work at all


@dataclass
class OptimConfig:
    """Stage-1 optimisation (SGD, linear warm-up then half-cosine, per iteration)."""

    epochs: int = in_range(200, 1)
    batch_size: int = in_range(256, 1)  # global batch (split over processes)
    base_lr: float = in_range(0.1, 0, open_low=True)  # lr = base_lr * global_batch / 256
    momentum: float = in_range(0.9, 0, 1, open_high=True)
    weight_decay: float = in_range(5e-4, 0)
    warmup_epochs: float = in_range(10.0, 0)
    amp: str = one_of("none", ("none", "bf16", "fp16"))  # fp16 only on CUDA, with a grad scaler
    seed: int = in_range(0, 0, 2**32 - 1)  # numpy's global seed range
    log_every: int = in_range(20, 1)  # steps between metrics.jsonl lines
    deterministic: bool = False
    # also save stage 1 inside an epoch every this many minutes (0: only at epoch ends and on SIGTERM /
    # SIGUSR1); under torchrun the save happens at the next log step
    checkpoint_every_minutes: float = in_range(0.0, 0)
    # learning rate of the backbone's trained tensors relative to the projection head's (1 = the same, the
    # paper); e.g. 0.1 fine-tunes a pretrained backbone gently while the new head learns at the full rate
    backbone_lr: float = in_range(1.0, 0, open_low=True)
    # layer-wise learning-rate decay: block i of n trains at layer_decay^(n - i) times the backbone's rate
    # (timm's grouping for timm models); 1 = off
    layer_decay: float = in_range(1.0, 0, 1, open_low=True)


@dataclass
class ClassifierConfig:
    """Stage 2: class-balanced linear classifier on the frozen backbone (METHOD.md B)."""

    # cached (features extracted once) | official (backbone every epoch)
    protocol: str = one_of("cached", ("cached", "official"))
    # val: keep the epoch with the best class-balanced top-1 on the validation split when there is one
    # (else the last); last: always the last epoch (what `dscl sweep` uses, so its points differ only in
    # the swept value: a small carved split makes the epoch choice itself noisy).
    select: str = one_of("val", ("val", "last"))
    epochs: int = in_range(40, 1)
    batch_size: int = in_range(2048, 1)
    lr: float = in_range(10.0, 0, open_low=True)
    momentum: float = in_range(0.9, 0, 1, open_high=True)
    weight_decay: float = in_range(0.0, 0)
    milestones: tuple[int, ...] = (20, 30)
    gamma: float = in_range(0.1, 0, 1, open_low=True)
    # cached protocol: augmented copies of each training image whose features are stored
    # (0 = only the un-augmented centre view).
    augmented_copies: int = in_range(4, 0)
    # cached protocol: z-score every feature dimension with the mean/std of the clean training features
    # before training (folded back into the saved layer, which then takes raw features). Frozen
    # contrastive features have very uneven scales per dimension; SGD on them converges badly unscaled.
    standardize: bool = False
    # official protocol: BatchNorm statistics re-estimated (model.train()) as the official code does.
    update_bn: bool = True
    # the augmentation policy and random erasing of the augmented training view (cached protocol's copies,
    # official protocol's epochs); same meaning as the views.* keys of the same names (GPaCo and BCL train
    # their classifier on RandAugment views)
    randaugment: tuple[int, int] | None = None
    randaugment_p: float = in_range(1.0, 0, 1, open_low=True)
    trivialaugment: bool = False
    autoaugment: bool = False
    erasing: float = in_range(0.0, 0, 1)
    # post-hoc rows of the report
    logit_adjust_tau: float = in_range(1.0, 0)
    tau_norm: float = in_range(1.0, 0)


@dataclass
class EvalConfig:
    """Many / Medium / Few boundaries (OLTR convention: >many_threshold, <few_threshold)."""

    many_threshold: int = in_range(100, 0)
    few_threshold: int = in_range(20, 0)


#: The trackers of ``log.trackers`` (dscl/trackers.py); every one but jsonl is an optional extra.
TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")


@dataclass
class LogConfig:
    """Where the run's records go besides ``metrics.jsonl`` (README "Experiment trackers"). Changes
    nothing the run computes: every key may change on --resume, in classify and in evaluate."""

    # jsonl = metrics.jsonl, always written; tensorboard (RUN/tensorboard), wandb and mlflow are optional
    # extras: pip install 'dscl-lt[tensorboard]' (or [wandb], [mlflow], [trackers] for all three)
    trackers: tuple[str, ...] = each_one_of(("jsonl",), TRACKERS)
    project: str = "dscl"  # the W&B project and the MLflow experiment
    # W&B group / MLflow tag "group"; None = the `dscl compare` / `dscl sweep` folder the run is in (none
    # for a run of its own), so a comparison's methods sit side by side
    group: str | None = None
    # MLflow tracking URI, e.g. sqlite:///mlflow.db or http://host:5000; None = $MLFLOW_TRACKING_URI, else
    # MLflow's default (sqlite:///mlflow.db in the working directory for MLflow 3)
    mlflow_uri: str | None = None


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    preset: str = "fmnist-lt"
    # default | official: `official` (--profile official) applies PROFILES["official"] over the preset,
    # the official code's conventions in both stages (README "Deliberate differences").
    profile: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


SECTIONS = ("data", "views", "model", "loss", "optim", "classifier", "eval", "log")

#: Named sets of conventions applied over a preset (before a config file and overrides, which still
#: win). ``official`` restores the official code's behaviour wherever ours deliberately differs
#: (README "Deliberate differences"); hyperparameters stay the preset's. ``gpaco`` and ``bcl`` are the
#: peers' augmentation recipes (README "Augmentation recipes"; not the paper's), in both stages:
#: - GPaCo (dvlab-research/Parametric-Contrastive-Learning, GPaCo/LT/paco_lt.py, sh/LT/ImageNetLT_train_R50.sh:
#:   --aug randcls_randclsstack --randaug_n 2 --randaug_m 10): both contrastive views get timm's
#:   'rand-n2-m10-mstd0.5' (each op p 0.5; m 10 of timm's 10 = torchvision's 30 of 30), and both feed its
#:   classifier; blur stays on (its second view has it);
#: - BCL (FlamieZhu/Balanced-Contrastive-Learning, main.py: randaug_n 2, randaug_m 10; README: the 57.8
#:   ResNeXt-50 row is cl_views rand-rand): the same RandAugment on both contrastive views and on the
#:   classifier branch's view; its SimCLR views have no blur.
_PEER_RANDAUGMENT = {"randaugment": [2, 30], "randaugment_p": 0.5}
#: the profiles under which a preset is still the paper's configuration (its ``expected`` numbers apply)
PAPER_PROFILES = ("default", "official")
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "official": {
        "model": {"patch_bn": "per-slot", "roi_aligned": False, "queue_init": "random"},
        "classifier": {"protocol": "official", "standardize": False, "update_bn": True},
    },
    "gpaco": {
        "views": {**_PEER_RANDAUGMENT, "policy_on": ["query", "key", "patches"]},
        "classifier": dict(_PEER_RANDAUGMENT),
    },
    "bcl": {
        "views": {**_PEER_RANDAUGMENT, "policy_on": ["query", "key", "patches"], "blur": False},
        "classifier": dict(_PEER_RANDAUGMENT),
    },
}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("dscl") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """First sentence of the comment block that opens the preset's YAML file ("" if it has none)."""
    text = (resources.files("dscl") / "configs" / f"{name}.yaml").read_text()
    comment: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    joined = " ".join(c for c in comment if c)
    match = re.match(r"(.+?\.)(\s|$)", joined)
    return match.group(1) if match else joined


def yaml_error_text(path: Any, exc: yaml.YAMLError) -> str:
    """``FILE: line N, column M: <problem> (<context> at line K, column L)``: one line (PyYAML's own
    message spans several, with a caret drawing); lines and columns count from 1, as editors do."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    text = f"{path}: line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, at = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and at is not None and (at.line, at.column) != (mark.line, mark.column):
        text += f" ({' '.join(context.split())} at line {at.line + 1}, column {at.column + 1})"
    return text


def _read_yaml(path: Any, what: str) -> dict[str, Any]:
    try:
        text = path.read_text() if hasattr(path, "read_text") else Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); give a YAML "
                          f"file") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_text(path, exc)) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The ``{section: {key: value}}`` mapping of a YAML config file (``--config FILE``)."""
    return _read_yaml(path, "config file")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(section_type: type) -> dict[str, Any]:
    """The resolved type of every field of a config section (``typing.get_type_hints``, cached)."""
    if section_type not in _FIELD_TYPES:
        _FIELD_TYPES[section_type] = typing.get_type_hints(section_type)
    return _FIELD_TYPES[section_type]


def _empty_text(where: str, key: str, optional: bool) -> str:
    """The message for an empty value: it would otherwise read as null and silently clear the key."""
    if optional:
        return (f"{where} is empty; write {key}=none (in a YAML file: {key.split('.')[-1]}: null) to clear it, "
                f"or give a value")
    return f"{where} is empty; give a value (this key cannot be cleared)"


def _yaml_value(text: str, where: str) -> Any:
    """A CLI / YAML string read as a YAML scalar or list (``5``, ``true``, ``[0.1, 0.5]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{where}: {text!r} is not a value dscl can read (e.g. 5, 0.2, true, [0.1, 0.5])") from None


def _yaml_number(text: str) -> Any:
    """YAML's reading of a string Python's int() / float() refused (``.inf``, ``0x10``, ``null``); the
    string itself when it is not YAML at all (the caller then says which number it needs)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _float(value: Any, where: str) -> float | None:
    """Every spelling Python's float() takes (``1e-2``, ``5E-4``, ``.5``, ``1_000.5``, ``inf``), plus YAML's
    (``.inf``): PyYAML follows YAML 1.1, which reads ``1e-2`` (no dot) as a string."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            value = _yaml_number(value)
            if value is None:  # null: validate says the key must be set
                return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    return float(value)


def _int(value: Any, where: str) -> int | None:
    """An integer, or a number spelling of one (``1e3``, ``2.0``); ``2.5`` and ``1e400`` are refused."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            number: Any = float(value.strip())
        except ValueError:
            number = _yaml_number(value)
            if number is None:
                return None
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        if not isinstance(number, int) or isinstance(number, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return number
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """A mapping field (``model.backbone_args``) from YAML or a CLI flow mapping ``{depth: 2, embed_dim: 64}``;
    null / none is the empty mapping (no arguments)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping like {{depth: 2, embed_dim: 64}} (on the command line quote it: "
                          f"'model.backbone_args={{depth: 2}}'), got {value!r}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: keys must be names, got {bad[0]!r}")
    return {k: _plain(v) for k, v in value.items()}


def _coerce(value: Any, tp: Any, where: str, key: str | None = None) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the field type ``tp``; ``key`` (``section.key``)
    names it in the hint of an empty value.

    ``none`` / ``null`` clear an optional field; an empty string is refused (it used to clear silently:
    ``data.n_max=`` meant "no cap"); strings for numeric fields are read as Python numbers, other
    non-string fields as YAML (``true``, ``[0.1, 0.5]``); a missing value (null) stays None.
    """
    inner, optional = _unwrap_optional(tp)
    if isinstance(value, str) and value.strip() == "":
        raise ConfigError(_empty_text(where, key or where, optional))
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    if isinstance(value, str) and inner not in (str, int, float):
        value = _yaml_value(value, where)
    if typing.get_origin(inner) is dict:
        return _mapping(value, where)
    if value is None:
        return None
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if inner is int:
        return _int(value, where)
    if inner is float:
        return _float(value, where)
    if typing.get_origin(inner) is tuple:
        if isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list like [a, b], got {value!r}")
        items = [a for a in typing.get_args(inner) if a is not Ellipsis]
        if items and all(a is float for a in items):
            return tuple(_float(v, f"{where}[{i}]") for i, v in enumerate(value))
        if items and all(a is int for a in items):
            return tuple(_int(v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if inner is str:
        return str(value)
    return value


def apply_mapping(cfg: Config, mapping: dict[str, Any], source: str) -> None:
    """Apply ``{section: {field: value}}`` onto ``cfg`` in place; unknown keys are errors."""
    for section, values in mapping.items():
        if section == "preset":
            cfg.preset = str(values)
            continue
        if section == "profile":
            if values not in PROFILES:
                raise ConfigError(f"{source}: unknown profile {values!r}; valid profiles: {', '.join(PROFILES)}")
            cfg.profile = str(values)
            continue
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown config section {section!r}; valid sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        sub = getattr(cfg, section)
        valid = [f.name for f in dataclasses.fields(sub)]
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}; valid keys of {section}: {', '.join(valid)}"
                )
            setattr(sub, key, _coerce(value, field_types(type(sub))[key], f"{source}: {section}.{key}",
                                     f"{section}.{key}"))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.epochs=5", "loss.alpha=0.2"]`` -> ``{"optim": {"epochs": "5"}, ...}``."""
    mapping: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(
                f"override {item!r} must look like section.key=value (e.g. optim.epochs=5)"
            )
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        mapping.setdefault(section.strip(), {})[name.strip()] = value
    return mapping


def load_config(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
) -> Config:
    """Defaults <- preset <- profile (:data:`PROFILES`) <- config file <- ``section.key=value``
    overrides, validated."""
    cfg = Config()
    name = preset or "fmnist-lt"
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(names)}")
    mapping = _read_yaml(resources.files("dscl") / "configs" / f"{name}.yaml", "preset")
    mapping.pop("expected", None)  # metadata (the paper's numbers), not configuration
    apply_mapping(cfg, mapping, f"preset {name}")
    cfg.preset = name
    if profile is not None:  # apply_mapping checks the name first, then sets the profile's keys
        apply_mapping(cfg, {"profile": profile, **PROFILES.get(profile, {})}, f"profile {profile}")
    if config_file:
        apply_mapping(cfg, _read_yaml(config_file, "config file"), config_file)
    if overrides:
        apply_mapping(cfg, parse_overrides(overrides), "override")
    validate(cfg)
    return cfg


# Keys that say where the data lives or how a run is executed, not what it computes: a run that
# changes only these still "uses its preset unchanged" (see preset_changes).
NEUTRAL_KEYS = frozenset({
    "data.data_root", "data.list_dir", "data.num_workers", "data.check_files", "model.pretrained",
    "optim.seed", "optim.log_every", "optim.amp", "optim.deterministic", "views.augment_on",
    *(f"log.{f.name}" for f in dataclasses.fields(LogConfig)),
})


def preset_expected(name: str) -> dict[str, Any] | None:
    """The ``expected:`` block of a shipped preset: the paper's published numbers for the configuration
    it encodes (``source``, ``top1``, ``many``, ``medium``, ``few``; None where not published or not
    verified), or None when the preset has none."""
    if name not in preset_names():
        return None
    data = _read_yaml(resources.files("dscl") / "configs" / f"{name}.yaml", "preset").get("expected")
    return dict(data) if isinstance(data, dict) else None


def preset_changes(cfg: Config) -> list[str]:
    """``section.key`` names where ``cfg`` differs from its preset (under its profile), ignoring
    :data:`NEUTRAL_KEYS`.

    An empty list means the run is the preset's configuration, so the preset's ``expected`` numbers
    apply to it. A preset that no longer exists counts as changed (``["preset"]``). The peers' recipes
    (``--profile gpaco`` / ``bcl``) are not the paper's: their keys count as changes.
    """
    if cfg.preset not in preset_names():
        return ["preset"]
    ref = load_config(cfg.preset, profile=cfg.profile if cfg.profile in PAPER_PROFILES else None).to_dict()
    mine = cfg.to_dict()
    changed = []
    for section in SECTIONS:
        for key, value in mine.get(section, {}).items():
            name = f"{section}.{key}"
            if name not in NEUTRAL_KEYS and ref.get(section, {}).get(key) != value:
                changed.append(name)
    return changed


def config_from_file(path: str | Path) -> Config:
    """The Config of a saved ``config.yaml`` (a run's fully resolved configuration)."""
    return config_from_dict(_read_yaml(Path(path), "run config"), str(path))


def config_from_dict(mapping: dict[str, Any], source: str = "config.yaml") -> Config:
    """Rebuild a Config from a saved ``config.yaml`` mapping."""
    cfg = Config()
    apply_mapping(cfg, mapping, source)
    validate(cfg)
    return cfg


def _choice_text(choices: tuple[str, ...], notes: Mapping[str, str]) -> str:
    """``a, b (note) or c``."""
    named = [f"{c} ({notes[c]})" if c in notes else c for c in choices]
    return named[0] if len(named) == 1 else f"{', '.join(named[:-1])} or {named[-1]}"


def _check_field(key: str, value: Any, f: dataclasses.Field, tp: Any) -> None:
    """``value`` inside the field's declared range / choices; the message names the key and what is allowed."""
    allowed = f.metadata.get("range")
    if allowed is not None:
        inner, optional = _unwrap_optional(tp)
        if value is None:
            if optional:
                return
            raise ConfigError(f"{key} must be set (a number {allowed.text()}), got null")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (ok and allowed.contains(value)):
            kind = "an integer" if inner is int else "a number"
            raise ConfigError(f"{key} must be {kind} {allowed.text()}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} must be {_choice_text(choices, f.metadata['notes'])}, got {value!r}")
    each = f.metadata.get("each_of")
    if each is not None and not (isinstance(value, (list, tuple))
                                 and all(isinstance(v, str) and v in each for v in value)):
        shown = list(value) if isinstance(value, (list, tuple)) else value
        raise ConfigError(f"{key} must list only {_choice_text(each, {})} (e.g. [{each[-1]}]), got {shown!r}")


def _check_fields(cfg: Config) -> None:
    """Every key inside the range or choices declared with its field (:func:`in_range`, :func:`one_of`)."""
    for section in SECTIONS:
        sub = getattr(cfg, section)
        types_ = field_types(type(sub))
        for f in dataclasses.fields(sub):
            _check_field(f"{section}.{f.name}", getattr(sub, f.name), f, types_[f.name])


def _check_backbone(model: ModelConfig) -> None:
    """``model.backbone`` names a family and a model (``timm:`` / ``open_clip:`` names are checked by their
    package when the backbone is built); a built-in takes neither ``model.pool=cls`` nor other arguments."""
    # imported here: the backbones package imports this module (and torch)
    from dscl.backbones.builtin import BACKBONES, BUILTIN_ARGS
    from dscl.backbones.spec import parse_backbone_name

    family, name = parse_backbone_name(model.backbone)
    if family != "builtin":
        return
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone={name!r} is not a built-in backbone ({', '.join(BACKBONES)}); for a timm "
                          "or open_clip model write timm:<name> or open_clip:<arch>")
    if model.pool != "avg":
        raise ConfigError(f"model.pool={model.pool} needs a class token (a ViT: timm:... or open_clip:...); the "
                          f"built-in {name} pools avg")
    unknown = sorted(set(model.backbone_args) - set(BUILTIN_ARGS))
    if unknown:
        raise ConfigError(f"model.backbone_args: the built-in {name} takes only {', '.join(BUILTIN_ARGS)}, got "
                          f"{', '.join(unknown)}")


def _check_finetune(cfg: Config) -> None:
    """``model.finetune`` is full, lora, frozen or last:K (K >= 1); every mode but full starts from weights."""
    mode = cfg.model.finetune
    head, _, k = mode.partition(":")
    if mode not in ("full", "lora", "frozen") and not (head == "last" and k.isdigit() and int(k) >= 1):
        raise ConfigError(f"model.finetune={mode!r} is not a fine-tuning mode; use full (every parameter), lora "
                          "(low-rank adapters), last:K (the last K blocks, e.g. last:2) or frozen (a linear probe)")
    if mode != "full" and not cfg.model.pretrained:
        raise ConfigError(f"model.finetune={mode} keeps pretrained weights, but model.pretrained is not set; give "
                          "the weights to start from (a file or a hub name), or use model.finetune=full")


def validate(cfg: Config) -> None:
    """Range checks that a YAML type check cannot express; every message names the key.

    Each field's own range or choices are declared with it (:func:`in_range`, :func:`one_of`); the checks
    below relate several keys or look inside a list.
    """
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    _check_fields(cfg)
    _check_backbone(cfg.model)
    _check_finetune(cfg)
    classes = cfg.data.classes
    need(classes is None or (len(classes) >= 2 and len(set(classes)) == len(classes)
                             and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes)),
         f"data.classes must list at least two different class ids >= 0 (e.g. [5, 6, 7, 8, 9]), got {classes!r}")
    need(classes is None or cfg.data.dataset in ("fmnist-lt", "cifar10-lt", "cifar100-lt"),
         f"data.classes picks classes of a generated long-tailed set (fmnist-lt, cifar10-lt, cifar100-lt); for "
         f"data.dataset={cfg.data.dataset}, list only the classes you want in the split files / folders")
    need(cfg.views.num_patches == 0 or cfg.views.patch_size <= cfg.data.image_size,
         f"views.patch_size ({cfg.views.patch_size}) must be <= data.image_size ({cfg.data.image_size}): "
         f"patches are cut from the image (or set views.num_patches=0)")
    need(len(cfg.views.patch_ratio) == 2 and 0 < cfg.views.patch_ratio[0] <= cfg.views.patch_ratio[1],
         f"views.patch_ratio must be [low, high] with 0 < low <= high, got {list(cfg.views.patch_ratio)}")
    need(all(isinstance(m, int) and m >= 1 for m in cfg.classifier.milestones)
         and list(cfg.classifier.milestones) == sorted(cfg.classifier.milestones),
         f"classifier.milestones must be increasing epochs >= 1 (e.g. [20, 30]), got {list(cfg.classifier.milestones)}")
    need(len(cfg.views.patch_scale) == 2 and 0 < cfg.views.patch_scale[0] <= cfg.views.patch_scale[1] <= 1,
         f"views.patch_scale must be [low, high] with 0 < low <= high <= 1, got {list(cfg.views.patch_scale)}")
    need(len(cfg.views.global_scale) == 2 and 0 < cfg.views.global_scale[0] <= cfg.views.global_scale[1] <= 1,
         f"views.global_scale must be [low, high] with 0 < low <= high <= 1, got {list(cfg.views.global_scale)}")
    need(not (cfg.classifier.standardize and cfg.classifier.protocol == "official"),
         "classifier.standardize=true needs classifier.protocol=cached (the official protocol re-runs the "
         "backbone every epoch, so there are no fixed features to standardise)")
    for section in ("views", "classifier"):
        _check_policy(getattr(cfg, section), section)
    need(cfg.eval.few_threshold <= cfg.eval.many_threshold, "eval.few_threshold must be <= eval.many_threshold")
    need(bool(cfg.log.project.strip()), "log.project must not be empty (it names the W&B project / MLflow experiment)")


def _check_policy(sub: Any, section: str) -> None:
    """At most one augmentation policy per section, and RandAugment's [N, M] in range."""
    chosen = [f"{section}.{k}" for k, on in (("randaugment", sub.randaugment is not None),
                                             ("trivialaugment", sub.trivialaugment), ("autoaugment", sub.autoaugment))
              if on]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} are both set; choose one augmentation policy (set the others to "
                          f"none / false)")
    ra = sub.randaugment
    if ra is not None and not (len(ra) == 2 and 1 <= ra[0] <= 10 and 0 <= ra[1] <= 30):
        raise ConfigError(f"{section}.randaugment must be [N, M]: N ops in [1, 10] and magnitude M in [0, 30] "
                          f"(torchvision's scale; e.g. [2, 9]), or none; got {list(ra)}")


def flat_config(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every key, plus ``"preset": name``."""
    out: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def uses_pbsd(cfg: Config) -> bool:
    """Whether the run trains PBSD (a contrastive loss, a positive weight and at least one patch)."""
    return cfg.loss.loss != "ce" and cfg.loss.pbsd_weight > 0 and cfg.views.num_patches > 0


def method_name(cfg: Config) -> str:
    """The method a config trains, as reports name it: ce, scl, dscl, scl+pbsd or dscl+pbsd."""
    return cfg.loss.loss + ("+pbsd" if uses_pbsd(cfg) else "")


def dump_config(cfg: Config, path: str | Path) -> Path:
    """``config.yaml``: the fully resolved configuration, written atomically."""
    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
