"""Image preprocessing, in two halves that training, evaluation and prediction all share.

1. `decode_image` (CPU, once per image): bytes -> uint8 (H, W, 3) at the checkpoint's
   `source_size`, the size the training images had (60x80 for this dataset). Decoding a
   small JPEG costs ~0.2 ms; keeping it uint8 and small keeps Ray's object store small.
2. `preprocess` (on the training/inference device, per batch): resize to `image_size`,
   optional random flip, normalise with the checkpoint's mean/std. Resizing and
   normalising in float on the CPU is ~10x the decode cost, so it belongs on the device.

Because prediction decodes to the same source size the model was trained on, an image
of any resolution reaches the model the way the training images did.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from fashion_vit.files import read_bytes

# PIL refuses files over ~179 Mpx by default as decompression bombs; a catalogue
# crawl can hold huge scans, and we only ever read a reduced draft of them.
Image.MAX_IMAGE_PIXELS = 400_000_000
# The two halves below in words, for users of an exported model who cannot call them.
RESIZE = (
    "decode to RGB (EXIF orientation applied; alpha composited on white; 16-bit scaled to 8) at source_size "
    "(height, width) with PIL bilinear resampling; then resize that to image_size x image_size, bilinear, "
    "align_corners=False, antialiased only when shrinking; then (x / 255 - mean) / std per channel, NCHW float32"
)


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn image bytes into model input; stored in every checkpoint."""

    image_size: int  # model input side (square)
    source_size: tuple[int, int]  # (height, width) images are decoded to and kept at as uint8
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        # Unpacked, so that a stored size or statistic of the wrong length fails on load, not in a batch.
        height, width = (int(v) for v in d["source_size"])
        mean_r, mean_g, mean_b = (float(v) for v in d["mean"])
        std_r, std_g, std_b = (float(v) for v in d["std"])
        return cls(
            image_size=int(d["image_size"]),
            source_size=(height, width),
            mean=(mean_r, mean_g, mean_b),
            std=(std_r, std_g, std_b),
        )


def decode_image(data: bytes, source_size: tuple[int, int]) -> np.ndarray:
    """Decode image bytes into uint8 RGB (H, W, 3) at `source_size` = (H, W).

    Handles EXIF orientation, grayscale, palette, alpha (composited on white, the
    background of product photos), CMYK and 16-bit images. Raises ValueError with a
    short reason for data that is not a readable image.
    """
    if not data:
        raise ValueError("empty file")
    h, w = source_size
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: big photos decode ~10x faster.
                img.draft("RGB", (w, h))
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR, reducing_gap=3.0)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(_short_reason(e)) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: scale to 8 bits by the type's range, not by clipping.
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, ...
    return img


def _short_reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "cannot identify image file" in text:
        return "not an image"
    if "truncated" in text.lower() or "image file is truncated" in text:
        return "truncated image"
    return f"{type(e).__name__}: {text}"[:200]


UNREADABLE = "unreadable"  # how an error reason starts when the file itself could not be read


class UnreadableImage(OSError):
    """A training image that could not be read at all (missing, no permission, I/O)."""


def image_bytes(item) -> bytes | bytearray:
    """An image's bytes from what a data frame holds: the bytes, or a path or URI to read."""
    return item if isinstance(item, bytes | bytearray) else read_bytes(item)


def decode_images(items, source_size: tuple[int, int], read=None) -> tuple[np.ndarray, np.ndarray]:
    """Decode many images, one failure never stopping the rest: the one place that does.

    items: image bytes, or with `read` (e.g. files.read_bytes) whatever it takes.
    Returns (uint8 (N, H, W, 3) with zeros where a file failed, str (N,) error reasons,
    "" where it decoded).
    """
    h, w = source_size
    images: np.ndarray = np.zeros((len(items), h, w, 3), np.uint8)
    errors: np.ndarray = np.full(len(items), "", dtype=object)
    for i, item in enumerate(items):
        try:
            images[i] = decode_image(read(item) if read else item, source_size)
        except ValueError as e:
            errors[i] = str(e)
        except OSError as e:  # permissions, vanished, I/O error
            errors[i] = f"{UNREADABLE}: {e.strerror or type(e).__name__}"
    return images, errors


def decode_batch(batch: dict[str, np.ndarray], source_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Ray Data batch function for labelled training data: column `image` bytes -> uint8 array.

    Rows whose bytes do not decode are dropped (the caller counts them): one corrupt
    file should not end a training run. A file that cannot be read at all raises
    UnreadableImage naming it.
    """
    images, errors = decode_images(batch["image"], source_size, read=image_bytes)
    for item, error in zip(batch["image"], errors, strict=True):
        if error.startswith(UNREADABLE):
            raise UnreadableImage(f"{item} ({error.removeprefix(UNREADABLE + ': ')})")
    ok = errors == ""
    return {"image": images[ok], "label": np.asarray(batch["label"], dtype=np.int64)[ok]}


def preprocess(
    images: torch.Tensor,
    prep: Preprocessing,
    augment: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device -> normalised float32 (B, 3, S, S) on that device.

    augment (training only): "flip", a random horizontal flip; "crop", the flip plus a
    random resized crop. Bilinear resize with antialiasing only when shrinking, so
    upsampling the 60x80 images matches a plain bilinear resize.
    """
    x = images.permute(0, 3, 1, 2)  # (B, 3, H, W), still uint8
    if augment:
        flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    x = x.float()
    s = prep.image_size
    if augment == "crop":
        x = random_resized_crop(x, s, generator)
    elif x.shape[-2:] != (s, s):
        shrinking = x.shape[-2] > s or x.shape[-1] > s
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=shrinking)
    shift, scale = _normalisation(prep.mean, prep.std, x.device)
    return torch.addcmul(shift, x, scale)


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) of shape (1, 3, 1, 1) on `device`, with (x / 255 - mean) / std equal to
    shift + x * scale, made once per device. Made from Python floats every batch, they
    were a blocking copy to the GPU, which waits for every queued kernel, so the host
    could not run a step ahead (the H100 run that did so was idle ~60 % of its epochs)."""
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    return (-mean_t / std_t).to(device), (1.0 / (255.0 * std_t)).to(device)


CROP_AREA = (0.6, 1.0)  # share of the image a crop keeps; product photos fill the frame
CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio change of a crop


def random_resized_crop(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """float (B, C, H, W) -> (B, C, size, size): per image, a random window of CROP_AREA of
    the image at an aspect change within CROP_RATIO, resampled to size x size. One
    affine grid_sample for the whole batch, on the batch's device."""
    b, dev = x.shape[0], x.device
    rand = lambda: torch.rand(b, device=dev, generator=generator)
    area = CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * rand()
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * rand())
    # Window sides as fractions of the image's width and height.
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    # Centre offsets in grid units ([-1, 1] spans the image), keeping the window inside.
    tx = (1 - w) * (2 * rand() - 1)
    ty = (1 - h) * (2 * rand() - 1)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w, tx
    theta[:, 1, 1], theta[:, 1, 2] = h, ty
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
