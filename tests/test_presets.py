"""Shipped presets: every one loads, and the paper's benchmarks carry their published numbers."""

import pytest

from dscl.config import load_config, preset_changes, preset_expected, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_is_its_own_configuration(name):
    cfg = load_config(name)
    assert cfg.preset == name and preset_changes(cfg) == []


def test_paper_presets_carry_expected_numbers_and_nothing_unverified():
    imagenet = preset_expected("imagenet-lt")
    assert imagenet["top1"] == 57.7 and "Table 2" in imagenet["source"]
    for name in ("inat2018", "places-lt"):
        expected = preset_expected(name)
        # the main-paper tables were not available: no number may be claimed for these presets
        assert expected is not None and all(expected[k] is None for k in ("top1", "many", "medium", "few"))
        assert "not verified" in expected["source"]
    assert preset_expected("fmnist-lt") is None and preset_expected("no-such-preset") is None


def test_preset_changes_ignore_where_the_data_lives_but_not_the_recipe():
    cfg = load_config("imagenet-lt", overrides=["data.data_root=/data/ILSVRC2012", "data.list_dir=/lists",
                                                "optim.seed=4", "data.num_workers=12"])
    assert preset_changes(cfg) == []
    cfg = load_config("imagenet-lt", overrides=["optim.epochs=90", "loss.alpha=0.2"])
    assert preset_changes(cfg) == ["loss.alpha", "optim.epochs"]
    cfg.preset = "gone"
    assert preset_changes(cfg) == ["preset"]


# ----------------------------------------------------------------------------------------------
# foundation-model presets and what `dscl presets` says about each (dscl/presets_info.py)

CLIP_PRESETS = ("imagenet-lt-clip-vitb16", "places-lt-clip-vitb16", "inat2018-clip-vitb16")


@pytest.mark.parametrize("name", CLIP_PRESETS)
def test_clip_presets_are_lora_on_openai_clip_with_a_lift_budget(name):
    cfg = load_config(name)  # validates: finetune=lora needs model.pretrained, which 'openai' is
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.finetune) == ("open_clip:ViT-B-16", "openai", "lora")
    assert cfg.model.backbone_args == {"quick_gelu": True}  # what the OpenAI weights were trained with
    assert cfg.optim.epochs == (20 if name.startswith("inat") else 10) and cfg.optim.batch_size == 128
    assert cfg.optim.base_lr * cfg.optim.batch_size / 256 == pytest.approx(0.01)  # LIFT's SGD learning rate
    assert (cfg.optim.weight_decay, cfg.optim.momentum, cfg.data.image_size) == (5e-4, 0.9, 224)
    assert cfg.loss.loss == "dscl" and cfg.loss.pbsd_weight > 0 and cfg.views.patch_size % 16 == 0
    assert preset_expected(name) is None  # DSCL has published nothing with CLIP: no numbers are claimed


@pytest.mark.parametrize("name", [*CLIP_PRESETS, "fmnist-lt-vit"])
def test_vit_presets_fit_their_patch_grid(name):
    import torch

    from dscl.backbones import build_backbone_from_spec, network_spec
    from dscl.model import check_patch_grid

    cfg = load_config(name)
    pytest.importorskip(cfg.model.backbone.split(":")[0])
    with torch.device("meta"):
        backbone = build_backbone_from_spec(network_spec(cfg.model))
    check_patch_grid(backbone, cfg)  # data.image_size and views.patch_size are multiples of the ViT's patch
    assert backbone.patch_size in (4, 16)


def _real_state_bytes(model):
    """Bytes a built stage-1 model holds, counted on its real tensors: every parameter and buffer of both
    encoders once (shared storage once), a gradient and an SGD momentum buffer per trained parameter, and the
    queue's features and labels."""
    seen, total = set(), 0
    for module in (model.online, model.momentum):
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    trained = [p for p in model.online.parameters() if p.requires_grad]
    total += 2 * sum(p.numel() * p.element_size() for p in trained)
    return total + model.queue.features.numel() * 4 + model.queue.labels.numel() * 8


