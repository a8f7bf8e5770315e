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
* ``dscl``: this package's own ``checkpoints/last.pt`` (or ``classifier.pt``, or a state-dict export) from
  another machine; a stored backbone spec must name the config's architecture.
* ``pretrained``: pretrained weights for the config's backbone (``model.backbone=timm:NAME`` or
  ``open_clip:ARCH`` with ``model.backbone_args``; also the built-ins), read by
  :func:`dscl.backbones.load_pretrained`: a timm / open_clip / torchvision / MoCo file (``.safetensors``
  too), a copied hub snapshot folder or an ``hf-hub:`` name. The run has no stage 1 (fresh head, momentum
  encoder a copy), so ``dscl classify`` / ``evaluate`` / ``predict`` / ``embed`` give the foundation
  model's linear probe; the input settings come from the weights' configuration when there is one.
  ``auto`` picks it for a ``timm:`` / ``open_clip:`` backbone and any file that is not dscl's.

Nothing is written unless every backbone weight is found with the right shape; missing and
unexpected keys are listed. Export (:func:`export_run`, ``dscl export``): TorchScript (images in,
logits out, preprocessing inside), ONNX (the optional ``export`` extra) and a state dict in the
torchvision / timm key layout.
"""

from __future__ import annotations

import dataclasses
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
from dscl.backbones import BACKBONES, BackboneSpec, build_backbone, load_pretrained, network_spec
from dscl.config import Config, dump_config, method_name
from dscl.errors import UsageError, listed
from dscl.inference import ImageClassifier, Predictor
from dscl.io import atomic_write
from dscl.model import DSCLModel, backbone_spec, build_encoder
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

IMPORT_FORMATS: tuple[str, ...] = ("auto", "official", "torchvision", "dscl", "pretrained")
EXPORT_FORMATS: tuple[str, ...] = ("torchscript", "onnx", "state-dict")
# Backbones whose keys are torchvision's (and timm's): their state-dict export loads into torchvision.
TORCHVISION_LAYOUT: frozenset[str] = frozenset({"resnet18", "resnet50", "resnet152", "resnext50_32x4d"})
ONNX_OPSET = 18  # first opset the torch.onnx (dynamo) exporter targets; onnxruntime >= 1.14 runs it
_OFFICIAL_QUEUE_KEYS = ("queue", "main_label_queue", "queue_ptr")
_SHOWN = 8  # keys listed per category in messages


# ------------------------------------------------------------------------------------------------
# reading external files


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
        # torchvision's and dscl's layouts are this package's backbone keys (the torchvision ResNets keep
        # torchvision's names); timm's and open_clip's native keys live under the wrapper's "model."
        stats = obj.get("feature_stats")
        backbone = dict(obj["backbone"])
        if obj.get("key_layout") in ("timm", "open_clip"):
            backbone = {f"model.{k}": v for k, v in backbone.items()}
        m = _Mapped(backbone=backbone, fc=dict(obj["fc"]),
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
    if state.base is not None:
        raise CheckpointError(
            f"this stage-1 checkpoint holds only the tensors its model.finetune={state.base.get('finetune')} run "
            f"trained (the frozen base came from {state.base.get('source')}); import that run's "
            "checkpoints/classifier.pt, which holds the merged backbone")
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
    """Built-in backbone names whose state dict the given weights fit exactly (to suggest model.backbone=...);
    none for weights in timm's / open_clip's layout (a dscl timm backbone keeps them under ``model.``)."""
    fits: list[str] = []
    if any(k.startswith("model.") for k in weights):
        return fits
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
            f"{listed(sorted(given), 5)}; expected e.g. {listed(list(expected), 5)}){hint}; nothing was written"
        )
    if missing or mismatched:
        hint = ""
        # the projection head's last layer says the embedding size (a backbone's own head.* keys, timm's, do not)
        file_dim = given.get("2.weight", given.get("head.2.weight")) if "head" in what else None
        if file_dim is not None and file_dim.shape[0] != cfg.model.dim:
            hint = f"; the file's embedding dimension is {file_dim.shape[0]}: add model.dim={file_dim.shape[0]}"
        elif suggest:
            fits = _fitting_backbones(given, cfg.model.backbone)
            hint = (f"; the weights fit model.backbone={fits[0]} (add that override)" if fits else
                    "; check the preset's model.backbone")
        problems = ([f"missing keys: {listed(missing, _SHOWN)}"] if missing else []) + (
            [f"shape mismatches (file vs model): {listed(mismatched, _SHOWN)}"] if mismatched else [])
        raise CheckpointError(
            f"{path}: the {what} does not fit model.backbone={cfg.model.backbone} (model.dim={cfg.model.dim}): "
            + "; ".join(problems) + hint + "; nothing was written"
        )
    return unexpected


def _plain_model(cfg: Config, queue_size: int, spec: BackboneSpec) -> DSCLModel:
    # the run's model with a deterministic fresh init (model.pretrained is not loaded: the checkpoint replaces it);
    # an import holds every tensor, as a model.finetune=full run does (the imported run's config says so)
    seed_everything(cfg.optim.seed)
    return DSCLModel(build_encoder(cfg, spec, pretrained=False), queue_size=queue_size)


def import_checkpoint(path: str | Path, cfg: Config, out: str | Path, *, fmt: str = "auto", overwrite: bool = False,
                      backbone_only: bool = False) -> ImportResult:
    """Turn an external checkpoint into a finished stage-1 run directory (see the module docstring).

    Args:
        path: the checkpoint file; for the ``pretrained`` format also a folder holding one (a copied hub
            snapshot) or a hub name (``hf-hub:ORG/NAME``) the backbone's family resolves.
        cfg: the run's configuration (a preset plus overrides): backbone, dimension and dataset.
        out: the run directory to create (refused when it exists and is not empty, unless ``overwrite``).
        fmt: one of :data:`IMPORT_FORMATS` (``auto`` detects it, see :func:`import_format`).
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
    source = str(path)
    # resumable=False: dscl import has no --resume to suggest
    out = prepare_run_dir(out, resume=False, overwrite=overwrite, check_only=True, resumable=False)
    obj = None if is_weights_source(source) else read_external(Path(source))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, finetune="full"))  # imports train nothing
    fmt = import_format(obj, fmt, cfg)
    mapped = None if fmt == "pretrained" else _read_mapped(obj, fmt, Path(source))[1]

    from dscl.data import build_datasets

    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    if mapped is None:
        made = _import_pretrained(source, cfg, splits)
    else:
        made = _import_mapped(obj, mapped, fmt, Path(source), cfg, splits, backbone_only, out)
    prepare_run_dir(out, resume=False, overwrite=overwrite, resumable=False)
    if dist.is_main():
        _write_import(out, cfg, splits, made, Path(source).name)
    dist.barrier()
    return ImportResult(fmt, out, made.loaded, made.missing, made.unexpected, made.notes, made.fc is not None)


