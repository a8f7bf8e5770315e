"""Augmentation policies (issue #32): RandAugment, TrivialAugmentWide, AutoAugment and random erasing on
both view paths. Each op against torchvision's functional op; the drawing against the policies'
definitions; the per-sample and batched paths against each other (same parameters -> same views; own
draws -> same op frequencies and magnitudes within sampling error); config refusals; runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from conftest import needs_fmnist, without_cuda_sync
from dscl.config import ConfigError, ViewConfig, load_config
from dscl.data import views as V
from dscl.data.batched_views import BatchedDSCLTransform, params_from_numpy
from dscl.data.policies import (
    OPS,
    Policy,
    apply_policy_batch,
    apply_policy_one,
    draw_policy,
    erase_batch,
    erase_one,
    policy_uniforms,
)

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Float images in [0, 1]: half smooth random colours, half exact uint8 levels (ties for posterize)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, max(2, size // 4), max(2, size // 4), generator=g)
    x = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    x[: n // 2] = (x[: n // 2] * 255).round() / 255
    return x.clamp(0, 1)


def _torchvision(img: torch.Tensor, name: str, mag: float) -> torch.Tensor:
    """The op as torchvision's RandAugment applies it (written out from its documented calls)."""
    nearest = InterpolationMode.NEAREST
    if name == "Identity":
        return img
    if name == "ShearX":
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(mag)), 0.0],
                         interpolation=nearest, center=[0, 0])
    if name == "ShearY":
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(mag))],
                         interpolation=nearest, center=[0, 0])
    if name == "TranslateX":
        return TF.affine(img, angle=0.0, translate=[int(mag), 0], scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
    if name == "TranslateY":
        return TF.affine(img, angle=0.0, translate=[0, int(mag)], scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
    if name == "Rotate":
        return TF.rotate(img, mag, interpolation=nearest)
    simple = {"Brightness": lambda: TF.adjust_brightness(img, 1 + mag),
              "Color": lambda: TF.adjust_saturation(img, 1 + mag), "Contrast": lambda: TF.adjust_contrast(img, 1 + mag),
              "Sharpness": lambda: TF.adjust_sharpness(img, 1 + mag),
              "Posterize": lambda: TF.posterize(img, int(mag)), "Solarize": lambda: TF.solarize(img, mag),
              "AutoContrast": lambda: TF.autocontrast(img), "Equalize": lambda: TF.equalize(img),
              "Invert": lambda: TF.invert(img)}
    return simple[name]()


_MAGNITUDES = {"ShearX": [0.3, -0.21, 0.99], "ShearY": [-0.3, 0.5], "TranslateX": [12.7, -5.2, 30.0],
               "TranslateY": [-12.7, 3.9], "Rotate": [30.0, -17.0, 90.0, 135.0, -180.0], "Brightness": [0.9, -0.45],
               "Color": [0.99, -0.9], "Contrast": [0.6, -0.9], "Sharpness": [0.9, -0.99], "Posterize": [4.0, 6.0, 8.0],
               "Solarize": [0.0, 0.5, 1.0], "AutoContrast": [0.0], "Equalize": [0.0], "Invert": [0.0],
               "Identity": [0.0]}


@pytest.mark.parametrize("size", [28, 33])
@pytest.mark.parametrize("name", OPS)
def test_each_op_on_both_paths_equals_torchvision(name, size):
    x = _images(6, size, seed=len(name))
    x[0, :, : size // 2] = 0.5  # a flat region (autocontrast / equalize edge cases)
    x[1] = 0.25  # a constant image
    k = OPS.index(name)
    for mag in _MAGNITUDES[name]:
        ref = torch.stack([_torchvision(img, name, mag) for img in x])
        ops = np.full((len(x), 1), k, dtype=np.int64)
        mags = np.full((len(x), 1), mag, dtype=np.float64)
        one = apply_policy_one(x.clone(), ops, mags)
        batch = apply_policy_batch(x.clone(), torch.from_numpy(ops), torch.from_numpy(mags))
        assert (one - ref).abs().max().item() == 0.0, (name, mag)
        assert (batch - ref).abs().max().item() < 1e-6, (name, mag)
        if name != "Identity":
            assert not torch.equal(ref, x) or name in ("Posterize", "Solarize"), (name, mag)  # the op does something


def test_batched_ops_mix_every_op_per_image_like_one_at_a_time():
    x = _images(64, 24, seed=3)
    g = torch.Generator().manual_seed(0)
    ops = torch.randint(0, len(OPS), (64, 3), generator=g)
    mags = torch.rand(64, 3, generator=g, dtype=torch.float64) * 0.6
    mags[ops == OPS.index("Posterize")] = 5.0
    one = apply_policy_one(x.clone(), ops.numpy(), mags.numpy())
    batch = apply_policy_batch(x.clone(), ops, mags)
    assert (one - batch).abs().max().item() < 1e-6


def test_erasing_on_both_paths_equals_torchvision_erase():
    x = _images(5, 20)
    boxes = np.asarray([[0, 0, 5, 7], [3, 4, 0, 0], [10, 2, 9, 17], [0, 0, 0, 0], [19, 19, 1, 1]], dtype=np.int64)
    ref = torch.stack([TF.erase(img, *b.tolist(), torch.zeros(())) if b[2] else img
                       for img, b in zip(x, boxes, strict=True)])
    assert torch.equal(erase_one(x.clone(), boxes), ref)
    assert torch.equal(erase_batch(x.clone(), torch.from_numpy(boxes)), ref)


# ------------------------------------------------------------------------------------------- drawing


def _draw(policy: Policy, n: int, widths=(32, 32, 16), seed: int = 0, torch_path: bool = False):
    on = (True,) * len(widths)
    u = torch.rand(n, len(widths), policy_uniforms(policy), generator=torch.Generator().manual_seed(seed),
                   dtype=torch.float64)
    if torch_path:
        p = draw_policy(u, policy, widths, on, on)
        return type(p)(*(a.numpy() for a in p))
    return draw_policy(u.numpy(), policy, widths, on, on)


def _within(count: np.ndarray, expected: np.ndarray, sigmas: float = 5.0) -> bool:
    """Binomial counts within ``sigmas`` standard deviations of their expectations."""
    total = count.sum()
    p = expected / expected.sum()
    return bool(np.all(np.abs(count - total * p) <= sigmas * np.sqrt(total * p * (1 - p)) + 1))


def test_randaugment_draws_its_definition():
    n = 20000
    p = _draw(Policy("randaugment", 2, 9), n)
    assert p.ops.shape == (n, 3, 2) and p.magnitude.shape == (n, 3, 2)
    counts = np.bincount(p.ops.ravel(), minlength=len(OPS))
    assert counts[OPS.index("Invert")] == 0 and _within(counts[:14], np.ones(14))
    for name, width, value in [("Rotate", 32, 9.0), ("ShearX", 32, 0.09), ("TranslateX", 32, 150 / 331 * 32 * 9 / 30),
                               ("TranslateY", 16, 150 / 331 * 16 * 9 / 30), ("Brightness", 32, 0.27),
                               ("Solarize", 32, 0.7), ("Posterize", 32, 7.0)]:
        col = 2 if width == 16 else 0
        sel = p.ops[:, col] == OPS.index(name)
        mags = p.magnitude[:, col][sel]
        assert np.allclose(np.abs(mags), value), name
        if name in ("Solarize", "Posterize"):
            assert (mags > 0).all()
        else:
            assert abs((mags < 0).mean() - 0.5) < 5 * 0.5 / math.sqrt(len(mags)), name
    assert (p.erase == 0).all()
    # timm's RandAugment (GPaCo, BCL): each op applies with probability 0.5
    half = _draw(Policy("randaugment", 2, 9, op_prob=0.5), n)
    identity = (half.ops == 0).mean()
    assert abs(identity - (0.5 + 0.5 / 14)) < 5 * math.sqrt(0.54 * 0.46 / half.ops.size)


def test_trivialaugment_draws_an_op_and_a_bin_uniformly():
    p = _draw(Policy("trivialaugment"), 20000)
    assert p.ops.shape[-1] == 1
    assert _within(np.bincount(p.ops.ravel(), minlength=14)[:14], np.ones(14))
    rot = np.abs(p.magnitude[p.ops == OPS.index("Rotate")])
    bins = np.round(rot / 4.5).astype(int)  # linspace(0, 135, 31)
    assert np.allclose(rot, bins * 4.5) and _within(np.bincount(bins, minlength=31), np.ones(31))
    translate = np.abs(p.magnitude[p.ops == OPS.index("TranslateX")])
    assert translate.max() <= 32.0 and np.allclose(translate * 30 / 32, np.round(translate * 30 / 32))


def test_autoaugment_draws_the_imagenet_subpolicies_with_their_probabilities():
    from dscl.data.policies import _AUTOAUGMENT_IMAGENET

    n = 40000
    p = _draw(Policy("autoaugment"), n, widths=(32,))
    expected = np.zeros(len(OPS))
    for sub in _AUTOAUGMENT_IMAGENET:
        for name, prob, _ in sub:
            expected[OPS.index(name)] += prob / len(_AUTOAUGMENT_IMAGENET)
            expected[0] += (1 - prob) / len(_AUTOAUGMENT_IMAGENET)
    counts = np.bincount(p.ops.ravel(), minlength=len(OPS))
    assert _within(counts, expected)
    posterize = p.magnitude[p.ops == OPS.index("Posterize")]
    assert set(np.unique(posterize).tolist()) <= {4.0, 5.0, 6.0}  # bins 5-8 of 8 - round(b / 2.25)
    rotate = np.abs(p.magnitude[p.ops == OPS.index("Rotate")]) / (30 / 9)  # linspace(0, 30, 10)
    assert len(rotate) and np.allclose(rotate, np.round(rotate)) and set(np.round(rotate).tolist()) == {3.0, 8.0, 9.0}


def test_erasing_draws_torchvisions_boxes():
    n, side = 20000, 32
    p = _draw(Policy(erasing=0.4), n, widths=(side,))
    box = p.erase[:, 0]
    erased = box[:, 2] > 0
    assert abs(erased.mean() - 0.4) < 5 * math.sqrt(0.24 / n)
    i, j, h, w = box[erased].T
    assert (h < side).all() and (w < side).all() and (i + h <= side).all() and (j + w <= side).all()
    area = h * w / side**2
    assert area.min() >= 0.01 and area.max() <= 0.36  # U(0.02, 0.33) after rounding h and w
    assert 0.15 < np.median(area) < 0.2
    tall = (h > w).mean()
    assert abs(tall - (w > h).mean()) < 0.03  # aspect log-uniform in [0.3, 3.3]: nearly symmetric


@pytest.mark.parametrize("policy", [Policy("randaugment", 2, 9, 0.5), Policy("trivialaugment", erasing=0.25),
                                    Policy("autoaugment", erasing=1.0), Policy("randaugment", 3, 30, 0.0, 0.5)])
def test_numpy_and_torch_draws_are_the_same_function(policy):
    a = _draw(policy, 3000, seed=4)
    b = _draw(policy, 3000, seed=4, torch_path=True)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


# ------------------------------------------------------------------------------------- the two paths

_CASES = [dict(randaugment=(2, 9), erasing=0.5, policy_on=("query", "key", "patches"),
               erasing_on=("query", "key", "patches")),
          dict(trivialaugment=True, erasing=1.0), dict(autoaugment=True, policy_on=("key",)),
          dict(randaugment=(1, 30), randaugment_p=0.5, policy_on=("patches",), erasing=0.3, erasing_on=("query",))]


@pytest.mark.parametrize("kw", _CASES)
def test_both_paths_give_the_same_views_for_the_same_parameters(kw):
    views = ViewConfig(num_patches=3, patch_size=14, blur=False, **kw)
    images = (torch.rand(10, 3, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    t = V.DSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(2))
    params = [t.draw(28, 28) for _ in images]
    assert all(p.policy is not None for p in params)
    outs = [t.apply(img, p) for img, p in zip(images, params, strict=True)]
    batched = BatchedDSCLTransform(28, views, MEAN, STD).apply(images, params_from_numpy(params))
    for f, b in zip(V.DSCLViews._fields, batched, strict=True):
        a = torch.stack([getattr(o, f) for o in outs])
        # the two paths resize the crops to within ~1e-6 of each other; an op with a threshold (posterize,
        # solarize, equalize's uint8 bins) may put such a pixel on the other side: rare, so count them
        off = ((a - b).abs() > 1e-4).float().mean().item()
        assert off < 2e-3, (f, off)


@pytest.mark.parametrize("kw", _CASES[:3])
def test_both_paths_draw_the_same_distribution(kw):
    """Own draws on each path (numpy per sample, torch batched, different seeds): op frequencies, signed
    magnitudes and erasing rates per view kind agree within sampling error."""
    views = ViewConfig(num_patches=2, patch_size=14, blur=False, **kw)
    n = 4000
    t = V.DSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(5))
    one = params_from_numpy([t.draw(28, 28) for _ in range(n)]).policy
    bt = BatchedDSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(6))
    batch = bt.draw(torch.full((n, 2), 28, dtype=torch.int64)).policy
    for image in range(4):  # key, query, patch, patch
        a = np.bincount(one.ops[:, image].numpy().ravel(), minlength=len(OPS))
        b = np.bincount(batch.ops[:, image].numpy().ravel(), minlength=len(OPS))
        pooled = (a + b) / (a.sum() + b.sum())
        sd = np.sqrt(pooled * (1 - pooled) * (1 / a.sum() + 1 / b.sum()))
        assert np.all(np.abs(a / a.sum() - b / b.sum()) <= 5 * sd + 1e-12), image
        ma, mb = one.magnitude[:, image].numpy(), batch.magnitude[:, image].numpy()
        spread = max(ma.std(), mb.std(), 1e-9)
        assert abs(ma.mean() - mb.mean()) <= 5 * spread * math.sqrt(2 / ma.size)
        ea, eb = (one.erase[:, image, 2] > 0).float().mean(), (batch.erase[:, image, 2] > 0).float().mean()
        assert abs(ea - eb) <= 5 * math.sqrt(max(ea * (1 - ea), 1e-4) * 2 / n) + 1e-9


def test_a_policy_applies_only_to_the_chosen_view_kinds():
    views = ViewConfig(num_patches=2, patch_size=14, blur=False, randaugment=(2, 30), policy_on=("key",),
                       erasing=1.0, erasing_on=("patches",))
    t = V.DSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(0))
    drawn = params_from_numpy([t.draw(28, 28) for _ in range(500)]).policy
    assert (drawn.ops[:, 1:] == 0).all() and (drawn.ops[:, 0] != 0).any()
    assert (drawn.erase[:, :2] == 0).all() and (drawn.erase[:, 2:, 2] > 0).float().mean() > 0.9


def test_without_a_policy_every_draw_is_what_it_was():
    views = ViewConfig(num_patches=3, patch_size=14, blur=False)
    assert V.sample_uniforms(views) == V.view_uniforms(3)
    on = ViewConfig(num_patches=3, patch_size=14, blur=False, randaugment=(2, 9))
    assert V.sample_uniforms(on) == V.view_uniforms(3) + 5 * policy_uniforms(Policy("randaugment", 2, 9))
    image = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    plain = V.DSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(7))(image)
    with_ra = V.DSCLTransform(28, on, MEAN, STD, generator=torch.Generator().manual_seed(7))(image)
    # the same uniforms up to the policy's: same crops (the key's pixels differ only where the policy
    # is on -- it is not, by default), different query
    assert torch.equal(plain.boxes, with_ra.boxes) and torch.equal(plain.key, with_ra.key)
    assert not torch.equal(plain.query, with_ra.query)


