"""dscl.data.core: the long-tailed count profiles, the IMBALANCECIFAR selection, LTDataset, and image
decoding (issue #12, item 1): every PIL mode becomes the right uint8 RGB pixels.

Each decoding test writes a file with known raw values (PIL / numpy / a hand-made PNG) and checks the
exact uint8 values ``decode_image`` returns, so a wrong rule (e.g. ``convert("RGB")`` clipping 16-bit
values to white) fails here.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dscl.data import check_images, summarize_dataset
from dscl.data.core import (
    DECODABLE_MODES,
    DataError,
    LTDataset,
    decode_image,
    long_tailed_counts,
    read_image_file,
    select_long_tailed,
)

# ------------------------------------------------------------------------------------------- profiles


@pytest.mark.parametrize(
    ("classes", "n_max", "imb", "expected_total", "expected_min"),
    [
        (100, 500, 100, 10847, 5),  # CIFAR-100-LT IF100 (FIELD.md 1.1)
        (100, 500, 50, 12608, 10),
        (100, 500, 10, 19573, 50),
        (10, 5000, 100, 12406, 50),  # CIFAR-10-LT IF100
    ],
)
def test_exp_profile_matches_published_totals(classes, n_max, imb, expected_total, expected_min):
    counts = long_tailed_counts(classes, n_max, imb, "exp")
    assert sum(counts) == expected_total
    assert counts[0] == n_max and counts[-1] == expected_min
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_exp_profile_formula_and_fmnist_default():
    assert long_tailed_counts(10, 1000, 100, "exp") == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    for imb in (10.0, 50.0, 200.0, 3.5):
        got = long_tailed_counts(7, 300, imb, "exp")
        assert got == [int(300 * (1 / imb) ** (i / 6)) for i in range(7)]
        assert got == long_tailed_counts(7, 300, imb, "exp")  # deterministic


@pytest.mark.parametrize("imb", [1, 10, 100, 200])
def test_step_profile(imb):
    counts = long_tailed_counts(10, 5000, imb, "step")
    assert counts == [5000] * 5 + [int(5000 / imb)] * 5
    assert long_tailed_counts(5, 100, 10, "step") == [100, 100, 10, 10, 10]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((10, 100, 0.5, "exp"), "imbalance_factor"),
        ((10, 0, 10, "exp"), "n_max"),
        ((10, 100, 10, "cosine"), "profile"),
        ((10, 10, 100, "exp"), "no image"),
    ],
)
def test_profile_errors(args, needle):
    with pytest.raises(DataError, match=needle):
        long_tailed_counts(*args)


def test_select_long_tailed_is_the_imbalancecifar_rule_without_global_state():
    targets = np.random.default_rng(3).permutation(np.repeat(np.arange(4), 7))
    counts = [7, 5, 2, 1]
    state = np.random.get_state()[1].copy()
    got = select_long_tailed(targets, counts, seed=11, source="toy")
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's global RNG is left alone
    np.random.seed(11)  # LDAM-DRW's IMBALANCECIFAR: seed once, shuffle per class in label order
    expected = []
    for c, n_c in enumerate(counts):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        expected += idx[:n_c].tolist()
    assert got.tolist() == expected
    assert np.bincount(targets[got], minlength=4).tolist() == counts
    assert select_long_tailed(targets, counts, seed=12, source="toy").tolist() != expected
    assert select_long_tailed(targets, [], seed=0, source="toy").tolist() == []
    with pytest.raises(DataError, match="toy: class 1 has 7 images but the long-tailed profile asks for 8"):
        select_long_tailed(targets, [7, 8, 1, 1], seed=0, source="toy")


def test_single_class_and_step_profile_of_an_odd_class_count():
    assert long_tailed_counts(1, 40, 10) == [40]
    assert long_tailed_counts(5, 100, 4, "step") == [100, 100, 25, 25, 25]  # the odd class is a tail class
    with pytest.raises(DataError, match="num_classes"):
        long_tailed_counts(0, 40, 10)


# ------------------------------------------------------------------------------------------- LTDataset


def test_ltdataset_subset_transform_and_summary():
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    ds = LTDataset([0, 0, 0, 1, 1, 2], 3, ["a", "b", "c"], images=images)
    sub = ds.subset([5, 3])
    assert sub.targets == [2, 1] and torch.equal(sub.load(0)[0], torch.from_numpy(images[5]))
    assert sub._images is ds._images and sub.path(0) is None
    shifted = sub.with_transform(lambda x: x.float() + 1)
    assert shifted[0][0].dtype == torch.float32 and sub.transform is None
    assert check_images(ds) == []
    from dscl.data import DatasetSplits

    splits = DatasetSplits("toy", ds, None, ds, 3, ["a", "b", "c"], [150, 100, 20], (0.5,) * 3, (0.5,) * 3)
    assert summarize_dataset(splits)["shot_classes"] == {"many": 1, "medium": 2, "few": 0}
    assert summarize_dataset(splits, 99, 21)["shot_classes"] == {"many": 2, "medium": 0, "few": 1}


def test_ltdataset_needs_one_storage_and_a_label_per_image():
    images = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="exactly one of images="):
        LTDataset([0, 0, 0], 1, ["a"])
    with pytest.raises(ValueError, match="exactly one of images="):
        LTDataset([0, 0, 0], 1, ["a"], images=images, paths=["x", "y", "z"])
    with pytest.raises(ValueError, match="2 targets for 3 images"):
        LTDataset([0, 0], 1, ["a"], images=images)
    with pytest.raises(ValueError, match="2 targets for 1 images"):
        LTDataset([0, 0], 1, ["a"], images=images, index=np.array([2]))
    ds = LTDataset([0, 1, 0], 2, ["a", "b"], images=images)
    with pytest.raises(IndexError, match=r"subset indices must be in \[0, 3\)"):
        ds.subset([0, 3])
    with pytest.raises(IndexError):
        ds.subset([-1])
    assert len(ds.subset([])) == 0 and ds.subset([]).class_counts() == [0, 0]


def test_ltdataset_load_gives_uint8_rgb_and_copies():
    grey = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ds = LTDataset([0, 1], 2, ["a", "b"], images=grey)
    image = ds.load(1)
    assert image.dtype == torch.uint8 and image.shape == (3, 3, 4)
    assert all(torch.equal(image[c], torch.from_numpy(grey[1])) for c in range(3))  # grey replicated
    image[0, 0, 0] = 255
    assert grey[1, 0, 0] != 255  # a copy: a transform may write into it
    colour = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    assert torch.equal(LTDataset([0, 0], 1, ["a"], images=colour).load(1), torch.from_numpy(colour[1]))
    assert ds.in_memory and ds.location(0) is None and repr(ds) == "LTDataset(2 images, 2 classes, in-memory)"


def test_ltdataset_of_files_reads_through_the_decoder(tmp_path):
    paths = []
    for k in range(3):
        Image.fromarray(np.full((5, 4, 3), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
        paths.append(str(tmp_path / f"{k}.png"))
    ds = LTDataset([0, 1, 1], 2, ["a", "b"], paths=paths, where=[f"l.txt, line {k + 1}" for k in range(3)])
    sub = ds.subset([2, 0])
    assert not sub.in_memory and sub.path(0) == paths[2] and sub.location(0) == "l.txt, line 3"
    assert sub.identities() == [paths[2], paths[0]] and ds.subset([1]).identities() == [paths[1]]
    assert torch.equal(sub.load(0), read_image_file(paths[2])) and int(sub.load(0)[0, 0, 0]) == 80
    assert sub.class_counts() == [1, 1] and repr(sub) == "LTDataset(2 images, 2 classes, files)"
    memory = LTDataset([0, 1], 2, ["a", "b"], images=np.zeros((5, 2, 2), np.uint8), index=np.array([4, 1]))
    assert memory.identities() == [4, 1] and memory.subset([1]).identities() == [1]


# ------------------------------------------------------------------------------------------ decoding


def _grey(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8 tensor whose channels must be equal -> (H, W) array."""
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    assert torch.equal(t[0], t[1]) and torch.equal(t[0], t[2])
    return t[0].numpy()


