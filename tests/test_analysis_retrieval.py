"""dscl analyze retrieval / patch-retrieval: the metrics on constructed inputs, and the CLI end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from dscl.analysis.common import AnalysisError, RunArtifacts
from dscl.analysis.retrieval import (
    nearest_neighbours,
    parse_box,
    query_patch_feature,
    response_maps,
    response_scores,
    retrieval_metrics,
)
from dscl.cli import main


def _at(deg: float, scale: float = 1.0) -> list[float]:
    return [scale * math.cos(math.radians(deg)), scale * math.sin(math.radians(deg))]


# ----------------------------------------------------------------------------------------------
# units


def test_precision_at_k_on_known_neighbours() -> None:
    # 2-d features on the unit circle (scaled: cosine must not care); neighbours follow the angle.
    train_deg = [0, 10, 20, 90, 100, 180]
    train_y = torch.tensor([0, 0, 1, 1, 2, 2])
    train = torch.tensor([_at(d, s) for d, s in zip(train_deg, [1, 3, 0.5, 2, 7, 1], strict=True)])
    query_deg = [2, 93, 99, 170, 17, 8]
    query_y = torch.tensor([0, 1, 2, 2, 1, 1])
    queries = torch.tensor([_at(d, 4.0) for d in query_deg])

    sims, idx = nearest_neighbours(queries, train, 3)
    expected_idx = [[0, 1, 2], [3, 4, 2], [4, 3, 2], [5, 4, 3], [2, 1, 0], [1, 0, 2]]
    assert idx.tolist() == expected_idx
    assert torch.all(sims[:, :-1] >= sims[:, 1:])
    assert sims[0, 0].item() == pytest.approx(math.cos(math.radians(2)), abs=1e-6)
    sims2, idx2 = nearest_neighbours(queries, train, 3, chunk=2)  # chunking changes nothing
    assert torch.equal(idx2, idx) and torch.allclose(sims2, sims)

    # class 3 has no queries; groups: many [0], medium [1], few [2, 3]
    m = retrieval_metrics(train_y[idx], query_y, 4, {"many": [0], "medium": [1], "few": [2, 3]})
    per = m["per_class"]
    assert [r["test_count"] for r in per] == [1, 3, 2, 0]
    assert per[0]["precision_at_k"] == pytest.approx(2 / 3)
    assert per[1]["precision_at_k"] == pytest.approx(4 / 9)  # 2/3, 1/3, 1/3
    assert per[2]["precision_at_k"] == pytest.approx(1 / 2)  # 1/3, 2/3
    assert per[3]["precision_at_k"] is None and per[3]["top1"] is None
    assert [r["top1"] for r in per[:3]] == pytest.approx([1.0, 2 / 3, 1.0])
    g = m["groups"]
    assert g["many"]["precision_at_k"] == pytest.approx(2 / 3)
    assert g["medium"]["precision_at_k"] == pytest.approx(4 / 9)
    assert g["few"]["precision_at_k"] == pytest.approx(1 / 2) and g["few"]["classes"] == 2
    assert g["few"]["top1"] == pytest.approx(1.0)
    assert m["overall"]["precision_at_k"] == pytest.approx(29 / 54)  # mean over the 3 classes with queries
    assert m["overall"]["precision_at_k_micro"] == pytest.approx(1 / 2)  # mean over the 6 queries
    assert m["overall"]["top1"] == pytest.approx(8 / 9)
    assert m["overall"]["top1_micro"] == pytest.approx(5 / 6)

    empty = retrieval_metrics(train_y[idx], query_y, 4, {"many": [], "medium": [0, 1], "few": [2, 3]})
    assert empty["groups"]["many"] == {"classes": 0, "precision_at_k": None, "top1": None}
    with pytest.raises(ValueError, match="k must be in 1..6"):
        nearest_neighbours(queries, train, 7)


def test_patch_response_finds_the_planted_location() -> None:
    torch.manual_seed(0)
    c = 8
    query = torch.randn(c)
    maps = torch.rand(3, c, 4, 4)  # positive noise
    maps[1, :, 2, 3] = 5.0 * query  # image 1 holds the query direction at row 2, col 3
    maps[2, :, 0, 0] = 0.0  # an all-zero position scores 0, not NaN
    resp = response_maps(maps, query)
    assert resp.shape == (3, 4, 4)
    manual = torch.nn.functional.cosine_similarity(maps[0, :, 1, 2], query, dim=0)
    assert resp[0, 1, 2].item() == pytest.approx(manual.item(), abs=1e-6)
    assert resp[2, 0, 0].item() == 0.0
    scores, argmax = response_scores(resp)
    assert scores[1].item() == pytest.approx(1.0, abs=1e-6)
    assert argmax[1].tolist() == [2, 3]
    assert int(scores.argmax()) == 1
    assert torch.all(scores <= 1.0 + 1e-6)


def test_query_patch_feature_pools_the_box_region() -> None:
    # 28 px image -> 4x4 map (7 px per cell); the top-left 2x2 cells hold b, the rest a.
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 4.0])
    fmap = a.view(1, 3, 1, 1).repeat(1, 1, 4, 4)
    fmap[0, :, :2, :2] = b[:, None, None]
    feat = query_patch_feature(fmap, (0, 0, 14, 14), 28)
    assert torch.allclose(feat, torch.tensor([0.0, 0.6, 0.8]), atol=1e-6)
    scores, argmax = response_scores(response_maps(fmap, feat))
    assert scores.item() == pytest.approx(1.0, abs=1e-6)
    assert argmax[0].tolist() == [0, 0]


def test_parse_box() -> None:
    assert parse_box(None, 28) == (7.0, 7.0, 21.0, 21.0)
    assert parse_box(" 0, 1,28 ,27.5", 28) == (0.0, 1.0, 28.0, 27.5)
    for bad, msg in [("1,2,3", "four comma-separated"), ("a,b,c,d", "four comma-separated"),
                     ("0,0,29,10", "not inside the 28x28"), ("-1,0,5,5", "not inside"),
                     ("10,10,5,20", "empty"), ("3,3,3,9", "empty"), ("0,0,nan,5", "finite")]:
        with pytest.raises(AnalysisError, match=msg):
            parse_box(bad, 28)


# ----------------------------------------------------------------------------------------------
# end to end on the smoke run


@pytest.mark.slow
@needs_fmnist
def test_retrieval_cli_numbers_are_consistent(smoke_run: Path, tmp_path: Path, capsys) -> None:
    rc = main(["analyze", "retrieval", "--run", str(smoke_run), "--k", "3", "--classes", "all",
               "--no-progress", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "P@3" in printed and "retrieval.png" in printed
    res = json.loads((tmp_path / "retrieval.json").read_text())
    assert (tmp_path / "retrieval.png").stat().st_size > 10_000
    assert res["settings"]["k"] == 3 and "L2-normalised" in res["settings"]["features"]
    (run,) = res["runs"]
    nb = np.load(tmp_path / "retrieval_neighbours.npz")
    idx, sims = nb["run0_indices"], nb["run0_similarities"]
    y_test, y_train = nb["test_labels"], nb["run0_train_labels"]
    assert idx.shape == (run["test_images"], 3) and idx.max() < run["train_images"]
    assert np.all(sims[:, :-1] >= sims[:, 1:]) and np.all(np.abs(sims) <= 1 + 1e-5)

    hits = y_train[idx] == y_test[:, None]
    assert run["overall"]["precision_at_k_micro"] == pytest.approx(hits.mean())
    assert run["overall"]["top1_micro"] == pytest.approx(hits[:, 0].mean())
    for row in run["per_class"]:
        mask = y_test == row["class"]
        assert row["test_count"] == mask.sum()
        assert row["precision_at_k"] == pytest.approx(hits[mask].mean())
        assert 0 <= row["precision_at_k"] <= 1 and 0 <= row["top1"] <= 1
    per = [r["precision_at_k"] for r in run["per_class"]]
    assert run["overall"]["precision_at_k"] == pytest.approx(np.mean(per))
    assert run["groups"]["many"]["precision_at_k"] is None  # the smoke subset has no Many class
    for g in ("medium", "few"):
        members = run["group_classes"][g]
        assert run["groups"][g]["precision_at_k"] == pytest.approx(np.mean([per[c] for c in members]))

    # drawn queries: the first test image of every class, neighbours as in the npz
    assert [q["label"] for q in res["queries"]] == list(range(len(run["per_class"])))
    for q in res["queries"]:
        assert q["test_index"] == int(np.flatnonzero(y_test == q["label"])[0])
        got = q["runs"][0]["neighbours"]
        assert [n["index"] for n in got] == idx[q["test_index"]].tolist()
        assert [n["same_class"] for n in got] == [n["label"] == q["label"] for n in got]
        s = [n["similarity"] for n in got]
        assert s == sorted(s, reverse=True)


def _first_test_images(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Open runs with only the first ``n`` test images (the smoke run's 10,000 take ~6 s per pass on one core)."""
    import dscl.analysis.retrieval as mod

    real = mod.open_run

    def opened(path: str | Path) -> RunArtifacts:
        art = real(path)
        art.splits.test = art.splits.test.subset(range(n))
        return art

    monkeypatch.setattr(mod, "open_run", opened)


