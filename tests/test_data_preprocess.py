"""dscl.data.preprocess: the ONE implementation of the evaluation view (EvalTransform, a run's input
conversion and the exported files all go through Preprocess), checked against torchvision."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dscl.data import EvalTransform
from dscl.data.preprocess import ImageTransform, Preprocess, image_items, input_mode, to_uint8_hwc
from dscl.inference import Preprocess as DocumentedPreprocess

MEAN, STD = (0.2, 0.4, 0.6), (0.3, 0.2, 0.25)
SHAPES = ((28, 28), (41, 33), (300, 199), (17, 250), (256, 256))


def _torchvision_view(img: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view written with torchvision (what EvalTransform computed before it shared Preprocess):
    uint8 (3, H, W) -> resize (+ centre crop from 128 px), /255, (x - mean) / std."""
    if size >= 128:
        img = TF.center_crop(TF.resize(img, round(size * 256 / 224), antialias=True), [size, size])
    elif tuple(img.shape[1:]) != (size, size):
        img = TF.resize(img, [size, size], antialias=True)
    x = img.to(torch.float32).div_(255.0)
    return x.sub_(torch.tensor(MEAN)[:, None, None]).div_(torch.tensor(STD)[:, None, None])


@pytest.mark.parametrize("size", [28, 32, 160, 224])
def test_every_path_of_the_evaluation_view_equals_torchvision_bit_for_bit(size: int) -> None:
    # The one conversion shared by evaluate / predict / export must stay torchvision's evaluation view exactly
    # (uint8 resize kernel with its rounding, centre crop for >= 128 px, normalisation), or runs would change
    # numbers: EvalTransform, Preprocess on a uint8 batch and a run's ImageTransform (one image or a batch).
    gen = torch.Generator().manual_seed(size)
    pre = Preprocess(size, MEAN, STD, grey=False)
    evaluation, run = EvalTransform(size, MEAN, STD), ImageTransform(pre)
    for h, w in ((size, size), *SHAPES):
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        expected = _torchvision_view(img, size)
        assert expected.shape == (3, size, size)
        for name, got in (("EvalTransform", evaluation(img)), ("Preprocess", pre(img.permute(1, 2, 0)[None])[0]),
                          ("ImageTransform", run(img)), ("ImageTransform.batch", run.batch([img])[0])):
            assert torch.equal(got, expected), (name, h, w, (got - expected).abs().max())
    # grey images are replicated, PIL images converted to RGB, on both paths
    grey = torch.randint(0, 256, (1, 37, 45), dtype=torch.uint8, generator=gen)
    assert torch.equal(evaluation(grey), _torchvision_view(grey.expand(3, -1, -1), size))
    assert torch.equal(evaluation(grey[0]), run(grey[0]))
    pil = Image.fromarray(torch.randint(0, 256, (30, 50, 3), dtype=torch.uint8, generator=gen).numpy())
    assert torch.equal(evaluation(pil), _torchvision_view(torch.from_numpy(np.array(pil)).permute(2, 0, 1), size))


