"""dscl.interop: importing checkpoints in the official DSCL / MoCo, torchvision and dscl layouts;
exporting runs as TorchScript, ONNX and torchvision-layout state dicts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from conftest import needs_fmnist
from dscl import load_run
from dscl.config import load_config
from dscl.evaluation import evaluate
from dscl.interop import export_run, import_checkpoint, read_external, state_dict_export
from dscl.run import CheckpointError, RunDirError, load_checkpoint, load_classifier, load_stage1

# ----------------------------------------------------------------------------------------------
# checkpoints in the exact layouts other code writes


def official_stage1(q: dict[str, torch.Tensor], k: dict[str, torch.Tensor], dim: int = 128, size: int = 256,
                    epoch: int = 200) -> dict:
    """The official DSCL / MoCo-v2 ``checkpoint.pth.tar``: DDP ``module.`` prefix, encoder_q / encoder_k with
    the MLP head as ``fc.0`` / ``fc.2``, a (dim, K) feature queue, a (1, K) label queue of random labels in
    [0, 1000) and the pointer."""
    sd = {f"module.encoder_q.{n}": v for n, v in q.items()}
    sd.update({f"module.encoder_k.{n}": v for n, v in k.items()})
    sd["module.queue"] = nn.functional.normalize(torch.randn(dim, size), dim=0)
    sd["module.main_label_queue"] = torch.randint(0, 1000, (1, size))
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": epoch, "arch": "resnet", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "momentum": 0.9, "params": [0]}]}}


def official_from_dscl(model_state: dict[str, torch.Tensor]) -> dict:
    """A dscl stage-1 model state rewritten in the official key layout (our convnet: fast to test)."""
    q, k = {}, {}
    for name, v in model_state.items():
        for ours, theirs, part in (("online.backbone.", "", q), ("online.head.", "fc.", q),
                                   ("momentum.backbone.", "", k), ("momentum.head.", "fc.", k)):
            if name.startswith(ours):
                part[theirs + name[len(ours):]] = v
    return official_stage1(q, k)


def _moco_resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=128)
    m.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))  # the MoCo-v2 head
    return m


def _r18_cfg(*extra: str):
    return load_config("smoke", overrides=["model.backbone=resnet18", "data.image_size=32", *extra])


# ----------------------------------------------------------------------------------------------
# import


@needs_fmnist
def test_official_resnet18_stage1_layout_lands_in_the_right_places(tmp_path: Path) -> None:
    q, k = _moco_resnet18(0), _moco_resnet18(1)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(official_stage1(q.state_dict(), k.state_dict()), path)
    res = import_checkpoint(path, _r18_cfg(), tmp_path / "run")
    assert res.format == "official" and not res.classifier and res.unexpected == []
    assert any("queue (128, 256) not imported" in n for n in res.notes)
    state = load_stage1(tmp_path / "run")
    assert state.finished and state.facts.imported["head"] and state.facts.imported["file_epoch"] == 200
    model = state.model
    for name, v in q.state_dict().items():
        ours = ("online.head." + name[3:]) if name.startswith("fc.") else "online.backbone." + name
        assert torch.equal(model[ours], v), name
    for name, v in k.state_dict().items():
        ours = ("momentum.head." + name[3:]) if name.startswith("fc.") else "momentum.backbone." + name
        assert torch.equal(model[ours], v), name
    assert int(model["queue.filled"]) == 0 and state.data.class_names[0] == "T-shirt/top"
    # the imported backbone computes exactly what encoder_q's trunk computes
    p = load_run(tmp_path / "run", stage1_ok=True)
    trunk = _moco_resnet18(0).eval()
    trunk.fc = nn.Identity()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(p.features_of(x), trunk(x), atol=1e-5)


@needs_fmnist
def test_official_stage2_file_becomes_the_classifier_and_exports_to_torchvision(tmp_path: Path) -> None:
    torch.manual_seed(2)
    tv = torchvision.models.resnet18(num_classes=10)
    for m in tv.modules():  # non-trivial BatchNorm statistics, as a trained stage 2 leaves them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "linear_best.pth.tar"
    torch.save({"epoch": 40, "state_dict": {f"module.{n}": v for n, v in tv.state_dict().items()},
                "best_acc1": 12.5}, path)
    res = import_checkpoint(path, _r18_cfg(), tmp_path / "run")
    assert res.format == "torchvision" and res.classifier
    assert "online.head.* (freshly initialised)" in res.missing
    p = load_run(tmp_path / "run")
    batch = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    tv.eval()
    with torch.no_grad():
        assert torch.allclose(p.logits(batch), tv(p.transform.batch(batch)), atol=1e-4)
    # export: torchvision keys, so torchvision's own resnet18 loads it (only fc missing without num_classes)
    sd = state_dict_export(p)
    assert sd["key_layout"] == "torchvision" and sd["class_names"] == p.class_names
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd["backbone"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    whole = torchvision.models.resnet18(num_classes=10)
    whole.load_state_dict({**sd["backbone"], **{f"fc.{n}": v for n, v in sd["fc"].items()}})
    with torch.no_grad():
        assert torch.allclose(whole.eval()(p.transform.batch(batch)), p.logits(batch), atol=1e-4)
    # --backbone-only ignores the fc
    res = import_checkpoint(path, _r18_cfg(), tmp_path / "bare", backbone_only=True)
    assert not res.classifier and not (tmp_path / "bare" / "checkpoints" / "classifier.pt").exists()
    # a plain torchvision file (ImageNet-style: no wrapper, no prefix, a 1000-class fc): backbone only
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "imagenet.pth")
    res = import_checkpoint(tmp_path / "imagenet.pth", _r18_cfg(), tmp_path / "imagenet")
    assert res.format == "torchvision" and not res.classifier
    assert any("fc (1000, 512) ignored" in n for n in res.notes)


@needs_fmnist
def test_dscl_last_pt_imports_with_its_queue(smoke_run: Path, tmp_path: Path) -> None:
    res = import_checkpoint(smoke_run / "checkpoints" / "last.pt", load_config("smoke"), tmp_path / "run")
    assert res.format == "dscl" and res.missing == [] and res.unexpected == []
    src = load_checkpoint(smoke_run / "checkpoints" / "last.pt")["model"]
    got = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert set(src) == set(got) and all(torch.equal(src[n], got[n]) for n in src)
    assert int(got["queue.filled"]) > 0


@needs_fmnist
def test_imports_that_do_not_fit_are_refused_and_write_nothing(smoke_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r18 = tmp_path / "r18.pth.tar"
    torch.save(official_stage1(_moco_resnet18(0).state_dict(), _moco_resnet18(1).state_dict()), r18)
    with pytest.raises(CheckpointError, match="nothing in the backbone matches a convnet.*model.backbone=resnet18"):
        import_checkpoint(r18, load_config("smoke"), out)
    with pytest.raises(CheckpointError, match="embedding dimension is 128: add model.dim=128"):
        import_checkpoint(r18, _r18_cfg("model.dim=64"), out)
    official = official_from_dscl(load_checkpoint(smoke_run / "checkpoints" / "last.pt")["model"])
    del official["state_dict"]["module.encoder_q.stages.4.weight"]
    torch.save(official, tmp_path / "partial.pth.tar")
    with pytest.raises(CheckpointError, match="missing keys: stages.4.weight"):
        import_checkpoint(tmp_path / "partial.pth.tar", load_config("smoke"), out)
    torch.save({"state_dict": {"encoder.foo.weight": torch.zeros(3)}}, tmp_path / "alien.pth")
    with pytest.raises(CheckpointError, match="nothing in the backbone matches"):
        import_checkpoint(tmp_path / "alien.pth", load_config("smoke"), out)
    with pytest.raises(CheckpointError, match="no encoder_q"):
        import_checkpoint(tmp_path / "alien.pth", load_config("smoke"), out, fmt="official")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*garbage.pth: it is not a file torch.save "
                                              "wrote, or it is damaged"):
        import_checkpoint(tmp_path / "garbage.pth", load_config("smoke"), out)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="it holds Python objects .*Path.*weights_only=True"):
        read_external(tmp_path / "pickled.pth")
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(RunDirError, match="not empty|other files") as err:
        import_checkpoint(r18, _r18_cfg(), out)
    assert "--resume" not in str(err.value) and "--overwrite" in str(err.value)  # dscl import has no --resume


@needs_fmnist
def test_a_wrongly_loaded_classifier_is_flagged_after_evaluation(smoke_run: Path, tmp_path: Path, capsys) -> None:
    # a classifier for these classes but random: the symptom users of the peers report (top-1 near chance)
    state = load_classifier(smoke_run)
    weight = torch.randn(10, 256, generator=torch.Generator().manual_seed(0)) * 1e-3
    bias = torch.tensor([0.0] * 9 + [1e3])
    torch.save({**state.backbone, "fc.weight": weight, "fc.bias": bias}, tmp_path / "plain.pth")
    import_checkpoint(tmp_path / "plain.pth", load_config("smoke"), tmp_path / "run")
    report = evaluate(tmp_path / "run", split="val", device="cpu", progress=False)  # 200 images: fast
    assert report["top1"] == pytest.approx(10.0, abs=0.01)  # always the last class on a balanced split
    assert "WARNING: top-1 10.0% is within 1.5x of chance" in capsys.readouterr().err
    assert [v["method"] for v in report["variants"]][-1] != "nearest class mean"  # no class means imported


# ----------------------------------------------------------------------------------------------
# export


@needs_fmnist
def test_torchscript_export_equals_the_predictor(smoke_run: Path, tmp_path: Path) -> None:
    p = load_run(smoke_run)
    path = export_run(p, "torchscript", tmp_path / "model.pt")
    extra = {"meta.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["meta.json"])["class_names"] == p.class_names
    gen = torch.Generator().manual_seed(0)
    for batch in (torch.randint(0, 256, (3, 28, 28, 1), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 256, (2, 40, 31, 3), dtype=torch.uint8, generator=gen),
                  torch.rand(2, 3, 50, 20, generator=gen)):
        with torch.no_grad():
            assert torch.allclose(module(batch), p.logits(batch), atol=1e-5, rtol=0)
    with pytest.raises(RunDirError, match="exists; pass --overwrite"):
        export_run(p, "torchscript", path)
    sd = torch.load(export_run(p, "state-dict", tmp_path / "sd.pt"), weights_only=True)
    assert sd["key_layout"] == "dscl" and set(sd["fc"]) == {"weight", "bias"}
    from dscl.backbones import build_backbone

    build_backbone("convnet").load_state_dict(sd["backbone"])  # convnet has no torchvision twin: its own keys


@needs_fmnist
def test_onnx_export_matches_torch(smoke_run: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="the optional export extra is not installed")
    pytest.importorskip("onnxscript")
    p = load_run(smoke_run)
    path = export_run(p, "onnx", tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # dynamic batch
        x = torch.rand(n, 3, 28, 28, generator=torch.Generator().manual_seed(n))
        (out,) = session.run(["logits"], {"images": x.numpy()})
        assert torch.allclose(torch.from_numpy(out), p.logits(x), atol=1e-4)


def test_onnx_recipe_of_a_colour_run_at_224_px() -> None:
    """The ONNX recipe names the evaluation view of large images (shorter side, centre crop) and colour input."""
    from types import SimpleNamespace

    from dscl.data.preprocess import Preprocess
    from dscl.interop import export_recipe

    p = SimpleNamespace(image_size=224, num_classes=1000, input_mode="RGB", cfg=load_config("smoke"),
                        transform=SimpleNamespace(preprocess=Preprocess(224, (0.5,) * 3, (0.25,) * 3, grey=False)),
                        temperature=1.5)
    recipe = export_recipe(p, "onnx", "m.onnx")  # type: ignore[arg-type]
    assert "float32 (N, 3, 224, 224) = RGB pixel values / 255 (a grey image repeated on the 3 channels)" in recipe
    assert "shorter side resized to 256 px with antialiased bilinear, then the centre 224 x 224 crop" in recipe
    assert "NOT normalised" in recipe and "(N, 1000)" in recipe
    assert "divide logits by temperature (T = 1.5" in recipe  # issue 31: exports carry T, outputs stay logits


def _fmnist_test_pixels(p, n: int) -> torch.Tensor:
    """The first ``n`` Fashion-MNIST test images as a user has them: uint8 ``(n, 28, 28)``."""
    from dscl.data import build_datasets

    splits = build_datasets(p.cfg.data, seed=p.cfg.optim.seed)
    return torch.stack([splits.test.load(i)[0] for i in range(n)])


def _odd_size_pngs(folder: Path) -> list[Path]:
    """Colour and grey PNGs of sizes other than the run's 28 px."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w, c) in enumerate(((40, 30, 3), (50, 20, 3), (33, 33, 1), (20, 40, 3))):
        a = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        paths.append(folder / f"{i}.png")
        Image.fromarray(a[..., 0] if c == 1 else a).save(paths[-1])
    return paths


