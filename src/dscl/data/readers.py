"""Readers for the supported sources: Fashion-MNIST idx files, CIFAR pickles, split lists, class folders.

Each reader returns plain arrays / lists; ``datasets.build_datasets`` turns them into ``LTDataset``s.
Nothing here opens an image file (that happens on ``load`` or in ``check_images``).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dscl.data.core import DataError

FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


# ----------------------------------------------------------------------------------------- Fashion-MNIST


def user_data_root(data_root: str | None, fix: str = "") -> tuple[Path, str] | None:
    """The data folder the user named, and where it was named: ``data.data_root`` (``--data-root``)
    first, then ``$DSCL_DATA`` (an empty variable counts as unset); None when neither is set.

    A named folder is never silently replaced by a default location: if it does not exist the run
    stops here, before anything is computed.

    Args:
        data_root: ``cfg.data.data_root``.
        fix: dataset-specific advice appended to the error.

    Raises:
        DataError: the named folder does not exist or is not a folder.
    """
    if data_root:
        root, origin = Path(data_root).expanduser(), "--data-root (data.data_root)"
    elif os.environ.get("DSCL_DATA"):
        root, origin = Path(os.environ["DSCL_DATA"]).expanduser(), "the environment variable DSCL_DATA"
    else:
        return None
    if not root.is_dir():
        unset = " (or unset DSCL_DATA to use the default location)" if origin.endswith("DSCL_DATA") else ""
        raise DataError(
            f"data folder {root}, given by {origin}, does not exist or is not a folder; point it at the "
            f"folder that holds the data{unset}{'. ' + fix if fix else ''}"
        )
    return root, origin


def _fmnist_candidates(data_root: str | None) -> tuple[list[Path], str | None]:
    named = user_data_root(data_root, _FMNIST_FIX)
    roots = [named[0]] if named is not None else [Path(FMNIST_SYSTEM_DIR)]
    places = []
    for root in roots:
        places += [root, root / "fashion-mnist", root / "fashion_mnist", root / "FashionMNIST" / "raw"]
    return places, named[1] if named is not None else None


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / name[: -len(".gz")]):
        if candidate.is_file():
            return candidate
    return None


_FMNIST_FIX = (
    "Fix: `sudo apt-get install dataset-fashion-mnist` (installs them under "
    f"{FMNIST_SYSTEM_DIR}), or download the four files from the Fashion-MNIST GitHub release "
    "(https://github.com/zalandoresearch/fashion-mnist, folder data/fashion) into a folder and pass "
    "--data-root FOLDER (data.data_root) or set DSCL_DATA=FOLDER."
)


def find_fmnist(data_root: str | None) -> Path:
    """Folder holding the four Fashion-MNIST idx files (``.gz`` or uncompressed).

    Searched: the folder named by ``data_root`` / ``$DSCL_DATA`` (and its ``fashion-mnist``,
    ``fashion_mnist``, ``FashionMNIST/raw`` subfolders) when one is named, else the Debian package's
    folder. A named folder without the files is an error, never a silent fall-back to the system copy.
    """
    places, origin = _fmnist_candidates(data_root)
    for folder in places:
        if all(_idx_file(folder, name) is not None for name in FMNIST_FILES):
            return folder
    searched = "\n".join(f"  {p}" for p in places)
    named = ""
    if origin is not None:
        named = f" (the folder given by {origin}; the system copy under {FMNIST_SYSTEM_DIR} is not used then"
        named += ": unset DSCL_DATA to use it)" if origin.endswith("DSCL_DATA") else ")"
    raise DataError(
        "Fashion-MNIST not found: none of these folders holds all four files "
        f"{', '.join(FMNIST_FILES)}{named}:\n{searched}\n{_FMNIST_FIX}"
    )


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read idx file {path}: {exc}; download the file again") from exc
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic number); download it again")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) if shape else 0
    if len(raw) - offset != expected:
        raise DataError(
            f"{path} is truncated or corrupt: header says {shape} ({expected} bytes), "
            f"found {len(raw) - offset}; download it again"
        )
    array = np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)
    array.flags.writeable = False
    return array


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte file (optionally gzipped) as a read-only uint8 array (cached per file version)."""
    st = path.stat()
    return _read_idx_cached(str(path), st.st_mtime_ns, st.st_size)


