"""Typed configuration: one dataclass per concern, one name and one default per hyperparameter.

Presets live in ``dscl/configs/*.yaml`` (shipped inside the package so an installed ``dscl`` finds
them). A preset is a partial mapping ``{section: {field: value}}`` applied over the defaults below;
command-line overrides ``section.field=value`` are applied over the preset. The fully resolved
config is written to every run directory as ``config.yaml``.

Defaults are the official code's values (METHOD.md A.8 / B) unless a comment says otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A preset, config file or override that cannot be applied (unknown key, bad value)."""


@dataclass
class DataConfig:
    """Which long-tailed dataset to read and how to make it long-tailed."""

    # fmnist-lt | cifar10-lt | cifar100-lt | split | folder
    dataset: str = "fmnist-lt"
    # Folder holding the data; None = $DSCL_DATA, then the dataset's standard location.
    data_root: str | None = None
    # Exponential/step profile for the generated LT sets (fmnist-lt, cifar*-lt). IF = n_max / n_min.
    imbalance_factor: float = 100.0
    # Images of the head class; None = the dataset's convention (fmnist 1000, cifar10 5000, cifar100 500).
    n_max: int | None = None
    profile: str = "exp"  # exp | step
    # Seed choosing which images form the LT subset (0 = the IMBALANCECIFAR convention).
    subset_seed: int = 0
    # Split-file datasets: list files (OLTR txt or BBN json); relative paths resolve against list_dir.
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    list_dir: str | None = None
    # Carve a class-stratified validation split (this fraction of each class, at least 1 image
    # for classes with >= 2) from the training set when the dataset has none; 0 = no carving.
    val_fraction: float = 0.0
    # Image pipeline sizes (global views, patches) in pixels.
    image_size: int = 224
    num_workers: int = -1  # -1 = sized to the machine (min(8, cpus - 1))


@dataclass
class ViewConfig:
    """The DSCL multi-view transform (METHOD.md A.2)."""

    global_scale: tuple[float, float] = (0.08, 1.0)
    num_patches: int = 5  # L; 0 disables PBSD's data work
    patch_size: int = 64
    patch_scale: tuple[float, float] = (0.05, 0.6)  # area fraction of the query view (supp. Table 4)
    patch_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Photometric augmentation strength; False turns colour jitter/grayscale/blur off everywhere.
    photometric: bool = True
    blur: bool = True  # Gaussian blur (pointless at 28 px; presets for tiny images turn it off)


@dataclass
class ModelConfig:
    """Backbone, projection head and the momentum encoder / queue."""

    backbone: str = "resnet50"
    pretrained: str | None = None  # local state-dict path (e.g. ImageNet weights for Places-LT)
    zero_init_residual: bool = True
    dim: int = 128  # embedding dimension
    queue_size: int = 65536  # K
    momentum: float = 0.999  # m of the EMA update
    channels_last: bool = True


@dataclass
class LossConfig:
    """Stage-1 objective: L = L_con + pbsd_weight * L_pbsd."""

    loss: str = "dscl"  # dscl | scl (the paper's SupCon baseline) | ce (cross-entropy baseline)
    alpha: float = 1 / 9  # weight of the own key; official beta = 8 -> alpha = 1/(1+beta)
    temperature: float = 0.07
    pbsd_weight: float = 1.5  # lambda; 0 = no patch work at all


@dataclass
class OptimConfig:
    """Stage-1 optimisation (SGD, linear warm-up then half-cosine, per iteration)."""

    epochs: int = 200
    batch_size: int = 256  # global batch (split over processes)
    base_lr: float = 0.1  # lr = base_lr * global_batch / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 10.0
    amp: str = "none"  # none | bf16 | fp16 (fp16 only on CUDA, with a grad scaler)
    seed: int = 0
    log_every: int = 20  # steps between metrics.jsonl lines
    deterministic: bool = False


@dataclass
class ClassifierConfig:
    """Stage 2: class-balanced linear classifier on the frozen backbone (METHOD.md B)."""

    protocol: str = "cached"  # cached (features extracted once) | official (backbone every epoch)
    # val: keep the epoch with the best class-balanced top-1 on the validation split when there is one
    # (else the last); last: always the last epoch (what `dscl sweep` uses, so its points differ only in
    # the swept value: a small carved split makes the epoch choice itself noisy).
    select: str = "val"
    epochs: int = 40
    batch_size: int = 2048
    lr: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (20, 30)
    gamma: float = 0.1
    # cached protocol: augmented copies of each training image whose features are stored
    # (0 = only the un-augmented centre view).
    augmented_copies: int = 4
    # official protocol: BatchNorm statistics re-estimated (model.train()) as the official code does.
    update_bn: bool = True
    # post-hoc rows of the report
    logit_adjust_tau: float = 1.0
    tau_norm: float = 1.0


@dataclass
class EvalConfig:
    """Many / Medium / Few boundaries (OLTR convention: >many_threshold, <few_threshold)."""

    many_threshold: int = 100
    few_threshold: int = 20


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    preset: str = "fmnist-lt"
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


SECTIONS = ("data", "views", "model", "loss", "optim", "classifier", "eval")


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


def _read_yaml(path: Any, what: str) -> dict[str, Any]:
    try:
        text = path.read_text() if hasattr(path, "read_text") else Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _coerce(value: Any, current: Any, where: str) -> Any:
    """Convert ``value`` to the type of the field's current value (from YAML or a CLI string)."""
    if isinstance(value, str) and not isinstance(current, str):
        value = yaml.safe_load(value) if value.strip() != "" else None
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(current, tuple):
        if isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list like [a, b], got {value!r}")
        if len(current) and all(isinstance(c, float) for c in current):
            return tuple(float(v) for v in value)
        return tuple(value)
    if isinstance(current, str):
        return str(value)
    return value


