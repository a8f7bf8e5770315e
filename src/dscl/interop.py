"""Checkpoints in and out: import checkpoints trained elsewhere, export runs for other tools.

Import (:func:`import_checkpoint`, ``dscl import``) turns an external checkpoint into a finished
stage-1 run directory (plus a stage-2 classifier when the file holds one), so ``classify``,
``evaluate``, ``analyze``, ``predict`` and ``export`` work on it. Formats (:data:`IMPORT_FORMATS`,
detected from the keys; ``module.`` prefixes of DataParallel/DDP are always stripped):

* ``official``: the official DSCL / MoCo-v2 stage-1 file (``checkpoint.pth.tar``): ``state_dict`` with
  ``module.encoder_q.<torchvision ResNet keys>``, the projection head as ``encoder_q.fc.0`` / ``.fc.2``,
  ``encoder_k.*`` (momentum encoder), ``queue`` (dim x K), ``main_label_queue`` (1 x K), ``queue_ptr``.
  The queue is NOT imported: the official queue starts as random features with random labels in
  [0, 1000) and a checkpoint cannot tell which entries are still random; it only matters to continue
  stage-1 training, and the imported run starts with an empty queue (this package's convention,
  in which only filled entries enter the losses).
* ``torchvision``: a plain torchvision (or timm) ResNet state dict, e.g. ImageNet weights or the
  official stage-2 file (``linear_best.pth.tar``: the ResNet keys plus ``fc.weight`` / ``fc.bias``).
  The backbone is imported; an ``fc`` whose shape fits the dataset's classes becomes the stage-2
  classifier (``checkpoints/classifier.pt``), any other ``fc`` is ignored. There is no projection
  head in such a file, so the run's head is freshly initialised (``gradient-ratio`` refuses it).
* ``dscl``: this package's own ``checkpoints/last.pt`` (or ``classifier.pt``) from another machine.

Nothing is written unless every backbone weight is found with the right shape; missing and
unexpected keys are listed. Export (:func:`export_run`, ``dscl export``): TorchScript (images in,
logits out, preprocessing inside), ONNX (the optional ``export`` extra) and a state dict in the
torchvision / timm key layout.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dscl import dist
from dscl.backbones import BACKBONES, build_backbone
from dscl.config import Config, dump_config, method_name
from dscl.errors import UsageError
from dscl.inference import ImageClassifier, Predictor
from dscl.io import atomic_write
from dscl.model import DSCLModel, Encoder
from dscl.rng import rng_state, seed_everything
from dscl.run import (
    CheckpointError,
    ClassifierState,
    DataMeta,
    MetricsLog,
    RunFacts,
    Stage1State,
    check_output_file,
    checkpoint_stage,
    damaged_checkpoint,
    prepare_run_dir,
    read_weights_only,
    save_classifier,
    save_stage1,
    state_from_dict,
)

IMPORT_FORMATS: tuple[str, ...] = ("auto", "official", "torchvision", "dscl")
EXPORT_FORMATS: tuple[str, ...] = ("torchscript", "onnx", "state-dict")
# Backbones whose keys are torchvision's (and timm's): their state-dict export loads into torchvision.
TORCHVISION_LAYOUT: frozenset[str] = frozenset({"resnet18", "resnet50", "resnet152", "resnext50_32x4d"})
ONNX_OPSET = 18  # first opset the torch.onnx (dynamo) exporter targets; onnxruntime >= 1.14 runs it
_OFFICIAL_QUEUE_KEYS = ("queue", "main_label_queue", "queue_ptr")
_SHOWN = 8  # keys listed per category in messages


# ------------------------------------------------------------------------------------------------
# reading external files


def _first(keys: list[str], n: int = _SHOWN) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_external(path: str | Path) -> Any:
    """A checkpoint trained elsewhere, read like dscl's own (:func:`dscl.run.read_weights_only`: tensors,
    containers, numbers, strings and numpy's RNG arrays) plus two classes of plain data other training
    code saves next to the weights: torch's version string (a str subclass) and ``argparse.Namespace``
    (a script's ``args``; its attributes are read with the same restrictions). Any other pickled object is
    refused, because unpickling an untrusted file can run arbitrary code.
    """
    import argparse

    problem = _not_a_checkpoint(Path(path))
    if problem:
        raise CheckpointError(problem)
    return read_weights_only(path, allowed=[torch.torch_version.TorchVersion, argparse.Namespace])


def _not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` is an export of a model, not a checkpoint of weights, in one complete sentence (the files
    users mistake for one), before torch's messages about them; None otherwise (an empty or cut-off file:
    :func:`dscl.run.read_weights_only` says so)."""
    import zipfile

    export = ("a compiled model, not a checkpoint of weights, so it cannot be imported; import the run's weights "
              "instead: dscl export --run RUN --format state-dict --out FILE.pt, then dscl import --checkpoint FILE.pt")
    if not path.is_file():
        return None  # read_weights_only says so
    if path.suffix.lower() == ".onnx":
        return f"{path} is an ONNX export: {export}"
    if damaged_checkpoint(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return None  # an older pickle-only torch file, or not torch at all
    # a TorchScript archive holds the compiled code (code/...) and its constants.pkl; a torch.save one neither
    if any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in names):
        return f"{path} is a TorchScript export (dscl export --format torchscript, torch.jit.save): {export}"
    return None


def _tensor_dict(obj: Any) -> dict[str, Tensor] | None:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    return None


def _strip_module(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def detect_format(obj: Any) -> str:
    """``official``, ``torchvision`` or ``dscl`` for a loaded checkpoint (see the module docstring)."""
    if isinstance(obj, Mapping) and checkpoint_stage(obj) is not None:
        return "dscl"
    if isinstance(obj, Mapping) and obj.get("format") == "dscl-state-dict":  # `dscl export --format state-dict`
        return "dscl"
    state = _state_dict_of(obj)
    if any(k.startswith("encoder_q.") for k in state):
        return "official"
    return "torchvision"


def _state_dict_of(obj: Any) -> dict[str, Tensor]:
    direct = _tensor_dict(obj)
    if direct is not None:
        return _strip_module(direct)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state", "net"):
            inner = _tensor_dict(obj.get(key))
            if inner is not None:
                return _strip_module(inner)
    raise CheckpointError("the checkpoint holds no state dict of tensors (looked at the file itself and at "
                          "'state_dict', 'model', 'model_state', 'net')")


# ------------------------------------------------------------------------------------------------
# mapping into this package's model


@dataclass
class ImportResult:
    """What :func:`import_checkpoint` did (the CLI prints it)."""

    format: str
    out: Path
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    classifier: bool = False


@dataclass
class _Mapped:
    backbone: dict[str, Tensor]
    head: dict[str, Tensor] | None = None
    momentum: dict[str, Tensor] | None = None
    queue: dict[str, Tensor] | None = None
    fc: dict[str, Tensor] | None = None
    feature_stats: tuple[Tensor, Tensor] | None = None  # standardisation folded into fc (dscl classifiers)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _split_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _map_official(state: dict[str, Tensor]) -> _Mapped:
    q, k = _split_prefix(state, "encoder_q."), _split_prefix(state, "encoder_k.")
    m = _Mapped(backbone={n: v for n, v in q.items() if not n.startswith("fc.")})
    head = {n.replace("fc.", "", 1): v for n, v in q.items() if n.startswith(("fc.0.", "fc.2."))}
    m.head = head or None
    if k:
        m.momentum = {("head." + n[len("fc."):] if n.startswith("fc.") else "backbone." + n): v for n, v in k.items()}
    m.unexpected = [n for n in state if not n.startswith(("encoder_q.", "encoder_k."))
                    and n not in _OFFICIAL_QUEUE_KEYS]
    m.unexpected += [f"encoder_q.{n}" for n in q if n.startswith("fc.") and not n.startswith(("fc.0.", "fc.2."))]
    if any(n in state for n in _OFFICIAL_QUEUE_KEYS):
        size = tuple(state["queue"].shape) if "queue" in state else "?"
        m.notes.append(f"queue {size} not imported (the official queue may still hold its random initial "
                       "entries and labels); the run's queue starts empty")
    if m.head is None:
        m.notes.append("no projection head (encoder_q.fc.0 / fc.2) in the file: the head is freshly initialised")
    if not k:
        m.notes.append("no momentum encoder (encoder_k.*) in the file: it starts as a copy of encoder_q")
    return m


def _map_torchvision(state: dict[str, Tensor]) -> _Mapped:
    state = {_strip_backbone(k): v for k, v in state.items()}
    m = _Mapped(backbone={n: v for n, v in state.items() if not n.startswith("fc.")})
    fc = {n[len("fc."):]: v for n, v in state.items() if n.startswith("fc.")}
    if fc:
        if set(fc) == {"weight", "bias"}:
            m.fc = fc
        else:
            m.unexpected += [f"fc.{n}" for n in fc]
    m.notes.append("no projection head in a torchvision state dict: the head is freshly initialised and the "
                   "momentum encoder is a copy of the imported backbone")
    return m


def _strip_backbone(key: str) -> str:
    return key[len("backbone."):] if key.startswith("backbone.") else key


def _map_dscl(obj: Mapping[str, Any]) -> _Mapped:
    if obj.get("format") == "dscl-state-dict":
        # both key layouts are this package's backbone keys: the torchvision ResNets keep torchvision's names
        stats = obj.get("feature_stats")
        m = _Mapped(backbone=dict(obj["backbone"]), fc=dict(obj["fc"]),
                    feature_stats=(stats["mean"], stats["std"]) if stats else None)
        m.notes.append(f"a dscl state-dict export ({obj.get('architecture')}, {len(obj.get('class_names') or [])} "
                       f"classes): backbone and classifier imported, no projection head (freshly initialised)")
        return m
    state = state_from_dict(obj)
    if isinstance(state, ClassifierState):
        m = _Mapped(backbone=dict(state.backbone), fc=dict(state.fc), feature_stats=state.feature_stats)
        m.notes.append("a dscl classifier.pt: backbone and classifier imported, no projection head "
                       "(freshly initialised)")
        return m
    model = dict(state.model)
    m = _Mapped(backbone=_split_prefix(model, "online.backbone."), head=_split_prefix(model, "online.head.") or None,
                momentum=_split_prefix(model, "momentum.") or None, queue=_split_prefix(model, "queue.") or None)
    m.unexpected = [k for k in model if not k.startswith(("online.backbone.", "online.head.", "momentum.", "queue."))]
    return m


def _compare(given: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches) of ``given`` against ``expected`` (BN counters optional)."""
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in given.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    return missing, unexpected, mismatched


def _fitting_backbones(weights: Mapping[str, Tensor], exclude: str) -> list[str]:
    """Backbone names whose state dict the given weights fit exactly (to suggest model.backbone=...)."""
    fits = []
    for name in BACKBONES:
        if name == exclude:
            continue
        missing, unexpected, mismatched = _compare(weights, build_backbone(name).state_dict())
        if not (missing or unexpected or mismatched):
            fits.append(name)
    return fits


def _check_part(what: str, given: Mapping[str, Tensor], expected: Mapping[str, Tensor], path: Path,
                cfg: Config, *, suggest: bool = False) -> list[str]:
    """Refuse a part with missing keys or wrong shapes; return its unexpected keys."""
    missing, unexpected, mismatched = _compare(given, expected)
    matched = len(given) - len(unexpected)
    if matched == 0 and given:
        hint = ""
        if suggest:
            fits = _fitting_backbones(given, cfg.model.backbone)
            hint = f"; it fits model.backbone={fits[0]} (add that override)" if fits else ""
        raise CheckpointError(
            f"{path}: nothing in the {what} matches a {cfg.model.backbone} (first keys in the file: "
            f"{_first(sorted(given), 5)}; expected e.g. {_first(list(expected), 5)}){hint}; nothing was written"
        )
    if missing or mismatched:
        hint = ""
        file_dim = given.get("2.weight", given.get("head.2.weight"))
        if file_dim is not None and file_dim.shape[0] != cfg.model.dim:
            hint = f"; the file's embedding dimension is {file_dim.shape[0]}: add model.dim={file_dim.shape[0]}"
        elif suggest:
            fits = _fitting_backbones(given, cfg.model.backbone)
            hint = (f"; the weights fit model.backbone={fits[0]} (add that override)" if fits else
                    "; check the preset's model.backbone")
        problems = ([f"missing keys: {_first(missing)}"] if missing else []) + (
            [f"shape mismatches (file vs model): {_first(mismatched)}"] if mismatched else [])
        raise CheckpointError(
            f"{path}: the {what} does not fit model.backbone={cfg.model.backbone} (model.dim={cfg.model.dim}): "
            + "; ".join(problems) + hint + "; nothing was written"
        )
    return unexpected


def _plain_model(cfg: Config, queue_size: int) -> DSCLModel:
    # the preset's model with a deterministic fresh init (model.pretrained is not loaded: the checkpoint replaces it)
    seed_everything(cfg.optim.seed)
    backbone = build_backbone(cfg.model.backbone, zero_init_residual=cfg.model.zero_init_residual)
    return DSCLModel(Encoder(backbone, dim=cfg.model.dim), queue_size=queue_size)


def import_checkpoint(path: str | Path, cfg: Config, out: str | Path, *, fmt: str = "auto", overwrite: bool = False,
                      backbone_only: bool = False) -> ImportResult:
    """Turn an external checkpoint into a finished stage-1 run directory (see the module docstring).

    Args:
        path: the checkpoint file.
        cfg: the run's configuration (a preset plus overrides): backbone, dimension and dataset.
        out: the run directory to create (refused when it exists and is not empty, unless ``overwrite``).
        fmt: one of :data:`IMPORT_FORMATS` (``auto`` detects it from the keys).
        overwrite: replace the dscl files of an existing run in ``out``.
        backbone_only: ignore a classifier in the file (no ``classifier.pt``; run ``dscl classify``).

    Returns:
        An :class:`ImportResult` (format, loaded tensor count, missing / unexpected keys, notes).

    Raises:
        CheckpointError: unreadable file, unknown format, another architecture, wrong shapes, nothing
            matching. Nothing is written in that case.
        DataError: the preset's dataset is missing (its classes and counts are stored in the run).
    """
    if fmt not in IMPORT_FORMATS:
        raise UsageError(f"--format {fmt!r}: use one of {', '.join(IMPORT_FORMATS)}")
    path = Path(path)
    # resumable=False: dscl import has no --resume to suggest
    out = prepare_run_dir(out, resume=False, overwrite=overwrite, check_only=True, resumable=False)
    obj = read_external(path)
    fmt, mapped = _read_mapped(obj, fmt, path)

    from dscl.data import build_datasets

    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    model = _plain_model(cfg, cfg.model.queue_size if cfg.loss.loss != "ce" else 0)
    weights, unexpected, notes = _fill_model(model, mapped, path, cfg)
    missing_parts = [] if mapped.momentum is not None else ["momentum.* (copied from the online encoder)"]
    if mapped.head is None:
        missing_parts.append("online.head.* (freshly initialised)")
    fc_state = _classifier_of(mapped, splits.num_classes, model.online.backbone.num_features, backbone_only, out, notes)
    model.load_state_dict(weights)  # the final consistency check: every tensor in place, shapes right

    imported = {"from": str(path.resolve()), "format": fmt, "head": mapped.head is not None,
                "momentum": mapped.momentum is not None,
                "file_epoch": obj.get("epoch") if isinstance(obj, Mapping) and isinstance(obj.get("epoch"), int)
                else None}
    prepare_run_dir(out, resume=False, overwrite=overwrite, resumable=False)
    if dist.is_main():
        data = DataMeta.of(splits.class_names, splits.train_counts, splits.mean, splits.std)
        dump_config(cfg, out / "config.yaml")
        facts = RunFacts(method=method_name(cfg), backbone=cfg.model.backbone, num_classes=splits.num_classes,
                         dim=cfg.model.dim, imported=imported)
        save_stage1(out, Stage1State(epoch=cfg.optim.epochs, epochs=cfg.optim.epochs, finished=True,
                                     wall_seconds=0.0, facts=facts, data=data, config=cfg.to_dict(),
                                     model=model.state_dict(),
                                     rng=[rng_state()]))
        if fc_state is not None:
            save_classifier(out, ClassifierState(
                protocol="imported", backbone_name=cfg.model.backbone, num_classes=splits.num_classes,
                selection=f"classifier imported from {path.name} ({fmt} format); dscl selected no epoch",
                imported=imported, data=data, backbone=model.online.backbone.state_dict(), fc=fc_state,
                feature_stats=mapped.feature_stats))
        MetricsLog(out / "metrics.jsonl").write(stage="import", **imported, classifier=fc_state is not None)
    dist.barrier()
    loaded = len(mapped.backbone) + len(mapped.head or {}) + len(mapped.momentum or {}) + (2 if fc_state else 0)
    return ImportResult(fmt, out, loaded, missing_parts, unexpected, notes, fc_state is not None)


def _read_mapped(obj: Any, fmt: str, path: Path) -> tuple[str, _Mapped]:
    """The file's format (``fmt`` or detected for ``auto``) and its tensors mapped onto our names."""
    detected = detect_format(obj)
    fmt = detected if fmt == "auto" else fmt
    if fmt == "dscl":
        if detected != "dscl":
            raise CheckpointError(f"{path} is not a dscl checkpoint or state-dict export (no 'stage' and 'version' "
                                  "keys, no format 'dscl-state-dict'); use --format official or torchvision")
        return fmt, _map_dscl(obj)
    state = _state_dict_of(obj)
    if fmt == "official" and not any(k.startswith("encoder_q.") for k in state):
        raise CheckpointError(f"{path} has no encoder_q.* keys, so it is not an official DSCL / MoCo stage-1 "
                              f"checkpoint (first keys: {_first(sorted(state), 5)}); try --format torchvision")
    return fmt, _map_official(state) if fmt == "official" else _map_torchvision(state)


def _fill_model(model: DSCLModel, mapped: _Mapped, path: Path, cfg: Config,
                ) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """The model's state dict with every mapped part in place (each checked against the model), the
    unexpected keys, and notes for the user."""
    target = model.state_dict()
    parts = [("backbone", "online.backbone.", mapped.backbone)]
    if mapped.head is not None:
        parts.append(("projection head", "online.head.", mapped.head))
    if mapped.momentum is not None:
        parts.append(("momentum encoder's backbone", "momentum.backbone.", _split_prefix(mapped.momentum, "backbone.")))
        if mapped.head is not None:
            parts.append(("momentum encoder's head", "momentum.head.", _split_prefix(mapped.momentum, "head.")))
    new = dict(target)
    unexpected = list(mapped.unexpected)
    for what, prefix, given in parts:
        expected = _split_prefix(target, prefix)
        extra = _check_part(what, given, expected, path, cfg, suggest=prefix == "online.backbone.")
        unexpected += [prefix + k for k in extra]
        new.update({prefix + k: v for k, v in given.items() if k in expected})
    if mapped.momentum is None:  # MoCo's initial state: the momentum encoder is a copy of the online one
        new.update({"momentum." + k[len("online."):]: v.clone() for k, v in new.items() if k.startswith("online.")})
    notes = list(mapped.notes)
    if mapped.queue is not None:
        if _compare(mapped.queue, _split_prefix(target, "queue.")) == ([], [], []):
            new.update({"queue." + k: v for k, v in mapped.queue.items()})
            notes.append(f"queue imported ({int(mapped.queue['filled'])} filled entries)")
        else:
            notes.append("queue not imported (its size differs from model.queue_size); the run's queue starts empty")
    return new, unexpected, notes


def _classifier_of(mapped: _Mapped, num_classes: int, width: int, backbone_only: bool, out: Path,
                   notes: list[str]) -> dict[str, Tensor] | None:
    """The file's linear classifier when it fits the dataset and backbone (else a note says why not)."""
    if mapped.fc is None:
        return None
    if backbone_only:
        notes.append("fc ignored (--backbone-only); run `dscl classify` for a classifier")
        return None
    shape = tuple(mapped.fc["weight"].shape)
    if shape == (num_classes, width) and tuple(mapped.fc["bias"].shape) == (num_classes,):
        return {k: v.float() for k, v in mapped.fc.items()}
    notes.append(f"fc {shape} ignored: the dataset has {num_classes} classes and the backbone "
                 f"{width} features; run `dscl classify --run {out}` for a classifier")
    return None


# ------------------------------------------------------------------------------------------------
# export


def export_meta(predictor: Predictor) -> dict[str, Any]:
    """What a user needs besides the weights: classes, input conversion, architecture."""
    return {
        "run": str(predictor.run_dir), "architecture": predictor.cfg.model.backbone,
        "class_names": predictor.class_names, "train_counts": predictor.train_counts,
        "image_size": predictor.image_size, "mean": list(predictor.mean), "std": list(predictor.std),
        "input_mode": predictor.input_mode,
    }


def scripted_classifier(predictor: Predictor) -> torch.jit.ScriptModule:
    """Preprocess + backbone + classifier as a TorchScript module (images -> logits).

    The backbone is traced at the run's image size (the preprocessing always produces that size) and
    the rest is scripted, so the resize / grey / normalisation branches keep working for any input.
    """
    import warnings

    module = predictor.classifier_module()
    size = predictor.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices; the format still loads everywhere
        module.backbone = torch.jit.trace(module.backbone, torch.zeros(2, 3, size, size))
        scripted = torch.jit.script(module)
    return scripted


def export_torchscript(predictor: Predictor, out: Path) -> Path:
    """TorchScript file: uint8 ``(N, H, W, C)`` or float ``(N, C, H, W)`` in [0, 1] -> logits ``(N, C)``.

    ``torch.jit.load(out)`` needs only torch (not dscl); ``meta.json`` inside the file (``_extra_files``)
    holds the class names and the input conversion.
    """
    import warnings

    scripted = scripted_classifier(predictor)
    extra = {"meta.json": json.dumps(export_meta(predictor))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.save's deprecation notice
        return atomic_write(out, lambda f: torch.jit.save(scripted, f, _extra_files=extra))


class _OnnxGraph(nn.Module):
    """Evaluation-size float images ``(N, 3, S, S)`` in [0, 1], not normalised -> logits (resizing is the
    caller's; grey conversion and normalisation are inside)."""

    def __init__(self, m: ImageClassifier) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: Tensor) -> Tensor:
        p = self.m.preprocess
        return self.m.fc(self.m.backbone(p.normalise(p._channels(x))))


def onnx_module(predictor: Predictor) -> nn.Module:
    """The module :func:`export_onnx` exports (float ``(N, 3, S, S)`` in [0, 1] -> logits)."""
    return _OnnxGraph(predictor.classifier_module()).eval()


def _need_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401 - the torch.onnx exporter needs it
    except ImportError as exc:
        raise CheckpointError(
            f"ONNX export needs the optional extra: pip install 'dscl-lt[export]' (onnx, onnxscript, onnxruntime); "
            f"{exc}"
        ) from exc
    return onnx


def export_onnx(predictor: Predictor, out: Path, *, opset: int = ONNX_OPSET) -> Path:
    """ONNX file: float32 ``images`` ``(N, 3, S, S)`` = pixels / 255, already resized / cropped to the run's
    evaluation view and NOT normalised (the graph normalises), -> ``logits`` ``(N, C)``; dynamic batch
    (:func:`export_recipe`). Needs ``pip install 'dscl-lt[export]'``."""
    onnx = _need_onnx()
    import contextlib
    import io
    import warnings

    module = onnx_module(predictor)
    size = predictor.image_size
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory(prefix=".dscl-onnx-", dir=out.parent) as tmp:
        raw = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.rand(2, 3, size, size),), raw, dynamo=True, opset_version=opset,
                              input_names=["images"], output_names=["logits"], dynamic_shapes={"x": {0: batch}},
                              external_data=False)
        model = onnx.load(raw)
    for key, value in export_meta(predictor).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    return atomic_write(out, lambda f: f.write(data))


