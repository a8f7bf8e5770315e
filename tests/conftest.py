import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# cuBLAS reads this when the process first uses it (issue #22 item 2): set it before any test touches CUDA,
# so that the deterministic GPU tests work after earlier tests made cuBLAS calls
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

FMNIST = Path("/usr/share/datasets/fashion-mnist")
HAS_FMNIST = bool(os.environ.get("DSCL_DATA")) or (FMNIST / "t10k-labels-idx1-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(
    not HAS_FMNIST,
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist (CI installs it) or set DSCL_DATA",
)


def dscl_cmd() -> list[str]:
    exe = shutil.which("dscl", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "dscl"]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([*dscl_cmd(), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=env)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A finished ``dscl run --preset smoke`` (stage 1, stage 2, report), shared by the whole session.

    Treat it as read-only: tests that change a run must copy it first (``shutil.copytree``).
    """
    if not HAS_FMNIST:
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist or set DSCL_DATA")
    from dscl.classify import classify
    from dscl.config import load_config
    from dscl.evaluation import evaluate
    from dscl.pretrain import pretrain

    out = tmp_path_factory.mktemp("smoke") / "run"
    cfg = load_config("smoke")
    pretrain(cfg, out, device="cpu", progress=False)
    classify(out, cfg=cfg, device="cpu", progress=False)
    evaluate(out, cfg=cfg, device="cpu", progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# shared by the command-line tests (tests/test_cli*.py)

REPORT_KEYS = {"dataset", "method", "top1", "top5", "many", "medium", "few", "shot_classes", "per_class",
               "seed", "epochs", "wall_seconds"}


def check_report(report: dict, num_classes: int) -> None:
    """The keys and value ranges every report.json has."""
    assert set(report) >= REPORT_KEYS
    for key in ("top1", "top5"):
        assert 0 <= report[key] <= 100
    for key in ("many", "medium", "few"):
        assert report[key] is None or 0 <= report[key] <= 100
    assert len(report["per_class"]) == num_classes
    for row in report["per_class"]:
        assert set(row) >= {"class", "train_count", "test_count", "accuracy"}
    assert sum(report["shot_classes"].values()) == num_classes
    assert report["wall_seconds"] > 0


def write_png_dataset(root: Path, num_classes=3, train_counts=(12, 6, 3), test_per_class=4) -> None:
    """A split-list dataset of 32 x 32 PNGs under ``root`` (``train.txt``, ``test.txt``, ``images/``);
    one bright channel per class makes the classes separable."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for split, counts in (("train", train_counts), ("test", [test_per_class] * num_classes)):
        for c, n in enumerate(counts):
            folder = root / "images" / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
                img[:, :, c] += 150  # one bright channel per class: separable
                Image.fromarray(img).save(folder / f"{i}.png")
                lines[split].append(f"images/{split}/class{c}/{i}.png {c}")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    """``array`` as an idx file (the Fashion-MNIST format), gzip-compressed unless ``compress`` is False."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def write_tiny_fmnist(folder: Path) -> None:
    """A 50-image Fashion-MNIST in ``folder`` (the four idx files the reader looks for)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(10), 5)
    images = np.arange(50 * 28 * 28).reshape(50, 28, 28) % 251
    for prefix in ("train", "t10k"):
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            write_idx(folder / f"{prefix}-{kind}-ubyte.gz", array)


def without_cuda_sync(fn):
    """``fn()`` under ``torch.cuda.set_sync_debug_mode("error")``: any host-device synchronisation raises
    (call it after a warm-up, once the tables are on the device)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