@needs_fmnist
def test_retrieval_compare_same_run_twice(smoke_run: Path, tmp_path: Path, capsys,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _first_test_images(monkeypatch, 2000)
    rc = main(["analyze", "retrieval", "--run", str(smoke_run), "--compare-run", str(smoke_run), "--k", "2",
               "--classes", "tail", "--queries-per-class", "2", "--no-progress", "--device", "cpu",
               "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "retrieval.json").read_text())
    a, b = res["runs"]
    assert a["test_images"] == b["test_images"] == 2000
    assert a["label"] != b["label"]  # same directory twice still gets two column blocks
    for key in ("per_class", "groups", "overall"):
        assert a[key] == b[key]
    assert len(res["queries"]) == 2 * len(res["settings"]["drawn_classes"])
    for q in res["queries"]:
        assert q["runs"][0]["neighbours"] == q["runs"][1]["neighbours"]
    assert capsys.readouterr().out.count("P@2") == 2


@needs_fmnist
def test_patch_retrieval_cli(smoke_run: Path, tmp_path: Path, capsys) -> None:
    rc = main(["analyze", "patch-retrieval", "--run", str(smoke_run), "--k", "4", "--box", "0,0,14,28",
               "--no-progress", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    assert "same class as the query" in capsys.readouterr().out
    res = json.loads((tmp_path / "patch_retrieval.json").read_text())
    assert (tmp_path / "patch_retrieval.png").stat().st_size > 10_000
    assert res["query"]["box"] == [0, 0, 14, 28]
    assert res["settings"]["feature_map_size"] == [4, 4]
    items = res["retrieved"]
    assert len(items) == 4 and len({r["index"] for r in items}) == 4
    scores = [r["score"] for r in items]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 + 1e-5 for s in scores)
    assert res["same_class_fraction"] == sum(r["label"] == res["query"]["label"] for r in items) / 4
    assert "max" in res["settings"]["score"]

    # default query: first test image of the rarest class; default box: the central half
    assert main(["analyze", "patch-retrieval", "--run", str(smoke_run), "--k", "2", "--no-progress",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "patch_retrieval.json").read_text())
    assert res["query"]["box"] == [7, 7, 21, 21]
    counts = [r["train_count"] for r in json.loads((smoke_run / "report.json").read_text())["per_class"]]
    assert res["query"]["train_count"] == min(counts)


@needs_fmnist
@pytest.mark.parametrize("args, message", [
    (["retrieval", "--classes", "Sweater"], "'Sweater' is not a class"),
    (["retrieval", "--k", "0"], "--k 0: must be at least 1"),
    (["retrieval", "--k", "100000"], "exceeds the"),
    (["retrieval", "--classes", "tail", "--queries-per-class", "0"], "--queries-per-class 0"),
    (["patch-retrieval", "--box", "5,5,40,9"], "not inside the 28x28"),
    (["patch-retrieval", "--box", "5,5"], "four comma-separated"),
    (["patch-retrieval", "--query", "10000000"], "out of range"),
])
def test_bad_arguments_exit_2(smoke_run: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    rc = main(["analyze", *args, "--run", str(smoke_run), "--no-progress", "--device", "cpu",
               "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("dscl analyze: error:") and message in err
    assert not (tmp_path / "retrieval.json").exists() and not (tmp_path / "patch_retrieval.json").exists()


@pytest.mark.slow
@needs_fmnist
def test_default_classes_fit_a_run_without_many_classes(smoke_run: Path, tmp_path: Path, capsys) -> None:
    # issue #13: the default head,tail failed on the smoke run ("no classes in that shot group"); the
    # default now uses the run's most and least frequent non-empty groups (medium and few here)
    rc = main(["analyze", "retrieval", "--run", str(smoke_run), "--no-progress", "--device", "cpu",
               "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "retrieval.json").read_text())
    assert res["settings"]["classes"] == "medium,tail"
    assert {q["train_count"] for q in res["queries"]} and all(q["train_count"] <= 100 for q in res["queries"])
    # asking for a group the run lacks still fails clearly
    assert main(["analyze", "retrieval", "--run", str(smoke_run), "--classes", "head", "--no-progress",
                 "--out", str(tmp_path / "h")]) == 2
    assert "'head'" in capsys.readouterr().err


@needs_fmnist
def test_run_without_checkpoint_fails_clearly(smoke_run: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(smoke_run / "config.yaml", bare / "config.yaml")
    for args in (["patch-retrieval", "--run", str(bare)],
                 ["retrieval", "--run", str(smoke_run), "--compare-run", str(bare), "--classes", "tail"]):
        assert main(["analyze", *args, "--no-progress", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dscl analyze: error:")
        assert "checkpoints/last.pt does not exist" in err and "dscl pretrain" in err
    assert main(["analyze", "retrieval", "--run", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow  # features of the 10,000 test images
def test_retrieval_figure_title_is_not_clipped(smoke_run, tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    import dscl.analysis.retrieval as retrieval_mod

    figures = []
    real_save = retrieval_mod.save_figure

    def keep(fig, path, **kwargs):
        figures.append(fig)
        return real_save(fig, path)  # left open: the test draws it

    monkeypatch.setattr(retrieval_mod, "save_figure", keep)
    retrieval_mod.retrieval(smoke_run, classes="medium,few", out=tmp_path, device="cpu", progress=False)
    (fig,) = figures
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig._suptitle.get_window_extent(canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox.width)