@needs_fmnist
def test_onnx_export_printed_recipe_gives_the_predictors_logits(smoke_run: Path, tmp_path: Path, capsys) -> None:
    """Issue 28: `dscl export --format onnx` said to feed Predictor.transform.batch, which is normalised, and
    the graph normalises again (argmax agreed on 59 % of 64 images). The printed recipe, followed with
    numpy / PIL / onnxruntime only, now gives the Predictor's logits."""
    import numpy as np
    from PIL import Image

    ort = pytest.importorskip("onnxruntime", reason="the optional export extra is not installed")
    pytest.importorskip("onnxscript")
    from dscl.cli import main

    path = tmp_path / "model.onnx"
    assert main(["export", "--run", str(smoke_run), "--format", "onnx", "--out", str(path)]) == 0
    recipe = " ".join(capsys.readouterr().out.split())
    # what the recipe says the input is: RGB pixels / 255 at 28 x 28, not normalised, grey repeated
    for words in ("float32 (N, 3, 28, 28)", "RGB pixel values / 255", "resized to 28 x 28", "NOT normalised",
                  "grey image on all 3 channels", "Image.BILINEAR", "Predictor.logits(x)"):
        assert words in recipe, (words, recipe)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    p = load_run(smoke_run)
    pixels = _fmnist_test_pixels(p, 64)  # (64, 28, 28) uint8, grey
    x = np.repeat(pixels.numpy()[:, None], 3, axis=1).astype(np.float32) / 255  # the recipe
    (out,) = session.run(["logits"], {"images": x})
    want = p.logits(pixels[..., None])
    assert torch.equal(torch.from_numpy(out).argmax(1), want.argmax(1))
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(out), p.logits(torch.from_numpy(x)), rtol=0, atol=1e-4)
    # images of other sizes, resized as the recipe says: within PIL's rounding of dscl's resize
    files = _odd_size_pngs(tmp_path / "imgs")
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((28, 28), Image.BILINEAR), dtype=np.float32)
                  for f in files]).transpose(0, 3, 1, 2) / 255
    (out,) = session.run(["logits"], {"images": x})
    ref = p.logits(files)  # (measured: 0.3 % of the largest logit apart)
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=0, atol=0.01 * float(ref.abs().max()))
    # what the old recipe fed: normalised twice, other logits
    (wrong,) = session.run(["logits"], {"images": p.transform.batch(pixels[..., None]).numpy()})
    assert not np.allclose(wrong, want.numpy(), atol=1e-2)