def is_weights_source(source: str) -> bool:
    """A source only the ``pretrained`` format reads: a hub name, a folder (a copied hub snapshot) or a
    ``.safetensors`` file (torch.load cannot read one)."""
    p = Path(source)
    return source.startswith("hf-hub:") or p.is_dir() or p.suffix.lower() == ".safetensors"


def import_format(obj: Any, fmt: str, cfg: Config) -> str:
    """The import format of a loaded file (``obj``; None for a :func:`is_weights_source` source).

    ``auto``: a dscl checkpoint or state-dict export is ``dscl``; for a ``timm:`` / ``open_clip:`` backbone any
    other file is ``pretrained`` (read by :func:`dscl.backbones.load_pretrained`: timm, open_clip, torchvision
    and MoCo layouts); for the built-ins ``official`` (``encoder_q.*`` keys) or ``torchvision``.
    """
    if obj is None:
        if fmt not in ("auto", "pretrained"):
            raise CheckpointError(f"--format {fmt} reads a torch.save file; hub names, folders and .safetensors "
                                  "files are weights: use --format pretrained (or auto)")
        return "pretrained"
    if fmt != "auto":
        return fmt
    detected = detect_format(obj)
    if detected != "dscl" and network_spec(cfg.model).family != "builtin":
        return "pretrained"
    return detected


