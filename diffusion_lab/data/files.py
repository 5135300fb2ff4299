"""File helpers shared by the on-disk datamodules: bounded downloads, parallel image decoding, choices.

Every on-disk dataset reads its whole split into memory once (as ``uint8``) and fails with a message
that names the folder it looked in, the files it expected and the config key to change.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffusion_lab.data.decoding import ImageModeError, to_rgb_array

DOWNLOAD_TIMEOUT_S = 60.0
# Extensions PIL decodes that image datasets ship in (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every socket operation inside the block (torchvision's downloaders set no timeout)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def require_files(title: str, folder: Path, missing: Sequence[str], hint: str) -> None:
    """Raise FileNotFoundError naming the files of dataset ``title`` missing from ``folder`` and how to get them."""
    if missing:
        raise FileNotFoundError(
            f"{title} not found: {folder} lacks {', '.join(missing)}. {hint} "
            "(With a Trainer, download happens in prepare_data(); call it before setup() by hand.)"
        )


def download_failed(title: str, folder: Path, err: Exception, hint: str) -> RuntimeError:
    """The error for a failed download of ``title`` to ``folder`` (raise it ``from err``)."""
    return RuntimeError(f"Downloading {title} to {folder} failed ({type(err).__name__}: {err}). {hint}")


def choice(value: object, choices: Sequence[str], key: str) -> str:
    """The option name of ``value`` (a str or a str-valued Enum from the config), checked against ``choices``."""
    name = str(getattr(value, "value", value))
    if name not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {name!r}")
    return name


def is_image_file(path: Path) -> bool:
    """Whether ``path`` names a non-hidden file with one of :data:`IMAGE_EXTENSIONS`."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def decode_threads() -> int:
    """Threads for decoding images: PIL releases the GIL while decoding and resampling."""
    return max(1, min(16, os.cpu_count() or 1))


def decode_images(paths: Sequence[Path], load: Callable[[Path], np.ndarray], shape: tuple[int, ...]) -> Tensor:
    """Decode every file with ``load`` (path -> (H, W, C) uint8) into one (N, C, H, W) uint8 tensor.

    Errors name the file that failed (an :class:`ImageModeError` names it already and passes unchanged).
    Decoding runs on :func:`decode_threads` threads, writing each image straight into the preallocated output,
    so peak memory is the output plus one image per thread.
    """
    out = torch.empty((len(paths), *shape), dtype=torch.uint8)

    def fill(index: int) -> None:
        path = paths[index]
        try:
            array = load(path)
        except ImageModeError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise RuntimeError(f"Could not decode image {path}: {err}") from err
        out[index] = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        for _ in pool.map(fill, range(len(paths))):
            pass
    return out


def open_rgb(path: Path) -> Image.Image:
    """Open an image file as an 8-bit RGB PIL image, decoded by the rules of :mod:`diffusion_lab.data.decoding`
    (16-bit samples keep their high byte, alpha is composited over black; float, 32-bit and animated images are
    refused with an :class:`ImageModeError` naming the file)."""
    with Image.open(path) as image:
        return Image.fromarray(to_rgb_array(image, path))
