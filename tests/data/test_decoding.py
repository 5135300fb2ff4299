"""Tests for diffusion_lab.data.decoding: real image files of every PIL mode, written into tmp_path, decoded to
8-bit RGB and compared with an independent numpy computation (or refused, naming the file and the mode).

16-bit-per-channel PNGs that Pillow cannot write are written chunk by chunk (:func:`write_png`) as the PNG
specification lays them out: signature, IHDR, optional tRNS, one zlib IDAT of filter-0 scanlines, IEND.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusion_lab.data.decoding import SUPPORTED_MODES, ImageModeError, to_rgb_array
from diffusion_lab.data.files import open_rgb

# PNG colour types (PNG spec, table 11.1).
GREY, RGB, GREY_ALPHA, RGBA = 0, 2, 4, 6


def write_png(path: Path, samples: np.ndarray, color_type: int, trns: bytes = b"") -> Path:
    """A 16-bit PNG of (H, W) or (H, W, C) uint16 ``samples``, with an optional raw tRNS chunk payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = samples.reshape(samples.shape[0], -1).astype(">u2")
    height, width = samples.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    scanlines = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 (None) on every line
    body = chunk(b"IHDR", header) + (chunk(b"tRNS", trns) if trns else b"") + chunk(b"IDAT", zlib.compress(scanlines))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b""))
    return path


def decode(path: Path) -> np.ndarray:
    """The file as the datamodules see it: (H, W, 3) uint8."""
    array = np.asarray(open_rgb(path))
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3
    return array


def grey3(grey: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3), independently of the code under test."""
    return np.stack([grey] * 3, axis=-1)


def over_black(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference "over black" in floating point: round(c · a / 255) per channel; (H, W, C), (H, W) -> uint8."""
    return np.round(color.astype(np.float64) * alpha[..., None] / 255.0).astype(np.uint8)


def ramp16(width: int = 1000) -> np.ndarray:
    """A (2, width) 16-bit grey ramp 0 .. 65535 (both ends included)."""
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (2, 1))