def apply_mapping(cfg: Config, mapping: dict[str, Any], source: str) -> None:
    """Apply ``{section: {field: value}}`` onto ``cfg`` in place; unknown keys are errors."""
    for section, values in mapping.items():
        if section == "preset":
            cfg.preset = str(values)
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
            where = f"{source}: {section}.{key}"
            field_default = getattr(sub, key)
            if field_default is None:
                # Optional fields: look at the declared default type via the dataclass field.
                setattr(sub, key, _coerce_optional(value, sub, key, where))
            else:
                setattr(sub, key, _coerce(value, field_default, where))


def _coerce_optional(value: Any, sub: Any, key: str, where: str) -> Any:
    declared = {f.name: f.type for f in dataclasses.fields(sub)}[key]
    if isinstance(value, str) and value.lower() in ("none", "null", ""):
        return None
    if "int" in str(declared) and "str" not in str(declared):
        return _coerce(value, 0, where)
    if isinstance(value, (int, float)) and "str" in str(declared):
        return str(value)
    return value


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
) -> Config:
    """Defaults <- preset <- config file <- ``section.key=value`` overrides, validated."""
    cfg = Config()
    name = preset or "fmnist-lt"
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(names)}")
    apply_mapping(cfg, _read_yaml(resources.files("dscl") / "configs" / f"{name}.yaml", "preset"), f"preset {name}")
    cfg.preset = name
    if config_file:
        apply_mapping(cfg, _read_yaml(config_file, "config file"), config_file)
    if overrides:
        apply_mapping(cfg, parse_overrides(overrides), "override")
    validate(cfg)
    return cfg


def config_from_dict(mapping: dict[str, Any], source: str = "config.yaml") -> Config:
    """Rebuild a Config from a saved ``config.yaml`` mapping."""
    cfg = Config()
    apply_mapping(cfg, mapping, source)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that a YAML type check cannot express."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.data.dataset in ("fmnist-lt", "cifar10-lt", "cifar100-lt", "split", "folder"),
         f"data.dataset {cfg.data.dataset!r} is not one of fmnist-lt, cifar10-lt, cifar100-lt, split, folder")
    need(cfg.data.imbalance_factor >= 1, f"data.imbalance_factor must be >= 1, got {cfg.data.imbalance_factor}")
    need(cfg.data.n_max is None or cfg.data.n_max >= 1, f"data.n_max must be >= 1, got {cfg.data.n_max}")
    need(cfg.data.profile in ("exp", "step"), f"data.profile must be exp or step, got {cfg.data.profile!r}")
    need(0 <= cfg.data.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    need(cfg.views.num_patches >= 0, "views.num_patches must be >= 0")
    need(len(cfg.views.patch_scale) == 2 and 0 < cfg.views.patch_scale[0] <= cfg.views.patch_scale[1] <= 1,
         f"views.patch_scale must be [low, high] with 0 < low <= high <= 1, got {list(cfg.views.patch_scale)}")
    need(len(cfg.views.global_scale) == 2 and 0 < cfg.views.global_scale[0] <= cfg.views.global_scale[1] <= 1,
         f"views.global_scale must be [low, high] with 0 < low <= high <= 1, got {list(cfg.views.global_scale)}")
    need(cfg.model.queue_size >= 0, "model.queue_size must be >= 0")
    need(0 <= cfg.model.momentum <= 1, f"model.momentum must be in [0, 1], got {cfg.model.momentum}")
    need(cfg.loss.loss in ("dscl", "scl", "ce"), f"loss.loss must be dscl, scl or ce, got {cfg.loss.loss!r}")
    need(0 < cfg.loss.alpha <= 1, f"loss.alpha must be in (0, 1], got {cfg.loss.alpha}")
    need(cfg.loss.temperature > 0, "loss.temperature must be > 0")
    need(cfg.loss.pbsd_weight >= 0, "loss.pbsd_weight must be >= 0")
    need(cfg.optim.epochs >= 1, "optim.epochs must be >= 1")
    need(cfg.optim.batch_size >= 1, "optim.batch_size must be >= 1")
    need(cfg.optim.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {cfg.optim.warmup_epochs}")
    need(cfg.optim.amp in ("none", "bf16", "fp16"), f"optim.amp must be none, bf16 or fp16, got {cfg.optim.amp!r}")
    need(cfg.classifier.select in ("val", "last"),
         f"classifier.select must be val or last, got {cfg.classifier.select!r}")
    need(cfg.classifier.protocol in ("cached", "official"),
         f"classifier.protocol must be cached or official, got {cfg.classifier.protocol!r}")
    need(cfg.classifier.epochs >= 1, "classifier.epochs must be >= 1")
    need(cfg.eval.few_threshold <= cfg.eval.many_threshold, "eval.few_threshold must be <= eval.many_threshold")


def uses_pbsd(cfg: Config) -> bool:
    """Whether the run trains PBSD (a contrastive loss, a positive weight and at least one patch)."""
    return cfg.loss.loss != "ce" and cfg.loss.pbsd_weight > 0 and cfg.views.num_patches > 0


def method_name(cfg: Config) -> str:
    """The method a config trains, as reports name it: ce, scl, dscl, scl+pbsd or dscl+pbsd."""
    return cfg.loss.loss + ("+pbsd" if uses_pbsd(cfg) else "")


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
