"""Export: a trained vit_model.pth as an ONNX model that runs without this package, and
the one owner of that file's format (its metadata and `read_onnx`).

    vit_model.pth -> engines.to_onnx (torch's torch.export-based exporter)
      -> metadata: labels, input size, mean/std, decode size and resize, recipe
      -> checked with ONNX Runtime against eager PyTorch on real images
      -> model.onnx (renamed from a temp name only once the check passed) + model.json
      -> optionally model.int8.onnx (ONNX Runtime's dynamic quantisation), checked the same way

The metadata sits in the ONNX file's metadata_props (every value a string, JSON where it
is not one) and, the same, in the JSON file beside it, so that a JVM or C++ service can
build the input from the image without Python.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fashion_vit.config import ConfigError, ExportConfig, FashionVitError
from fashion_vit.engines import INPUT_NAME, OUTPUT_NAME, create_forward, to_onnx
from fashion_vit.files import atomic_open, is_image_name, is_uri, walk_files
from fashion_vit.model import ModelError, SavedModel, load_checkpoint
from fashion_vit.transforms import RESIZE, Preprocessing, decode_images, preprocess

FORMAT = "fashion-vit-onnx/1"
# Top-1 agreement with eager fp32 PyTorch the check demands, and the largest difference
# in any class probability an fp32 export may have (measured: ~1e-6).
AGREEMENT = {"none": 0.999, "int8": 0.99}
MAX_PROB_DIFF = {"none": 1e-3, "int8": 1.0}
CHECK_BATCH = 64


class ExportError(FashionVitError):
    """The export could not be made, or it does not agree with the PyTorch model."""


@dataclass
class OnnxModel:
    """An exported model read back: what the onnx engine and the batch job need."""

    data: bytes  # the serialised ONNX model
    labels: list[str]  # class index -> label
    preprocessing: Preprocessing
    metadata: dict = field(default_factory=dict)  # its metadata_props (JSON strings where not text)


@dataclass
class Check:
    """An exported model against eager PyTorch on the same preprocessed images."""

    images: int
    agreement: float  # share of images with the same top-1 label
    max_prob_diff: float  # largest |p_onnx - p_torch| over every image and class
    folder: str

    def line(self, name: str) -> str:
        return (
            f"{name}: top-1 agreement with PyTorch {self.agreement:.2%} on {self.images} images of {self.folder}, "
            f"largest probability difference {self.max_prob_diff:.1e}"
        )


@dataclass
class ExportOutcome:
    output: str
    check: Check
    int8: str | None = None
    int8_check: Check | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"exported {self.output} ({_mb(self.output)}; metadata also in {json_path(self.output)})"]
        lines.append(self.check.line("checked with ONNX Runtime"))
        if self.int8 and self.int8_check:
            lines.append(f"int8: {self.int8} ({_mb(self.int8)})")
            lines.append(self.int8_check.line("int8 checked"))
        lines.append(f"{self.seconds:.1f}s")
        return "\n".join(lines)


def run(cfg: ExportConfig, log=print) -> ExportOutcome:
    """The whole `jobs/export.py`."""
    t0 = time.perf_counter()
    try:
        saved = load_checkpoint(cfg.model)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    folder = check_folder(cfg.images, saved)
    images = sample_images(folder, cfg.check_images, saved.preprocessing.source_size)
    log(f"exporting {cfg.model} with torch.onnx.export(dynamo=True) ...")
    meta = metadata(saved, source=cfg.model)
    data = with_metadata(to_onnx(saved), meta)
    check = write_checked(cfg.output, data, meta, lambda d: compare(saved, d, images, folder))
    outcome = ExportOutcome(cfg.output, check)
    if cfg.quantize == "int8":
        log("quantising to int8 (ONNX Runtime dynamic quantisation) ...")
        meta8 = {**meta, "quantization": "int8"}
        data8 = with_metadata(quantize_int8(data), meta8)
        outcome.int8 = int8_path(cfg.output)
        outcome.int8_check = write_checked(
            outcome.int8, data8, meta8, lambda d: compare(saved, d, images, folder, quantization="int8")
        )
    outcome.seconds = time.perf_counter() - t0
    return outcome


def metadata(saved: SavedModel, source: str) -> dict:
    """Everything needed to use the model without this package."""
    prep = saved.preprocessing
    return {
        "format": FORMAT,
        "labels": list(saved.labels),
        "input": f"{INPUT_NAME}: float32 (batch, 3, {prep.image_size}, {prep.image_size}), RGB",
        "output": f"{OUTPUT_NAME}: float32 (batch, {len(saved.labels)}), softmax gives the probabilities",
        "image_size": prep.image_size,
        "source_size": list(prep.source_size),
        "mean": list(prep.mean),
        "std": list(prep.std),
        "resize": RESIZE,
        "quantization": "none",
        "source": os.path.abspath(source),
        "recipe": saved.train_config.get("recipe", ""),
        "train_config": saved.train_config,
        "metrics": saved.metrics,
    }


def as_props(meta: dict) -> dict[str, str]:
    """metadata_props values: strings as they are, anything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def with_metadata(proto, meta: dict) -> bytes:
    """An onnx.ModelProto with `meta` as its metadata_props, serialised."""
    del proto.metadata_props[:]
    for key, value in as_props(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def read_onnx(path: str) -> OnnxModel:
    """A model.onnx written by `run`; ModelError if it is not one."""
    import onnx

    try:
        with open(path, "rb") as f:
            data = f.read()
        proto = onnx.load_from_string(data)
    except OSError as e:
        raise ModelError(f"could not read {path!r} ({e.strerror or type(e).__name__})") from None
    except Exception:
        raise ModelError(f"{path!r} is not an ONNX model") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path!r} is not an ONNX model written by jobs/export.py (no {FORMAT!r} format tag)")
    prep = Preprocessing.from_dict({k: json.loads(meta[k]) for k in ("image_size", "source_size", "mean", "std")})
    return OnnxModel(data=data, labels=json.loads(meta["labels"]), preprocessing=prep, metadata=meta)