def check_ramp(out: np.ndarray, samples: np.ndarray) -> None:
    """16-bit samples became their high byte: exact ends 0 and 255, monotone, all channels equal."""
    assert np.array_equal(out, grey3(samples // 256))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and (np.diff(out[0, :, 0].astype(int)) >= 0).all()
    assert len(np.unique(out)) == 256  # every 8-bit level is used, none clipped to white


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    samples = ramp16()
    path = tmp_path / "ramp.png"
    Image.fromarray(samples).save(path)  # Pillow writes mode I;16 as a 16-bit grey PNG
    with Image.open(path) as image:
        assert image.mode == "I;16"
        assert (np.asarray(image.convert("RGB")) == 255).mean() > 0.99  # the damage this module prevents
    check_ramp(decode(path), samples)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_grey_tiff(tmp_path: Path, mode: str) -> None:
    samples = ramp16()
    path = tmp_path / "ramp.tif"
    Image.frombytes(mode, samples.shape[::-1], samples.astype("<u2" if mode == "I;16" else ">u2").tobytes()).save(path)
    with Image.open(path) as image:
        assert image.mode == mode
    check_ramp(decode(path), samples)


def test_16bit_pgm_opens_as_mode_i_and_is_scaled(tmp_path: Path) -> None:
    samples = ramp16()
    path = tmp_path / "ramp.pgm"
    height, width = samples.shape
    path.write_bytes(f"P5\n{width} {height}\n65535\n".encode() + samples.astype(">u2").tobytes())
    with Image.open(path) as image:
        assert image.mode == "I" and image.format == "PPM"
    check_ramp(decode(path), samples)


def test_16bit_grey_png_with_trns_key(tmp_path: Path) -> None:
    samples = np.array([[0, 300, 40000, 65535]], dtype=np.uint16)
    path = write_png(tmp_path / "keyed.png", samples, GREY, trns=struct.pack(">H", 40000))
    assert decode(path)[0, :, 0].tolist() == [0, 1, 0, 255]  # 40000 is the key: transparent, composited to black


def test_48bit_rgb_and_64bit_rgba_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, size=(3, 5, 3), dtype=np.uint16)
    assert np.array_equal(decode(write_png(tmp_path / "rgb48.png", rgb, RGB)), rgb // 256)
    rgba = rng.integers(0, 65536, size=(3, 5, 4), dtype=np.uint16)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 65535
    expected = over_black(rgba[..., :3] // 256, rgba[..., 3] // 256)
    assert np.array_equal(decode(write_png(tmp_path / "rgba64.png", rgba, RGBA)), expected)
    grey_alpha = rng.integers(0, 65536, size=(3, 5, 2), dtype=np.uint16)
    expected = grey3(over_black(grey_alpha[..., :1] // 256, grey_alpha[..., 1] // 256)[..., 0])
    assert np.array_equal(decode(write_png(tmp_path / "la32.png", grey_alpha, GREY_ALPHA)), expected)


def test_48bit_rgb_png_with_trns_key_is_refused(tmp_path: Path) -> None:
    rgb = np.array([[[1, 2, 3], [400, 500, 600]]], dtype=np.uint16)
    path = write_png(tmp_path / "keyed48.png", rgb, RGB, trns=struct.pack(">3H", 400, 500, 600))
    with pytest.raises(ImageModeError, match="16-bit RGB with a tRNS colour key") as info:
        decode(path)
    assert str(path) in str(info.value)


def test_bilevel(tmp_path: Path) -> None:
    bits = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    Image.fromarray(bits).save(tmp_path / "bits.png")
    with Image.open(tmp_path / "bits.png") as image:
        assert image.mode == "1"
    assert np.array_equal(decode(tmp_path / "bits.png"), grey3(bits.astype(np.uint8) * 255))


def test_palette_pixels_are_their_palette_colours(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, size=(6, 7), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.tobytes())
    image.save(tmp_path / "palette.png")
    assert np.array_equal(decode(tmp_path / "palette.png"), palette[indices])
    image.save(tmp_path / "palette_trns.png", transparency=int(indices[0, 0]))  # one palette entry transparent
    expected = np.where((indices == indices[0, 0])[..., None], 0, palette[indices])
    assert np.array_equal(decode(tmp_path / "palette_trns.png"), expected)


def test_palette_with_alpha_per_entry(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    palette = rng.integers(0, 256, size=(16, 3), dtype=np.uint8)
    alphas = rng.integers(0, 256, size=16, dtype=np.uint8)
    indices = rng.integers(0, 16, size=(4, 5), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.tobytes())
    image.save(tmp_path / "palette_alpha.png", transparency=alphas.tobytes())  # a tRNS entry per palette index
    assert np.array_equal(decode(tmp_path / "palette_alpha.png"), over_black(palette[indices], alphas[indices]))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_8bit_trns_colour_key(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(3)
    array = rng.integers(1, 256, size=(4, 4) if mode == "L" else (4, 4, 3), dtype=np.uint8)
    key = array[1, 2]
    Image.fromarray(array).save(tmp_path / "keyed.png", transparency=int(key) if mode == "L" else tuple(map(int, key)))
    rgb = grey3(array) if mode == "L" else array
    keyed = (rgb == rgb[1, 2]).all(axis=-1)
    assert np.array_equal(decode(tmp_path / "keyed.png"), np.where(keyed[..., None], 0, rgb))


def test_cmyk_and_ycbcr(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    cmyk = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tif")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    assert np.array_equal(decode(tmp_path / "cmyk.tif"), np.round((255 - c) * (255 - k) / 255).astype(np.uint8))
    ycc = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    Image.fromarray(ycc, mode="YCbCr").save(tmp_path / "ycc.tif")
    with Image.open(tmp_path / "ycc.tif") as image:
        assert image.mode == "YCbCr"
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))  # JPEG (JFIF) full-range BT.601
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)])
    expected = np.clip(np.round(rgb), 0, 255).transpose(1, 2, 0)
    assert np.abs(decode(tmp_path / "ycc.tif").astype(int) - expected).max() <= 1  # Pillow's fixed-point tables


@pytest.mark.parametrize(
    ("array", "mode", "why"),
    [
        (np.array([[0.0, 0.5, 7.0]], dtype=np.float32), "F", "32-bit float"),
        (np.array([[0, 70000, -5]], dtype=np.int32), "I", "32-bit integer"),
    ],
)
def test_modes_without_a_fixed_range_are_refused(tmp_path: Path, array: np.ndarray, mode: str, why: str) -> None:
    path = tmp_path / "wide.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(ImageModeError) as info:
        decode(path)
    message = str(info.value)
    assert str(path) in message and f"mode {mode}" in message and why in message
    assert "supported modes: 1, L, LA, P, PA, RGB, RGBX, RGBA, CMYK, YCbCr, I;16, I;16B, I;16L, I;16N" in message


def test_lab_tiff_is_refused(tmp_path: Path) -> None:
    Image.new("LAB", (2, 2), (50, 128, 128)).save(tmp_path / "lab.tif")
    with pytest.raises(ImageModeError, match=r"mode 'LAB' \(no conversion to 8-bit RGB is defined for it\)"):
        decode(tmp_path / "lab.tif")


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_animations_and_multipage_files_are_refused(tmp_path: Path, fmt: str) -> None:
    frames = [Image.new("RGB", (4, 4), (60 * i, 0, 0)) for i in range(3)]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {}))
    with pytest.raises(ImageModeError, match="it holds 3 frames") as info:
        decode(path)
    assert str(path) in str(info.value)


def test_mpo_uses_its_primary_picture(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(250, 250, 250), (0, 0, 0)]]
    frames[0].save(tmp_path / "stereo.jpg", "MPO", save_all=True, append_images=frames[1:], quality=100)
    with Image.open(tmp_path / "stereo.jpg") as image:
        assert image.format == "MPO" and getattr(image, "n_frames", 1) == 2
    assert (np.abs(decode(tmp_path / "stereo.jpg").astype(int) - 250) <= 1).all()