def read_fmnist(data_root: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Path]:
    """``(train_images (N,28,28), train_labels, test_images, test_labels, folder)``."""
    folder = find_fmnist(data_root)
    arrays = [read_idx(_idx_file(folder, name)) for name in FMNIST_FILES]  # type: ignore[arg-type]
    for images, labels, name in ((arrays[0], arrays[1], FMNIST_FILES[0]), (arrays[2], arrays[3], FMNIST_FILES[2])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{folder / name}: images {images.shape} do not match labels {labels.shape}; "
                "download the files again"
            )
    return arrays[0], arrays[1].astype(np.int64), arrays[2], arrays[3].astype(np.int64), folder


# ------------------------------------------------------------------------------------------------ CIFAR


@dataclass
class CifarSpec:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    meta_file: str
    names_key: str
    url: str


CIFAR_SPECS = {
    "cifar10-lt": CifarSpec(
        "cifar-10-batches-py", tuple(f"data_batch_{k}" for k in range(1, 6)), ("test_batch",),
        "labels", "batches.meta", "label_names", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100-lt": CifarSpec(
        "cifar-100-python", ("train",), ("test",), "fine_labels", "meta", "fine_label_names",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


#: What a CIFAR batch may name when unpickled: numpy arrays (under numpy 1's and 2's module names) and the
#: bytes codec Python 3 writes protocol-2 bytes with. Anything else could run code of the file's author.
_CIFAR_GLOBALS = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                            *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
                            *((f"numpy.{core}.multiarray", "scalar") for core in ("core", "_core")),
                            *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core"))})


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, strings and numpy arrays only (a downloaded "dataset" is not trusted)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which no CIFAR batch holds and which "
                                         f"could run code when unpickled; it is not the CIFAR python version")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as fh:
            data = _ArrayUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise DataError(f"CIFAR file {path} is missing; extract the full archive again") from exc
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"cannot unpickle CIFAR file {path}: {exc}; download and extract it again") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path} does not hold a CIFAR batch dictionary")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in data.items()}


def find_cifar(name: str, data_root: str | None) -> Path:
    spec = CIFAR_SPECS[name]
    named = user_data_root(data_root, f"Download {spec.url} and extract it there")
    roots = [named[0]] if named is not None else []
    places = []
    for root in roots:
        places += [root / spec.folder, root] if root.name != spec.folder else [root]
    for folder in places:
        if all((folder / f).is_file() for f in spec.train_files + spec.test_files):
            return folder
    searched = "\n".join(f"  {p}" for p in places) or "  (no folder: data.data_root and DSCL_DATA are unset)"
    raise DataError(
        f"{name}: the python-pickle folder {spec.folder!r} with files "
        f"{', '.join(spec.train_files + spec.test_files)} was not found in:\n{searched}\n"
        f"Fix: download {spec.url}, extract it (`tar xzf {spec.url.rsplit('/', 1)[-1]}`) and pass the "
        "folder that contains it as --data-root (data.data_root) or DSCL_DATA."
    )