@dataclass
class _Imported:
    """The run an import makes, before anything is written."""

    model: DSCLModel
    spec: BackboneSpec
    imported: dict[str, Any]
    loaded: int
    fc: dict[str, Tensor] | None = None
    feature_stats: tuple[Tensor, Tensor] | None = None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _queue_size(cfg: Config) -> int:
    return cfg.model.queue_size if cfg.loss.loss != "ce" else 0


def _import_pretrained(source: str, cfg: Config, splits: Any) -> _Imported:
    """Pretrained weights (a timm / open_clip / torchvision file or a hub name) as a run with no stage 1:
    the backbone is the weights, the projection head is fresh and the momentum encoder a copy, so
    ``dscl classify`` trains a linear probe on the frozen pretrained features. The input settings come from
    the weights' configuration where there is one (:func:`dscl.backbones.resolve_input_settings`)."""
    spec = backbone_spec(cfg, splits.mean, splits.std, pretrained=source)
    model = _plain_model(cfg, _queue_size(cfg), spec)
    backbone = model.online.backbone
    load_pretrained(backbone, spec, source)  # every weight must fit, else a CheckpointError naming the keys
    model.momentum.load_state_dict(model.online.state_dict())  # MoCo's start: the momentum encoder is a copy
    where = source if source.startswith("hf-hub:") else str(Path(source).resolve())
    imported = {"from": where, "format": "pretrained", "head": False, "momentum": False, "file_epoch": None}
    notes = [f"pretrained {spec.qualified_name} weights: the backbone only; the projection head is freshly "
             "initialised and the momentum encoder is a copy (no stage 1 was trained)",
             f"inputs: {spec.describe_inputs()}"]
    return _Imported(model, spec, imported, len(backbone.weights_module().state_dict()),
                     missing=["online.head.* (freshly initialised)", "momentum.* (copied from the online encoder)"],
                     notes=notes)


def _import_mapped(obj: Any, mapped: _Mapped, fmt: str, path: Path, cfg: Config, splits: Any, backbone_only: bool,
                   out: Path) -> _Imported:
    """A dscl / official / torchvision file mapped onto the run's model (every part checked)."""
    spec = backbone_spec(cfg, splits.mean, splits.std)
    stored = _file_spec(obj) if fmt == "dscl" else None
    if stored is not None:
        if not stored.same_network(spec):
            raise CheckpointError(f"{path} holds a {stored.qualified_name} backbone (arguments {stored.args}, pool "
                                  f"{stored.pool}) but the config asks for {spec.qualified_name} ({spec.args}, pool "
                                  f"{spec.pool}); add model.backbone={stored.qualified_name} and its "
                                  "model.backbone_args / model.pool; nothing was written")
        if stored.input_source == "pretrained":  # the network was trained on those inputs: keep them
            spec = dataclasses.replace(spec, mean=stored.mean, std=stored.std, interpolation=stored.interpolation,
                                       crop_pct=stored.crop_pct, input_source="pretrained")
    model = _plain_model(cfg, _queue_size(cfg), spec)
    weights, unexpected, notes = _fill_model(model, mapped, path, cfg)
    missing = [] if mapped.momentum is not None else ["momentum.* (copied from the online encoder)"]
    if mapped.head is None:
        missing.append("online.head.* (freshly initialised)")
    fc = _classifier_of(mapped, splits.num_classes, model.online.backbone.num_features, backbone_only, out, notes)
    model.load_state_dict(weights)  # the final consistency check: every tensor in place, shapes right
    imported = {"from": str(path.resolve()), "format": fmt, "head": mapped.head is not None,
                "momentum": mapped.momentum is not None,
                "file_epoch": obj.get("epoch") if isinstance(obj, Mapping) and isinstance(obj.get("epoch"), int)
                else None}
    loaded = len(mapped.backbone) + len(mapped.head or {}) + len(mapped.momentum or {}) + (2 if fc else 0)
    return _Imported(model, spec, imported, loaded, fc, mapped.feature_stats if fc is not None else None, missing,
                     unexpected, notes)