# Mode -> (make a random file array from the generator, independent reference decoding of that array).
REFERENCES: dict[str, tuple[Callable[[np.random.Generator, int, int], np.ndarray], Callable[[np.ndarray], np.ndarray]]]
REFERENCES = {
    "L": (lambda rng, h, w: rng.integers(0, 256, (h, w), dtype=np.uint8), grey3),
    "RGB": (lambda rng, h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8), lambda a: a),
    "RGBA": (
        lambda rng, h, w: rng.integers(0, 256, (h, w, 4), dtype=np.uint8),
        lambda a: over_black(a[..., :3], a[..., 3]),
    ),
    "LA": (
        lambda rng, h, w: rng.integers(0, 256, (h, w, 2), dtype=np.uint8),
        lambda a: grey3(over_black(a[..., :1], a[..., 1])[..., 0]),
    ),
    "I;16": (lambda rng, h, w: rng.integers(0, 65536, (h, w), dtype=np.uint16), lambda a: grey3(a // 256)),
    "CMYK": (
        lambda rng, h, w: rng.integers(0, 256, (h, w, 4), dtype=np.uint8),
        lambda a: np.round((255 - a[..., :3] / 1.0) * (255 - a[..., 3:] / 1.0) / 255).astype(np.uint8),
    ),
}


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(sorted(REFERENCES)),
    fmt=st.sampled_from(["PNG", "TIFF"]),
    seed=st.integers(0, 2**32 - 1),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
)
def test_decoding_matches_an_independent_reference(mode: str, fmt: str, seed: int, height: int, width: int) -> None:
    make, reference = REFERENCES[mode]
    array = make(np.random.default_rng(seed), height, width)
    fmt = "TIFF" if mode == "CMYK" else fmt  # PNG has no CMYK
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"image.{fmt.lower()}"
        Image.fromarray(array, mode=None if mode == "I;16" else mode).save(path, fmt)
        assert np.array_equal(decode(path), reference(array))


def test_to_rgb_array_of_an_open_image_names_the_given_path(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((2, 2), np.float32)).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as image, pytest.raises(ImageModeError, match=r"Refusing image where/f\.tif"):
        to_rgb_array(image, "where/f.tif")
    assert "F" not in SUPPORTED_MODES and "I;16" in SUPPORTED_MODES
