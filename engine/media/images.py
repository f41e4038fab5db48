"""Decoding user images safely: any fsspec URI, EXIF orientation applied, RGB, a decompression-bomb guard."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from engine import storage

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DEFAULT_MIN_IMAGE_SIDE = 16  # a 1x1 tracking pixel or an icon is never a usable photo or document
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An image could not be read or decoded; the message names its URI and the reason."""


def decode_image(
    data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_side: int = DEFAULT_MIN_IMAGE_SIDE
) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image with EXIF orientation applied.

    Any mode becomes 8-bit RGB: CMYK, palette, grey, alpha (dropped) and 16-bit samples (scaled, not clipped). An
    animated image gives its first frame."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        # Check the header's size before decoding a single pixel: a bomb is refused without being expanded.
        if image.width * image.height > max_pixels:
            raise ImageError(
                f"{name}: image is {image.width}x{image.height} = {image.width * image.height} pixels, "
                f"over the limit of {max_pixels} (max_image_pixels)"
            )
        if min(image.size) < min_side:
            raise ImageError(f"{name}: image is {image.width}x{image.height} px, smaller than {min_side} px on a side "
                             "(min_image_side)")  # fmt: skip
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in HIGH_BIT_DEPTH_MODES:
            # Pillow's convert("RGB") clips 16-bit samples at 255, turning the image white; scale them instead.
            image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
        return image.convert("RGB")
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in any format Pillow reads (it starts with {data[:12]!r})") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name}: refused as a decompression bomb ({err})") from None
    except Exception as err:  # Pillow raises many types for corrupt data; all mean "not a usable image"
        if isinstance(err, OSError) and "truncated" in str(err).lower():  # worded by format and where data stops
            raise ImageError(f"{name}: the file is truncated: it ends before the image does ({err})") from None
        raise ImageError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def read_source(uri: str) -> bytes:
    """The bytes at any fsspec URI (transient storage errors retried, see engine.storage); ImageError if unreadable."""
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ImageError(f"{uri}: no such file") from None
    except Exception as err:
        raise ImageError(f"{uri}: cannot read ({type(err).__name__}: {err})") from None


def read_image(
    uri: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_side: int = DEFAULT_MIN_IMAGE_SIDE
) -> Image.Image:
    """Read and decode the image at any fsspec URI."""
    return decode_image(read_source(uri), name=uri, max_pixels=max_pixels, min_side=min_side)


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """Scale the shorter side to `resolution`, then crop a square (centred, or top-left when not centre-cropping)."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left, top = 0, 0
    return image.crop((left, top, left + resolution, top + resolution))