def _file_spec(obj: Any) -> BackboneSpec | None:
    """The backbone spec a dscl checkpoint (version 3) or state-dict export stores, else None."""
    if isinstance(obj, Mapping) and obj.get("format") == "dscl-state-dict":
        return BackboneSpec.from_dict(obj["spec"]) if isinstance(obj.get("spec"), Mapping) else None
    return state_from_dict(obj).spec


def _write_import(out: Path, cfg: Config, splits: Any, made: _Imported, file_name: str) -> None:
    """The run directory of an import: config, a finished stage-1 checkpoint, the classifier when the file
    had one, and the import record in ``metrics.jsonl``."""
    data = DataMeta.of(splits.class_names, splits.train_counts, splits.mean, splits.std)
    dump_config(cfg, out / "config.yaml")
    facts = RunFacts(method=method_name(cfg), backbone=made.spec.qualified_name, num_classes=splits.num_classes,
                     dim=cfg.model.dim, imported=made.imported)
    save_stage1(out, Stage1State(epoch=cfg.optim.epochs, epochs=cfg.optim.epochs, finished=True, wall_seconds=0.0,
                                 facts=facts, data=data, config=cfg.to_dict(), spec=made.spec,
                                 model=made.model.state_dict(), rng=[rng_state()]))
    if made.fc is not None:
        fmt = made.imported["format"]
        save_classifier(out, ClassifierState(
            protocol="imported", backbone_name=made.spec.qualified_name, num_classes=splits.num_classes,
            spec=made.spec, selection=f"classifier imported from {file_name} ({fmt} format); dscl selected no epoch",
            imported=made.imported, data=data, backbone=made.model.online.backbone.state_dict(), fc=made.fc,
            feature_stats=made.feature_stats))
    MetricsLog(out / "metrics.jsonl").write(stage="import", **made.imported, classifier=made.fc is not None)


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
                              f"checkpoint (first keys: {listed(sorted(state), 5)}); try --format torchvision")
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


def temperature_words(predictor: Predictor) -> str:
    """The export's sentence on calibrated probabilities: exported models output the raw logits (temperature
    NOT applied); the metadata's ``temperature`` T turns them into calibrated probabilities, or says why there
    is none."""
    t = predictor.temperature
    if t is None:
        return (f"the model outputs raw logits and no temperature is included (temperature: null; "
                f"{predictor.temperature_note()})")
    return (f"the model outputs raw logits (temperature NOT applied); divide logits by temperature (T = {t:.6g}, "
            "fitted by NLL on the validation split) before softmax for calibrated probabilities")


def export_meta(predictor: Predictor) -> dict[str, Any]:
    """What a user needs besides the weights: classes, input conversion (the backbone spec's), architecture
    (``spec``: :meth:`dscl.backbones.BackboneSpec.to_dict`, which rebuilds the network), and ``temperature``
    (T of temperature scaling, or None) with ``temperature_note`` (:func:`temperature_words`): the exported
    model outputs raw logits, ``softmax(logits / temperature)`` are the calibrated probabilities."""
    spec = predictor.spec
    return {
        "run": str(predictor.run_dir), "architecture": spec.qualified_name,
        "class_names": predictor.class_names, "train_counts": predictor.train_counts,
        "image_size": predictor.image_size, "mean": list(predictor.mean), "std": list(predictor.std),
        "input_mode": predictor.input_mode, "interpolation": spec.interpolation, "crop_pct": spec.crop_pct,
        "resize_short": spec.resize_short, "spec": spec.to_dict(),
        "temperature": predictor.temperature, "temperature_note": temperature_words(predictor),
    }


