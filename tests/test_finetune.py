"""model.finetune through the commands (issue 30): a timm ViT-tiny from a local file fine-tuned with LoRA, its
last blocks or nothing; checkpoints that hold what was trained and check the base; merged weights downstream;
``frozen`` giving exactly the features of the same file imported with no stage 1; exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from dscl.cli import main
from dscl.config import load_config
from dscl.errors import CheckpointError
from dscl.pretrain import pretrain
from dscl.run import load_classifier, load_stage1

timm = pytest.importorskip("timm", reason="the optional timm extra is not installed")
pytest.importorskip("peft", reason="the optional lora extra is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch")

# timm's ViT-tiny as it is (12 blocks of width 192), on Fashion-MNIST upsampled to 32 px (2 x 2 patches)
OVERRIDES = ["model.backbone=timm:vit_tiny_patch16_224", "data.image_size=32", "views.patch_size=16",
             "model.queue_size=64", "optim.epochs=2"]


def _vit_file(path: Path, seed: int = 0) -> Path:
    """Random ViT-tiny weights in timm's own layout (its ImageNet head included), as a .safetensors file."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224")
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory) -> Path:
    return _vit_file(tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors")


def _cfg(weights: Path, finetune: str, *extra: str):
    return load_config("smoke", overrides=[*OVERRIDES, f"model.pretrained={weights}", f"model.finetune={finetune}",
                                           *extra])


@needs_fmnist
@pytest.mark.slow  # three ViT-tiny stage-1 runs (about a minute on 2 CPU cores)
def test_lora_checkpoint_is_a_fraction_of_full_and_resumes_exactly(tmp_path, vit_file):
    full = pretrain(_cfg(vit_file, "full"), tmp_path / "full", progress=False)
    lora = pretrain(_cfg(vit_file, "lora"), tmp_path / "lora", progress=False)
    size_full, size_lora = full.stat().st_size, lora.stat().st_size
    assert size_lora <= size_full / 4, (size_lora, size_full)
    state = load_stage1(tmp_path / "lora")
    assert state.base["finetune"] == "lora" and state.base["source"] == str(vit_file)
    assert not any(".base_layer." in k or k.endswith("patch_embed.proj.weight") for k in state.model)
    assert any(".lora_A." in k for k in state.model) and "online.head.0.weight" in state.model
    # the same run stopped after one epoch and resumed gives the same checkpoint, bit for bit
    cfg = _cfg(vit_file, "lora")
    pretrain(cfg, tmp_path / "split", progress=False, max_epochs=1)
    pretrain(cfg, tmp_path / "split", progress=False, resume=True)
    resumed = load_stage1(tmp_path / "split")
    assert resumed.model.keys() == state.model.keys()
    for k, v in state.model.items():
        assert torch.equal(resumed.model[k], v), k


@needs_fmnist
def test_resume_refuses_a_base_that_changed_or_went_missing(tmp_path):
    weights = _vit_file(tmp_path / "w.safetensors")
    cfg = _cfg(weights, "last:1", "optim.epochs=3")
    pretrain(cfg, tmp_path / "run", progress=False, max_epochs=1)
    _vit_file(weights, seed=1)  # the file now holds other weights
    with pytest.raises(CheckpointError, match=r"trained on top of frozen weights from .*w\.safetensors .*point "
                                              r"model\.pretrained at the original weights file"):
        pretrain(cfg, tmp_path / "run", progress=False, resume=True)
    weights.unlink()
    assert main(["pretrain", "--resume", "--out", str(tmp_path / "run"), "--no-progress"]) == 2


@needs_fmnist
@pytest.mark.slow  # two ViT-tiny runs and two embeds (about a minute on 2 CPU cores)
def test_frozen_gives_exactly_the_features_of_the_file_imported_with_no_stage1(tmp_path, vit_file, capsys):
    from dscl.backbones import build_backbone_from_spec
    from dscl.inference import load_run

    run, probe = tmp_path / "frozen", tmp_path / "probe"
    flags = [*OVERRIDES, f"model.pretrained={vit_file}", "model.finetune=frozen"]
    assert main(["run", "--preset", "smoke", "--out", str(run), "--no-progress", *flags]) == 0
    state = load_stage1(run)
    assert state.base["finetune"] == "frozen"
    assert not any(k.startswith("online.backbone.") for k in state.model)  # only the head trained
    # the backbone after stage 1 is the loaded file, bit for bit
    p = load_run(run)
    loaded = build_backbone_from_spec(state.spec, vit_file).state_dict()
    got = p.backbone.state_dict()
    assert got.keys() == loaded.keys() and all(torch.equal(got[k], loaded[k]) for k in loaded)
    assert main(["import", "--checkpoint", str(vit_file), "--format", "pretrained", "--preset", "smoke",
                 "--out", str(probe), *OVERRIDES]) == 0
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    g = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(g.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(images / f"{i}.png")
    for r in (run, probe):
        assert main(["embed", "--run", str(r), str(images), "--out", str(tmp_path / f"{r.name}.npz"),
                     "--no-progress"]) == 0
    a, b = np.load(tmp_path / "frozen.npz"), np.load(tmp_path / "probe.npz")
    assert list(a["paths"]) == list(b["paths"])
    np.testing.assert_array_equal(a["features"], b["features"])


@needs_fmnist
def test_lora_run_classifies_predicts_and_exports_merged_plain_weights(tmp_path, vit_file):
    from dscl.inference import load_run

    run = tmp_path / "lora"
    assert main(["run", "--preset", "smoke", "--out", str(run), "--no-progress", *OVERRIDES,
                 f"model.pretrained={vit_file}", "model.finetune=lora", "optim.epochs=1",
                 "optim.backbone_lr=0.5", "optim.layer_decay=0.8"]) == 0
    cls = {"backbone": load_classifier(run).backbone}
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()
    assert set(cls["backbone"]) == {f"model.{k}" for k in plain}  # merged: no adapter left, timm's own layout
    state = load_stage1(run)
    trained = {k: v for k, v in state.model.items() if ".lora_B." in k and k.startswith("online.")}
    assert trained and any(v.abs().sum() > 0 for v in trained.values())  # the adapters learned something
    frozen = build_backbone_from_spec_file(state.spec, Path(state.base["source"]))
    qkv = "model.blocks.0.attn.qkv.weight"
    assert not torch.equal(cls["backbone"][qkv], frozen[qkv])  # the merge changed the adapted weights
    assert torch.equal(cls["backbone"]["model.patch_embed.proj.weight"], frozen["model.patch_embed.proj.weight"])
    p = load_run(run)
    x = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8)
    assert p.logits(x).shape == (2, 10)


def build_backbone_from_spec_file(spec, path: Path) -> dict[str, torch.Tensor]:
    from dscl.backbones import build_backbone_from_spec

    return build_backbone_from_spec(spec, path).state_dict()