@needs_fmnist
def test_torchscript_export_printed_recipe_gives_the_predictors_logits(smoke_run: Path, tmp_path: Path,
                                                                       capsys) -> None:
    """Issue 28, checked like the ONNX recipe: decoded pixels of any size straight into torch.jit.load(file)."""
    import numpy as np
    from PIL import Image

    from dscl.cli import main

    path = tmp_path / "model.pt"
    assert main(["export", "--run", str(smoke_run), "--format", "torchscript", "--out", str(path)]) == 0
    recipe = " ".join(capsys.readouterr().out.split())
    for words in (f"torch.jit.load({str(path)!r})(x)", "uint8 (N, H, W, C) pixels", "float (N, C, H, W) in [0, 1]",
                  "any size"):
        assert words in recipe, (words, recipe)
    module = torch.jit.load(str(path))
    p = load_run(smoke_run)
    pixels = _fmnist_test_pixels(p, 16)[..., None]  # (16, 28, 28, 1)
    with torch.no_grad():
        torch.testing.assert_close(module(pixels), p.logits(pixels), rtol=0, atol=1e-5)
        for f in _odd_size_pngs(tmp_path / "imgs"):
            a = np.asarray(Image.open(f))
            x = torch.from_numpy(a if a.ndim == 3 else a[..., None])[None]  # (1, H, W, C) uint8
            torch.testing.assert_close(module(x), p.logits([f]), rtol=0, atol=1e-5)
            torch.testing.assert_close(module(x.permute(0, 3, 1, 2).float() / 255),
                                       p.logits(x.permute(0, 3, 1, 2).float() / 255), rtol=0, atol=1e-5)


