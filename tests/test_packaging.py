"""Packaging: the distribution's name (``dscl`` on PyPI is someone else's package), the install hints that
name it, and the wheel: built from a copy of the source, installed into a fresh virtual environment and run
from there, never from ``src/``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import needs_fmnist

ROOT = Path(__file__).resolve().parents[1]
#: the text a user may copy an install command from
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".txt", ".cfg"}


def distribution_name() -> str:
    """``[project] name`` of pyproject.toml (read without tomllib: Python 3.10 has none)."""
    project = ROOT.joinpath("pyproject.toml").read_text().split("[project]", 1)[1]
    match = re.search(r'^name\s*=\s*"([^"]+)"', project, re.MULTILINE)
    assert match, "pyproject.toml has no [project] name"
    return match.group(1)


def _text_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Makefile"]
    for folder in ("src", "scripts", "benchmarks", "docs", ".ci"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                  and ".egg-info" not in str(p) and "__pycache__" not in p.parts]
    return [p for p in files if p.is_file()]


def test_the_distribution_is_not_the_unrelated_dscl_and_every_install_hint_names_it():
    """Issue 28 item 18: ``pip install dscl`` installs an unrelated package, so the distribution has its own
    name and every ``pip install '...[extra]'`` hint (and the ``trackers`` extra itself) uses it."""
    from dscl.trackers import pip_command

    name = distribution_name()
    assert name != "dscl" and name == "dscl-lt"
    wrong = [f"{p.relative_to(ROOT)}:{i}" for p in _text_files()
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if re.search(r"(?<![\w.-])dscl\[", line)]
    assert wrong == [], f"'dscl[...]' extras (the unrelated package) in {wrong}"
    assert pip_command("wandb") == f"pip install '{name}[wandb]'"
    assert f"pip install '{name}[trackers]'" in ROOT.joinpath("README.md").read_text()


def _build_wheel(tmp: Path) -> tuple[Path, str]:
    """A wheel of a clean copy of the source (no build/ or egg-info of earlier builds can leak into it, and
    the working tree stays untouched), built offline with this environment's setuptools. Returns the wheel
    and the build's output."""
    src = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", src / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    wheels = list((tmp / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], build.stdout + build.stderr


def _fresh_venv(venv: Path, wheel: Path) -> Path:
    """A virtual environment holding only the wheel; its dependencies (torch & co., slow to install) come
    from this environment's site-packages through a ``.pth`` line, which puts them on ``sys.path`` after the
    venv's own packages and runs none of their ``.pth`` files (so this checkout's editable install of dscl
    is not seen). Returns the venv's python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(purelib, "_dependencies_from_the_test_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.mark.slow
@needs_fmnist
def test_the_wheel_installs_into_a_fresh_venv_and_runs_from_there(tmp_path):
    name = distribution_name()
    wheel, log = _build_wheel(tmp_path)
    assert "deprecated" not in log.lower() and "BuildBackendWarning" not in log, log  # e.g. the licence table
    assert wheel.name.startswith(name.replace("-", "_") + "-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    presets = {f"dscl/configs/{p.name}" for p in (ROOT / "src" / "dscl" / "configs").glob("*.yaml")}
    assert presets and presets <= names and "dscl/py.typed" in names  # package data
    assert f"Name: {name}\n" in meta and "License-Expression: MIT\n" in meta
    assert f"Requires-Dist: {name}[mlflow,tensorboard,wandb]; extra == \"trackers\"" in meta

    venv = tmp_path / "venv"
    python = _fresh_venv(venv, wheel)
    work = tmp_path / "work"  # nowhere near src/: the current directory must not shadow the installed package
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), PYTHONNOUSERSITE="1")

    def run(*cmd: str) -> str:
        res = subprocess.run(list(cmd), capture_output=True, text=True, cwd=work, env=env, timeout=600)
        assert res.returncode == 0, (cmd, res.stdout, res.stderr)
        return res.stdout

    where = run(str(python), "-c", "import dscl; print(dscl.__file__)").strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    dscl = str(venv / "bin" / "dscl")
    from dscl import __version__

    assert run(dscl, "--version").strip() == f"dscl {__version__}"
    listed = run(dscl, "presets")
    assert all(Path(p).stem in listed for p in presets)
    run(dscl, "pretrain", "--preset", "smoke", "optim.epochs=1", "--out", str(work / "run"), "--no-progress")
    assert (work / "run" / "checkpoints" / "last.pt").is_file()