def scripted_classifier(predictor: Predictor) -> torch.jit.ScriptModule:
    """Preprocess + backbone + classifier as a TorchScript module (images -> logits).

    The backbone is traced at the run's image size (the preprocessing always produces that size) and
    the rest is scripted, so the resize / grey / normalisation branches keep working for any input. The
    trace runs without autograd, the mode inference runs in (torch's attention takes its fused path then:
    a trace with grad recorded the other path, and its check against the module failed for open_clip).
    """
    import warnings

    module = predictor.classifier_module()
    size = predictor.image_size
    with warnings.catch_warnings(), torch.no_grad():
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
    (``key_layout: "dscl"``; ``dscl.backbones.build_backbone(name)`` loads them). ``timm:`` and
    ``open_clip:`` backbones export their model's own keys (``key_layout: "timm"`` / ``"open_clip"``: the
    ``model.`` prefix of dscl's wrapper stripped), which ``timm.create_model(name, num_classes=0, **args)`` /
    the open_clip image tower load; ``sd["spec"]`` rebuilds the network with dscl.
    """
    fc = predictor._require_fc()
    layout, backbone = _native_backbone_state(predictor)
    return {
        "format": "dscl-state-dict", "key_layout": layout, "backbone": backbone,
        "fc": {k: v.detach().cpu().clone() for k, v in fc.state_dict().items()},
        # the z-scoring folded into fc (classifier.standardize): fc takes raw features either way; the
        # statistics let a re-import tau-normalise the classifier in the space it was trained in
        "feature_stats": ({"mean": predictor.feature_stats[0].cpu(), "std": predictor.feature_stats[1].cpu()}
                          if predictor.feature_stats is not None else None),
        **export_meta(predictor),
    }


def _native_backbone_state(predictor: Predictor) -> tuple[str, dict[str, Tensor]]:
    """``(key layout, CPU copy of the backbone's state dict in that layout)`` (see :func:`state_dict_export`)."""
    spec = predictor.spec
    state = {k: v.detach().cpu().clone() for k, v in predictor.backbone.state_dict().items()}
    if spec.family != "builtin":
        prefix = f"{getattr(predictor.backbone, 'weights_attr', '') or 'model'}."
        return spec.family, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return ("torchvision" if spec.name in TORCHVISION_LAYOUT else "dscl"), state


def export_state_dict(predictor: Predictor, out: Path) -> Path:
    """Write :func:`state_dict_export` with ``torch.save`` (loads with ``weights_only=True``)."""
    payload = state_dict_export(predictor)
    return atomic_write(out, lambda f: torch.save(payload, f))


def _values(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


#: PIL's resampling filter closest to each interpolation of the evaluation view
_PIL_FILTERS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST"}


def _view_words(predictor: Predictor) -> str:
    """How the evaluation view is sized (the run's :class:`dscl.data.preprocess.Preprocess`, from its backbone
    spec: crop fraction and interpolation), in words."""
    s, pre = predictor.image_size, predictor.transform.preprocess
    mode = pre.interpolation
    how = f"antialiased {mode}" if pre.antialias else f"{mode} (no antialiasing)"
    if pre.crop:
        return f"shorter side resized to {pre.resize_short} px with {how}, then the centre {s} x {s} crop"
    pil = f"img.resize(({s}, {s}), Image.{_PIL_FILTERS[mode]})"
    close = ("gives the same pixels to within 1/255" if mode == "bilinear" else
             "is close but not identical (PIL's bicubic uses another kernel constant)" if mode == "bicubic" else
             "picks pixels by another rounding")
    return f"resized to {s} x {s} with {how} (PIL's {pil} {close})"


def export_recipe(predictor: Predictor, fmt: str, path: str | Path) -> str:
    """How to use the file :func:`export_run` wrote in ``fmt``, as ``dscl export`` prints it.

    Each recipe is the exported file's input contract; tests follow it word for word and compare with
    :meth:`Predictor.logits`, so a change here is a change of what users are told to do.
    """
    s, c, mode = predictor.image_size, predictor.num_classes, predictor.input_mode
    if fmt == "torchscript":
        return (f"torch.jit.load({str(path)!r})(x) -> logits (N, {c}); x = uint8 (N, H, W, C) pixels or float "
                f"(N, C, H, W) in [0, 1], any size ({_view_words(predictor)}, {mode} conversion and normalisation "
                "inside); class names in the file's extra file meta.json; the same x gives Predictor.logits(x); "
                f"{temperature_words(predictor)} (meta.json's temperature)")
    if fmt == "onnx":
        # the graph normalises itself: Predictor.transform.batch (already normalised) must not be its input
        grey = ("a grey image on all 3 channels; colour is converted to grey inside" if mode == "L" else
                "a grey image repeated on the 3 channels")
        # a cropped view is not a fixed point of the view: the Predictor would resize and crop x again
        same = ("Predictor.logits(images) of the images x was cut from gives the same logits (not Predictor.logits(x), "
                "which would resize and crop x again)" if predictor.transform.preprocess.crop else
                "for the same x, Predictor.logits(x) gives the same logits")
        pre = predictor.transform.preprocess
        return (f"input 'images': float32 (N, 3, {s}, {s}) = RGB pixel values / 255 ({grey}), "
                f"{_view_words(predictor)}, NOT normalised: the graph subtracts the run's mean "
                f"{_values(pre.mean.flatten().tolist())} and divides by its std {_values(pre.std.flatten().tolist())} "
                f"itself (so not Predictor.transform.batch(...), whose output is normalised already); {same}. "
                f"Output 'logits' (N, {c}); dynamic batch; "
                "class names, mean, std, image_size, interpolation, crop_pct, temperature and the backbone spec in "
                f"the model's metadata_props; {temperature_words(predictor)}")
    return (f"sd = torch.load(...): 'backbone' ({_layout_words(predictor)}), 'fc' (weight, bias), class_names, "
            f"spec, temperature; inputs: {predictor.spec.describe_inputs()}; {temperature_words(predictor)}")


def _layout_words(predictor: Predictor) -> str:
    """How to load the ``backbone`` entry of a state-dict export, in words (one per key layout)."""
    spec = predictor.spec
    args = "".join(f", {k}={v!r}" for k, v in spec.args.items())
    dscl = ("or with dscl: dscl.backbones.build_backbone_from_spec(BackboneSpec.from_dict(sd['spec']))"
            ".model.load_state_dict(sd['backbone'])")
    if spec.family == "timm":
        return (f"timm's own keys: timm.create_model({spec.name!r}, num_classes=0{args}).load_state_dict("
                f"sd['backbone']); {dscl}")
    if spec.family == "open_clip":
        return (f"the open_clip image tower's own keys, proj dropped: open_clip.create_model({spec.name!r}).visual"
                f".load_state_dict(sd['backbone'], strict=False) misses only proj when no vision_cfg was changed; "
                f"{dscl}")
    if spec.name in TORCHVISION_LAYOUT:
        return (f"torchvision / timm keys: torchvision.models.{spec.name}().load_state_dict(sd['backbone'], "
                "strict=False) misses only fc")
    return (f"dscl's own keys ({spec.name} has no torchvision equivalent): "
            f"dscl.backbones.build_backbone({spec.name!r}).load_state_dict(sd['backbone'])")


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
