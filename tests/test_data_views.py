"""The DSCL multi-view transform (METHOD.md A.2) and the eval / classifier transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, default_collate

from dscl.config import ViewConfig
from dscl.data import ClassifierTransform, DSCLTransform, DSCLViews, EvalTransform, LTDataset
from dscl.data import views as V

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


def _image(h: int = 28, w: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (3, max(2, h // 4), max(2, w // 4)), generator=g).float()
    smooth = F.interpolate(base[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return smooth.round().clamp(0, 255).to(torch.uint8)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


@pytest.mark.parametrize(("size", "n", "p", "src"), [(28, 3, 14, (28, 28)), (32, 0, 16, (32, 32)),
                                                     (64, 4, 24, (90, 70)), (112, 2, 32, (150, 120))])
def test_shapes_boxes_and_box_geometry(size, n, p, src):
    views = ViewConfig(num_patches=n, patch_size=p, blur=True)
    t = DSCLTransform(size, views, MEAN, STD)
    torch.manual_seed(0)
    lo, hi = views.patch_scale
    for _ in range(30):
        out = t(_image(*src))
        assert isinstance(out, DSCLViews)
        assert out.query.shape == (3, size, size) and out.key.shape == (3, size, size)
        assert out.patches.shape == (n, 3, p, p) and out.boxes.shape == (n, 4)
        assert out.query.dtype == out.patches.dtype == out.boxes.dtype == torch.float32
        for x1, y1, x2, y2 in out.boxes.tolist():
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            w, h = x2 - x1, y2 - y1
            if (w, h) != (size, size):  # not the whole-view fallback
                # rounding w, h to whole pixels moves area and ratio by up to ~1 px per side
                assert lo * size**2 - (w + h + 1) <= w * h <= hi * size**2 + (w + h + 1)
                assert 3 / 4 - 1.5 / min(w, h) <= w / h <= 4 / 3 + 1.5 / min(w, h)


def test_patches_are_the_box_region_of_the_query_view():
    views = ViewConfig(num_patches=5, patch_size=16, photometric=False)
    for size, src in ((32, (40, 36)), (128, (160, 140))):  # matrix path and interpolate path
        t = DSCLTransform(size, views, MEAN, STD, generator=torch.Generator().manual_seed(1))
        flipped = 0
        for seed in range(8):
            out = t(_image(*src, seed=seed))
            query = _unnormalise(out.query)
            for patch, (x1, y1, x2, y2) in zip(out.patches, out.boxes.int().tolist(), strict=True):
                ref = TF.resized_crop(query, y1, x1, y2 - y1, x2 - x1, [16, 16], antialias=True)
                got = _unnormalise(patch)
                err, err_flip = (got - ref).abs().max().item(), (got - ref.flip(-1)).abs().max().item()
                assert min(err, err_flip) < 1e-4, (size, err, err_flip)
                flipped += err_flip < err
        assert 5 <= flipped <= 35  # independent patch flips, p = 0.5 (40 patches)


def test_query_and_key_are_independent_crops_with_flips():
    views = ViewConfig(num_patches=0, photometric=False, global_scale=(1.0, 1.0))
    t = DSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(0))
    img = _image()
    plain = _unnormalise(EvalTransform(28, MEAN, STD)(img))
    flips = {"query": 0, "key": 0}
    for _ in range(200):
        out = t(img)  # scale 1 on a square image: the whole image, maybe mirrored
        for name in flips:
            view = _unnormalise(getattr(out, name))
            if torch.allclose(view, plain.flip(-1), atol=1e-4):
                flips[name] += 1
            else:
                assert torch.allclose(view, plain, atol=1e-4)
    assert 70 <= flips["query"] <= 130 and 70 <= flips["key"] <= 130


def test_determinism_and_photometric_switch_keeps_geometry():
    img = _image(30, 26)
    views = ViewConfig(num_patches=3, patch_size=14, blur=True)
    t = DSCLTransform(28, views, MEAN, STD)
    torch.manual_seed(7)
    a = t(img)
    torch.manual_seed(7)
    b = t(img)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    c = t(img)
    assert not torch.equal(a.query, c.query)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    off = ViewConfig(num_patches=3, patch_size=14, photometric=False)
    on = DSCLTransform(28, views, MEAN, STD, generator=g1)(img)
    plain = DSCLTransform(28, off, MEAN, STD, generator=g2)(img)
    assert torch.equal(on.boxes, plain.boxes)  # same draws: photometric only changes colours
    assert not torch.allclose(on.query, plain.query)


def _reference_jitter(img: torch.Tensor, b, c, s, h, order, gray) -> torch.Tensor:
    fns = [lambda x: TF.adjust_brightness(x, b), lambda x: TF.adjust_contrast(x, c),
           lambda x: TF.adjust_saturation(x, s), lambda x: TF.adjust_hue(x, h)]
    for k in order:
        img = fns[k](img)
    return TF.rgb_to_grayscale(img, num_output_channels=3) if gray else img


def test_batched_colour_ops_match_torchvision():
    rng = np.random.default_rng(0)
    groups = [np.stack([_image(20, 20, seed=k).numpy() / 255.0 for k in range(2)]).astype(np.float32),
              np.stack([_image(12, 12, seed=10 + k).numpy() / 255.0 for k in range(5)]).astype(np.float32)]
    n = 7
    params = V._PhotoParams(
        brightness=rng.uniform(0.6, 1.4, n), contrast=rng.uniform(0.6, 1.4, n),
        saturation=rng.uniform(0.6, 1.4, n), hue=rng.uniform(-0.5, 0.5, n),
        order=np.stack([rng.permutation(4) for _ in range(n)]), gray=np.arange(n) % 3 == 1,
        sigma=np.zeros(n),
    )
    params = params._replace(brightness=np.where(np.arange(n) == 0, 1.0, params.brightness))
    out = V.augment_and_normalise(groups, params, np.zeros(3, np.float32), np.ones(3, np.float32))
    k = 0
    for g, o in zip(groups, out, strict=True):
        for img, got in zip(g, o, strict=True):
            ref = _reference_jitter(torch.from_numpy(img), params.brightness[k], params.contrast[k],
                                    params.saturation[k], params.hue[k], params.order[k], params.gray[k])
            assert (got - ref).abs().max().item() < 2e-4, k
            k += 1


def test_blur_paths_agree_and_match_a_direct_convolution(monkeypatch):
    rng = np.random.default_rng(1)
    group = rng.random((3, 3, 20, 20)).astype(np.float32)
    sigma = np.array([0.0, 0.7, 2.0])
    matrix = V._blur(group, sigma)
    monkeypatch.setattr(V, "_MATRIX_MAX", 0)
    conv = V._blur(group, sigma)
    assert np.abs(matrix - conv).max() < 1e-5
    assert np.array_equal(matrix[0], group[0])  # sigma 0: untouched
    taps = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
    taps /= taps.sum()
    padded = np.pad(group[2], ((0, 0), (6, 6), (6, 6)), mode="reflect")
    rows = sum(taps[d] * padded[:, d : d + 20, :] for d in range(13))
    direct = sum(taps[d] * rows[:, :, d : d + 20] for d in range(13))
    assert np.abs(matrix[2] - direct).max() < 1e-5


@pytest.mark.parametrize(("start", "length", "in_size", "out"), [(3, 20, 28, 14), (0, 9, 28, 28), (5, 17, 40, 17)])
def test_resize_weights_match_antialiased_interpolate(start, length, in_size, out):
    x = torch.rand(1, 1, in_size, in_size)
    weights = V._resize_weights(np.array([start]), np.array([length]), in_size, out)[0]
    wt = torch.from_numpy(weights).float()
    ours = wt @ x[0, 0] @ wt.T
    ref = F.interpolate(x[:, :, start : start + length, start : start + length], size=(out, out),
                        mode="bilinear", align_corners=False, antialias=True)[0, 0]
    assert (ours - ref).abs().max().item() < 1e-5


def test_sample_boxes_fallbacks():
    u = np.zeros((1, 22))
    u[0, 0:20:2] = 1.0  # area fraction 1 ...
    u[0, 1:20:2] = 1.0  # ... with ratio 4/3: never fits, so every try fails
    assert V.sample_boxes(u, 10, 10, (1.0, 1.0), (3 / 4, 4 / 3), "whole").tolist() == [[0, 0, 10, 10]]
    assert V.sample_boxes(u, 10, 30, (1.0, 1.0), (3 / 4, 4 / 3), "center").tolist() == [[0, 8, 10, 13]]


def test_collate_with_and_without_patches():
    for n in (0, 3):
        t = DSCLTransform(28, ViewConfig(num_patches=n, patch_size=14, blur=False), MEAN, STD)
        batch = default_collate([t(_image(seed=k)) for k in range(4)])
        assert isinstance(batch, DSCLViews)
        assert batch.query.shape == (4, 3, 28, 28) and batch.patches.shape == (4, n, 3, 14, 14)
        assert batch.boxes.shape == (4, n, 4)


def test_dataloader_with_two_workers():
    images = np.stack([_image(seed=k)[0].numpy() for k in range(16)])
    ds = LTDataset([k % 4 for k in range(16)], 4, list("abcd"), images=images)
    t = DSCLTransform(28, ViewConfig(num_patches=3, patch_size=14, blur=False), MEAN, STD)
    loader = DataLoader(ds.with_transform(t), batch_size=4, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == 4
    views, labels = batches[0]
    assert views.patches.shape == (4, 3, 3, 14, 14) and labels.tolist() == [0, 1, 2, 3]
    # the workers draw different augmentations (DataLoader seeds each worker's torch RNG)
    assert not torch.equal(batches[0][0].boxes, batches[1][0].boxes)


def test_eval_transform():
    img = _image(28, 28)
    out = EvalTransform(28, MEAN, STD)(img)
    assert torch.allclose(_unnormalise(out), img.float() / 255, atol=1e-5)
    assert EvalTransform(32, MEAN, STD)(img).shape == (3, 32, 32)
    big = _image(300, 400)
    out = EvalTransform(224, MEAN, STD)(big)
    ref = TF.center_crop(TF.resize(big, 256, antialias=True), [224, 224]).float() / 255
    assert out.shape == (3, 224, 224) and torch.allclose(_unnormalise(out), ref, atol=1e-5)


def test_classifier_transform():
    flat = torch.full((3, 40, 40), 128, dtype=torch.uint8)
    weak = ClassifierTransform(32, MEAN, STD, strong=False, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        assert torch.allclose(_unnormalise(weak(flat)), torch.full((3, 32, 32), 128 / 255), atol=1e-5)
    strong = ClassifierTransform(64, MEAN, STD, generator=torch.Generator().manual_seed(0))
    outs = [strong(_image(80, 80)) for _ in range(10)]
    assert all(o.shape == (3, 64, 64) for o in outs)
    colour = [_unnormalise(strong(flat)).mean().item() for _ in range(20)]
    assert max(colour) - min(colour) > 0.05  # brightness / contrast jitter moves a flat image
    assert not math.isnan(sum(colour))
