"""Decoding user images safely: any fsspec URI, EXIF orientation applied, RGB, a decompression-bomb guard."""

from __future__ import annotations

import io

import fsspec
from PIL import Image, ImageOps

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image could not be read or decoded; the message names its URI and the reason."""


def decode_image(data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image with EXIF orientation applied."""
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
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name}: refused as a decompression bomb ({err})") from None
    except Exception as err:  # Pillow raises many types for corrupt data; all mean "not a usable image"
        raise ImageError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def read_image(uri: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Read and decode the image at any fsspec URI."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(f"{uri}: no such file") from None
    except Exception as err:
        raise ImageError(f"{uri}: cannot read ({type(err).__name__}: {err})") from None
    return decode_image(data, name=uri, max_pixels=max_pixels)


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