def test_eval_transform_runs_through_the_shared_preprocess(monkeypatch) -> None:
    """EvalTransform is not a second implementation: its output comes from Preprocess.forward."""
    calls = []
    forward = Preprocess.forward

    def counted(self: Preprocess, x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return forward(self, x)

    monkeypatch.setattr(Preprocess, "forward", counted)
    t = EvalTransform(28, MEAN, STD)
    assert isinstance(t.preprocess, Preprocess) and not t.preprocess.grey
    t(torch.zeros(3, 40, 30, dtype=torch.uint8))
    assert calls == [(1, 40, 30, 3)]
    assert DocumentedPreprocess is Preprocess  # README's dscl.inference.Preprocess is this class


def test_transforms_pickle_for_loader_workers() -> None:
    img = torch.randint(0, 256, (3, 33, 21), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for t in (EvalTransform(32, MEAN, STD), ImageTransform(Preprocess(32, MEAN, STD, grey=True))):
        assert torch.equal(pickle.loads(pickle.dumps(t))(img), t(img))
    assert repr(EvalTransform(32, MEAN, STD)) == "EvalTransform(image_size=32)"
    assert repr(ImageTransform(Preprocess(32, MEAN, STD, grey=True))) == "ImageTransform(image_size=32, grey=True)"


def test_grey_runs_convert_colour_like_pil_and_grey_is_replicated() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    grey = np.array(Image.fromarray(rgb).convert("L"))
    out = Preprocess(11, (0.0,) * 3, (1.0,) * 3, grey=True)(torch.from_numpy(rgb)[None])  # no resize at 9x11 -> 11x11
    pre = Preprocess(11, (0.0,) * 3, (1.0,) * 3, grey=True)
    chans = pre._channels(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    assert torch.equal(chans[0, 0], torch.from_numpy(grey)) and torch.equal(chans[0, 0], chans[0, 2])
    assert out.shape == (1, 3, 11, 11) and torch.equal(out[0, 0], out[0, 1])
    # float input: the same weights, no rounding
    f = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    assert torch.allclose(pre._channels(f)[0, 0] * 255, torch.from_numpy(grey).float(), atol=0.51)
    # colour runs keep colour; a grey image is replicated (PIL's convert("RGB"))
    colour = Preprocess(11, (0.0,) * 3, (1.0,) * 3, grey=False)
    assert torch.equal(colour._channels(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0],
                       torch.from_numpy(rgb).permute(2, 0, 1))
    one = torch.from_numpy(grey)[None, :, :, None]
    assert torch.equal(colour(one), colour(one.expand(-1, -1, -1, 3)))
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
        colour(torch.zeros(1, 5, 5, 4, dtype=torch.uint8))
    assert input_mode("fmnist-lt") == "L" and input_mode("cifar10-lt") == "RGB"


def test_image_transform_batch_takes_every_input_kind() -> None:
    t = ImageTransform(Preprocess(16, MEAN, STD, grey=False))
    batch = torch.randint(0, 256, (4, 20, 18, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    want = torch.stack([t(im.permute(2, 0, 1)) for im in batch])
    assert torch.equal(t.batch(batch), want)  # a uint8 (N, H, W, C) batch
    assert torch.equal(t.batch(batch.numpy()), want)  # numpy batches are batches too
    assert torch.equal(t.batch([im.numpy() for im in batch]), want)  # numpy (H, W, C) images
    assert torch.equal(t.batch(batch[0].numpy()), want[:1])  # one numpy image is a list of one
    assert t.batch([]).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match="a batch"):
        t.batch(torch.zeros(3, 20, 18, dtype=torch.uint8))
    assert isinstance(image_items(batch), torch.Tensor) and image_items("a.png") == ["a.png"]
    assert to_uint8_hwc(torch.zeros(5, 6, dtype=torch.uint8)).shape == (5, 6, 1)


# ---------------------------------------------------------------------------------------- the backbone spec's view


def _spec_view(img: torch.Tensor, size: int, crop_pct: float, mode: str) -> torch.Tensor:
    """timm's evaluation view in torch terms: shorter side to round(size / crop_pct), centre crop, in float with
    antialiasing, rounded back to uint8 pixels, /255, normalised."""
    x = img[None].to(torch.float32)
    h, w = img.shape[1:]
    r = round(size / crop_pct)
    nh, nw = (int(r * h / w), r) if w <= h else (r, int(r * w / h))
    x = torch.nn.functional.interpolate(x, size=[nh, nw], mode=mode, align_corners=False, antialias=True)
    x = TF.center_crop(x.round().clamp(0, 255), [size, size])[0] / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@pytest.mark.parametrize("size", [28, 160, 224])
def test_the_dataset_convention_is_an_explicit_crop_fraction(size: int) -> None:
    """A built-in run's spec (crop_pct 224/256 from 128 px, 1 below, bilinear) reproduces the view of every run
    before specs bit for bit: Preprocess without a crop fraction and with the spec's are one conversion."""
    from dscl.backbones import BackboneSpec
    from dscl.backbones.pretrained import dataset_crop_pct
    from dscl.data.preprocess import preprocess_for

    spec = BackboneSpec("builtin", "convnet", image_size=size, mean=MEAN, std=STD, crop_pct=dataset_crop_pct(size))
    before, now = Preprocess(size, MEAN, STD, grey=False), preprocess_for(spec)
    assert (now.crop, now.resize_short, now.interpolation) == (before.crop, before.resize_short, "bilinear")
    gen = torch.Generator().manual_seed(size)
    for h, w in SHAPES:
        img = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8, generator=gen)
        assert torch.equal(now(img), before(img))
        assert torch.equal(now(img), _torchvision_view(img[0].permute(2, 0, 1), size)[None])


def test_a_pretrained_spec_crops_and_resizes_as_its_configuration_says() -> None:
    """CLIP / timm settings: bicubic resizes, crop_pct 0.9 (shorter side to round(64 / 0.9) = 71, centre 64);
    TorchScript keeps the same view."""
    gen = torch.Generator().manual_seed(0)
    pre = Preprocess(64, MEAN, STD, grey=False, crop_pct=0.9, interpolation="bicubic")
    assert pre.crop and pre.resize_short == 71
    scripted = torch.jit.script(pre)
    for h, w in ((28, 28), (41, 33), (300, 199)):
        img = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8, generator=gen)
        want = _spec_view(img[0].permute(2, 0, 1), 64, 0.9, "bicubic")
        torch.testing.assert_close(pre(img)[0], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(scripted(img), pre(img), rtol=0, atol=0)
    whole = Preprocess(64, MEAN, STD, grey=False, crop_pct=1.0, interpolation="nearest")
    img = torch.arange(32 * 32 * 3, dtype=torch.int32).remainder(256).to(torch.uint8).reshape(1, 32, 32, 3)
    doubled = img.permute(0, 3, 1, 2).repeat_interleave(2, 2).repeat_interleave(2, 3).float() / 255  # nearest, x2
    want = (doubled - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(whole(img), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="crop_pct must be in"):
        Preprocess(64, MEAN, STD, grey=False, crop_pct=0.0)
