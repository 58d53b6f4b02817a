"""Images as a viewer shows them: every PIL mode becomes that RGB picture, or is refused in one line.

``open_rgb(path_or_file, where)`` is the one place images enter schedsearch (calibration sets; the serving
endpoint can use it too). It refuses, with an :class:`~schedsearch.errors.ImageError` naming the image:

- more than ``MAX_PIXELS`` pixels (PIL's decompression-bomb limit) -- checked from the header, before decoding;
- an aspect ratio of ``MAX_ASPECT`` or more (vision processors refuse them; Qwen2-VL's says "absolute aspect
  ratio must be smaller than 200");
- a file PIL cannot decode, and pixel data with no faithful 8-bit view (float outside [0, 1] and [0, 255],
  32-bit integers outside the 16-bit range, NaN).

and converts the rest as a viewer would:

- EXIF orientation applied (``ImageOps.exif_transpose``);
- 16-bit grayscale (``I;16*``, and ``I`` holding values above 255, as PIL gives for 16-bit PGM data) scaled
  by 255/65535 -- ``convert("RGB")`` clips it instead, so a 16-bit PNG became solid white; ``I`` data within
  [0, 255] (no stated depth, e.g. ``L.convert("I")``) is kept as 8-bit;
- ``F`` (float) in [0, 1] scaled by 255, in [0, 255] kept;
- transparency (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, a palette or colour key with ``transparency``)
  composited over white, instead of dropping alpha and showing whatever colour hides under transparent pixels;
- everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``) through PIL's converter.
"""

from __future__ import annotations

import warnings
from typing import Any

from schedsearch.errors import ImageError

MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS default (a 1024 MiB RGBA image / 4 / 3)
MAX_ASPECT = 200.0
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def open_rgb(source: Any, where: str) -> Any:
    """Decode ``source`` (a path or a binary file) into the RGB image a viewer shows; ImageError otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = getattr(source, "name", source) if not isinstance(source, (bytes, bytearray)) else "<bytes>"
    what = f"{where}: image {name}" if where else f"image {name}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                check_size(im.size, what)
                im = ImageOps.exif_transpose(im)
                return to_rgb(im, what)
    except FileNotFoundError:
        raise ImageError(f"{what} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"{what} is a folder, not an image file") from None
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{what} is too large to decode safely ({err}): downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{what} cannot be decoded ({type(err).__name__}: {err})") from None


def check_size(size: tuple[int, int], what: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{what} is empty ({w}x{h} pixels)")
    if w * h > MAX_PIXELS:
        raise ImageError(f"{what} has {w}x{h} = {w * h} pixels, more than {MAX_PIXELS}: downscale it")
    if max(w, h) / min(w, h) >= MAX_ASPECT:
        raise ImageError(f"{what} is {w}x{h} pixels, an aspect ratio of 1:{max(w, h) / min(w, h):.0f}; vision "
                         f"processors need less than 1:{MAX_ASPECT:.0f}: crop or pad it")


def to_rgb(im: Any, what: str = "image") -> Any:
    """The RGB view of an opened PIL image (see the module docstring for each mode)."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im.convert("RGB")  # a loaded copy: the file is closed when open_rgb returns
    if mode in _SIXTEEN_BIT or mode == "F":
        return Image.fromarray(_to_uint8(im, what), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(f"{what} has pixel mode {mode!r}, which cannot be shown as RGB ({err}): "
                         "save it as an 8-bit RGB PNG or JPEG") from None


def _to_uint8(im: Any, what: str) -> Any:
    import numpy as np

    a = np.asarray(im)
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ImageError(f"{what} holds NaN or infinite pixel values: save it as an 8-bit image")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            scale = 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scale = 1.0
        else:
            raise ImageError(f"{what} is a float image with values in [{lo:g}, {hi:g}], which has no standard "
                             "display range: save it scaled to [0, 1] or as an 8-bit image")
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 65535:
        raise ImageError(f"{what} is a 32-bit integer image with values in [{lo}, {hi}], outside the 16-bit "
                         "range: save it as an 8- or 16-bit image")
    if im.mode == "I" and hi <= 255:  # "I" has no stated depth: 8-bit data (e.g. L.convert("I")) stays as is
        return a.astype(np.uint8)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)  # 16-bit -> 8-bit, rounded (0 -> 0, 65535 -> 255)
