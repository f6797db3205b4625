from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fashion_vit.transforms import Preprocessing, decode_image, preprocess

SIZE = (80, 60)  # (H, W) of the fashion-small images


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decodes_a_real_jpeg_at_native_size(shared_data):
    data = (shared_data / "images" / "15970.jpg").read_bytes()
    arr = decode_image(data, SIZE)
    assert arr.shape == (80, 60, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: Image.new("L", (60, 80), 128), "PNG"),
        (lambda: Image.new("RGB", (60, 80), (10, 200, 30)).convert("P"), "PNG"),
        (lambda: Image.new("CMYK", (60, 80), (0, 255, 255, 0)), "JPEG"),
        (lambda: Image.new("RGB", (600, 800), (10, 200, 30)), "WEBP"),
        (lambda: Image.new("RGB", (61, 79), (10, 200, 30)), "BMP"),
        (lambda: Image.new("RGB", (60, 80), (10, 200, 30)), "TIFF"),
        (lambda: Image.new("RGB", (60, 80), (10, 200, 30)), "GIF"),
    ],
)
def test_every_mode_becomes_rgb_at_source_size(make, fmt):
    arr = decode_image(encode(make(), fmt), SIZE)
    assert arr.shape == (80, 60, 3) and arr.dtype == np.uint8


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (60, 80), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (0, 0, 30, 80))  # opaque blue left half
    arr = decode_image(encode(img, "PNG"), SIZE)
    assert tuple(arr[40, 5]) == (0, 0, 255)
    assert tuple(arr[40, 55]) == (255, 255, 255)


def test_cmyk_colours_survive():
    arr = decode_image(encode(Image.new("CMYK", (60, 80), (0, 255, 255, 0)), "JPEG"), SIZE)
    r, g, b = arr[40, 30].astype(int)
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red


def test_16_bit_grayscale_is_scaled_not_clipped():
    img = Image.fromarray(np.full((80, 60), 32768, dtype=np.uint16))
    arr = decode_image(encode(img, "PNG"), SIZE)
    assert 120 <= arr[0, 0, 0] <= 135


def test_exif_orientation_is_respected():
    img = Image.new("RGB", (80, 60), (0, 0, 0))  # landscape on disk
    img.paste((255, 255, 255), (0, 0, 40, 60))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    arr = decode_image(encode(img, "JPEG", exif=exif, quality=95), SIZE)
    # Displayed portrait: the white half is now on top.
    assert arr[5, 30].mean() > 200 and arr[75, 30].mean() < 50


@pytest.mark.parametrize("data, reason", [(b"", "empty file"), (b"hello world", "not an image")])
def test_bad_bytes_raise_value_error_with_reason(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode_image(data, SIZE)


def test_truncated_jpeg_raises(shared_data):
    data = (shared_data / "images" / "15970.jpg").read_bytes()
    with pytest.raises(ValueError):
        decode_image(data[: len(data) // 3], SIZE)


PREP = Preprocessing(image_size=32, source_size=SIZE, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


def test_preprocess_matches_a_direct_float_reference():
    images = torch.randint(0, 256, (4, 80, 60, 3), dtype=torch.uint8)
    out = preprocess(images, PREP)
    ref = F.interpolate(
        images.permute(0, 3, 1, 2).float() / 255, size=(32, 32), mode="bilinear", align_corners=False, antialias=True
    )
    ref = (ref - torch.tensor(PREP.mean).view(1, 3, 1, 1)) / torch.tensor(PREP.std).view(1, 3, 1, 1)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_flip_only_in_training():
    images = torch.zeros((64, 80, 60, 3), dtype=torch.uint8)
    images[:, :, :30] = 255  # white left half
    evaluated = preprocess(images, PREP)
    assert torch.equal(evaluated, preprocess(images, PREP))
    torch.manual_seed(0)
    trained = preprocess(images, PREP, augment="flip")
    flipped = (trained[:, 0, :, 0] < trained[:, 0, :, -1]).all(dim=1)  # left darker than right
    assert 10 < int(flipped.sum()) < 54  # about half, not none or all
    torch.testing.assert_close(trained[~flipped], evaluated[~flipped])
    torch.testing.assert_close(trained[flipped], evaluated[flipped].flip(3))


def test_crop_takes_a_random_window_inside_each_image():
    """A horizontal ramp: a window's width shows as the span of values across the output."""
    identity = Preprocessing(image_size=32, source_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
    ramp = (torch.arange(60) * 4).to(torch.uint8)  # 0 .. 236 across the width
    images = ramp.view(1, 1, 60, 1).expand(64, 80, 60, 3).contiguous()
    full = preprocess(images, identity)[:, 0, 16]
    torch.manual_seed(0)
    cropped = preprocess(images, identity, augment="crop")
    assert cropped.shape == (64, 3, 32, 32)
    rows = cropped[:, 0, 16]
    span = (rows[:, -1] - rows[:, 0]).abs() / (full[:, -1] - full[:, 0])
    # Windows keep 60-100 % of the area at a 3/4-4/3 aspect change: 0.67-1 of the width.
    # (The full-image reference is antialiased, which pulls its edge columns in by ~1 %.)
    assert float(span.min()) > 0.6 and float(span.max()) <= 1.02
    assert float(span.std()) > 0.02  # a different window per image
    assert float(rows.min()) >= -1e-3 and float(rows.max()) <= 236 + 1e-3  # never outside the image
