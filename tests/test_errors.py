"""One error base: every error class dscl defines for its users derives from DsclError (issue #28 item 17)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import dscl
from dscl.errors import DivergedError, DsclError, LaunchError, UsageError

#: Exceptions dscl defines that are not errors in the user's input (control flow)
NOT_USER_ERRORS = {"Preempted"}


def _dscl_exception_classes() -> dict[str, type]:
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(dscl.__path__, "dscl."):
        if info.name.startswith(("dscl.__main__", "dscl.backbones.timm", "dscl.backbones.open_clip")):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_error_class_dscl_defines_derives_from_one_base():
    classes = _dscl_exception_classes()
    names = {q.rsplit(".", 1)[1] for q in classes}
    # the domain classes are all there (the walk is not vacuous)
    assert {"ConfigError", "DataError", "RunDirError", "CheckpointError", "CompareError", "SweepError",
            "EnsembleError", "AnalysisError", "TrackerError", "UsageError", "LaunchError", "DivergedError"} <= names
    stray = [q for q, c in classes.items()
             if not issubclass(c, DsclError) and q.rsplit(".", 1)[1] not in NOT_USER_ERRORS]
    assert stray == []


@pytest.mark.parametrize("cls, also", [(UsageError, ValueError), (LaunchError, ValueError), (LaunchError, RuntimeError),
                                       (DivergedError, FloatingPointError)])
def test_user_errors_keep_the_builtin_base_library_callers_catch(cls, also):
    assert issubclass(cls, DsclError) and issubclass(cls, also)


def test_launch_and_divergence_errors_are_user_errors():
    from dscl import dist

    with pytest.raises(LaunchError, match="SLURM_PROCID"):
        dist.slurm_environment({"SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2"})