def to_onnx_model(saved: SavedModel, source: str = "") -> OnnxModel:
    """A SavedModel exported in memory, unchecked (the batch job's --engine onnx with a .pth)."""
    meta = metadata(saved, source)
    return OnnxModel(with_metadata(to_onnx(saved), meta), saved.labels, saved.preprocessing, as_props(meta))


# --- the check ------------------------------------------------------------------------


def check_folder(images: str | None, saved: SavedModel) -> str:
    """--images, else the images of the Kaggle folder the checkpoint was trained on."""
    if images is not None:
        return images
    trained = saved.trained_with()
    data_dir = trained.data_dir if trained else None
    own = os.path.join(data_dir, "images") if data_dir and not is_uri(data_dir) else None
    if own and os.path.isdir(own) and os.access(own, os.R_OK | os.X_OK):
        return own
    where = f"its training images ({own}) are not readable here" if own else "it was not trained on a local folder"
    raise ConfigError(f"pass --images DIR, a folder of real images to check the export on ({where})")


def sample_images(folder: str, n: int, source_size: tuple[int, int]) -> np.ndarray:
    """Up to n images of `folder` (recursively), a seeded sample, decoded as prediction
    decodes them: uint8 (N, H, W, 3)."""
    paths = sorted(p for p in walk_files(folder) if is_image_name(p))
    if len(paths) > n:
        paths = sorted(random.Random(0).sample(paths, n))
    images, errors = decode_images(paths, source_size, read=_read)
    if not (errors == "").any():
        raise ConfigError(f"--images {folder!r} holds no readable images to check the export on")
    return images[errors == ""]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def compare(saved: SavedModel, data: bytes, images: np.ndarray, folder: str, quantization: str = "none") -> Check:
    """Run `data` with ONNX Runtime and the checkpoint with eager PyTorch, fp32 on the CPU,
    over the same preprocessed images; raise ExportError below AGREEMENT / over MAX_PROB_DIFF."""
    cpu = torch.device("cpu")
    reference = create_forward(saved, "torch", cpu)
    exported = create_forward(data, "onnx", cpu)
    same, worst = 0, 0.0
    with torch.inference_mode():
        for start in range(0, len(images), CHECK_BATCH):
            x = preprocess(torch.from_numpy(images[start : start + CHECK_BATCH]), saved.preprocessing)
            p, q = reference(x).float().softmax(1), exported(x).float().softmax(1)
            same += int((p.argmax(1) == q.argmax(1)).sum())
            worst = max(worst, float((p - q).abs().max()))
    check = Check(len(images), same / len(images), worst, folder)
    if check.agreement < AGREEMENT[quantization] or check.max_prob_diff > MAX_PROB_DIFF[quantization]:
        raise ExportError(
            f"the exported model disagrees with PyTorch ({check.line('check')}; needs at least "
            f"{AGREEMENT[quantization]:.1%} and at most {MAX_PROB_DIFF[quantization]:.0e}): nothing was written"
        )
    return check


def write_checked(path: str, data: bytes, meta: dict, check) -> Check:
    """Write `data` under a temp name beside `path`, run `check(data)`, and only if it
    passes rename it to `path` and write the JSON beside it."""
    with atomic_open(path, "wb") as f:
        f.write(data)
        result = check(data)  # raising here removes the temp file; `path` is untouched
    description = {**meta, "onnx": os.path.basename(path), "sha256": hashlib.sha256(data).hexdigest()}
    description["check"] = {k: getattr(result, k) for k in ("images", "agreement", "max_prob_diff", "folder")}
    with atomic_open(json_path(path)) as f:
        json.dump(description, f, indent=2)
    return result


def quantize_int8(data: bytes):
    """An onnx.ModelProto of `data` after ONNX Runtime's dynamic quantisation: int8 weights
    per output channel, activations quantised per batch at run time (no calibration data).
    Only the MatMuls (attention and MLP, nearly all the arithmetic): with the patch
    embedding and the head quantised too, 24 of 5,000 unseen images changed label against
    10, and the forward was no faster (docs/engines.md).

    Weights use 7 bits (reduce_range): on x86 CPUs without VNNI, ONNX Runtime's u8s8
    kernel sums pairs of products in 16 bits and saturates with 8-bit weights. The same
    file then answers differently by CPU: probabilities off by up to 0.054 and 99.1 %
    top-1 agreement under an emulated EPYC-Milan, against 0.007 and 99.8 % with VNNI.
    With 7 bits both gave 0.0065 and 99.8 %, at the same speed (docs/engines.md)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        with open(src, "wb") as f:
            f.write(data)
        root = logging.getLogger()
        level = root.level
        # It logs advice to run its shape-inference pre-pass first, on the root logger.
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(
                src,
                dst,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,
                op_types_to_quantize=["MatMul"],
            )
        finally:
            root.setLevel(level)
        return onnx.load(dst)


def json_path(onnx_path: str) -> str:
    return onnx_path[: -len(".onnx")] + ".json"


def int8_path(onnx_path: str) -> str:
    return onnx_path[: -len(".onnx")] + ".int8.onnx"


def _mb(path: str) -> str:
    return f"{os.path.getsize(path) / 1e6:.1f} MB"
