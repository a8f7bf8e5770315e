"""``dscl predict | embed | export | import | ensemble``: using what was trained (issue #13).

Every command loads runs through :func:`dscl.inference.load_run`, the one place a run becomes a model.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from dscl.cli.common import EXIT_ERROR, EXIT_OK, config_args, load_cfg, print_main, runtime_args, table
from dscl.errors import UsageError

if TYPE_CHECKING:
    import torch

    from dscl.data.inputs import Inputs
    from dscl.inference import EnsemblePredictor, Predictor

VARIANT_HELP = ("plain: the linear classifier (default); logit-adjust: minus tau*log(prior) of the training counts; "
                "tau-norm: tau-normalised weights; ncm: nearest class mean")


# ------------------------------------------------------------------------------------------------
# predict


PREDICTION_FORMATS = (".csv", ".jsonl")


class RowWriter:
    """Streams prediction rows as CSV or JSON lines, flushing after each batch.

    Both formats hold the same columns, in this order: ``path``, ``label`` (labelled inputs only), then for
    the k best classes ``class_i`` (name), ``index_i`` (class index) and ``prob_i``; ``logit_i`` with
    ``--logits``; ``prob:<class name>`` for every class with ``--all-probs``; and ``error`` (empty / null
    for a readable image). A JSON line is the CSV row as an object, with numbers as numbers and empty
    cells as null.
    """

    def __init__(self, fh: IO[str], jsonl: bool, k: int, labelled: bool, logits: bool,
                 class_names: list[str] | None = None) -> None:
        self.fh, self.jsonl, self.k, self.labelled, self.logits = fh, jsonl, k, labelled, logits
        self.all_probs = class_names
        self.columns = ["path"] + (["label"] if labelled else [])
        for i in range(1, k + 1):
            self.columns += [f"class_{i}", f"index_{i}", f"prob_{i}"]
        self.columns += [f"logit_{i}" for i in range(1, k + 1)] if logits else []
        self.columns += [f"prob:{name}" for name in class_names or []]
        self.columns.append("error")
        self.csv = None if jsonl else csv.writer(fh)
        if self.csv is not None:
            self.csv.writerow(self.columns)

    def row(self, path: str, label: str | None, top: list[tuple[str, int, float, float]], error: str | None,
            probs: list[float] | None = None) -> None:
        """``top``: (class name, class index, probability, logit) for the k best classes, best first;
        ``probs``: every class's probability (with ``--all-probs``)."""
        record: dict[str, Any] = dict.fromkeys(self.columns)
        record["path"] = path
        if self.labelled:
            record["label"] = label
        for i, (name, index, prob, logit) in enumerate(top, start=1):
            record.update({f"class_{i}": name, f"index_{i}": index, f"prob_{i}": prob})
            if self.logits:
                record[f"logit_{i}"] = logit
        if self.all_probs is not None and probs is not None:
            record.update({f"prob:{name}": pr for name, pr in zip(self.all_probs, probs, strict=True)})
        record["error"] = error
        if self.csv is not None:
            self.csv.writerow(["" if v is None else f"{v:.8g}" if isinstance(v, float) else v
                               for v in record.values()])
        else:
            rounded = {k: round(v, 8) if isinstance(v, float) else v for k, v in record.items()}
            self.fh.write(json.dumps(rounded, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self.fh.flush()


def _prediction_format(out: str | None) -> bool:
    """Whether ``--out`` asks for JSON lines; refuses a file name that is neither .csv nor .jsonl."""
    if out is None:
        return False
    suffix = Path(out).suffix.lower()
    if suffix not in PREDICTION_FORMATS:
        raise UsageError(f"--out {out}: predictions are written as CSV (.csv) or JSON lines (.jsonl); "
                         f"give a file name ending in one of these")
    return suffix == ".jsonl"


@dataclass
class _Seen:
    """What ``dscl predict`` saw while writing rows: the logits and labels of the labelled images that
    could be read (for the Many / Medium / Few table) and the files that could not be read."""

    logits: list[torch.Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def _predict_rows(fh: IO[str], p: Predictor | EnsemblePredictor, inputs: Inputs, args: argparse.Namespace,
                  jsonl: bool, k: int, seen: _Seen) -> None:
    """Stream one row per input file into ``fh`` (an error row for a file that cannot be read)."""
    import torch
    from tqdm import tqdm

    from dscl.data.inputs import iter_files

    writer = RowWriter(fh, jsonl, k, inputs.labelled, args.logits, p.class_names if args.all_probs else None)
    bar = tqdm(total=len(inputs.paths), desc="predict", unit="img", disable=args.no_progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for batch in iter_files(p.transform, inputs.paths, batch_size=args.batch_size, workers=args.workers):
            logits = (p.batch_logits(batch.images, args.variant) if len(batch.images)
                      else torch.zeros(0, p.num_classes))
            # --calibrated: softmax(logits / T); the logit_i columns stay the raw logits
            probs = torch.softmax(p.calibrate(logits, args.variant) if args.calibrated else logits, dim=1).float()
            top_p, top_i = probs.topk(k, dim=1)
            j = 0
            for i, path, error in zip(batch.indices, batch.paths, batch.errors, strict=True):
                label = inputs.labels[i]
                name = p.class_names[label] if label is not None else None
                if error is not None:
                    writer.row(path, name, [], error)
                    seen.failed.append((path, error))
                    continue
                top = [(p.class_names[c], c, float(pr), float(logits[j, c]))
                       for pr, c in zip(top_p[j].tolist(), top_i[j].tolist(), strict=True)]
                writer.row(path, name, top, None, probs[j].tolist() if args.all_probs else None)
                if label is not None:
                    seen.logits.append(logits[j])
                    seen.labels.append(label)
                j += 1
            writer.flush()
            bar.update(len(batch.indices))
    finally:
        bar.close()


def _predict_summary(p: Predictor | EnsemblePredictor, inputs: Inputs, args: argparse.Namespace,
                     seen: _Seen) -> list[str]:
    """The lines printed after the rows: counts, the labelled images' table, unreadable files."""
    import torch

    from dscl.metrics import summarize
    from dscl.report import format_table

    n_ok = len(inputs.paths) - len(seen.failed)
    lines = [f"predicted {n_ok} of {len(inputs.paths)} images ({args.variant} classifier of {p.run_dir})"
             + (f"; calibrated probabilities softmax(logits / T), T = {p.temperature:.4g}" if args.calibrated
                and p.temperature is not None else "")
             + (f"; rows in {args.out}" if args.out else "")]
    if seen.labels:
        cfg = p.cfg
        s = summarize(torch.stack(seen.logits), torch.tensor(seen.labels), p.train_counts,
                      many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold)
        row = {"method": f"{args.variant} ({len(seen.labels)} labelled images)",
               **{key: s[key] for key in ("top1", "many", "medium", "few")}}
        lines += ["", "top-1 % on the labelled list (Many/Medium/Few = mean per-class accuracy, groups from the "
                  "run's training counts)", format_table([row]), f"top-5: {s['top5']:.1f}%"]
        from dscl.evaluation import chance_warning

        warning = chance_warning(s["top1"], p.num_classes)
        if warning:
            lines += ["", warning] + ([f"The list's labels were read as indices: {n}" for n in inputs.notes]
                                      or ["Check that the list's labels name the run's classes."])
    if seen.failed:
        lines += ["", f"{len(seen.failed)} file(s) could not be read (error rows written):"]
        lines += [f"  {path}: {err}" for path, err in seen.failed[:10]]
        lines += [f"  ... and {len(seen.failed) - 10} more"] if len(seen.failed) > 10 else []
    return lines


def cmd_predict(args: argparse.Namespace) -> int:
    import io

    from dscl.data.inputs import collect_inputs
    from dscl.inference import VARIANTS, load_model
    from dscl.io import atomic_write
    from dscl.run import check_output_file

    if args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: must be at least 1")
    if args.variant not in VARIANTS:
        raise UsageError(f"--variant {args.variant!r}: use one of {', '.join(VARIANTS)}")
    jsonl = _prediction_format(args.out)
    if args.out is not None:
        check_output_file(Path(args.out), overwrite=args.overwrite)  # before any work
    p = load_model(args.run, device=args.device)  # a run, or an ensemble folder of `dscl ensemble`
    p.require_classifier()
    if args.calibrated:  # before any image is read: a run without a temperature, an ensemble, a variant
        import torch

        p.calibrate(torch.zeros(0, p.num_classes), args.variant)
    inputs = collect_inputs(args.inputs, num_classes=p.num_classes, data_root=args.data_root,
                            class_names=p.class_names)
    for note in inputs.notes:
        print(f"note: {note}", file=sys.stderr)
    k = min(args.top_k, p.num_classes)
    info = sys.stderr if args.out is None else sys.stdout  # a CSV on stdout stays clean
    seen = _Seen()
    if args.out is None:
        _predict_rows(sys.stdout, p, inputs, args, jsonl, k, seen)
    else:
        # through a temp file renamed at the end: an interrupted or failed predict leaves no file under
        # the final name (nothing half-written, nothing that blocks the rerun)
        def write(f: IO[bytes]) -> None:
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            _predict_rows(text, p, inputs, args, jsonl, k, seen)
            text.flush()
            text.detach()

        atomic_write(Path(args.out), write)
    print("\n".join(_predict_summary(p, inputs, args, seen)), file=info, flush=True)
    return EXIT_ERROR if seen.failed else EXIT_OK


# ------------------------------------------------------------------------------------------------
# embed


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from dscl.data.inputs import collect_inputs, iter_files
    from dscl.inference import load_run
    from dscl.io import atomic_write
    from dscl.run import check_output_file

    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise UsageError(f"--out {out}: embeddings are written as a numpy .npz file; give a name ending in .npz")
    check_output_file(out, overwrite=args.overwrite)
    p = load_run(args.run, device=args.device, stage1_ok=True)
    inputs = collect_inputs(args.inputs, num_classes=p.num_classes, data_root=args.data_root,
                            class_names=p.class_names)
    for note in inputs.notes:
        print(f"note: {note}", file=sys.stderr)
    feats: list[torch.Tensor] = []
    ok: list[int] = []
    failed: list[tuple[str, str]] = []
    bar = tqdm(total=len(inputs.paths), desc="embed", unit="img", disable=args.no_progress, file=sys.stderr,
               dynamic_ncols=True)
    for batch in iter_files(p.transform, inputs.paths, batch_size=args.batch_size, workers=args.workers):
        if len(batch.images):
            feats.append(F.normalize(p.features_of(batch.images), dim=1).cpu())
        for i, path, error in zip(batch.indices, batch.paths, batch.errors, strict=True):
            if error is None:
                ok.append(i)
            else:
                failed.append((path, error))
        bar.update(len(batch.indices))
    bar.close()
    arrays: dict[str, Any] = {
        "features": (torch.cat(feats) if feats else torch.zeros(0, p.num_features)).numpy().astype(np.float32),
        "paths": np.asarray([inputs.paths[i] for i in ok], dtype=str),
        "class_names": np.asarray(p.class_names, dtype=str),
        "failed_paths": np.asarray([f for f, _ in failed], dtype=str),
        "errors": np.asarray([e for _, e in failed], dtype=str),
    }
    if inputs.labelled:  # -1 for entries that came without a label (files or folders next to a list)
        arrays["labels"] = np.asarray([inputs.labels[i] if inputs.labels[i] is not None else -1 for i in ok],
                                      dtype=np.int64)
    atomic_write(out, lambda f: np.savez_compressed(f, **arrays))  # type: ignore[arg-type]
    print(f"wrote {out}: features {arrays['features'].shape} (L2-normalised backbone features of {p.source}), "
          f"paths{', labels' if inputs.labelled else ''}, class_names")
    if failed:
        print(f"{len(failed)} file(s) could not be read (listed in failed_paths / errors):", file=sys.stderr)
        for path, err in failed[:10]:
            print(f"  {path}: {err}", file=sys.stderr)
    return EXIT_ERROR if failed else EXIT_OK


# ------------------------------------------------------------------------------------------------
# export / import / ensemble


def cmd_export(args: argparse.Namespace) -> int:
    from dscl.inference import load_run
    from dscl.interop import export_recipe, export_run

    p = load_run(args.run, device="cpu")
    path = export_run(p, args.format, args.out, overwrite=args.overwrite)
    print(f"wrote {path} ({args.format})\n{export_recipe(p, args.format, path)}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from dscl.interop import import_checkpoint

    cfg = load_cfg(args)
    res = import_checkpoint(args.checkpoint, cfg, args.out, fmt=args.format, overwrite=args.overwrite,
                            backbone_only=args.backbone_only)
    lines = [f"imported {args.checkpoint} ({res.format} format, {res.loaded} tensors) into {res.out} "
             f"as a finished stage-1 run ({cfg.model.backbone}, preset {cfg.preset})"
             + (" with no stage 1: dscl classify trains a linear probe on its frozen features"
                if res.format == "pretrained" else "")]
    if res.missing:
        lines.append("not in the file: " + "; ".join(res.missing))
    if res.unexpected:
        shown = ", ".join(res.unexpected[:10]) + (f" (+{len(res.unexpected) - 10} more)" if len(res.unexpected) > 10
                                                  else "")
        lines.append(f"unexpected keys, ignored ({len(res.unexpected)}): {shown}")
    lines += [f"note: {n}" for n in res.notes]
    if res.classifier:
        lines.append(f"its classifier is checkpoints/classifier.pt; next: dscl evaluate --run {res.out}")
    else:
        lines.append(f"next: dscl classify --run {res.out}, then dscl evaluate --run {res.out}")
    print_main("\n".join(lines))
    return EXIT_OK


def cmd_ensemble(args: argparse.Namespace) -> int:
    from dscl.ensemble import ensemble

    report = ensemble(args.runs, args.out, split=args.split, device=args.device, progress=not args.no_progress,
                      overwrite=args.overwrite)
    print_main(f"{report['dataset']} — {report['method']}; top-1 % on the {report['split']} set\n{table(report)}\n\n"
               f"report: {Path(args.out) / 'report.md'}")
    return EXIT_OK


def _io_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="a classified run directory")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (searched recursively) or lists: .txt with one path per line, "
                        "optionally followed by its class name or index ('path label', 'path<TAB>label', or "
                        "quoted \"path\" \"label\"), or BBN .json")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder the paths of a split list are relative to (default: the list's folder)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0,
                   help="image-decoding processes (default: %(default)s = in the main process)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    runtime_args(p)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register predict, embed, export, import and ensemble."""
    p = sub.add_parser("predict", help="classify images with a trained run (CSV / JSONL of top-k classes)")
    _io_args(p)
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output file: FILE.csv or FILE.jsonl (JSON lines with the same columns); default: CSV on "
                        "stdout. Written to a temporary file and renamed when complete")
    p.add_argument("--variant", default="plain", choices=("plain", "logit-adjust", "tau-norm", "ncm"),
                   help=VARIANT_HELP)
    p.add_argument("--logits", action="store_true", help="also write the raw logits of the top-k classes")
    p.add_argument("--all-probs", action="store_true",
                   help="also write every class's probability (one prob:<class name> column per class)")
    p.add_argument("--calibrated", action="store_true",
                   help="temperature-scaled probabilities softmax(logits / T), T fitted on the validation split by "
                        "dscl classify (same top-k classes, better-calibrated confidences; --logits still writes "
                        "the raw logits); plain variant only, not for ensembles")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("embed", help="L2-normalised backbone features of images -> .npz (features, paths, labels)")
    _io_args(p)
    p.add_argument("--out", required=True, metavar="FILE.npz", help="output file")
    p.set_defaults(handler=cmd_embed)

    p = sub.add_parser("export", help="write a run as TorchScript, ONNX or a torchvision-layout state dict")
    p.add_argument("--run", required=True, metavar="DIR", help="a classified run directory")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx", "state-dict"),
                   help="torchscript: images in, logits out (preprocessing inside); onnx: needs "
                        "pip install 'dscl-lt[export]'; state-dict: torchvision / timm key layout")
    p.add_argument("--out", required=True, metavar="FILE", help="output file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("import", help="turn a checkpoint trained elsewhere (official DSCL/MoCo, torchvision, "
                                      "dscl) or pretrained timm / open_clip weights (a linear probe) into a run "
                                      "directory")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="the checkpoint file (.pth.tar, .pth, .pt); pretrained weights also as .safetensors / .bin, "
                        "a copied hub snapshot folder or hf-hub:ORG/NAME (with model.backbone=timm:NAME or "
                        "open_clip:ARCH)")
    p.add_argument("--format", default="auto", choices=("auto", "official", "torchvision", "dscl", "pretrained"),
                   help="key layout (default: detected; pretrained weights for a timm: / open_clip: backbone: "
                        "pretrained)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace the dscl files of an existing run in --out")
    p.add_argument("--backbone-only", action="store_true",
                   help="ignore a classifier (fc) in the file; train one with dscl classify")
    config_args(p)
    runtime_args(p)
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("ensemble", help="average the softmax outputs of several runs of one dataset -> report")
    p.add_argument("--runs", required=True, nargs="+", metavar="RUN", help="two or more classified runs")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--overwrite", action="store_true", help="replace the report files of an existing --out")
    runtime_args(p)
    p.set_defaults(handler=cmd_ensemble)
