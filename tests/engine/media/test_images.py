import io

import numpy as np
import pytest
from PIL import Image

from engine.diffusion.instance_data import to_tensor
from engine.media.images import ImageError, read_image, resize_and_crop


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert read_image(str(path)).size == (20, 40)


@pytest.mark.parametrize(
    "image, rgb",
    [
        (Image.new("RGBA", (16, 16), (1, 2, 3, 0)), (1, 2, 3)),
        (Image.new("P", (16, 16)), (0, 0, 0)),
        (Image.new("I;16", (16, 16), 40000), (156, 156, 156)),  # 16-bit samples scaled to 8 bits, not clipped
        (Image.new("L", (16, 16), 77), (77, 77, 77)),
        (Image.new("CMYK", (16, 16), (0, 255, 255, 0)), (255, 0, 0)),
    ],
    ids=["rgba", "palette", "16-bit", "grey", "cmyk"],
)
def test_every_mode_becomes_rgb(tmp_path, image, rgb):
    path = tmp_path / "x.tiff"
    image.save(path)
    decoded = read_image(str(path))
    assert decoded.mode == "RGB" and decoded.getpixel((5, 5)) == rgb


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"this is a text file", "not an image in any format Pillow reads"),
        (None, "the file is truncated"),  # truncated PNG, filled in below
    ],
)
def test_undecodable_images_name_the_uri_and_reason(tmp_path, data, message):
    if data is None:
        data = _png(Image.new("RGB", (64, 64), "blue"))[:60]
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=f"{path}: {message}"):
        read_image(str(path))


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(str(tmp_path / "absent.png"))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(path)  # tiny on disk, 9 megapixels decoded
    with pytest.raises(ImageError, match="over the limit of 1000000"):
        read_image(str(path), max_pixels=1_000_000)


def test_resize_and_crop_gives_square_in_range():
    image = Image.new("RGB", (50, 30), (255, 0, 0))
    out = resize_and_crop(image, 32)
    assert out.size == (32, 32)
    tensor = to_tensor(out)
    assert tensor.shape == (3, 32, 32)
    assert np.isclose(tensor[0].mean().item(), 1.0) and np.isclose(tensor[1].mean().item(), -1.0)