@needs_fmnist
def test_onnx_export_without_the_extra_says_how_to_install_it(smoke_run: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` sees when it is not installed
    with pytest.raises(CheckpointError, match=r"pip install 'dscl-lt\[export\]'"):
        export_run(load_run(smoke_run), "onnx", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


# ----------------------------------------------------------------------------------------------
# foreign files are data, never code (issue 28 item 16)


class _RunsCode:
    """Pickles as a call of ``exec`` that creates ``marker``: what a hostile checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@needs_fmnist
def test_an_official_file_with_its_training_arguments_imports(smoke_run: Path, tmp_path: Path) -> None:
    """MoCo-derived training scripts often save ``args`` (an argparse.Namespace of plain values) next to the
    weights: that one class is allowlisted for imports, its attributes read as data like everything else."""
    import argparse

    official = official_from_dscl(load_checkpoint(smoke_run / "checkpoints" / "last.pt")["model"])
    official["args"] = argparse.Namespace(arch="resnet50", lr=0.1, moco_k=65536, schedule=[120, 160])
    torch.save(official, tmp_path / "checkpoint.pth.tar")
    assert read_external(tmp_path / "checkpoint.pth.tar")["args"].moco_k == 65536
    res = import_checkpoint(tmp_path / "checkpoint.pth.tar", load_config("smoke"), tmp_path / "run")
    assert res.format == "official" and res.missing == [] and load_stage1(tmp_path / "run").finished


@needs_fmnist
def test_an_imported_file_that_would_run_code_is_refused_and_never_runs(smoke_run: Path, tmp_path: Path,
                                                                         capsys) -> None:
    from dscl.cli import main

    marker = tmp_path / "ran"
    official = official_from_dscl(load_checkpoint(smoke_run / "checkpoints" / "last.pt")["model"])
    torch.save({**official, "args": _RunsCode(marker)}, tmp_path / "checkpoint.pth.tar")
    argv = ["import", "--checkpoint", str(tmp_path / "checkpoint.pth.tar"), "--preset", "smoke",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds Python objects (builtins.exec)" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ import messages (issue 28 item 15)


def test_importing_a_torchscript_export_says_what_it_is_and_what_to_import(tmp_path: Path) -> None:
    # torch's weights_only message ("Cannot use weights_only=True with TorchScript archives ...") came through
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 3)), str(path))
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(path, load_config("smoke"), tmp_path / "run")
    msg = str(err.value)
    assert f"{path} is a TorchScript export" in msg and "dscl export --run RUN --format state-dict" in msg
    assert "weights_only" not in msg and "\n" not in msg and not (tmp_path / "run").exists()
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")  # an ONNX export is no checkpoint either
    with pytest.raises(CheckpointError, match=r"model.onnx is an ONNX export: .* --format state-dict"):
        read_external(tmp_path / "model.onnx")


def test_a_truncated_or_empty_checkpoint_is_named_in_a_complete_sentence(tmp_path: Path) -> None:
    # the truncated file's message was torch's, cut after 200 characters in the middle of a sentence
    whole = tmp_path / "whole.pt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, whole)
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(whole.read_bytes()[:3000])
    with pytest.raises(CheckpointError) as err:
        read_external(cut)
    msg = str(err.value)
    assert msg == (f"cannot read checkpoint {cut}: the file is incomplete (3000 bytes; its zip archive has no end, "
                   "as when a copy or download stopped early); copy or download it again")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt: the file is empty \(0 bytes\); copy or download it again$"):
        read_external(tmp_path / "empty.pt")


# ----------------------------------------------------------------------------------------------
# pretrained timm / open_clip weights as a run with no stage 1: a foundation model's linear probe (issue 29)

PROBE_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def _probe_cfg(backbone: str, args: dict):
    return load_config("smoke", overrides=[f"model.backbone={backbone}", f"model.backbone_args={json.dumps(args)}",
                                           "data.image_size=64", "views.patch_size=32"])


def _timm_snapshot(folder: Path):
    """timm's hub layout of a random ViT (config.json with its own mean / std, model.safetensors, head included),
    as `timm.models.push_to_hf_hub` writes it and a copied Hugging Face snapshot holds it."""
    timm = pytest.importorskip("timm", reason="the optional timm extra is not installed")
    torch.manual_seed(3)
    # dynamic_img_size: the model itself then takes the 64 px views (the weights do not depend on it)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=7, dynamic_img_size=True, **PROBE_VIT).eval()
    timm.models.save_for_hf(model, str(folder), data_config={"mean": (0.1, 0.2, 0.3), "std": (0.9, 0.8, 0.7)},
                            safe_serialization=True)
    return model


@needs_fmnist
def test_import_of_timm_weights_makes_a_linear_probe_run_with_the_weights_input_settings(tmp_path: Path) -> None:
    model = _timm_snapshot(tmp_path / "snap")
    res = import_checkpoint(tmp_path / "snap", _probe_cfg("timm:vit_tiny_patch16_224", PROBE_VIT), tmp_path / "run")
    assert res.format == "pretrained" and not res.classifier and res.loaded > 0
    assert "online.head.* (freshly initialised)" in res.missing
    state = load_stage1(tmp_path / "run")
    assert state.finished and state.facts.imported["format"] == "pretrained"
    assert state.spec.input_source == "pretrained" and state.spec.mean == (0.1, 0.2, 0.3)
    for k, v in state.backbone_weights().items():  # the momentum encoder starts as a copy
        assert torch.equal(state.model[f"momentum.backbone.{k}"], v), k
    p = load_run(tmp_path / "run", stage1_ok=True)
    assert (p.mean, p.std) == ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7))
    images = torch.randint(0, 256, (3, 50, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = p.transform.batch(images)
    with torch.no_grad():  # the Predictor's features are timm's own patch tokens (mean-pooled) of those weights
        want = model.forward_features(x)[:, model.num_prefix_tokens:].mean(dim=1)
    torch.testing.assert_close(p.features(images), want, rtol=1e-5, atol=1e-5)


@needs_fmnist
def test_import_of_a_clip_model_file_keeps_its_image_tower(tmp_path: Path) -> None:
    open_clip = pytest.importorskip("open_clip", reason="the optional open_clip extra is not installed")
    torch.manual_seed(4)
    clip = open_clip.create_model(
        "ViT-B-16", pretrained=None, embed_dim=16,
        vision_cfg={"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
        text_cfg={"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}).eval()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}},
               tmp_path / "clip.pt")  # open_clip's training script's layout: both towers, DDP prefix
    args = {"width": 32, "layers": 2, "head_width": 16, "image_size": 64}
    res = import_checkpoint(tmp_path / "clip.pt", _probe_cfg("open_clip:ViT-B-16", args), tmp_path / "run")
    assert res.format == "pretrained"
    p = load_run(tmp_path / "run", stage1_ok=True)
    assert p.spec.interpolation == "bicubic" and p.mean == tuple(open_clip.OPENAI_DATASET_MEAN)  # CLIP's inputs
    torch.testing.assert_close(p.backbone.model.conv1.weight, clip.visual.conv1.weight, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"do not fit backbone open_clip:ViT-B-16; shape mismatches"):
        import_checkpoint(tmp_path / "clip.pt", _probe_cfg("open_clip:ViT-B-16", {**args, "width": 48}),
                          tmp_path / "other")
    assert not (tmp_path / "other").exists()


@needs_fmnist
@pytest.mark.slow  # import, stage 2 and the 10,000 test images through a ViT (11 s on 2 CPU cores)
def test_linear_probe_of_pretrained_weights_classifies_evaluates_predicts_and_embeds(tmp_path: Path, capsys) -> None:
    """`dscl import --checkpoint FILE model.backbone=timm:NAME`: no stage 1, then the after-training commands."""
    from dscl.cli import main

    _timm_snapshot(tmp_path / "snap")
    run = tmp_path / "probe"
    assert main(["import", "--checkpoint", str(tmp_path / "snap" / "model.safetensors"), "--preset", "smoke",
                 "--out", str(run), "model.backbone=timm:vit_tiny_patch16_224",
                 f"model.backbone_args={json.dumps(PROBE_VIT)}", "data.image_size=64", "views.patch_size=32"]) == 0
    assert "pretrained format" in capsys.readouterr().out
    assert main(["classify", "--run", str(run), "--no-progress"]) == 0
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "imported pretrained backbone + dscl classifier" and report["epochs"] is None
    assert report["backbone"]["mean"] == [0.1, 0.2, 0.3]  # the snapshot's config.json, next to the file
    img = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(torch.randint(0, 256, (30, 30, 3), dtype=torch.uint8).numpy()).save(img)
    assert main(["predict", "--run", str(run), str(img), "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["embed", "--run", str(run), str(img), "--out", str(tmp_path / "e.npz")]) == 0
    import numpy as np

    feats = np.load(tmp_path / "e.npz")["features"]
    np.testing.assert_allclose(feats, load_run(run).embed([img]).numpy(), rtol=1e-5, atol=1e-6)


def _tiny_classified_run(tmp_path: Path, *overrides: str) -> Path:
    """A classified run made in-process (the config's backbone with random weights, 3 classes, no spec stored as
    before specs; no dataset needed)."""
    from dscl.backbones import build_backbone_from_spec, network_spec
    from dscl.config import dump_config
    from dscl.run import ClassifierState, DataMeta, save_classifier

    cfg = load_config("smoke", overrides=list(overrides))
    torch.manual_seed(0)
    net = build_backbone_from_spec(network_spec(cfg.model))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    dump_config(cfg, run / "config.yaml")
    save_classifier(run, ClassifierState(protocol="cached", backbone_name=cfg.model.backbone, num_classes=3,
                                         data=DataMeta.of(["a", "b", "c"], [5, 3, 1], (0.5,) * 3, (0.25,) * 3),
                                         backbone=net.state_dict(), fc=nn.Linear(net.num_features, 3).state_dict()))
    return run


def test_onnx_recipe_of_a_cropped_view_compares_with_the_images_the_view_was_cut_from(tmp_path: Path) -> None:
    """From 128 px the view is a centre crop, so x (the view) is not a fixed point of the Predictor's conversion:
    Predictor.logits(x) would resize and crop x again. The recipe said it gave the graph's logits; it does not."""
    from dscl.interop import export_recipe, onnx_module

    p = load_run(_tiny_classified_run(tmp_path, "data.image_size=160", "views.patch_size=64"))
    recipe = " ".join(export_recipe(p, "onnx", "m.onnx").split())
    assert "for the same x, Predictor.logits(x) gives the same logits" not in recipe
    assert "Predictor.logits(images) of the images x was cut from gives the same logits" in recipe
    assert "shorter side resized to 183 px with antialiased bilinear, then the centre 160 x 160 crop" in recipe
    images = torch.randint(0, 256, (2, 200, 170, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pre = p.transform.preprocess
    x = pre._resize(pre._channels(images.permute(0, 3, 1, 2))).float() / 255  # what the recipe feeds the graph
    with torch.no_grad():
        torch.testing.assert_close(onnx_module(p)(x), p.logits(images), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(p.logits(x), p.logits(images), atol=1e-3)


@pytest.mark.parametrize(("backbone", "args", "layout"), [
    ("timm:vit_tiny_patch16_224", PROBE_VIT, "timm"),
    ("open_clip:ViT-B-16", {"width": 32, "layers": 2, "head_width": 16, "image_size": 64}, "open_clip"),
])
def test_state_dict_export_of_a_timm_or_open_clip_run_has_the_libraries_own_keys(tmp_path: Path, backbone, args,
                                                                                 layout) -> None:
    """timm's / open_clip's native key layout (dscl's wrapper prefix stripped): their own model loads it, and
    `dscl import` of the export gives the same classifier back."""
    pytest.importorskip(layout, reason=f"the optional {layout} extra is not installed")
    from dscl.backbones import BackboneSpec, build_backbone_from_spec

    run = _tiny_classified_run(tmp_path, f"model.backbone={backbone}", f"model.backbone_args={json.dumps(args)}",
                               "data.image_size=64", "views.patch_size=32")
    p = load_run(run)
    sd = torch.load(export_run(p, "state-dict", tmp_path / "sd.pt"), weights_only=True)
    assert sd["key_layout"] == layout and not any(k.startswith("model.") for k in sd["backbone"])
    rebuilt = build_backbone_from_spec(BackboneSpec.from_dict(sd["spec"]))
    rebuilt.model.load_state_dict(sd["backbone"])  # the library's own module, strict
    if layout == "timm":
        import timm

        timm.create_model("vit_tiny_patch16_224", num_classes=0, **args).load_state_dict(sd["backbone"])
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(p.transform.batch(images)), p.features(images))
    from dscl.interop import _map_dscl, _read_mapped

    assert _read_mapped(sd, "auto", tmp_path / "sd.pt")[0] == "dscl"
    assert set(_map_dscl(sd).backbone) == set(p.backbone.state_dict())  # the prefix comes back on import
