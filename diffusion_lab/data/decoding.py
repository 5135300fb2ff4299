"""Decode an opened image file of any supported PIL mode to 8-bit RGB, or refuse it naming the file and mode.

``Image.convert("RGB")`` alone damages some files silently: it clips 16-bit grey (``I;16``, and ``I`` from
16-bit PGM) to 255, so everything above 255/65535 turns white, and it drops alpha, keeping whatever colour
sits under transparent pixels. The rules here, one per mode (:data:`CONVERTERS`):

- 8-bit grey (``1``, ``L``) is repeated into R, G and B; ``1`` reads 0 / 255.
- 16-bit samples keep their high byte, ``x >> 8`` (0 -> 0, 65535 -> 255, monotone): what Pillow itself does
  when it opens a 16-bit-per-channel RGB or RGBA PNG (it reads those as 8-bit modes), so grey and colour agree.
  16-bit grey is ``I;16`` / ``I;16B`` / ``I;16L`` / ``I;16N``, or ``I`` from PNG and PGM (Pillow scales a PGM
  to 0..65535 by its maxval).
- Alpha (``LA``, ``RGBA``, ``PA``, palettes with transparent entries, ``tRNS`` colour keys) is composited over
  black (:data:`ALPHA_BACKGROUND`), i.e. premultiplied: ``round((c·a + bg·(255 − a)) / 255)`` per channel, so a
  fully transparent pixel is black whatever colour the file stores under it.
- ``P`` (palette) pixels are their palette colours; ``CMYK`` and ``YCbCr`` use Pillow's conversions (CMYK
  without ICC profile: ``(255 − C)(255 − K) / 255``; YCbCr: JPEG's full-range BT.601). ICC profiles are ignored,
  as before.
- Refused, naming the file: ``F`` (float, no fixed value range), ``I`` from formats other than PNG/PGM (32-bit
  integers, no fixed range), every other mode (``LAB``, ``HSV``, …), 16-bit RGB PNGs with a ``tRNS`` colour key
  (Pillow reads their pixels as 8 bits, so the 16-bit key cannot be matched), and animations or multi-page files
  (``n_frames > 1``: no one frame is the image), except MPO, whose first frame is the primary picture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# Grey level behind transparent pixels (0: composite over black, i.e. premultiplied alpha).
ALPHA_BACKGROUND = 0
# Formats whose PIL mode "I" holds 16-bit samples (0..65535): 16-bit PNG (older Pillow) and PGM (scaled by maxval).
SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")
# Multi-frame formats whose first frame is the image itself (MPO: a JPEG plus its secondary pictures).
FIRST_FRAME_FORMATS = ("MPO",)


class ImageModeError(ValueError):
    """An image file whose mode (or frame count) cannot be decoded to 8-bit RGB faithfully; names the file."""


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8, the grey level in every channel."""
    return np.repeat(grey[..., None], 3, axis=-1)


