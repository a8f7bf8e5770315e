"""Image files a user points a trained run at: collected, then streamed decoded in batches.

``dscl predict`` / ``dscl embed`` (:mod:`dscl.cli.use`) and ``dscl evaluate RUN DATA``
(:func:`dscl.evaluation.evaluate_data`) take files, folders and labelled lists (:func:`collect_inputs`,
:func:`read_labelled_list`) and read them with :func:`iter_files`, where an unreadable file becomes an
error entry instead of stopping the others. Nothing here knows about models: the conversion of an
image is passed in (a run's :class:`dscl.data.preprocess.ImageTransform`, ``Predictor.transform``).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dscl.data.core import DataError

LIST_SUFFIXES = (".txt", ".json")  # split lists (OLTR txt "path label" lines, BBN json)


@dataclass
class Inputs:
    """Image files to run on, in order; ``labels[i]`` is known for entries that come from a labelled list.
    ``notes``: what a reader should know about how labels were read (e.g. an index-to-class mapping)."""

    paths: list[str]
    labels: list[int | None]
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return any(label is not None for label in self.labels)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_labelled_list(path: Path, root: Path, class_names: Sequence[str]) -> Inputs:
    """A path list for predict / embed / evaluate: one image per line, optionally with its class.

    A line is ``path``, ``path label`` (the label is the last whitespace-separated field, a path may hold
    spaces), ``path<TAB>label`` (the label may hold spaces), or shell-quoted ``"path" "label with spaces"``.
    A label is a class **name** of the run, its folder-safe spelling (``T-shirt_top`` for ``T-shirt/top``,
    :func:`dscl.data.readers.folder_safe_name`, as class folders are read), or a class **index** (the run's
    class order, as ``dscl predict`` prints it). Paths are relative to ``root``. Blank lines and ``#``
    comments are skipped. When indices are used and the run's classes have names, or folder-safe
    spellings are used, a note says which mapping was used.

    Raises:
        DataError: a label that is neither a class name nor an index in range, or a malformed line,
            with the file and line.
    """
    from dscl.data.readers import folder_safe_spellings

    spellings = folder_safe_spellings(class_names)
    index_of = {**spellings, **{name: i for i, name in enumerate(class_names)}}
    spelled: dict[str, int] = {}
    paths: list[str] = []
    labels: list[int | None] = []
    used_indices = False
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the list {path}: {exc}") from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}, line {lineno}"
        label: str | None
        if "\t" in stripped:
            rel, label = (part.strip() for part in stripped.rsplit("\t", 1))
        elif '"' in stripped or "'" in stripped:
            try:
                parts = shlex.split(stripped)
            except ValueError as exc:
                raise DataError(f"{where}: {exc} in {stripped!r}; quote a path or label holding spaces") from None
            if len(parts) not in (1, 2):
                raise DataError(f"{where}: expected 'path' or 'path label', got {len(parts)} fields in {stripped!r}; "
                                "quote a path or label that holds spaces, or separate them with a tab")
            rel, label = parts[0], parts[1] if len(parts) == 2 else None
        else:
            fields = stripped.rsplit(None, 1)
            if len(fields) == 2 and (fields[1] in index_of or _is_int(fields[1])):
                rel, label = fields
            else:
                rel, label = stripped, None  # an unlabelled path (it may hold spaces)
        value: int | None = None
        if label is not None and label != "":
            if label in index_of:
                value = index_of[label]
                if label in spellings:
                    spelled[label] = value
            elif _is_int(label) and 0 <= int(label) < len(class_names):
                value, used_indices = int(label), True
            else:
                shown = ", ".join(list(class_names)[:10]) + (", ..." if len(class_names) > 10 else "")
                raise DataError(f"{where}: label {label!r} is neither a class of the run ({shown}) nor a class "
                                f"index in [0, {len(class_names)})")
        full = Path(rel) if Path(rel).is_absolute() else root / rel
        paths.append(str(full))
        labels.append(value)
    notes = []
    if used_indices and list(class_names) != [str(i) for i in range(len(class_names))]:
        mapping = ", ".join(f"{i} = {n}" for i, n in enumerate(list(class_names)[:10]))
        notes.append(f"{path}: labels read as class indices in the run's class order ({mapping}"
                     f"{', ...' if len(class_names) > 10 else ''}); write class names to be explicit")
    if spelled:
        notes.append(f"{path}: labels written as the folder-safe spelling of a class: "
                     + ", ".join(f"{label} = {class_names[i]}" for label, i in spelled.items()))
    return Inputs(paths, labels, notes)


def collect_inputs(inputs: Sequence[str | Path], *, num_classes: int, data_root: str | Path | None = None,
                   class_names: Sequence[str] | None = None) -> Inputs:
    """Expand command-line inputs: image files (kept even when missing, to become error rows),
    folders (every image file below them, recursively, sorted; hidden entries skipped) and lists
    (``.txt``: one path per line, optionally labelled by class name or index, see
    :func:`read_labelled_list`; BBN ``.json`` with indices), paths relative to ``data_root``, default the
    list's folder.

    Raises:
        DataError: an empty folder, a malformed list, or a list label that is not one of the run's classes.
    """
    from dscl.data.readers import IMAGE_EXTENSIONS, image_files, read_list

    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    out = Inputs([], [])
    for item in inputs:
        path = Path(item)
        root = Path(data_root) if data_root is not None else path.parent
        if path.is_dir():
            found = sorted(str(f) for f in image_files(path))
            if not found:
                raise DataError(f"folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            out.paths += found
            out.labels += [None] * len(found)
        elif path.is_file() and path.suffix.lower() == ".txt":
            listed = read_labelled_list(path, root, names)
            out.paths += listed.paths
            out.labels += listed.labels
            out.notes += listed.notes
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            split = read_list(path, root)
            for where, label in zip(split.where, split.labels, strict=True):
                if not 0 <= label < num_classes:
                    raise DataError(f"{where}: label {label} is outside [0, {num_classes}) (the run's classes)")
            out.paths += split.paths
            out.labels += list(split.labels)
        else:
            out.paths.append(str(path))
            out.labels.append(None)
    return out


# ------------------------------------------------------------------------------------------------
# streaming: files in, converted batches out


class BatchConversion(Protocol):
    """What :func:`iter_files` converts with: one image -> a tensor (picklable, for loader workers), and
    ``batch([])``, the empty batch of that conversion (``dscl.data.preprocess.ImageTransform`` is one)."""

    def __call__(self, image: Any) -> Tensor: ...

    def batch(self, images: Any) -> Tensor: ...


@dataclass
class FileBatch:
    """One batch of input files: ``paths[i]`` decoded into ``images[ok[i]]`` or failed with ``errors[i]``."""

    indices: list[int]
    paths: list[str]
    errors: list[str | None]
    images: Tensor  # (n_ok, 3, S, S) normalised, in the order of the entries whose error is None


class _FileSet(Dataset):
    def __init__(self, paths: Sequence[str], transform: Any) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        try:
            return i, self.transform(self.paths[i]), None
        except (DataError, ValueError, OSError) as exc:
            return i, None, file_error(self.paths[i], exc)


def file_error(path: str, exc: Exception) -> str:
    """What is wrong with one input file, on one line and without advice: the decoder's advice (check the
    training data with ``dscl data --check``) does not fit files given to predict / evaluate, so each command
    adds the one hint that fits, once."""
    cause = exc.__cause__ if isinstance(exc, DataError) and isinstance(exc.__cause__, Exception) else exc
    if isinstance(cause, FileNotFoundError):
        return f"image file {path} does not exist"
    if cause is exc and isinstance(exc, DataError):
        return " ".join(str(exc).split())  # dscl's own message (not a decoder failure): already says what
    return f"cannot read image file {path}: {' '.join(str(cause).split()) or type(cause).__name__}"


def _collate(items: list[tuple[int, Tensor | None, str | None]]) -> tuple[list[int], list[Tensor], list[str | None]]:
    return [i for i, _, _ in items], [x for _, x, _ in items if x is not None], [e for _, _, e in items]


def iter_files(transform: BatchConversion, paths: Sequence[str], *, batch_size: int = 64,
               workers: int = 0) -> Iterator[FileBatch]:
    """Decode and convert ``paths`` with ``transform`` in batches (``workers`` loader processes); a file
    that cannot be read becomes an error entry (:func:`file_error`) instead of stopping the others."""
    loader = DataLoader(_FileSet(paths, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate)
    for indices, images, errors in loader:
        stacked = torch.stack(images) if images else transform.batch([])
        yield FileBatch(indices, [paths[i] for i in indices], errors, stacked)