def _cifar_batch(folder: Path, files: tuple[str, ...], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        batch = _unpickle(folder / f)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{folder / f}: missing key 'data' or {label_key!r}; is this the python version?")
        data = np.asarray(batch["data"], dtype=np.uint8)
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(lab):
            raise DataError(f"{folder / f}: data {data.shape} / labels {lab.shape} are not CIFAR batches")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def read_cifar(name: str, data_root: str | None):
    """``(train (N,3,32,32) uint8, train_labels, test, test_labels, class_names, folder)``."""
    spec = CIFAR_SPECS[name]
    folder = find_cifar(name, data_root)
    x_train, y_train = _cifar_batch(folder, spec.train_files, spec.label_key)
    x_test, y_test = _cifar_batch(folder, spec.test_files, spec.label_key)
    num_classes = 10 if name == "cifar10-lt" else 100
    names = [str(c) for c in range(num_classes)]
    meta = folder / spec.meta_file
    if meta.is_file():
        try:
            got = list(_unpickle(meta).get(spec.names_key, []))  # type: ignore[call-overload]
            if len(got) == num_classes:
                names = [str(n) for n in got]
        except DataError:
            pass
    return x_train, y_train, x_test, y_test, names, folder


# ------------------------------------------------------------------------------------------ split lists


@dataclass
class ListSplit:
    """One parsed list file: image paths (resolved) and labels; ``where[k]`` locates entry k for errors."""

    source: str
    paths: list[str]
    labels: list[int]
    where: list[str]
    num_classes: int | None = None


def resolve_list_file(name: str, list_dir: str | None, what: str) -> Path:
    path = Path(name)
    if not path.is_absolute() and list_dir is not None:
        path = Path(list_dir) / path
    if not path.is_file():
        hint = f" (resolved against data.list_dir={list_dir})" if list_dir and not Path(name).is_absolute() else ""
        raise DataError(f"{what} list file {path} does not exist{hint}; check data.{what}_list / data.list_dir")
    return path


def _join(root: Path, rel: str) -> str:
    p = Path(rel)
    return str(p if p.is_absolute() else root / p)


def _parse_txt(path: Path, text: str, root: Path) -> ListSplit:
    paths, labels, where = [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.rsplit(None, 1)  # the label is the last field; a path may contain spaces
        if len(parts) != 2:
            raise DataError(
                f"{path}, line {lineno}: expected 'relative/path label', got {stripped!r}; "
                "each line must hold an image path and an integer label separated by whitespace"
            )
        rel, label = parts
        try:
            value = int(label)
        except ValueError:
            raise DataError(
                f"{path}, line {lineno}: label {label!r} is not an integer (line {stripped!r})"
            ) from None
        paths.append(_join(root, rel))
        labels.append(value)
        where.append(f"{path}, line {lineno}")
    return ListSplit(str(path), paths, labels, where)


def _parse_json(path: Path, text: str, root: Path) -> ListSplit:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(
            f"{path}: expected a BBN-style JSON object "
            '{"annotations": [{"fpath": ..., "category_id": ...}, ...], "num_classes": C}'
        )
    paths, labels, where = [], [], []
    for k, ann in enumerate(data["annotations"], start=1):
        loc = f"{path}, annotation {k}"
        if not isinstance(ann, dict) or "fpath" not in ann or "category_id" not in ann:
            raise DataError(f"{loc}: each annotation needs 'fpath' and 'category_id', got {ann!r}")
        label = ann["category_id"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(f"{loc}: category_id {label!r} is not an integer")
        try:
            value = int(label)
        except ValueError:
            raise DataError(f"{loc}: category_id {label!r} is not an integer") from None
        paths.append(_join(root, str(ann["fpath"])))
        labels.append(value)
        where.append(loc)
    num_classes = data.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise DataError(f"{path}: num_classes must be a positive integer, got {num_classes!r}")
    return ListSplit(str(path), paths, labels, where, num_classes)


def read_list(path: Path, root: Path) -> ListSplit:
    """Parse an OLTR txt list or a BBN JSON list (detected by extension, then by content)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read list file {path}: {exc}") from exc
    is_json = path.suffix.lower() == ".json" or text.lstrip().startswith("{")
    split = _parse_json(path, text, root) if is_json else _parse_txt(path, text, root)
    if not split.paths:
        raise DataError(f"{path}: the split is empty (no image entries); check that it is the right file")
    return split


# -------------------------------------------------------------------------------------------- folders


def _hidden(name: str) -> bool:
    # .ipynb_checkpoints, .git, .DS_Store, ._photo.jpg (macOS resource forks): never data
    return name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (``IMAGE_EXTENSIONS``, any case, recursively, sorted), hidden
    entries skipped at every level."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(_hidden(part) for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _class_subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


# "/" cannot stand in a folder name anywhere, the others not on Windows (nor control characters): a
# class named "T-shirt/top" (Fashion-MNIST) is kept in a folder named "T-shirt_top"
_NOT_IN_FOLDER_NAMES = re.compile(r'[/\\:*?"<>|\x00-\x1f]')


def folder_safe_name(name: str) -> str:
    """The spelling of a class name that a folder can carry: each character a folder name cannot hold on
    some system (``/ \\ : * ? " < > |`` and control characters) becomes ``_`` (``T-shirt/top`` ->
    ``T-shirt_top``; spaces are kept)."""
    return _NOT_IN_FOLDER_NAMES.sub("_", name)


def folder_safe_spellings(class_names: Sequence[str]) -> dict[str, int]:
    """``{folder-safe spelling: class index}`` for the classes whose spelling differs from their name,
    is no class's exact name and belongs to that class alone (the spellings a name may be matched by)."""
    exact = set(class_names)
    owners: dict[str, list[int]] = {}
    for i, name in enumerate(class_names):
        safe = folder_safe_name(name)
        if safe != name and safe not in exact:
            owners.setdefault(safe, []).append(i)
    return {safe: idx[0] for safe, idx in owners.items() if len(idx) == 1}


def match_class_folders(folder: Path, class_names: Sequence[str]) -> tuple[dict[str, int], list[str], list[str]]:
    """Which class each (non-hidden) subfolder of ``folder`` holds: the class of that exact name, else the
    class whose :func:`folder_safe_name` it is, when that spelling belongs to one class only.

    Returns:
        ``({folder name: class index}, [folders matching no class], notes)``; the notes name the
        folder-safe matches used (``T-shirt_top = T-shirt/top``).

    Raises:
        DataError: a folder that is the folder-safe spelling of several classes, or two folders that
            hold the same class (its exact name and its folder-safe spelling).
    """
    names = list(class_names)
    index_of = {name: i for i, name in enumerate(names)}
    spellings = folder_safe_spellings(names)
    mapping: dict[str, int] = {}
    unknown: list[str] = []
    by_spelling: list[str] = []
    for sub in _class_subfolders(folder):
        if sub in index_of:
            mapping[sub] = index_of[sub]
        elif sub in spellings:
            mapping[sub] = spellings[sub]
            by_spelling.append(sub)
        else:
            owners = [n for n in names if folder_safe_name(n) == sub]
            if len(owners) > 1:
                raise DataError(f"{folder}: class folder {sub} is the folder-safe spelling of several classes "
                                f"({', '.join(owners)}), so it cannot say which; give the images as a labelled "
                                f"list (one 'path<TAB>class name' line per image) instead")
            unknown.append(sub)
    for sub in by_spelling:
        name = names[mapping[sub]]
        if name in mapping:
            raise DataError(f"{folder}: class folders {name} and {sub} both hold class {name}; keep one")
    notes = []
    if by_spelling:
        notes.append(f"{folder}: class folders named by the folder-safe spelling of a class (characters a folder "
                     f"name cannot hold, such as /, written as _): "
                     + ", ".join(f"{sub} = {names[mapping[sub]]}" for sub in by_spelling))
    return mapping, unknown, notes


def read_folder_split(folder: Path, class_names: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    """Images of ``folder/<class>/**``; classes = sorted subfolders unless ``class_names`` is given
    (then a folder holds a class by its name or its folder-safe spelling, :func:`match_class_folders`).

    Hidden entries (names starting with ``.``, e.g. ``.ipynb_checkpoints``, ``.git``, ``.DS_Store``)
    are skipped at every level: a hidden folder is never a class and files inside one are never images.
    Files are those with an image extension (``IMAGE_EXTENSIONS``, any case), searched recursively.
    Images come in class order, then folder order.
    """
    if class_names is None:
        class_names = _class_subfolders(folder)
        mapping = {name: i for i, name in enumerate(class_names)}
    else:
        mapping, unknown, _ = match_class_folders(folder, class_names)
        if unknown:
            raise DataError(
                f"{folder}: class folders {unknown[:5]} do not exist in the train split; "
                "every val/test class must also be a train class"
            )
    paths, labels = [], []
    for sub, label in sorted(mapping.items(), key=lambda item: (item[1], item[0])):
        files = image_files(folder / sub)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return paths, labels, class_names
