"""Batched DSCL views on the training device (issue #15): same views as the per-sample transform given
the same parameters, parameters drawn from the recipe's distributions, boxes on the right region."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader

from conftest import needs_fmnist, without_cuda_sync
from dscl.config import ViewConfig, load_config
from dscl.data import DSCLTransform, DSCLViews, LTDataset
from dscl.data import views as V
from dscl.data.batched_views import (
    BatchedDSCLTransform,
    Canvas,
    CanvasTransform,
    augment_on_device,
    params_from_numpy,
    working_size,
)

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth uint8 images (n, 3, h, w): random colours at a quarter of the resolution, upsampled."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, max(2, h // 4), max(2, w // 4)), generator=g).float()
    return F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    shape = (1,) * (x.dim() - 3) + (3, 1, 1)
    return x * torch.tensor(STD).view(shape) + torch.tensor(MEAN).view(shape)


def _per_sample(t: DSCLTransform, images: torch.Tensor) -> tuple[list[V.ViewParams], DSCLViews]:
    params = [t.draw(img.shape[1], img.shape[2]) for img in images]
    outs = [t.apply(img, p) for img, p in zip(images, params, strict=True)]
    return params, DSCLViews(*(torch.stack([getattr(o, f) for o in outs]) for f in DSCLViews._fields))


# ---------------------------------------------------------------- same parameters -> same views


@pytest.mark.parametrize(("size", "n_patches", "patch", "src", "blur"), [
    (28, 3, 14, (28, 28), False),  # the fmnist-lt preset
    (32, 3, 16, (40, 36), True),  # crops from a larger, non-square image; blur
    (64, 4, 24, (70, 70), True),
    (32, 0, 16, (32, 32), False),  # no patches (PBSD off)
])
def test_batched_equals_per_sample_given_the_same_parameters(size, n_patches, patch, src, blur):
    views = ViewConfig(num_patches=n_patches, patch_size=patch, blur=blur)
    per_sample = DSCLTransform(size, views, MEAN, STD, generator=torch.Generator().manual_seed(size))
    images = _images(8, *src, seed=size)
    params, expected = _per_sample(per_sample, images)
    got = BatchedDSCLTransform(size, views, MEAN, STD).apply(images, params_from_numpy(params))
    assert got.query.shape == (8, 3, size, size) and got.patches.shape == (8, n_patches, 3, patch, patch)
    for name, a, b in zip(DSCLViews._fields, got, expected, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        if a.numel():
            assert (a - b).abs().max().item() < 2e-5, name
    assert torch.equal(got.boxes, expected.boxes)
    if blur:  # the blur really ran (some query views were blurred, compared with an unblurred twin)
        assert bool(params_from_numpy(params).photo.sigma[:, 1].gt(0).any())


def test_batched_equals_per_sample_for_large_images_up_to_uint8_rounding():
    """Above 96 px the per-sample path resizes with torchvision's uint8 kernel (fixed-point, rounded
    to whole levels after each axis); the batched path keeps floats: they agree to a grey level."""
    views = ViewConfig(num_patches=2, patch_size=32, photometric=False)
    per_sample = DSCLTransform(128, views, MEAN, STD, generator=torch.Generator().manual_seed(3))
    images = _images(4, 150, 140, seed=3)
    params, expected = _per_sample(per_sample, images)
    got = BatchedDSCLTransform(128, views, MEAN, STD).apply(images, params_from_numpy(params))
    tol = 1.01 / 255 / min(STD)
    for name in ("query", "key", "patches"):
        assert (getattr(got, name) - getattr(expected, name)).abs().max().item() < tol, name


def test_numpy_and_torch_parameters_are_identical_for_the_same_uniforms():
    """One drawing function for both paths: the same uniforms give exactly the same parameters."""
    views = ViewConfig(num_patches=4, patch_size=16, blur=True)
    n = 64
    u = torch.rand(n, V.view_uniforms(4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u[::4, : 2 * (2 * V._TRIES + 2)] = 0.999  # huge thin crops: no try fits, the centre fallback is used
    heights = torch.randint(20, 90, (n, 1), generator=torch.Generator().manual_seed(1))
    widths = torch.randint(20, 90, (n, 1), generator=torch.Generator().manual_seed(2))
    batched = V.draw_view_params(u, heights.double(), widths.double(), 32, views)
    for k in range(n):
        one = V.draw_view_params(u[k : k + 1].numpy(), int(heights[k]), int(widths[k]), 32, views)
        for field in ("crops", "flips", "boxes", "patch_flips"):
            assert np.array_equal(getattr(one, field), getattr(batched, field)[k : k + 1].numpy()), (k, field)
        for field in V._PhotoParams._fields:
            assert np.allclose(getattr(one.photo, field), getattr(batched.photo, field)[k : k + 1].numpy(),
                               rtol=0, atol=1e-12), (k, field)


# ---------------------------------------------------------------- distributions


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = [np.searchsorted(np.sort(x), grid, side="right") / len(x) for x in (a, b)]
    return float(np.abs(cdf[0] - cdf[1]).max())


def test_parameter_distributions_match_the_recipe():
    n = 12000
    views = ViewConfig(num_patches=3, patch_size=16, blur=True)
    t = BatchedDSCLTransform(64, views, MEAN, STD, generator=torch.Generator().manual_seed(0))
    src_h, src_w = 60, 80
    p = t.draw(torch.tensor([[src_h, src_w]]).repeat(n, 1))

    # crops: torchvision's RandomResizedCrop.get_params on the same image sizes is the reference
    torch.manual_seed(0)
    ref_global = np.array([T.RandomResizedCrop.get_params(torch.empty(1, src_h, src_w), (0.08, 1.0),
                                                           (3 / 4, 4 / 3)) for _ in range(3000)], dtype=float)
    ref_patch = np.array([T.RandomResizedCrop.get_params(torch.empty(1, 64, 64), views.patch_scale,
                                                          views.patch_ratio) for _ in range(3000)], dtype=float)
    crit = 1.95 * math.sqrt(1 / 3000 + 1 / (2 * n))  # KS critical value at alpha = 0.001
    for ours, ref, (height, width) in ((p.crops.reshape(-1, 4).numpy(), ref_global, (src_h, src_w)),
                                       (p.boxes.reshape(-1, 4).numpy()[: 2 * n], ref_patch, (64, 64))):
        ours = ours.astype(float)
        i, j, h, w = ours.T
        assert (i >= 0).all() and (j >= 0).all() and (i + h <= height).all() and (j + w <= width).all()
        def stats(b: np.ndarray, height: int = height, width: int = width) -> list[np.ndarray]:
            return [b[:, 2] * b[:, 3] / (height * width),  # area fraction
                    b[:, 3] / b[:, 2],  # aspect ratio w / h
                    b[:, 0] / (height - b[:, 2] + 1),  # vertical position in the free range
                    b[:, 1] / (width - b[:, 3] + 1)]

        for stat_ours, stat_ref in zip(stats(ours), stats(ref), strict=True):
            assert _ks(stat_ours, stat_ref) < crit
    # flips: p = 0.5 for the query, the key and every patch
    for flips in (p.flips[:, 0], p.flips[:, 1], p.patch_flips.reshape(-1)):
        assert abs(flips.double().mean().item() - 0.5) < 0.02

    photo = p.photo  # columns: key, query, patches
    jittered = (photo.brightness != 1) | (photo.contrast != 1) | (photo.saturation != 1)
    expected = {"jitter": (1.0, 0.8), "gray": (0.0, 0.2), "blur": (0.0, 0.5)}
    observed = {"jitter": jittered, "gray": photo.gray, "blur": photo.sigma > 0}
    for name, (p_key, p_strong) in expected.items():
        rates = observed[name].double().mean(dim=0)
        assert abs(rates[0].item() - p_key) < 0.02, name
        assert (rates[1:] - p_strong).abs().max().item() < 0.03, name
    for factor in (photo.brightness, photo.contrast, photo.saturation):
        values = factor[jittered].numpy()
        assert values.min() >= 0.6 and values.max() <= 1.4
        assert _ks(values, np.random.default_rng(0).uniform(0.6, 1.4, 20000)) < 0.03  # U(0.6, 1.4)
    assert (photo.hue[:, 0] == 0).all() and photo.hue.abs().max() <= 0.1
    assert _ks(photo.hue[:, 1:][jittered[:, 1:]].numpy(), np.random.default_rng(1).uniform(-0.1, 0.1, 20000)) < 0.03
    sigma = photo.sigma[:, 1:][photo.sigma[:, 1:] > 0].numpy()
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    assert _ks(sigma, np.random.default_rng(2).uniform(0.1, 2.0, 20000)) < 0.03
    # the jitter order is a uniform random permutation
    perms = {q: k for k, q in enumerate(itertools.permutations(range(4)))}
    codes = torch.tensor([perms[tuple(o)] for o in photo.order[:, 1].tolist()])
    freq = torch.bincount(codes, minlength=24).double() / n
    assert (freq - 1 / 24).abs().max().item() < 0.012


def test_generator_makes_the_batched_draws_reproducible():
    views = ViewConfig(num_patches=2, patch_size=14, blur=False)
    images = _images(5, 28, 28)
    canvas = Canvas(images, torch.tensor([[28, 28]]).repeat(5, 1))
    a = BatchedDSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(4))(canvas)
    b = BatchedDSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(4))(canvas)
    c = BatchedDSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(5))(canvas)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.query, c.query)


# ---------------------------------------------------------------- geometry


def test_batched_patches_are_the_box_region_of_the_query_view():
    views = ViewConfig(num_patches=5, patch_size=16, photometric=False)
    t = BatchedDSCLTransform(32, views, MEAN, STD, generator=torch.Generator().manual_seed(1))
    images = _images(16, 40, 36, seed=2)
    out = t(Canvas(images, torch.tensor([[40, 36]]).repeat(16, 1)))
    flipped = 0
    for query, patches, boxes in zip(out.query, out.patches, out.boxes, strict=True):
        for patch, (x1, y1, x2, y2) in zip(_unnormalise(patches), boxes.int().tolist(), strict=True):
            assert 0 <= x1 < x2 <= 32 and 0 <= y1 < y2 <= 32
            ref = TF.resized_crop(_unnormalise(query), y1, x1, y2 - y1, x2 - x1, [16, 16], antialias=True)
            err, err_flip = (patch - ref).abs().max().item(), (patch - ref.flip(-1)).abs().max().item()
            assert min(err, err_flip) < 1e-4
            flipped += err_flip < err
    assert 20 <= flipped <= 60  # independent flips, p = 0.5 (80 patches)


def test_canvas_views_show_the_same_region_as_crops_of_the_source_image():
    """File datasets: crops drawn on the source image, cut from the squeezed working canvas."""
    views = ViewConfig(num_patches=3, patch_size=16, photometric=False)
    src_h, src_w, side = 90, 120, working_size(32, ViewConfig(working_scale=2.0), in_memory=False)
    assert side == 64
    sources = _images(6, src_h, src_w, seed=7)
    per_sample = DSCLTransform(32, views, MEAN, STD, generator=torch.Generator().manual_seed(7))
    params, expected = _per_sample(per_sample, sources)
    canvas = torch.utils.data.default_collate([CanvasTransform(side)(img) for img in sources])
    assert canvas.image.shape == (6, 3, side, side) and canvas.size.tolist() == [[src_h, src_w]] * 6
    batched = BatchedDSCLTransform(32, views, MEAN, STD)
    got = batched.apply(canvas.image, params_from_numpy(params), canvas.size)
    # the canvas is resampled, so equality holds only to resolution; a wrong region would be far off
    shifted = params_from_numpy(params)
    i, j, h, w = shifted.crops.unbind(-1)  # each region mirrored within its free range: moved, same size
    shifted = shifted._replace(crops=torch.stack([src_h - h - i, src_w - w - j, h, w], dim=-1))
    wrong = batched.apply(canvas.image, shifted, canvas.size)
    for name in ("query", "key", "patches"):
        err = (_unnormalise(getattr(got, name)) - _unnormalise(getattr(expected, name))).abs().mean().item()
        err_wrong = (_unnormalise(getattr(wrong, name)) - _unnormalise(getattr(expected, name))).abs().mean().item()
        assert err < 0.02 and err_wrong > 3 * err, (name, err, err_wrong)
    assert torch.equal(got.boxes, expected.boxes)


# ---------------------------------------------------------------- loader side and wiring


def test_in_memory_loader_delivers_uint8_canvases_for_the_batch_contract():
    images = np.stack([_images(1, 28, 28, seed=k)[0, 0].numpy() for k in range(12)])  # grey, like fmnist
    ds = LTDataset([k % 3 for k in range(12)], 3, list("abc"), images=images)
    loader = DataLoader(ds.with_transform(CanvasTransform(None)), batch_size=6, num_workers=0)
    canvas, labels = next(iter(loader))
    assert isinstance(canvas, Canvas) and canvas.image.dtype == torch.uint8
    assert canvas.image.shape == (6, 3, 28, 28) and canvas.size.tolist() == [[28, 28]] * 6
    assert torch.equal(canvas.image[:, 0], torch.from_numpy(images[:6]))  # untouched pixels
    out = BatchedDSCLTransform(28, ViewConfig(num_patches=3, patch_size=14, blur=False), MEAN, STD)(canvas)
    assert out.query.shape == out.key.shape == (6, 3, 28, 28)
    assert out.patches.shape == (6, 3, 3, 14, 14) and out.boxes.shape == (6, 3, 4)
    assert all(torch.isfinite(x).all() for x in out) and labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_augment_on_rule():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert augment_on_device("auto", cpu, 28) and augment_on_device("auto", cpu, 32)
    assert not augment_on_device("auto", cpu, 64) and not augment_on_device("auto", cpu, 224)
    assert augment_on_device("auto", cuda, 224)
    assert not augment_on_device("auto", mps, 28)
    assert augment_on_device("device", cpu, 224) and not augment_on_device("loader", cuda, 28)
    with pytest.raises(ValueError, match="augment_on"):
        augment_on_device("gpu", cpu, 28)
    assert working_size(224, ViewConfig(), in_memory=False) == 336 and working_size(224, ViewConfig(), True) is None
    with pytest.raises(ValueError, match="working_size"):
        CanvasTransform(0)


def test_config_keys_are_validated():
    assert load_config("smoke").views.augment_on == "auto"
    with pytest.raises(ValueError, match="views.augment_on"):
        load_config("smoke", overrides=["views.augment_on=gpu"])
    with pytest.raises(ValueError, match="views.working_scale"):
        load_config("smoke", overrides=["views.working_scale=0.5"])


def test_patches_channels_last_is_a_free_view_for_the_student():
    from dscl.pretrain import patches_channels_last

    patches = torch.randn(4, 3, 3, 14, 14)
    laid = patches_channels_last(patches)
    assert torch.equal(laid, patches)
    flat = laid.transpose(0, 1).reshape(12, 3, 14, 14)  # what DSCLModel.patch_student does
    assert flat.data_ptr() == laid.data_ptr() and flat.is_contiguous(memory_format=torch.channels_last)


@needs_fmnist
def test_no_patches_without_pbsd_batched(tmp_path, monkeypatch):
    import dscl.pretrain as train_mod

    seen = []
    real = train_mod.BatchedDSCLTransform

    def spy(image_size, views, mean, std, **kwargs):
        seen.append(views.num_patches)
        return real(image_size, views, mean, std, **kwargs)

    monkeypatch.setattr(train_mod, "BatchedDSCLTransform", spy)
    cfg = load_config("smoke", overrides=["optim.epochs=1", "optim.warmup_epochs=5", "loss.pbsd_weight=0",
                                          "views.augment_on=device"])
    train_mod.pretrain(cfg, tmp_path / "run", progress=False)
    assert seen == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_views_on_cuda_match_the_cpu_and_do_not_synchronise():
    views = ViewConfig(num_patches=3, patch_size=32, blur=True)
    images = _images(8, 150, 140, seed=1)
    canvas = torch.utils.data.default_collate([CanvasTransform(112)(img) for img in images])
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = BatchedDSCLTransform(96, views, MEAN, STD, device="cuda", generator=gen)
    image_cuda, size_cuda = canvas.image.cuda(), canvas.size.cuda()
    t(Canvas(image_cuda, size_cuda))  # warm-up: caches the recipe table on the device
    params = without_cuda_sync(lambda: t.draw(size_cuda))
    out = without_cuda_sync(lambda: t.apply(image_cuda, params, size_cuda))
    params_cpu = V.ViewParams(*(p.cpu() for p in params[:4]), V._PhotoParams(*(a.cpu() for a in params.photo)))
    ref = BatchedDSCLTransform(96, views, MEAN, STD).apply(canvas.image, params_cpu, canvas.size)
    for a, b in zip(out, ref, strict=True):
        assert (a.cpu() - b).abs().max().item() < 1e-3


@needs_fmnist
@pytest.mark.slow
def test_per_sample_path_still_resumes_exactly(tmp_path):
    """tests/test_pretrain.py::test_resume_is_exact now runs the batched path (the smoke preset's
    default on a CPU, its generator saved as ``view_rng``); this keeps the per-sample path covered."""
    from dscl.pretrain import pretrain
    from dscl.run import load_checkpoint

    cfg = load_config("smoke", overrides=["optim.epochs=2", "optim.deterministic=true", "views.augment_on=loader"])
    pretrain(cfg, tmp_path / "straight", progress=False)
    pretrain(cfg, tmp_path / "split", progress=False, max_epochs=1)
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["view_rng"] is None
    pretrain(cfg, tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@needs_fmnist
def test_batched_path_saves_its_generator_per_rank(tmp_path):
    from dscl.pretrain import _view_seed, pretrain
    from dscl.run import load_checkpoint

    cfg = load_config("smoke", overrides=["optim.epochs=1", "views.augment_on=device"])
    pretrain(cfg, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert isinstance(state["view_rng"], list) and len(state["view_rng"]) == 1
    restored = torch.Generator().set_state(state["view_rng"][0])
    start = torch.Generator().manual_seed(_view_seed(cfg.optim.seed, 0))  # the stream has advanced
    assert not torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=start))


def test_batched_views_make_no_blocking_host_to_device_copy():
    """Issue #22 item 1 (simulated on the CPU): the only tensors that cross from the host are the canvas
    and its sizes, each once and without blocking; no Python-list index (which builds a host index tensor
    and copies it with a blocking copy). On CUDA either would make the host wait for the GPU each step."""
    from torch.overrides import TorchFunctionMode

    views = ViewConfig(num_patches=3, patch_size=16, blur=True)
    images = _images(6, 60, 50, seed=2)
    canvas = torch.utils.data.default_collate([CanvasTransform(48)(img) for img in images])
    t = BatchedDSCLTransform(32, views, MEAN, STD, device="cpu", generator=torch.Generator().manual_seed(0))
    host = {id(canvas.image): "image", id(canvas.size): "size"}

    class Record(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.copies: list[tuple[str, bool]] = []
            self.list_indices = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to and id(args[0]) in host:
                self.copies.append((host[id(args[0])], bool(kwargs.get("non_blocking", False))))
                return func(*args, **kwargs).clone()  # as on a GPU: the device copy is another tensor
            if func is torch.Tensor.__getitem__:
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                self.list_indices += sum(isinstance(i, list) for i in index)
            return func(*args, **kwargs)

    with Record() as rec:
        out = t(canvas)
    assert sorted(rec.copies) == [("image", True), ("size", True)], rec.copies
    assert rec.list_indices == 0
    assert out.query.shape == (6, 3, 32, 32) and out.patches.shape == (6, 3, 3, 16, 16)
