"""model.finetune (issue 30): which tensors train, LoRA injected and merged, the momentum encoder sharing the
frozen base, the EMA on trained tensors only, layer-wise learning rates, and the base's hash."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dscl.adapters import (
    Finetune,
    apply_finetune,
    base_digest,
    block_groups,
    default_lora_targets,
    lr_scales,
    merge_lora,
)
from dscl.backbones import build_backbone
from dscl.config import ConfigError, load_config
from dscl.errors import CheckpointError
from dscl.model import DSCLModel, Encoder, base_record, frozen_keys, load_trained, momentum_update, trained_state

timm = pytest.importorskip("timm", reason="the optional timm extra is not installed")
peft = pytest.importorskip("peft", reason="the optional lora extra is not installed")

VIT = {"depth": 3, "embed_dim": 32, "num_heads": 2, "img_size": 32}


class _Model:
    """The model section of a config, as apply_finetune reads it."""

    def __init__(self, finetune: str, **kw) -> None:
        self.finetune = finetune
        self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets = 4, 8.0, 0.0, None
        self.__dict__.update(kw)


def _vit(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("timm:vit_tiny_patch16_224", args=VIT)


def _randomise_adapters(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_" in n:  # lora_B starts at zero: give the adapters something to merge
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_finetune_modes_parse_and_bad_ones_are_refused_naming_the_key():
    assert Finetune.parse("full") == Finetune("full") and not Finetune("full").partial
    assert Finetune.parse("last:3") == Finetune("last", 3) and Finetune.parse("frozen").partial
    for bad in ("last", "last:0", "last:x", "adapters", "LoRA"):
        with pytest.raises(ConfigError, match="model.finetune="):
            Finetune.parse(bad)
    with pytest.raises(ConfigError, match=r"model.finetune='last:0' is not a fine-tuning mode"):
        load_config("smoke", overrides=["model.finetune=last:0", "model.pretrained=w.pth"])
    with pytest.raises(ConfigError, match="model.finetune=lora keeps pretrained weights, but model.pretrained is not"):
        load_config("smoke", overrides=["model.finetune=lora"])
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        load_config("smoke", overrides=["optim.layer_decay=1.5"])
    cfg = load_config("smoke", overrides=["model.finetune=last:2", "model.pretrained=w.pth"])
    assert (cfg.model.finetune, cfg.optim.backbone_lr, cfg.optim.layer_decay) == ("last:2", 1.0, 1.0)


def test_full_changes_nothing():
    vit = _vit()
    before = {n: p.requires_grad for n, p in vit.named_parameters()}
    plan = apply_finetune(vit, _Model("full"))
    assert {n: p.requires_grad for n, p in vit.named_parameters()} == before
    assert plan.held_eval == [] and not any("lora" in n for n in vit.state_dict())


def test_lora_on_a_timm_vit_adapts_the_attention_projections_only():
    vit = _vit()
    assert default_lora_targets(vit) == r".*\.attn\.(qkv|proj)"
    plan = apply_finetune(vit, _Model("lora"))
    assert plan.trained and all(".lora_" in n for n in plan.trained)
    adapted = {n.split(".lora_")[0] for n in plan.trained}
    assert adapted == {f"model.blocks.{i}.attn.{m}" for i in range(3) for m in ("qkv", "proj")}  # not patch_embed.proj
    n_trained = sum(p.numel() for p in vit.parameters() if p.requires_grad)
    assert n_trained == 3 * 4 * (32 + 96) + 3 * 4 * (32 + 32)  # 3 blocks x r x (in + out) per adapted layer
    assert {n for n, p in vit.named_parameters() if not p.requires_grad} == set(plan.frozen)


def test_merged_lora_is_the_plain_network_computing_what_the_adapters_computed():
    plain = _vit()
    keys = list(plain.state_dict())
    vit = copy.deepcopy(plain)
    apply_finetune(vit, _Model("lora"))
    _randomise_adapters(vit)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = vit.forward_features(x)
        assert not torch.allclose(want, plain.forward_features(x), atol=1e-3)  # the adapters do something
        merge_lora(vit)
        got = vit.forward_features(x)
    assert list(vit.state_dict()) == keys and type(vit.model.blocks[0].attn.qkv) is nn.Linear
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain.load_state_dict(vit.state_dict())  # plain weights in the original layout
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone,args", [("open_clip:ViT-B-16", {"width": 32, "layers": 2, "head_width": 16,
                                                                    "image_size": 32, "patch_size": 8}),
                                           ("resnet32", None), ("convnet", None)])
def test_lora_defaults_and_merge_for_open_clip_and_cnns(backbone, args):
    if backbone.startswith("open_clip"):
        pytest.importorskip("open_clip", reason="the optional open_clip extra is not installed")
    torch.manual_seed(0)
    net = build_backbone(backbone, args=args)
    keys = list(net.state_dict())
    targets = default_lora_targets(net)
    if backbone.startswith("open_clip"):
        assert targets == ["transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]
    else:  # spatial convolutions but the stem
        convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
        assert targets == convs[1:]
    apply_finetune(net, _Model("lora"))
    _randomise_adapters(net)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net.forward_features(x)
        merge_lora(net)
        got = net.forward_features(x)
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_targets_that_match_nothing_are_a_config_error():
    with pytest.raises(ConfigError, match=r"model.lora_targets='nothing\\\\.here' matches no layer"):
        apply_finetune(_vit(), _Model("lora", lora_targets=r"nothing\.here"))


def test_blocks_per_family_and_last_k():
    vit = _vit()
    groups = block_groups(vit)
    assert len(groups) == 4 and any("patch_embed" in n for n in groups[0])
    assert all(n.startswith("model.blocks.2.") or n.startswith("model.norm.") for n in groups[-1])
    assert any(n.startswith("model.norm.") for n in groups[-1])  # the final norm with the last block
    plan = apply_finetune(vit, _Model("last:2"))
    assert {n.split(".")[2] for n in plan.trained if n.startswith("model.blocks.")} == {"1", "2"}
    assert "model.norm.weight" in plan.trained and "model.blocks.0.attn.qkv.weight" in plan.frozen
    assert "model.pos_embed" in plan.frozen
    with pytest.raises(ConfigError, match="has 3 blocks; use last:1 to last:3"):
        apply_finetune(_vit(), _Model("last:4"))
    r32 = build_backbone("resnet32")
    g = block_groups(r32)
    assert len(g) == 16 and g[0] == ["conv1.weight", "bn1.weight", "bn1.bias"]  # stem + 3 x 5 blocks
    assert all(n.startswith("layer3.4.") for n in g[-1])
    conv = block_groups(build_backbone("convnet"))
    assert conv[0] == [] and len(conv) == 5 and conv[1] == ["stages.0.weight", "stages.0.bias", "stages.1.weight",
                                                            "stages.1.bias"] or conv[1][0].startswith("stages.0")


def test_frozen_parts_are_held_in_eval_so_frozen_batchnorm_keeps_its_statistics():
    torch.manual_seed(0)
    enc = Encoder(build_backbone("resnet32"), dim=8)
    enc.finetune_plan = plan = apply_finetune(enc.backbone, _Model("last:1"))
    enc.held_eval = tuple(plan.held_eval)
    enc.train()
    assert not enc.backbone.layer1.training and not enc.backbone.bn1.training
    assert enc.backbone.layer3[4].training and enc.head.training
    stats = enc.backbone.bn1.running_mean.clone()
    enc(torch.randn(4, 3, 32, 32))
    assert torch.equal(enc.backbone.bn1.running_mean, stats)


def _encoder(mode: str) -> Encoder:
    vit = _vit()
    enc = Encoder(vit, dim=8)
    enc.finetune_plan = plan = apply_finetune(vit, _Model(mode))
    enc.held_eval = tuple(plan.held_eval)
    return enc


@pytest.mark.parametrize("mode", ["lora", "last:1", "frozen"])
def test_momentum_encoder_shares_the_frozen_tensors_and_the_ema_moves_only_trained_ones(mode):
    model = DSCLModel(_encoder(mode), queue_size=4)
    online, momentum = dict(model.online.named_parameters()), dict(model.momentum.named_parameters())
    assert list(online) == list(momentum)
    frozen = [n for n, p in online.items() if not p.requires_grad]
    trained = [n for n, p in online.items() if p.requires_grad]
    assert frozen and trained  # the head trains in every mode
    for n in frozen:  # one storage: the same tensor object
        assert momentum[n] is online[n]
    for n in trained:
        assert momentum[n].data_ptr() != online[n].data_ptr() and not momentum[n].requires_grad
    frozen_before = {n: online[n].detach().clone() for n in frozen}
    k_before = {n: momentum[n].detach().clone() for n in trained}
    with torch.no_grad():
        for n in trained:
            online[n].add_(torch.randn_like(online[n]))
    m = 0.9
    momentum_update(model.online, model.momentum, m)
    for n in trained:  # theta_k <- m theta_k + (1 - m) theta_q
        torch.testing.assert_close(momentum[n], m * k_before[n] + (1 - m) * online[n], rtol=0, atol=1e-6)
    for n in frozen:
        assert torch.equal(online[n], frozen_before[n]) and momentum[n] is online[n]


def test_partial_checkpoints_hold_the_trained_tensors_and_check_the_base():
    cfg = load_config("smoke", overrides=["model.backbone=timm:vit_tiny_patch16_224",
                                          "model.backbone_args={depth: 3, embed_dim: 32, num_heads: 2, img_size: 32}",
                                          "model.pretrained=w.pth", "model.finetune=lora", "data.image_size=32",
                                          "views.patch_size=16"])
    model = DSCLModel(_encoder("lora"), queue_size=4)
    state = trained_state(model)
    skip = frozen_keys(model)
    assert skip and not skip & set(state) and set(state) | skip == set(model.state_dict())
    assert all(k.startswith(("online.", "momentum.")) for k in skip)
    assert any(".lora_A." in k for k in state) and "queue.feats" in "".join(state) or "queue" in "".join(state)
    record = base_record(cfg, model.online)
    assert record["finetune"] == "lora" and record["source"] == "w.pth" and len(record["sha256"]) == 64
    fresh = DSCLModel(_encoder("lora"), queue_size=4)
    load_trained(fresh, state, stored=record, built=base_record(cfg, fresh.online), where="last.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    other = DSCLModel(_encoder("lora"), queue_size=4)
    with torch.no_grad():
        other.online.backbone.model.blocks[0].attn.qkv.base_layer.weight[0, 0] += 1e-3
    with pytest.raises(CheckpointError, match=r"last\.pt was trained on top of frozen weights from w\.pth"):
        load_trained(other, state, stored=record, built=base_record(cfg, other.online), where="last.pt")
    with pytest.raises(CheckpointError, match="model.finetune=lora"):
        load_trained(DSCLModel(Encoder(_vit(), dim=8), queue_size=4), state, stored=record, built=None,
                     where="last.pt")


def test_base_digest_sees_every_byte_and_name():
    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    d = base_digest(t)
    assert d == base_digest(dict(reversed(list(t.items()))))
    assert d != base_digest({"a": t["a"].clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(5.5)),
                             "b": t["b"]})
    assert d != base_digest({"a2": t["a"], "b": t["b"]}) and d != base_digest({"a": t["a"].view(3, 2), "b": t["b"]})


def test_layer_decay_scales_follow_the_definition():
    vit = _vit()
    names = [n for n, _ in vit.named_parameters()]
    groups = block_groups(vit)
    scales = lr_scales(vit, names, backbone_lr=0.5, layer_decay=0.8)
    for g, group in enumerate(groups):  # stem = layer 0 ... last block = layer 3, the projection head layer 4
        for n in group:
            assert scales[n] == pytest.approx(0.5 * 0.8 ** (4 - g)), n
    assert lr_scales(vit, names, backbone_lr=0.1, layer_decay=1.0) == {n: 0.1 for n in names}


@pytest.mark.parametrize("backbone,args", [("timm:vit_tiny_patch16_224", VIT),
                                           ("open_clip:ViT-B-16", {"width": 32, "layers": 2, "head_width": 16,
                                                                   "image_size": 32})])
def test_grad_checkpointing_gives_the_same_gradients_to_adapters_behind_frozen_layers(backbone, args):
    """model.grad_checkpointing recomputes each block in the backward pass: the LoRA gradients (which flow back
    through frozen layers whose input needs no grad) are those of the plain forward, and the switch is on."""
    if backbone.startswith("open_clip"):
        pytest.importorskip("open_clip", reason="the optional open_clip extra is not installed")
    from dscl.model import enable_grad_checkpointing

    grads = []
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = build_backbone(backbone, args=args)
        apply_finetune(net, _Model("lora"))
        _randomise_adapters(net)
        if ckpt:
            enable_grad_checkpointing(net, backbone)
            inner = net.model
            assert getattr(inner, "grad_checkpointing", None) or inner.transformer.grad_checkpointing
        pooled, fmap = net.forward_with_map(x)
        (pooled.square().sum() + fmap.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_grad_checkpointing_is_refused_where_it_would_not_be_exact_or_does_not_exist():
    from dscl.model import enable_grad_checkpointing

    with pytest.raises(ConfigError, match="model.grad_checkpointing: convnet has no gradient checkpointing"):
        enable_grad_checkpointing(build_backbone("convnet"), "convnet")
    with pytest.raises(ConfigError, match="BatchNorm layers, whose running statistics"):
        enable_grad_checkpointing(build_backbone("timm:resnet18"), "timm:resnet18")