def test_the_views_are_deterministic_under_the_seed():
    views = ViewConfig(num_patches=2, patch_size=14, blur=False, trivialaugment=True, erasing=0.5)
    image = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    a = V.DSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(9))(image)
    b = V.DSCLTransform(28, views, MEAN, STD, generator=torch.Generator().manual_seed(9))(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_stage2_copies_take_the_policy_and_keep_their_draws_without_one():
    image = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)

    def view(policy: Policy, seed: int = 3) -> torch.Tensor:
        return V.ClassifierTransform(28, MEAN, STD, generator=torch.Generator().manual_seed(seed), policy=policy)(image)

    plain = V.ClassifierTransform(28, MEAN, STD, generator=torch.Generator().manual_seed(3))(image)
    assert torch.equal(view(Policy()), plain)
    assert not torch.equal(view(Policy("randaugment", 2, 30)), plain)
    erased = view(Policy(erasing=1.0))
    assert (erased == 0).sum() > (plain == 0).sum()


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("override", "key"), [
    ("views.randaugment=[2, 31]", "views.randaugment"), ("views.randaugment=[0, 9]", "views.randaugment"),
    ("views.randaugment=[2]", "views.randaugment"), ("classifier.randaugment=[2, -1]", "classifier.randaugment"),
    ("views.erasing=1.5", "views.erasing"), ("views.randaugment_p=0", "views.randaugment_p"),
    ("views.policy_on=[query, head]", "views.policy_on"), ("views.erasing_on=[keys]", "views.erasing_on"),
    ("views.randaugment=[2, 9.5]", "views.randaugment"),
])
def test_bad_policy_values_are_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("smoke", overrides=[override])