def _rgb(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy()


def _png16(path: Path, array: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB / LA): colour type 2 = RGB, 4 = grey+alpha."""
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------ 16-bit


def test_16bit_png_scales_by_the_full_range_not_to_white(tmp_path):
    # the values: raw 4883 ... 54227 came out as 255 everywhere
    raw = np.array([[4883, 54227, 0], [65535, 128, 129], [32768, 257, 1000]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = _grey(read_image_file(tmp_path / "g16.png"))
    expected = np.array([[19, 211, 0], [255, 0, 1], [128, 1, 4]], dtype=np.uint8)  # round(v / 257)
    assert np.array_equal(got, expected)
    assert np.array_equal(expected, np.floor(raw / 257 + 0.5).astype(np.uint8))


def test_16bit_big_endian_and_16bit_tiff(tmp_path):
    raw = np.array([[4883, 54227], [65535, 0]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (2, 2), raw.astype(">u2").tobytes())
    assert big.mode == "I;16B"
    assert np.array_equal(_grey(decode_image(big)), [[19, 211], [255, 0]])
    Image.fromarray(raw).save(tmp_path / "g16.tif")
    assert np.array_equal(_grey(decode_image(tmp_path / "g16.tif")), [[19, 211], [255, 0]])


def test_16bit_pgm_opens_as_mode_i_and_is_16bit(tmp_path):
    path = tmp_path / "g.pgm"
    path.write_bytes(b"P5 3 1 65535\n" + np.array([4883, 54227, 65535], dtype=">u2").tobytes())
    assert Image.open(path).mode == "I"
    assert np.array_equal(_grey(decode_image(path)), [[19, 211, 255]])


def test_48bit_rgb_and_32bit_grey_alpha_png(tmp_path):
    _png16(tmp_path / "rgb16.png", np.array([[[65535, 32768, 128], [4883, 54227, 0]]], dtype=np.uint16), 2)
    assert np.array_equal(_rgb(decode_image(tmp_path / "rgb16.png")), [[[255, 128, 0], [19, 211, 0]]])
    # grey 54227 (-> 211) with alpha 65535 (opaque) and 32896 (-> 128): 211 * 128 / 255 = 105.9 -> 106
    _png16(tmp_path / "la16.png", np.array([[[54227, 65535], [54227, 32896]]], dtype=np.uint16), 4)
    assert np.array_equal(_grey(decode_image(tmp_path / "la16.png")), [[211, 106]])


def test_32bit_integer_mode_i(tmp_path):
    # within 16 bits: the 16-bit rule; outside: clipped to 0..65535 first
    values = np.array([[0, 257 * 100, 65535], [70000, -5, 4883]], dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert np.array_equal(_grey(decode_image(tmp_path / "i32.tif")), [[0, 100, 255], [255, 0, 19]])


def test_float_mode_f(tmp_path):
    unit = np.array([[0.0, 0.5, 1.0], [0.25, 0.002, 0.998]], dtype=np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    # [0, 1] -> x 255, rounded (127.5 rounds to even 128, 63.75 -> 64, 0.51 -> 1, 254.49 -> 254)
    assert np.array_equal(_grey(decode_image(tmp_path / "unit.tif")), [[0, 128, 255], [64, 1, 254]])
    wide = np.array([[-3.0, 12.4, 300.0], [np.nan, 254.6, 1.5]], dtype=np.float32)
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    # not all in [0, 1]: rounded and clipped to 0..255; NaN -> 0
    assert np.array_equal(_grey(decode_image(tmp_path / "wide.tif")), [[0, 12, 255], [0, 255, 2]])


# --------------------------------------------------------------------------------------- alpha, palette


def test_rgba_composited_over_black(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [10, 20, 30, 255], [200, 100, 50, 51]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    # round(c * a / 255): 200 * 51 / 255 = 40, 100 -> 20, 50 -> 10; fully transparent -> black
    assert np.array_equal(_rgb(decode_image(tmp_path / "a.png")), [[[0, 0, 0], [10, 20, 30], [40, 20, 10]]])


def test_grey_alpha_la(tmp_path):
    la = np.array([[[200, 128], [200, 255], [90, 0]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    assert np.array_equal(_grey(decode_image(tmp_path / "la.png")), [[100, 200, 0]])  # 200*128/255 = 100.4


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2])
    pal.save(tmp_path / "p.png")
    assert np.array_equal(_rgb(decode_image(tmp_path / "p.png")), [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])
    pal.save(tmp_path / "pt.png", transparency=0)  # palette entry 0 (red) is transparent
    assert "transparency" in Image.open(tmp_path / "pt.png").info
    assert np.array_equal(_rgb(decode_image(tmp_path / "pt.png")), [[[0, 0, 0], [0, 255, 0], [0, 0, 255]]])
    pal.save(tmp_path / "p.gif")
    assert np.array_equal(_rgb(decode_image(tmp_path / "p.gif")), [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])


def test_grey_png_with_transparent_value(tmp_path):
    Image.fromarray(np.array([[7, 50, 7]], dtype=np.uint8)).save(tmp_path / "lt.png", transparency=7)
    assert np.array_equal(_grey(decode_image(tmp_path / "lt.png")), [[0, 50, 0]])


def test_cmyk_bilevel_and_plain_modes(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 128], [0, 255, 255, 0]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    # PIL: R = 255 - min(255, C + K), same for G/M and B/Y
    expected = [[[255, 255, 255], [0, 255, 255], [127, 127, 127], [255, 0, 0]]]
    assert np.array_equal(_rgb(decode_image(tmp_path / "c.tif")), expected)
    Image.fromarray(np.array([[True, False, True]])).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert np.array_equal(_grey(decode_image(tmp_path / "b.png")), [[255, 0, 255]])
    grey = np.array([[0, 1, 254, 255]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    assert np.array_equal(_grey(decode_image(tmp_path / "l.png")), grey)
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(_rgb(decode_image(tmp_path / "rgb.png")), rgb)


# ---------------------------------------------------------------------------------- orientation, frames

# EXIF orientation tag value -> the numpy operation that shows the stored array upright
ORIENTATIONS = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: a[::-1, ::-1],
    4: np.flipud,
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].T,
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
    assert np.array_equal(_grey(decode_image(tmp_path / "o.png")), ORIENTATIONS[orientation](stored))


def test_exif_rotated_jpeg(tmp_path):
    # a camera JPEG stored landscape (16 x 8: red left half, blue right half), tagged "rotate 90 CW"
    stored = np.zeros((8, 16, 3), dtype=np.uint8)
    stored[:, :8] = (255, 0, 0)
    stored[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "cam.jpg", exif=exif, quality=100, subsampling=0)
    got = _rgb(decode_image(tmp_path / "cam.jpg")).astype(int)
    assert got.shape == (16, 8, 3)  # portrait: the left (red) half is now on top
    assert np.abs(got[:8] - [255, 0, 0]).max() <= 3 and np.abs(got[8:] - [0, 0, 255]).max() <= 3


def test_16bit_image_with_exif_orientation(tmp_path):
    stored = np.array([[257, 514, 771], [1028, 1285, 1542]], dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "o16.png", exif=exif)
    assert np.array_equal(_grey(decode_image(tmp_path / "o16.png")), np.rot90(stored // 257, -1))


def test_multi_frame_files_give_the_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((2, 2), v, dtype=np.uint8)) for v in (10, 200, 90)]
    frames[0].save(tmp_path / "m.tif", save_all=True, append_images=frames[1:])
    frames[0].convert("P").save(tmp_path / "m.gif", save_all=True, append_images=[f.convert("P") for f in frames[1:]])
    for name in ("m.tif", "m.gif"):
        with Image.open(tmp_path / name) as img:
            assert img.n_frames == 3
            img.seek(2)
            # an opened image left on another frame is decoded from frame 0 too
            assert np.array_equal(_grey(decode_image(img)), np.full((2, 2), 10))
        assert np.array_equal(_grey(decode_image(tmp_path / name)), np.full((2, 2), 10))


# ---------------------------------------------------------------------------------------------- API


def test_path_and_pil_inputs_agree_and_dataset_load_uses_the_decoder(tmp_path):
    raw = np.array([[4883, 54227]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "g16.png")
    from_path = decode_image(str(tmp_path / "g16.png"))
    with Image.open(tmp_path / "g16.png") as img:
        assert torch.equal(decode_image(img), from_path)
    ds = LTDataset([0], 1, ["a"], paths=[str(tmp_path / "g16.png")])
    assert torch.equal(ds.load(0), from_path) and int(from_path.max()) == 211


def test_unreadable_and_missing_files_name_the_file_and_the_check_flag(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"cannot read image file .*bad\.png.*dscl data --check"):
        decode_image(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"gone\.png does not exist.*dscl data --check"):
        read_image_file(str(tmp_path / "gone.png"))


def test_every_mode_pil_can_create_decodes(tmp_path):
    # a blank image of every decodable mode gives a (3, H, W) uint8 tensor (no mode is forgotten)
    for mode in sorted(DECODABLE_MODES):
        img = Image.new(mode, (5, 4))
        out = decode_image(img)
        assert out.shape == (3, 4, 5) and out.dtype == torch.uint8, mode


def test_fingerprint_identifies_samples_order_and_labels(tmp_path):
    from dscl.data import LTDataset

    images = np.zeros((6, 4, 4), dtype=np.uint8)
    ds = LTDataset([0, 1, 1], 2, ["a", "b"], images=images, index=np.array([0, 3, 5]))
    same = LTDataset([0, 1, 1], 2, ["a", "b"], images=images.copy(), index=np.array([0, 3, 5]))
    fp = ds.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{12}", fp) and same.fingerprint() == fp
    assert ds.subset([1, 0, 2]).fingerprint() != fp  # order
    assert LTDataset([0, 1, 1], 2, ["a", "b"], images=images, index=np.array([0, 3, 4])).fingerprint() != fp
    assert LTDataset([0, 1, 0], 2, ["a", "b"], images=images, index=np.array([0, 3, 5])).fingerprint() != fp
    # file datasets: the same relative paths under different roots are the same subset
    rel = ["train/a/1.png", "train/b/2.png"]
    here = LTDataset([0, 1], 2, ["a", "b"], paths=[str(tmp_path / "x" / r) for r in rel])
    there = LTDataset([0, 1], 2, ["a", "b"], paths=[f"/mnt/data/ILSVRC/{r}" for r in rel])
    assert here.fingerprint() == there.fingerprint()
    other = LTDataset([0, 1], 2, ["a", "b"], paths=["/mnt/data/ILSVRC/train/a/1.png", "/mnt/data/ILSVRC/train/b/3.png"])
    assert other.fingerprint() != here.fingerprint()