def test_state_estimate_of_a_builtin_preset_matches_the_real_model():
    from dscl.model import build_model
    from dscl.presets_info import estimate_state

    cfg = load_config("fmnist-lt")
    est = estimate_state(cfg)  # built on the meta device
    model = build_model(cfg, num_classes=10)
    n_params = sum(p.numel() for p in model.online.parameters())
    assert (est.trained, est.frozen) == (n_params, 0)
    assert est.bytes == _real_state_bytes(model)
    # the formula, independently: 4 bytes x (4 copies of every trained parameter) + 2 x buffers + the queue
    buffers = sum(b.numel() * b.element_size() for b in model.online.buffers())
    assert est.bytes == 4 * 4 * n_params + 2 * buffers + cfg.model.queue_size * (cfg.model.dim * 4 + 8)


def test_state_estimate_of_lora_counts_the_shared_frozen_base_once(tmp_path):
    pytest.importorskip("peft")
    import torch

    from dscl.backbones import build_backbone
    from dscl.model import build_model
    from dscl.presets_info import estimate_state

    weights = tmp_path / "convnet.pth"
    torch.save(build_backbone("convnet").state_dict(), weights)
    cfg = load_config("fmnist-lt", overrides=["model.finetune=lora", f"model.pretrained={weights}"])
    est = estimate_state(cfg)
    model = build_model(cfg, num_classes=10)
    trained = sum(p.numel() for p in model.online.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.online.parameters() if not p.requires_grad)
    assert (est.trained, est.frozen) == (trained, frozen) and 0 < trained < frozen
    assert est.bytes == _real_state_bytes(model)


def test_state_estimate_of_clip_lora_on_the_meta_device():
    pytest.importorskip("open_clip")
    pytest.importorskip("peft")
    from dscl.presets_info import estimate_state

    est = estimate_state(load_config("imagenet-lt-clip-vitb16"))
    width, blocks, rank, dim = 768, 12, 8, 128
    # LoRA on each block's attention: in-projection (width -> 3 width) and out-projection (width -> width)
    lora = blocks * rank * ((width + 3 * width) + (width + width))
    head = width * width + width + width * dim + dim
    assert est.trained == lora + head
    assert 80e6 < est.frozen < 90e6  # ViT-B/16's image tower without CLIP's projection
    assert est.bytes == 4 * (est.frozen + 4 * est.trained) + 65536 * (dim * 4 + 8)  # no BatchNorm buffers


def test_estimate_names_the_missing_extra(monkeypatch):
    import importlib.util

    from dscl.presets_info import estimate_text

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    assert estimate_text(load_config("places-lt-clip-vitb16")) == \
        "model state: install dscl-lt[open_clip] for an estimate"


def test_weights_needed_says_what_is_downloaded_and_by_whom(tmp_path):
    from dscl.presets_info import weights_needed

    none = "none set (trains from scratch unless you pass --pretrained PATH)"
    assert weights_needed(load_config("imagenet-lt")) == none
    clip = weights_needed(load_config("inat2018-clip-vitb16"))
    assert "'openai'" in clip and "downloaded by open_clip" in clip and "dscl-lt[open_clip]" in clip
    path = tmp_path / "w.safetensors"
    assert str(path) in weights_needed(load_config("fmnist-lt-vit", overrides=[f"model.pretrained={path}"]))
    hub = weights_needed(load_config("fmnist-lt-vit", overrides=["model.pretrained=hf-hub:timm/x"]))
    assert "hf-hub:timm/x" in hub and "downloaded by timm" in hub


def test_dscl_presets_lists_weights_and_memory_per_preset(capsys):
    from dscl.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    blocks: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line and not line[0].isspace() and line.split()[0] in preset_names():
            blocks[line.split()[0]] = []
        elif line.strip() and blocks:
            blocks[list(blocks)[-1]].append(line.strip())
    assert sorted(blocks) == preset_names()
    for name in CLIP_PRESETS:
        weights, memory = blocks[name][:2]
        assert weights.startswith("weights: ") and "'openai'" in weights and "open_clip" in weights
        assert memory.startswith("model state ") and "(lora)" in memory
    assert blocks["smoke"][0] == "weights: none set (trains from scratch unless you pass --pretrained PATH)"
    assert "benchmarks/finetune_cost.py" in out