def test_two_policies_at_once_are_refused_naming_both():
    with pytest.raises(ConfigError, match=r"views\.randaugment and views\.trivialaugment"):
        load_config("smoke", overrides=["views.randaugment=[2, 9]", "views.trivialaugment=true"])
    cfg = load_config("smoke", overrides=["views.randaugment=[2,9]", "views.randaugment=none"])
    assert cfg.views.randaugment is None


def test_the_cli_refuses_a_bad_strength_with_a_clear_message(capsys):
    from dscl.cli import main

    assert main(["run", "--preset", "smoke", "--out", "/nonexistent/never", "views.randaugment=[2, 40]"]) != 0
    err = capsys.readouterr().err
    assert "views.randaugment" in err and "[0, 30]" in err


# ------------------------------------------------------------------------------------------------- runs


@needs_fmnist
@pytest.mark.parametrize("augment_on", ["device", "loader"])
def test_a_run_with_randaugment_differs_from_one_without_and_resumes_exactly(tmp_path, augment_on):
    from dscl.pretrain import pretrain
    from dscl.run import load_checkpoint

    base = ["optim.epochs=2", "optim.deterministic=true", f"views.augment_on={augment_on}"]
    ra = [*base, "views.randaugment=[2, 15]", "views.erasing=0.25"]
    pretrain(load_config("smoke", overrides=base), tmp_path / "plain", progress=False)
    pretrain(load_config("smoke", overrides=ra), tmp_path / "straight", progress=False)
    pretrain(load_config("smoke", overrides=ra), tmp_path / "split", progress=False, max_epochs=1)
    pretrain(load_config("smoke", overrides=ra), tmp_path / "split", resume=True, progress=False)
    plain, a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["model"]
                   for r in ("plain", "straight", "split"))
    assert any(not torch.equal(v, plain[k]) for k, v in a.items() if v.is_floating_point())
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_policies_on_cuda_match_the_cpu_and_do_not_synchronise():
    views = ViewConfig(num_patches=3, patch_size=32, blur=True, randaugment=(2, 15), erasing=0.5,
                       policy_on=("query", "key", "patches"))
    images = (torch.rand(16, 3, 96, 96, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = BatchedDSCLTransform(96, views, MEAN, STD, device="cuda", generator=gen)
    size = torch.full((16, 2), 96, dtype=torch.int64).cuda()
    image_cuda = images.cuda()
    t.apply(image_cuda, t.draw(size), size)  # warm-up: caches the tables on the device
    params = without_cuda_sync(lambda: t.draw(size))
    out = without_cuda_sync(lambda: t.apply(image_cuda, params, size))
    cpu = V.ViewParams(*(p.cpu() for p in params[:4]), V._PhotoParams(*(a.cpu() for a in params.photo)),
                       type(params.policy)(*(a.cpu() for a in params.policy)))
    ref = BatchedDSCLTransform(96, views, MEAN, STD).apply(images, cpu, size.cpu())
    for a, b in zip(out, ref, strict=True):
        assert ((a.cpu() - b).abs() > 1e-3).float().mean().item() < 1e-3  # nearest-neighbour ties may differ


def test_the_peer_profiles_set_their_recipes_over_any_preset():
    from dscl.cli.common import PROFILE_NAMES
    from dscl.config import PROFILES

    assert tuple(PROFILES) == PROFILE_NAMES
    for name in ("gpaco", "bcl"):
        for preset in ("fmnist-lt", "imagenet-lt"):
            cfg = load_config(preset, profile=name)
            plain = load_config(preset)
            assert cfg.profile == name and cfg.views.randaugment == (2, 30) and cfg.views.randaugment_p == 0.5
            assert cfg.views.policy_on == ("query", "key", "patches")
            assert cfg.classifier.randaugment == (2, 30) and cfg.classifier.randaugment_p == 0.5
            assert cfg.optim == plain.optim and cfg.loss == plain.loss and cfg.model == plain.model
            assert cfg.views.blur == (plain.views.blur if name == "gpaco" else False)
    # an override still wins over the profile
    cfg = load_config("fmnist-lt", overrides=["views.randaugment=[1, 9]"], profile="gpaco")
    assert cfg.views.randaugment == (1, 9)


def test_a_peer_profile_is_not_the_papers_configuration():
    from dscl.config import preset_changes

    assert preset_changes(load_config("imagenet-lt", profile="official")) == []
    changed = preset_changes(load_config("imagenet-lt", profile="gpaco"))
    assert {"views.randaugment", "views.randaugment_p", "views.policy_on", "classifier.randaugment"} <= set(changed)


@needs_fmnist
def test_stage2_trains_on_the_classifier_policy(smoke_run, tmp_path, monkeypatch):
    import shutil

    import dscl.classify as C

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    seen: list[Policy] = []
    real = C.classifier_transform_for

    def spy(spec, policy):
        seen.append(policy)
        return real(spec, policy)

    monkeypatch.setattr(C, "classifier_transform_for", spy)
    cfg = load_config("smoke", overrides=["classifier.randaugment=[2, 9]", "classifier.erasing=0.25",
                                          "classifier.augmented_copies=1", "classifier.epochs=1"])
    C.classify(run, cfg=cfg, progress=False)
    assert seen == [Policy("randaugment", 2, 9, 0.25)]