def state_dict_export(predictor: Predictor) -> dict[str, Any]:
    """``{"backbone": {...}, "fc": {"weight", "bias"}, "key_layout", "class_names", ...}`` (tensors on the CPU).

    For the torchvision ResNets ``backbone`` holds torchvision's keys (= timm's), so
    ``torchvision.models.resnet50().load_state_dict(sd["backbone"], strict=False)`` reports only ``fc``
    missing, and with ``num_classes=C`` plus ``fc.*`` from ``sd["fc"]`` it is the whole classifier.
    ``convnet`` and ``resnet32`` have no torchvision equivalent: their keys are this package's
    (``key_layout: "dscl"``; ``dscl.backbones.build_backbone(name)`` loads them).
    """
    fc = predictor._require_fc()
    name = predictor.cfg.model.backbone
    return {
        "format": "dscl-state-dict", "key_layout": "torchvision" if name in TORCHVISION_LAYOUT else "dscl",
        "backbone": {k: v.detach().cpu().clone() for k, v in predictor.backbone.state_dict().items()},
        "fc": {k: v.detach().cpu().clone() for k, v in fc.state_dict().items()},
        # the z-scoring folded into fc (classifier.standardize): fc takes raw features either way; the
        # statistics let a re-import tau-normalise the classifier in the space it was trained in
        "feature_stats": ({"mean": predictor.feature_stats[0].cpu(), "std": predictor.feature_stats[1].cpu()}
                          if predictor.feature_stats is not None else None),
        **export_meta(predictor),
    }


