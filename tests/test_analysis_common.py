"""dscl.analysis.common: opening a run for ``dscl analyze``, its shot groups, the --classes words and
names, the stage-1 model at initialisation, the output folder."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dscl.analysis.common import (
    AnalysisError,
    RunArtifacts,
    analysis_dir,
    default_classes,
    open_run,
    resolve_classes,
    stage1_model,
)
from dscl.config import dump_config, load_config

NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal"]


def _art(counts, tmp_path: Path = Path("runs/r"), cfg=None, names=NAMES) -> RunArtifacts:
    """A run's artifacts with hand-made splits (nothing trained: no stage-1 state, no predictor)."""
    splits = SimpleNamespace(name="toy", train_counts=list(counts), class_names=list(names), num_classes=len(names))
    return RunArtifacts(tmp_path, cfg or load_config("smoke"), splits, None, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- classes


def test_groups_follow_the_runs_thresholds():
    cfg = load_config("smoke", overrides=["eval.many_threshold=50", "eval.few_threshold=10"])
    art = _art([200, 60, 50, 20, 10, 3], cfg=cfg)
    assert art.train_counts == [200, 60, 50, 20, 10, 3]
    assert art.groups() == {"many": [0, 1], "medium": [2, 3, 4], "few": [5]}


@pytest.mark.parametrize(("counts", "expected"), [
    ([200, 150, 50, 30, 5, 2], "head,tail"),
    ([60, 50, 40, 30, 5, 2], "medium,tail"),   # the smoke preset: no Many class
    ([200, 150, 50, 30, 25, 20], "head,medium"),
    ([50, 50, 40, 30, 25, 20], "medium"),      # one group only: named once
])
def test_default_classes_fit_the_run(counts, expected):
    assert default_classes(_art(counts)) == expected
    assert resolve_classes(expected, _art(counts))  # and they resolve on that run


def test_default_classes_of_a_run_without_classes():
    assert default_classes(_art([], names=[])) == "all"


def test_resolve_classes_words_names_and_indices():
    art = _art([200, 150, 50, 30, 5, 2])  # many 0 1, medium 2 3, few 4 5
    assert resolve_classes("head,tail", art) == [0, 1, 4, 5]
    assert resolve_classes("many, few", art) == [0, 1, 4, 5]
    assert resolve_classes("medium", art) == [2, 3]
    assert resolve_classes("all", art) == list(range(6))
    assert resolve_classes("coat,0,TROUSER", art) == [4, 0, 1]  # order kept, names case-insensitive
    assert resolve_classes("tail,5,sandal,few", art) == [4, 5]  # duplicates dropped
    assert resolve_classes(" 3 , ", art) == [3]


@pytest.mark.parametrize(("spec", "message"), [
    ("", "is empty"),
    (" , ", "is empty"),
    ("6", r"class index out of range 0\.\.5"),
    ("-1", r"class index out of range 0\.\.5"),
    ("hat", r"'hat' is not a class of toy; valid: head, medium, tail, all, indices 0\.\.5, or names: T-shirt"),
])
def test_resolve_classes_errors(spec, message):
    with pytest.raises(AnalysisError, match=message):
        resolve_classes(spec, _art([200, 150, 50, 30, 5, 2]))


def test_resolve_classes_refuses_an_empty_group():
    with pytest.raises(AnalysisError, match="'head': the run has no classes in that shot group"):
        resolve_classes("head", _art([60, 50, 40, 30, 5, 2]))


# ---------------------------------------------------------------------------------------------- runs


def test_analysis_dir_defaults_to_the_runs_analysis_folder(tmp_path):
    art = _art([1] * 6, tmp_path / "run")
    assert analysis_dir(art, None) == tmp_path / "run" / "analysis" and (tmp_path / "run" / "analysis").is_dir()
    assert analysis_dir(art, tmp_path / "x" / "y") == tmp_path / "x" / "y" and (tmp_path / "x" / "y").is_dir()
    assert analysis_dir(art, str(tmp_path / "x" / "y")) == tmp_path / "x" / "y"  # an existing folder is fine


def test_open_run_needs_a_run_with_a_finished_stage1(tmp_path):
    with pytest.raises(ValueError, match=r"run directory .*nowhere does not exist \(give the --out folder"):
        open_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.yaml"):
        open_run(tmp_path / "empty")
    (tmp_path / "configured").mkdir()
    dump_config(load_config("smoke"), tmp_path / "configured" / "config.yaml")
    with pytest.raises(ValueError, match="last.pt"):
        open_run(tmp_path / "configured")


def test_stage1_model_at_initialisation_is_the_seeded_training_start():
    cfg = load_config("smoke", overrides=["optim.seed=3"])
    art = _art([1] * 6, cfg=cfg)
    torch.manual_seed(123)  # whatever the global RNG holds, the initial model is the training's
    a = stage1_model(art, initial=True)
    torch.manual_seed(456)
    b = stage1_model(art, initial=True)
    assert not a.training and len(a.queue) == 0
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    other = stage1_model(_art([1] * 6, cfg=load_config("smoke", overrides=["optim.seed=4"])), initial=True)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), other.state_dict().values(),
                                                      strict=True))


def test_stage1_model_of_a_cross_entropy_run_is_refused():
    art = _art([1] * 6, Path("runs/ce"), cfg=load_config("smoke", overrides=["loss.loss=ce"]))
    with pytest.raises(AnalysisError, match="runs/ce was trained with cross-entropy"):
        stage1_model(art)
