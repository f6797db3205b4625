"""Inference engines: the one place that turns a model into a forward function.

    forward(pixel_values) -> logits
    pixel_values: float32 (B, 3, S, S) on the device, made by transforms.preprocess
    logits: float (B, num_labels) on the same device

Every engine receives the same preprocessed tensor (decoding and `preprocess` are the
callers', unchanged), so only the arithmetic differs:
- torch: eager PyTorch, bf16 autocast on a GPU;
- compile: the same forward through torch.compile (compiled on its first batch, once);
- onnx: ONNX Runtime over the graph `to_onnx` exports with torch's exporter, with all
  of ONNX Runtime's graph optimisations; on CPU, or on CUDA where onnxruntime-gpu is
  installed. It runs fp32 on both (bf16 is a PyTorch autocast, not part of the graph).

The engines agree on the top-1 label, not on the last bits of the logits: a resumed
batch job must use the engine its interrupted run used (predict.open_work).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch

from fashion_vit.config import ENGINES, ONNX_EXTRA, FashionVitError
from fashion_vit.model import SavedModel

Forward = Callable[[torch.Tensor], torch.Tensor]
ONNX_OPSET = 20
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"


class EngineError(FashionVitError):
    """An engine could not be set up."""


def create_forward(
    model: SavedModel | bytes,
    engine: str,
    device: torch.device,
    threads: int | None = None,
    bf16: bool = False,
) -> Forward:
    """The forward function of `model` (a SavedModel, or a serialised ONNX model for the
    onnx engine) on `device`. threads: ONNX Runtime's intra-op threads (torch's are
    the caller's, process-wide). bf16: autocast for torch and compile on a GPU."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    if isinstance(model, bytes):
        if engine != "onnx":
            raise EngineError(f"an ONNX model runs only with engine onnx, not {engine}")
        return onnx_forward(model, device, threads)
    if engine == "onnx":
        return onnx_forward(to_onnx(model).SerializeToString(), device, threads)
    forward = torch_forward(model, device, bf16)
    return compiled(forward) if engine == "compile" else forward


def torch_forward(saved: SavedModel, device: torch.device, bf16: bool = False) -> Forward:
    """Eager PyTorch, the reference every other engine is checked against."""
    model, _ = saved.build()
    model.to(device)

    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(pixel_values=pixel_values).logits

    return forward


def compiled(forward: Forward) -> Forward:
    """torch.compile of `forward`, with a symbolic batch size: one compilation serves every
    batch, including the short last batch of each block. torch specialises sizes 0 and 1
    even then, so a single image is sent twice, rather than compiling a second graph
    (as a copy: a broadcast view's zero stride would fail the graph's guards all the same)."""
    fast = torch.compile(forward, dynamic=True)

    def forward_compiled(pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[0] == 1:
            return fast(pixel_values.repeat(2, 1, 1, 1))[:1]
        return fast(pixel_values)

    return forward_compiled


# --- ONNX ---------------------------------------------------------------------------


class _Logits(torch.nn.Module):
    """The classifier as a function of pixel_values alone, returning a tensor, the
    signature the exported graph has."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def to_onnx(saved: SavedModel):
    """The model as an onnx.ModelProto, exported by torch's torch.export-based exporter:
    input pixel_values float32 (batch, 3, S, S), output logits float32 (batch, labels),
    any batch size. Metadata is the caller's (export.py)."""
    for module in ("onnx", "onnxscript"):
        _require(module)
    model, prep = saved.build()
    # Attention as plain MatMul and Softmax: SDPA's decomposition adds a NaN guard per
    # layer (IsNaN, Where) that ONNX Runtime cannot fuse away; the maths is the same.
    model.set_attn_implementation("eager")
    example = torch.zeros(2, 3, prep.image_size, prep.image_size)
    with _quiet_exporter():
        program = torch.onnx.export(
            _Logits(model).eval(),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            opset_version=ONNX_OPSET,
            external_data=False,
            verbose=False,
        )
    assert program is not None  # with no file to write, the exporter returns the program
    return program.model_proto


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs its steps and a warning per torchvision op it cannot register;
    none of it is the user's concern."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def onnx_session(data: bytes, device: torch.device, threads: int | None = None):
    """An ONNX Runtime session over a serialised model, with every graph optimisation:
    CUDA on a GPU device (which needs onnxruntime-gpu), else the CPU."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no warnings about providers it skipped
    # By default its threads spin between runs, holding cores that the same process's
    # decoding, Ray Data's tasks and Serve's proxy need (docs/engines.md: the batch job's
    # steady rate on 2 cores, 848-1,077 images/s spinning, 1,387-1,564 not).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        # Ray sets OMP_NUM_THREADS=1 in actors; ONNX Runtime sizes its own pool.
        options.intra_op_num_threads = threads
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError(
                "engine onnx on a GPU needs ONNX Runtime's CUDA provider (pip install onnxruntime-gpu); "
                f"this onnxruntime has {', '.join(ort.get_available_providers())}"
            )
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(data, options, providers=providers)


def onnx_forward(data: bytes, device: torch.device, threads: int | None = None) -> Forward:
    """ONNX Runtime as a forward function on torch tensors: on CPU through numpy (no
    copy), on CUDA with the input and output bound to torch's own GPU memory."""
    session = onnx_session(data, device, threads)
    if device.type == "cuda":
        return _cuda_forward(session, device)

    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.float().contiguous().numpy()
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])

    return forward


def _cuda_forward(session, device: torch.device) -> Forward:
    classes = session.get_outputs()[0].shape[1]
    index = device.index or 0

    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.float().contiguous()
        logits = torch.empty((x.shape[0], classes), dtype=torch.float32, device=x.device)
        binding = session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, np.float32, tuple(logits.shape), logits.data_ptr())
        # ONNX Runtime runs on its own stream: the preprocessing queued on torch's must be done.
        torch.cuda.current_stream(device).synchronize()
        session.run_with_iobinding(binding)
        return logits

    return forward


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EngineError(f"engine onnx needs the {module} package, which is not installed ({ONNX_EXTRA})") from None
