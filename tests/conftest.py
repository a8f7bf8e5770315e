import os
import shutil
import subprocess
import sys
from pathlib import Path

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
