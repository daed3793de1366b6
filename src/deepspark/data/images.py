"""Encoded image files (PNG, JPEG, GIF, BMP, TIFF, WebP) as bytes: recognising them and decoding them to
uint8 pixels. Shared by inference (which resizes to the model's input and turns a bad row into that row's
error) and training (which refuses an image whose size differs from the model's input, and stops at a
bad row: see docs/training.md)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable

import numpy as np

__all__ = ["RowError", "decode_image", "image_shapes", "is_encoded_image"]

# File signatures Pillow decodes; raw pixel records (IDX) almost never start with one of them.
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)


# Tried first, in this order: Pillow tries the formats it is given one by one, and in its full list
# (alphabetical by plugin, when nothing opened an image before) PNG came after 20 others.
_COMMON = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
_formats_cache: tuple[int, list[str]] = (-1, [])


def _formats() -> list[str]:
    """The formats Pillow may read a value as: all it has but EPS, whose decoding runs Ghostscript (the
    ``gs`` program, where installed) on the value's PostScript, which is a program: never run on input.
    The common ones first (:data:`_COMMON`); made again only when Pillow registers another format."""
    global _formats_cache
    from PIL import Image

    Image.init()
    known, names = _formats_cache
    if known != len(Image.ID):
        ids = [name for name in Image.ID if name != "EPS"]
        names = [name for name in _COMMON if name in ids] + [name for name in ids if name not in _COMMON]
        _formats_cache = (len(Image.ID), names)
    return names


class RowError(Exception):
    """One input value cannot be used; its message says why (inference makes it the row's ``error``)."""


def is_encoded_image(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a value) starts like an image file Pillow reads."""
    data = bytes(head[:12])
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def image_shapes(values: Iterable[bytes]) -> set[tuple[int, int, int]]:
    """The distinct ``(C, H, W)`` of encoded images, read from their headers only (C is 1 for grey
    images, 3 otherwise: what :func:`decode_image` makes of them). Raises :class:`RowError` for a value
    that is not an image."""
    from PIL import Image

    shapes = set()
    for data in values:
        try:
            with Image.open(io.BytesIO(bytes(data)), formats=_formats()) as opened:
                width, height = opened.size
                grey = opened.mode in ("1", "L", "LA", "I", "I;16", "F")
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, …
            raise RowError(f"cannot read the image header: {exc}") from None
        shapes.add((1 if grey else 3, height, width))
    return shapes


def decode_image(data: bytes, shape: tuple[int, int, int], *, resize: bool = True) -> np.ndarray:
    """Encoded image bytes → uint8 ``[C, H, W]`` of ``shape`` (grey for C=1, RGB for C=3).

    An image of another size is resized to ``shape``, or with ``resize=False`` refused
    (:class:`RowError` naming both sizes): training takes images at the model's input size only.
    """
    from PIL import Image

    channels, height, width = shape
    if channels not in (1, 3):
        raise RowError(f"images can feed models with 1 or 3 input channels, this one has {channels}")
    mode = "L" if channels == 1 else "RGB"
    if not data:
        raise RowError("empty input (0 bytes): there is no image to decode")
    try:
        with Image.open(io.BytesIO(data), formats=_formats()) as opened:
            pixels_limit = Image.MAX_IMAGE_PIXELS
            if pixels_limit and opened.size[0] * opened.size[1] > pixels_limit:
                # Pillow only warns up to twice its limit, then decodes: a 0.5 MB PNG took 1.3 GB and 4 s,
                # and a task decodes several at once (8 URL threads). An error row, as past twice is.
                raise RowError(
                    f"the image is {opened.size[0]}x{opened.size[1]} pixels, over Pillow's "
                    f"decompression-bomb limit of {pixels_limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
                )
            if not resize and opened.size != (width, height):
                raise RowError(
                    f"the image is {opened.size[0]}x{opened.size[1]} pixels but the model's input is "
                    f"{width}x{height} (width x height)"
                )
            if opened.mode == "F" or (opened.mode == "I" and opened.format != "PNG"):
                # 32-bit pixels (float or integer TIFF, say) have no fixed range: convert() clips them at
                # 255, so floats in [0, 1] came out black, and any scale chosen here would be a guess.
                kind = "float" if opened.mode == "F" else "integer"
                raise RowError(
                    f"the image's pixels are 32-bit {kind}s, which have no fixed range; save it with 8- or "
                    "16-bit pixels"
                )
            if opened.mode.startswith("I;16") or (opened.mode == "I" and opened.format == "PNG"):
                # 16-bit grey (PNG, TIFF): Pillow's convert() clips these values at 255 rather than
                # scaling them, which turns every pixel above 255/65535 white. Scale to 0-255 instead:
                # round(v / 257), in integers ((v + 128) // 257: v / 257 is never halfway between two)
                # and in place: 7 bytes a pixel at the peak, where floats took 24.
                wide = np.asarray(opened)
                if wide.dtype != np.uint16:  # mode I: int32
                    wide = np.clip(wide, 0, 65535)
                wide = wide.astype(np.uint32)
                wide += 128
                wide //= 257
                grey = Image.fromarray(wide.astype(np.uint8), "L")
                image = grey.convert(mode)
            else:
                opened.draft(mode, (width, height))  # JPEG: decode at a reduced scale when that is enough
                # Already in the mode (a grey PNG): convert() would only copy it.
                image = opened if opened.mode == mode else opened.convert(mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)  # in the `with`: a closed image has no pixels
    except RowError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError…
        # Without the object's address Pillow puts in some messages, so the same file gives the same row.
        why = re.sub(r" ?<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(exc))
        raise RowError(f"cannot decode image: {why}") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
