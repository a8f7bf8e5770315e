"""pool_boxes: one roi_align call, scale derived from sizes, pixel-exact boxes with aligned=True."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from dscl.patches import pool_boxes


def linear_map(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """f(y, x) = a_c + b_c * y + c_c * x per channel (different coefficients per channel and image)."""
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(b, c, 3, generator=g)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    return coef[..., 0, None, None] + coef[..., 1, None, None] * ys + coef[..., 2, None, None] * xs


def full_boxes(b: int, l: int, h: int, w: int) -> torch.Tensor:
    return torch.tensor([0.0, 0.0, w, h]).expand(b, l, 4).clone()


def test_full_box_constant_map_is_exact():
    # Every bilinear sample of a constant map is the constant: exact up to float rounding.
    fmap = torch.randn(2, 5, 1, 1).expand(2, 5, 7, 7).contiguous()
    out = pool_boxes(fmap, full_boxes(2, 3, 224, 224), 224)
    assert out.shape == (3, 2, 5)
    torch.testing.assert_close(out, fmap.mean(dim=(2, 3)).expand(3, 2, 5), rtol=0, atol=1e-6)


def test_full_box_even_map_equals_global_average_pool():
    # 32 px -> 8x8 map, 2x2 bins of 4x4 cells, sampling ratio ceil(4)=4: with aligned=True the 8
    # sample coordinates per axis are exactly the cell centres 0..7, so ANY map pools to its mean.
    fmap = torch.randn(3, 4, 8, 8)
    out = pool_boxes(fmap, full_boxes(3, 2, 32, 32), 32)
    torch.testing.assert_close(out, fmap.mean(dim=(2, 3)).expand(2, 3, 4), rtol=0, atol=1e-5)


def test_full_box_odd_map_linear_exact_random_bounded():
    # 224 px -> 7x7 map: samples at -0.0625 + 0.875 k (k = 0..7), symmetric about the centre 3 after
    # border clamping, so a map linear in position pools exactly to its mean (= its centre value).
    fmap = linear_map(2, 4, 7, 7)
    out = pool_boxes(fmap, full_boxes(2, 1, 224, 224), 224)
    torch.testing.assert_close(out[0], fmap.mean(dim=(2, 3)), rtol=0, atol=1e-5)
    # A random N(0,1) map: the ROI value is a weighted mean of the 49 cells whose weights (>= 0,
    # sum 1) are close to uniform 1/49, so |diff| <= sum_i |w_i - 1/49| * max|f| is small: measured
    # max |diff| over these 256 channels is 0.013. The 0.05 bound still fails for the aligned=False
    # half-cell shift (0.18) and for a wrong spatial scale (> 2).
    rnd = torch.randn(4, 64, 7, 7, generator=torch.Generator().manual_seed(1))
    for aligned, ok in ((True, True), (False, False)):
        diff = pool_boxes(rnd, full_boxes(4, 1, 224, 224), 224, aligned=aligned)[0] - rnd.mean(dim=(2, 3))
        assert bool(diff.abs().max() < 0.05) is ok


def test_official_aligned_false_is_shifted():
    # The legacy convention samples half a cell towards the bottom-right: biased on a linear map.
    fmap = linear_map(1, 1, 8, 8) * 0 + torch.arange(8.0)[None, :]  # f = x
    out = pool_boxes(fmap, full_boxes(1, 1, 32, 32), 32, aligned=False)
    assert out.item() > fmap.mean().item() + 0.3


def test_scale_cifar_stride_quadrant():
    # 32 px image, 8x8 map (stride 4): the top-left 16x16 px quadrant is exactly cells [0:4, 0:4].
    fmap = torch.randn(2, 3, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0], [16.0, 0.0, 32.0, 16.0]])
    out = pool_boxes(fmap, boxes.expand(2, 3, 4), 32)
    torch.testing.assert_close(out[0], fmap[:, :, :4, :4].mean(dim=(2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], fmap[:, :, 4:, 4:].mean(dim=(2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2], fmap[:, :, :4, 4:].mean(dim=(2, 3)), rtol=0, atol=1e-5)


def test_scale_imagenet_stride():
    # 224 px image, 7x7 map (stride 32): box x in [32, 96), y in [64, 128) is cells x 1..2, y 2..3.
    fmap = torch.randn(1, 6, 7, 7)
    out = pool_boxes(fmap, torch.tensor([[[32.0, 64.0, 96.0, 128.0]]]), (224, 224))
    torch.testing.assert_close(out[0], fmap[:, :, 2:4, 1:3].mean(dim=(2, 3)), rtol=0, atol=1e-5)


def test_rectangular_image():
    # 64 x 32 (h x w) image, stride 4 -> 16 x 8 map; bottom half box -> rows 8..15.
    fmap = torch.randn(1, 2, 16, 8)
    out = pool_boxes(fmap, torch.tensor([[[0.0, 32.0, 32.0, 64.0]]]), (64, 32))
    torch.testing.assert_close(out[0], fmap[:, :, 8:, :].mean(dim=(2, 3)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
def test_batched_call_equals_per_box_calls(aligned):
    g = torch.Generator().manual_seed(3)
    b, l, px = 3, 4, 28
    fmap = torch.randn(b, 5, 7, 7, generator=g)
    xy = torch.rand(b, l, 2, generator=g) * 18
    wh = 2 + torch.rand(b, l, 2, generator=g) * 8
    boxes = torch.cat([xy, xy + wh], dim=2)
    out = pool_boxes(fmap, boxes, px, aligned=aligned)
    assert out.shape == (l, b, 5) and out.dtype == torch.float32
    for j in range(l):
        for i in range(b):
            one = roi_align(fmap[i:i + 1], [boxes[i, j][None]], output_size=2, spatial_scale=7 / 28,
                            sampling_ratio=-1, aligned=aligned)
            torch.testing.assert_close(out[j, i], one.mean(dim=(2, 3))[0], rtol=0, atol=1e-6)


def test_float32_under_autocast_and_no_gradient_needed():
    fmap = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool_boxes(fmap.to(torch.bfloat16), full_boxes(2, 1, 32, 32), 32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], fmap.detach().mean(dim=(2, 3)), rtol=0, atol=0.05)


def test_errors():
    fmap = torch.randn(2, 3, 8, 8)
    boxes = full_boxes(2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"8x8.*32x64"):
        pool_boxes(fmap, boxes, (32, 64))  # width says stride 8, height says stride 4
    with pytest.raises(ValueError, match=r"boxes.*\(1, 1, 4\)"):
        pool_boxes(fmap, boxes[:1], 32)
    with pytest.raises(ValueError, match="feature_map"):
        pool_boxes(fmap[0], boxes, 32)
    # one cell of rounding is accepted: 225 x 161 px through a ResNet gives an 8 x 6 map
    pool_boxes(torch.randn(1, 1, 8, 6), torch.tensor([[[0.0, 0.0, 161.0, 225.0]]]), (225, 161))
