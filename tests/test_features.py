"""dscl.features: pooled features of a frozen backbone, BatchNorm re-estimation on clean images."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dscl.data import LTDataset
from dscl.features import extract_features, recompute_bn

CPU = torch.device("cpu")


def _dataset(n: int = 24, seed: int = 0, offset: int = 0) -> LTDataset:
    """``n`` random uint8 3 x 6 x 6 images in memory; the transform scales them to [0, 1] floats."""
    rng = np.random.default_rng(seed)
    images = rng.integers(offset, 256 - offset, size=(n, 3, 6, 6), dtype=np.uint8)
    labels = [k % 3 for k in range(n)]
    return LTDataset(labels, 3, ["a", "b", "c"], images=images, transform=lambda x: x.float() / 255)


def _backbone() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Conv2d(4, 5, 1),
                        nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.num_features = 5  # what extract_features reads for an empty dataset
    with torch.no_grad():  # non-trivial affine parameters and stale statistics from "stage 1"
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.fill_(7.0)
            bn.running_var.fill_(9.0)
            bn.num_batches_tracked.fill_(1000)
    return net


def _batches(ds: LTDataset, batch_size: int) -> list[torch.Tensor]:
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    return list(xs.split(batch_size))


def _expected_stats(net: nn.Sequential, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """BatchNorm's cumulative average written out: per batch, the batch mean and the unbiased batch
    variance of each BN layer's input (the layers normalise with the batch's own statistics in
    training mode); the running statistics are the plain averages over batches."""
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("m1", "v1", "m2", "v2")}
    with torch.no_grad():
        for x in batches:
            h1 = net[0](x)
            stats["m1"].append(h1.mean((0, 2, 3)))
            stats["v1"].append(h1.var((0, 2, 3), unbiased=True))
            a1 = F.batch_norm(h1, None, None, net[1].weight, net[1].bias, training=True, eps=net[1].eps)
            h2 = net[3](torch.relu(a1))
            stats["m2"].append(h2.mean((0, 2, 3)))
            stats["v2"].append(h2.var((0, 2, 3), unbiased=True))
    return {k: torch.stack(v).mean(0) for k, v in stats.items()}


# ------------------------------------------------------------------------------------------ recompute_bn


def test_recompute_bn_equals_the_statistics_computed_directly():
    net, ds = _backbone(), _dataset(24)
    params = {k: v.clone() for k, v in net.named_parameters()}
    net.train()
    recompute_bn(net, ds, batch_size=8, device=CPU, workers=0, progress=False)
    expected = _expected_stats(_backbone(), _batches(ds, 8))  # same weights, computed by hand
    torch.testing.assert_close(net[1].running_mean, expected["m1"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, expected["v1"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[4].running_mean, expected["m2"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[4].running_var, expected["v2"], rtol=1e-5, atol=1e-6)
    # the stale statistics were dropped, not averaged in: 3 batches counted from zero
    assert int(net[1].num_batches_tracked) == int(net[4].num_batches_tracked) == 3
    # equal batches: the running mean of the first layer is the mean over the whole dataset
    whole = _backbone()[0](torch.cat(_batches(ds, 8))).mean((0, 2, 3))
    torch.testing.assert_close(net[1].running_mean, whole.detach(), rtol=1e-5, atol=1e-6)
    # parameters are untouched, each layer's momentum is restored, and the backbone is left in eval mode
    for name, value in net.named_parameters():
        assert torch.equal(value, params[name]), name
    assert net[1].momentum == 0.3 and net[4].momentum == 0.1
    assert not any(m.training for m in net.modules())


def test_recompute_bn_depends_only_on_the_data():
    ds, other = _dataset(24, seed=0), _dataset(24, seed=1, offset=60)
    a, b, c = _backbone(), _backbone(), _backbone()
    with torch.no_grad():
        b[1].running_mean.fill_(-3.0)  # different stale statistics
        b[4].running_var.fill_(0.01)
    recompute_bn(a, ds, batch_size=8, device=CPU, workers=0, progress=False)
    recompute_bn(b, ds, batch_size=8, device=CPU, workers=0, progress=False)
    recompute_bn(c, other, batch_size=8, device=CPU, workers=0, progress=False)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.allclose(a[1].running_mean, c[1].running_mean)
    assert not torch.allclose(a[4].running_var, c[4].running_var)
    # run again on the same data: the same statistics (nothing accumulates across calls)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    recompute_bn(a, ds, batch_size=8, device=CPU, workers=0, progress=False)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-7)


def test_recompute_bn_changes_what_eval_mode_computes():
    """After re-estimation, eval-mode outputs normalise with the clean-image statistics."""
    net, ds = _backbone(), _dataset(24)
    x = torch.stack([ds[i][0] for i in range(4)])
    with torch.no_grad():
        stale = net.eval()(x).clone()
    recompute_bn(net, ds, batch_size=8, device=CPU, workers=0, progress=False)
    with torch.no_grad():
        fresh = net(x)
    assert not torch.allclose(stale, fresh)
    ref = _backbone()
    with torch.no_grad():
        for bn, got in ((ref[1], net[1]), (ref[4], net[4])):
            bn.running_mean.copy_(got.running_mean)
            bn.running_var.copy_(got.running_var)
        torch.testing.assert_close(ref.eval()(x), fresh)


def test_recompute_bn_without_batchnorm_changes_nothing():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    recompute_bn(net, _dataset(8), batch_size=4, device=CPU, workers=0, progress=False)
    assert net.training  # untouched: no BatchNorm, nothing to re-estimate
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])


# ----------------------------------------------------------------------------------------- extract_features


@pytest.mark.parametrize("training", [True, False])
def test_extract_features_in_dataset_order_in_eval_mode(training):
    net, ds = _backbone(), _dataset(10)
    net.train(training)
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    feats, labels = extract_features(net, ds, batch_size=4, device=CPU, workers=0, progress=False, desc="f")
    assert feats.shape == (10, 5) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert labels.tolist() == ds.targets and labels.dtype == torch.long
    with torch.no_grad():
        direct = _backbone().eval()(torch.stack([ds[i][0] for i in range(10)]))
    torch.testing.assert_close(feats, direct)  # eval mode (running statistics), in dataset order
    assert net.training == training  # the caller's mode is restored
    for key, value in net.state_dict().items():  # BN statistics are not updated by extraction
        assert torch.equal(value, buffers[key]), key


def test_extract_features_of_an_empty_dataset():
    ds = _dataset(4).subset([])
    feats, labels = extract_features(_backbone(), ds, batch_size=4, device=CPU, workers=0, progress=False, desc="f")
    assert feats.shape == (0, 5) and labels.shape == (0,) and labels.dtype == torch.long


# ----------------------------------------------------------------------------------------- frozen_backbone


def test_frozen_backbone_is_the_runs_backbone_with_the_checkpoints_weights(tmp_path):
    from dscl.backbones import build_backbone
    from dscl.config import load_config
    from dscl.features import frozen_backbone
    from dscl.model import backbone_spec

    cfg = load_config("smoke")
    spec = backbone_spec(cfg, (0.5,) * 3, (0.25,) * 3)  # the stored spec is the only input of the rebuild
    torch.manual_seed(0)
    trained = build_backbone(cfg.model.backbone)
    torch.manual_seed(1)  # another initialisation: every weight must come from the checkpoint
    got = frozen_backbone(spec, trained.state_dict(), tmp_path / "last.pt")
    assert type(got) is type(trained)
    for key, value in trained.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    other = build_backbone("resnet32").state_dict()
    with pytest.raises(ValueError, match=f"{tmp_path / 'last.pt'} does not fit backbone {cfg.model.backbone}"):
        frozen_backbone(spec, other, tmp_path / "last.pt")