def composite(color: np.ndarray, alpha: np.ndarray, background: int = ALPHA_BACKGROUND) -> np.ndarray:
    """Porter & Duff 1984 "over" onto a constant ``background``: (H, W, C) uint8 colour, (H, W) uint8 alpha ->
    (H, W, C) uint8 ``round((c·a + bg·(255 − a)) / 255)`` (exact: 255 is odd, so no value ends in .5)."""
    a = alpha.astype(np.uint32)[..., None]
    mixed = color.astype(np.uint32) * a + background * (255 - a)
    return ((mixed + 127) // 255).astype(np.uint8)


def high_byte(x: np.ndarray) -> np.ndarray:
    """16-bit samples (any integer dtype, values 0..65535) -> their high byte ``x >> 8`` as uint8."""
    return (x.astype(np.uint32) >> 8).astype(np.uint8)


def _from_rgba(image: Image.Image) -> np.ndarray:
    array = np.asarray(image.convert("RGBA"))
    return composite(array[..., :3], array[..., 3])


def _from_la(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    return grey_to_rgb(composite(array[..., :1], array[..., 1])[..., 0])


def _from_16bit(image: Image.Image) -> np.ndarray:
    samples = np.asarray(image)
    rgb = grey_to_rgb(high_byte(samples))
    key = image.info.get("transparency")  # a 16-bit grey tRNS key: those exact samples are transparent
    if isinstance(key, int):
        return composite(rgb, np.where(samples == key, 0, 255).astype(np.uint8))
    return rgb


def _keyed_or(convert: Callable[[Image.Image], np.ndarray]) -> Callable[[Image.Image], np.ndarray]:
    """``convert``, unless the image has a ``tRNS`` colour key: then the keyed pixels are composited as alpha 0."""
    return lambda image: _from_rgba(image) if "transparency" in image.info else convert(image)


# PIL mode -> (H, W, 3) uint8 decoder; the modes not listed are refused.
CONVERTERS: dict[str, Callable[[Image.Image], np.ndarray]] = {
    "1": _keyed_or(lambda image: grey_to_rgb(np.asarray(image.convert("L")))),
    "L": _keyed_or(lambda image: grey_to_rgb(np.asarray(image))),
    "LA": _from_la,
    "P": _from_rgba,
    "PA": _from_rgba,
    "RGB": _keyed_or(lambda image: np.asarray(image)),
    "RGBX": lambda image: np.asarray(image)[..., :3],
    "RGBA": _from_rgba,
    "CMYK": lambda image: np.asarray(image.convert("RGB")),
    "YCbCr": lambda image: np.asarray(image.convert("RGB")),
    **dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N"), _from_16bit),
}
SUPPORTED_MODES = (*CONVERTERS, f"I (from {'/'.join(SIXTEEN_BIT_I_FORMATS)})")
WHY_REFUSED = {
    "F": "32-bit float samples have no fixed value range",
    "I": "32-bit integer samples have no fixed value range",
}


def _converter(image: Image.Image) -> Callable[[Image.Image], np.ndarray] | None:
    """The decoder for ``image``'s mode (``I`` counts as 16-bit only for :data:`SIXTEEN_BIT_I_FORMATS`)."""
    if image.mode == "I" and image.format in SIXTEEN_BIT_I_FORMATS:
        return _from_16bit
    return CONVERTERS.get(image.mode)


def _refusal(image: Image.Image) -> str | None:
    """Why ``image`` (opened, not yet loaded) cannot be decoded faithfully, or None if it can."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format not in FIRST_FRAME_FORMATS:
        return f"it holds {frames} frames (an animation or multi-page file); save the frame to use as its own file"
    if _converter(image) is None:
        why = WHY_REFUSED.get(image.mode, "no conversion to 8-bit RGB is defined for it")
        return f"PIL mode {image.mode!r} ({why}) is not supported; supported modes: {', '.join(SUPPORTED_MODES)}"
    tiles = image.tile if isinstance(image, ImageFile.ImageFile) else []  # the decoder's raw modes, before load()
    rawmodes = [tile.args for tile in tiles if isinstance(tile.args, str)]
    if image.mode == "RGB" and "transparency" in image.info and any(";16" in raw for raw in rawmodes):
        return "16-bit RGB with a tRNS colour key (Pillow reads its pixels as 8 bits, so the key cannot be matched)"
    return None


def to_rgb_array(image: Image.Image, path: Path | str) -> np.ndarray:
    """An opened PIL image (first frame, not yet loaded) -> (H, W, 3) uint8 RGB, by the rules of this module.

    Raises:
        ImageModeError: naming ``path``, its mode or frame count, and the supported modes.
    """
    convert, problem = _converter(image), _refusal(image)
    if convert is None or problem is not None:
        raise ImageModeError(f"Refusing image {path} ({image.format}, mode {image.mode}): {problem}.")
    return np.ascontiguousarray(convert(image), dtype=np.uint8)