def export_state_dict(predictor: Predictor, out: Path) -> Path:
    """Write :func:`state_dict_export` with ``torch.save`` (loads with ``weights_only=True``)."""
    payload = state_dict_export(predictor)
    return atomic_write(out, lambda f: torch.save(payload, f))


def _view_words(predictor: Predictor) -> str:
    """How the evaluation view is sized (dscl.data.preprocess.Preprocess), in words."""
    s, pre = predictor.image_size, predictor.transform.preprocess
    if s >= 128:
        return (f"shorter side resized to {pre.resize_short} px with antialiased bilinear, then the centre {s} x {s} "
                f"crop")
    return (f"resized to {s} x {s} with antialiased bilinear (PIL's img.resize(({s}, {s}), Image.BILINEAR) gives "
            f"the same pixels to within 1/255)")


def export_recipe(predictor: Predictor, fmt: str, path: str | Path) -> str:
    """How to use the file :func:`export_run` wrote in ``fmt``, as ``dscl export`` prints it.

    Each recipe is the exported file's input contract; tests follow it word for word and compare with
    :meth:`Predictor.logits`, so a change here is a change of what users are told to do.
    """
    s, c, mode = predictor.image_size, predictor.num_classes, predictor.input_mode
    if fmt == "torchscript":
        return (f"torch.jit.load({str(path)!r})(x) -> logits (N, {c}); x = uint8 (N, H, W, C) pixels or float "
                f"(N, C, H, W) in [0, 1], any size (resized to {s} px, {mode} conversion and normalisation inside); "
                "class names in the file's extra file meta.json; the same x gives Predictor.logits(x)")
    if fmt == "onnx":
        # the graph normalises itself: Predictor.transform.batch (already normalised) must not be its input
        grey = ("a grey image on all 3 channels; colour is converted to grey inside" if mode == "L" else
                "a grey image repeated on the 3 channels")
        return (f"input 'images': float32 (N, 3, {s}, {s}) = RGB pixel values / 255 ({grey}), "
                f"{_view_words(predictor)}, NOT normalised: the graph subtracts the run's mean and divides by its "
                "std itself (so not Predictor.transform.batch(...), whose output is normalised already); for the "
                f"same x, Predictor.logits(x) gives the same logits. Output 'logits' (N, {c}); dynamic batch; "
                "class names, mean, std and image_size in the model's metadata_props")
    name = predictor.cfg.model.backbone
    layout = (f"torchvision / timm keys: torchvision.models.{name}().load_state_dict(sd['backbone'], strict=False) "
              "misses only fc" if name in TORCHVISION_LAYOUT else
              f"dscl's own keys ({name} has no torchvision equivalent): "
              f"dscl.backbones.build_backbone({name!r}).load_state_dict(sd['backbone'])")
    return f"sd = torch.load(...): 'backbone' ({layout}), 'fc' (weight, bias), class_names, mean, std, image_size"


def export_run(predictor: Predictor, fmt: str, out: str | Path, *, overwrite: bool = False) -> Path:
    """Export a loaded run in ``fmt`` (:data:`EXPORT_FORMATS`) to the file ``out`` (atomic)."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    predictor._require_fc()
    if fmt == "onnx":  # check the extra before anything is created
        _need_onnx()
    check_output_file(out, overwrite=overwrite)
    if fmt == "torchscript":
        return export_torchscript(predictor, out)
    if fmt == "onnx":
        return export_onnx(predictor, out)
    return export_state_dict(predictor, out)
