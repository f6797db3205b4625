"""Online predictions: a trained model behind an HTTP endpoint, with Ray Serve.

    POST /predict?top_k=K   the image's bytes (Content-Type image/* or application/octet-stream),
                            or multipart/form-data with one or several files
    GET  /healthz           {"status": "ok"} from a replica with the model loaded
    GET  /                  the model's labels, input size, recipe and metrics

The answers are the batch job's: each image is decoded by `transforms.decode_image` at
the checkpoint's source size, in a thread (a large image must not stall the replica's
event loop), then waits in a `@serve.batch` queue; each batch goes through the batch
job's `Predictor` once, so preprocessing and outputs (predicted_category, confidence,
label_i / prob_i) cannot drift from `jobs/batch_predict.py`.

Anything wrong with a request is answered with a 4xx and a one-line JSON error,
{"error": "..."}; the replica goes on serving. Size limits are checked before
decoding: the body's length (--max-image-mb) and the image's pixel count from its
header (--max-image-mpx), which PIL's own decompression-bomb limit, raised for batch
crawls in transforms.py, does not cover here.

`build_app(cfg)` makes the application (jobs/serve.py runs it); `app_builder(args)` is
the same for `serve run` and Serve config files (serve_config.yaml).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from fashion_vit.config import RECIPE_FIELDS, ConfigError, FashionVitError, ServeConfig
from fashion_vit.export import OnnxModel, to_onnx_model
from fashion_vit.model import SavedModel
from fashion_vit.predict import Predictor, load_model
from fashion_vit.transforms import decode_image

APP_NAME = "fashion-vit"
DEPLOYMENT_NAME = "Classifier"
RAW_TYPES = ("image/", "application/octet-stream")  # a body that is the image itself
MULTIPART = "multipart/form-data"
MB = 1024**2

logger = logging.getLogger("ray.serve")


class ServeError(FashionVitError):
    """The application could not be started."""


class RequestError(Exception):
    """A request the server refuses: its HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Upload:
    """One image of a request: its name (a multipart file's, or "" for a raw body) and bytes."""

    name: str
    data: bytes


# --- the deployment ---------------------------------------------------------------------


@serve.deployment(name=DEPLOYMENT_NAME)
class Classifier:
    """One replica: the model loaded once, requests answered over HTTP, images batched."""

    def __init__(self, cfg: dict):
        self.cfg = ServeConfig(**cfg)
        self.saved = load_model(self.cfg.model)
        self.predictor = make_predictor(self.saved, self.cfg)
        self.labels = list(self.saved.labels)
        self.source_size = self.saved.preprocessing.source_size
        self.max_bytes = int(self.cfg.max_image_mb * MB)
        self.max_pixels = int(self.cfg.max_image_mpx * 1e6)
        # At most this many images decode at once: memory stays bounded under a burst of big uploads.
        self.decoder = ThreadPoolExecutor(max(2, self.cfg.cpus_per_replica), thread_name_prefix="decode")
        # Serve's documented way to size a batch per instance.
        self.predict_image.set_max_batch_size(self.cfg.max_batch_size)
        self.predict_image.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000)
        self.info = model_info(self.saved, self.cfg)
        # The first forward pass of each batch shape allocates; pay for the common ones before the first request.
        h, w = self.source_size
        for n in sorted({1, self.cfg.max_batch_size}):
            self.predictor({"image": np.zeros((n, h, w, 3), np.uint8)})

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            route = relative_path(request)
            if route == "/predict":
                allow(request, "POST")
                return JSONResponse(await self.predict(request))
            if route == "/healthz":
                allow(request, "GET")
                return JSONResponse({"status": "ok"})
            if route == "/":
                allow(request, "GET")
                return JSONResponse(self.info)
            raise RequestError(404, f"no such path {route!r}: POST /predict, GET /healthz or GET /")
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except Exception as e:  # a bug or a failed forward: still one line of JSON, the trace in the log
            logger.exception("request failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    async def predict(self, request: Request) -> dict:
        """The answer for one request: an image's predictions, or for a multipart request
        {"predictions": [...]}, one per file in the form's order, each with its "file"."""
        top_k = parse_top_k(request.query_params.get("top_k"), len(self.labels))
        kind = content_kind(request.headers.get("content-type"))
        body = await read_body(request, self.max_bytes)
        uploads = (
            await parse_multipart(request, body, self.cfg.max_files) if kind == "multipart" else [Upload("", body)]
        )
        loop = asyncio.get_running_loop()
        decoded = [loop.run_in_executor(self.decoder, self.decode, u) for u in uploads]
        # Every image is decoded (or refused) before any is predicted: a bad file refuses the request.
        images = await asyncio.gather(*decoded)
        rows = await asyncio.gather(*(self.predict_image(image) for image in images))
        answers = [top_k_view(row, top_k) for row in rows]
        if kind == "raw":
            return answers[0]
        return {"predictions": [{"file": u.name, **a} for u, a in zip(uploads, answers, strict=True)]}

    def decode(self, upload: Upload) -> np.ndarray:
        """Runs in a decoder thread: uint8 (H, W, 3) at the model's source size, or RequestError."""
        return decode_upload(upload, self.source_size, self.max_pixels)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)  # set per replica from the config in __init__
    async def predict_image(self, images: list[np.ndarray]) -> list[dict]:
        """A batch of decoded images (each (H, W, 3) uint8) -> one row of all labels' probabilities each.

        The forward runs on the event loop on purpose: the requests that arrive meanwhile
        queue up and form the next batch. Run in a thread, it would leave Serve's batcher
        cutting batches by the wait timeout alone, mostly of one image under load."""
        out = self.predictor({"image": np.stack(images)})
        k = len(self.labels)
        return [
            {
                "predicted_category": str(out["predicted_category"][i]),
                "confidence": float(out["confidence"][i]),
                "labels": [str(out[f"label_{j + 1}"][i]) for j in range(k)],
                "probs": [float(out[f"prob_{j + 1}"][i]) for j in range(k)],
            }
            for i in range(len(images))
        ]


def make_predictor(saved: SavedModel | OnnxModel, cfg: ServeConfig) -> Predictor:
    """The replica's Predictor: the one place it is made, with every label's probability
    (a request's top_k is a view of them), on the engine asked for (a .pth asked to run
    on ONNX Runtime is exported in memory first, as in the batch job)."""
    if cfg.engine == "onnx" and isinstance(saved, SavedModel):
        saved = to_onnx_model(saved, cfg.model)
    return Predictor(saved, top_k=len(saved.labels), threads=cfg.cpus_per_replica, engine=cfg.engine or "torch")


# --- requests ------------------------------------------------------------------------


def relative_path(request: Request) -> str:
    """The path under the application's route prefix: "/predict" also when it is mounted at /fashion."""
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return "/" + path.strip("/") if path.strip("/") else "/"


def allow(request: Request, method: str) -> None:
    if request.method != method and not (method == "GET" and request.method == "HEAD"):
        raise RequestError(405, f"{request.method} is not allowed here; use {method}")


def parse_top_k(text: str | None, num_labels: int) -> int:
    """?top_k=: 0 (the default) to the number of labels."""
    if text is None or text == "":
        return 0
    try:
        k = int(text)
    except ValueError:
        raise RequestError(400, f"top_k must be an integer from 0 to {num_labels}, got {text!r}") from None
    if not 0 <= k <= num_labels:
        raise RequestError(400, f"top_k must be from 0 to {num_labels} (the model's labels), got {k}")
    return k


def content_kind(content_type: str | None) -> str:
    """ "raw" (the body is the image) or "multipart"; anything else is a 415."""
    media = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if media == MULTIPART:
        return "multipart"
    if media.startswith(RAW_TYPES):
        return "raw"
    hint = " (curl --data-binary sends that: add -H 'Content-Type: image/jpeg', or use -F file=@photo.jpg)"
    raise RequestError(
        415,
        f"Content-Type {media!r} is not accepted: send image/* or application/octet-stream bytes, or {MULTIPART}"
        + (hint if media == "application/x-www-form-urlencoded" else ""),
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 past `limit` bytes: by its declared Content-Length
    before reading, and by the bytes actually read (a length can be absent or lie)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise RequestError(400, f"Content-Length {declared!r} is not a number") from None
        if length > limit:
            raise RequestError(413, f"body of {length / MB:.1f} MB is over the limit of {limit / MB:g} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is over the limit of {limit / MB:g} MB")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise RequestError(400, "empty body: send an image's bytes, or multipart/form-data with files")
    return body


async def parse_multipart(request: Request, body: bytes, max_files: int) -> list[Upload]:
    """The files of a multipart/form-data body already read (so its size was bounded), in order."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files)
    except (MultiPartException, HTTPException, ValueError) as e:  # ValueError: python-multipart's parse errors
        reason = getattr(e, "message", None) or getattr(e, "detail", None) or str(e)
        raise RequestError(400, f"multipart/form-data refused: {reason}") from None
    try:
        files = [v for _, v in form.multi_items() if not isinstance(v, str)]
        if not files:
            raise RequestError(400, "multipart/form-data without files: send each image as a file field")
        return [Upload(f.filename or f"file{i + 1}", await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()


def decode_upload(upload: Upload, source_size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """An uploaded image decoded as the batch job decodes it, after its pixel count is
    checked from the header alone; RequestError (413 too big, 422 not a readable image)."""
    name = f"file {upload.name!r}: " if upload.name else ""
    if not upload.data:
        raise RequestError(400, f"{name}empty file")
    pixels = header_pixels(upload.data)
    if pixels > max_pixels:
        size = "over PIL's own limit" if math.isinf(pixels) else f"of {pixels / 1e6:.0f} megapixels"
        raise RequestError(413, f"{name}image {size} is over the limit of {max_pixels / 1e6:g} megapixels")
    try:
        return decode_image(upload.data, source_size)
    except ValueError as e:
        raise RequestError(422, f"{name}{e}") from None


def header_pixels(data: bytes) -> float:
    """Width x height as the image's header states them, without decoding; infinite
    for what PIL refuses outright as a bomb, 0 for what is not an image (decode_image
    then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width * img.height
    except Image.DecompressionBombError:
        return math.inf
    except (OSError, SyntaxError, ValueError):
        return 0


def top_k_view(row: dict, top_k: int) -> dict:
    """A replica's row as the batch job's columns: predicted_category, confidence, label_i / prob_i."""
    out = {"predicted_category": row["predicted_category"], "confidence": row["confidence"]}
    for j in range(top_k):
        out[f"label_{j + 1}"] = row["labels"][j]
        out[f"prob_{j + 1}"] = row["probs"][j]
    return out


def model_info(saved: SavedModel | OnnxModel, cfg: ServeConfig) -> dict:
    """GET /: what a client needs to know about the model. No paths: the server's
    file layout is none of a client's business."""
    if isinstance(saved, OnnxModel):  # an export carries both in its metadata (export.py)
        train = json.loads(saved.metadata.get("train_config", "{}"))
        metrics = json.loads(saved.metadata.get("metrics", "{}"))
    else:
        train, metrics = saved.train_config, saved.metrics
    kept = ("recipe", "from_scratch", "label_column", *RECIPE_FIELDS)
    return _finite(
        {
            "model": os.path.basename(cfg.model.rstrip("/")),
            "labels": list(saved.labels),
            "input_size": saved.preprocessing.image_size,
            "source_size": list(saved.preprocessing.source_size),
            "recipe": train.get("recipe"),
            "trained_with": {k: train[k] for k in kept if k in train},
            "engine": cfg.engine,
            "test_metrics": metrics.get("test", {}),
            "validation_metrics": metrics.get("val", {}),
            "limits": {
                "max_image_mb": cfg.max_image_mb,
                "max_image_mpx": cfg.max_image_mpx,
                "max_files": cfg.max_files,
                "top_k": len(saved.labels),
            },
            "batching": {"max_batch_size": cfg.max_batch_size, "batch_wait_ms": cfg.batch_wait_ms},
        }
    )


def _finite(value):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# --- the application -----------------------------------------------------------------


def deployment_options(cfg: ServeConfig, gpus: bool) -> dict:
    """Replicas, autoscaling and each replica's resources: one GPU each where there are GPUs."""
    options: dict = {
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, **({"num_gpus": 1} if gpus else {})},
        # Queued in the replica, a request joins the next batch; queued in Serve's proxy (the
        # replicas full), it waits out a retry backoff of 25 ms to 0.5 s. Seen on the busy
        # 2-core machine at concurrency 32: batches of 8 with room for 16 requests, 17
        # requests/s; with room for 64, 28-40 (not side by side: docs/serving.md).
        "max_ongoing_requests": max(cfg.max_ongoing_requests, cfg.max_batch_size),
        "logging_config": {"enable_access_log": cfg.access_log},
    }
    if cfg.max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "initial_replicas": max(1, cfg.min_replicas),
            # A replica is busy once a full batch waits on it.
            "target_ongoing_requests": cfg.max_batch_size,
        }
    else:
        options["num_replicas"] = cfg.num_replicas or 1
    return options


def build_app(cfg: ServeConfig, gpus: bool | None = None) -> serve.Application:
    """The application for `cfg` (validated). gpus: whether replicas take a GPU; default
    --gpu/--cpu, else whether the Ray cluster this process is connected to has GPUs."""
    if gpus is None:
        gpus = cfg.use_gpu if cfg.use_gpu is not None else _cluster_has_gpus()
    values = asdict(cfg)
    values["model"] = os.path.abspath(cfg.model)  # replicas do not share the driver's working directory
    return Classifier.options(**deployment_options(cfg, gpus)).bind(values)  # type: ignore[attr-defined]


def app_builder(args: dict) -> serve.Application:
    """For `serve run fashion_vit.serve:app_builder model=...` and serve_config.yaml's
    `args`: ServeConfig's fields by name (strings are converted as the flags convert them)."""
    from fashion_vit.cli import parse_config

    argv = []
    known = {f.name for f in fields(ServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if name == "use_gpu":
            argv.append("--gpu" if str(value).lower() in ("1", "true", "yes") else "--cpu")
        elif value is not None:
            argv += [flag, str(value)]
    try:
        flags = parse_config(ServeConfig, argv, "app_builder", "")
    except SystemExit:  # argparse has printed why; Serve's build task must get an exception, not an exit
        raise ConfigError(f"invalid application args {args}") from None
    return build_app(ServeConfig(**flags).validate())


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def run(cfg: ServeConfig, log=print) -> str:
    """Start Serve (HTTP on cfg.host:cfg.port) on the Ray this process joins or starts,
    deploy the application and wait until it is ready. Returns its base URL."""
    from fashion_vit.cluster import start_ray

    # Joining a cluster, Serve may already listen on the port here, for this application to share.
    if cfg.address is None and not os.environ.get("RAY_ADDRESS"):
        check_port_free(cfg.host, cfg.port)
    load_model(cfg.model)  # fail fast, before Ray starts, on a bad model file
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log(f"listening on {cfg.host}: the endpoint has no authentication; see docs/serving.md for a gateway")
    start_ray(cfg.address)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
    except Exception as e:  # e.g. the proxy could not bind: Serve raises it from the proxy actor
        raise ServeError(f"Serve did not start: {_last_line(e)}") from None
    host, port = _listening_on(cfg)
    t = time.perf_counter()
    try:
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    except Exception as e:  # a replica that cannot start: Serve gives up after retries
        raise ServeError(f"the application did not start: {_last_line(e)}") from None
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    log(f"serving {cfg.model} at {url} (ready in {time.perf_counter() - t:.1f}s)")
    return url


def check_port_free(host: str, port: int) -> None:
    """ConfigError if host:port cannot be bound, before Ray starts: Serve's proxy would
    fail on it only after Ray's start, with its traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror}): another program holds the port, or it is not an "
            "address of this machine; pick another --port or --host (to join a Ray cluster, give --address)"
        ) from None


def _listening_on(cfg: ServeConfig) -> tuple[str, int]:
    """Where Serve's HTTP proxy listens: the cluster's Serve keeps the options it was first
    started with, so a second app on a running Serve cannot choose its own port."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise ServeError("Serve did not start on this Ray cluster")
    http = client.http_config
    if (http.host, http.port) != (cfg.host, cfg.port):
        raise ConfigError(
            f"Serve already runs on this Ray cluster at {http.host}:{http.port}; "
            f"pass --host {http.host} --port {http.port}, or stop that Serve first (serve shutdown)"
        )
    return http.host, http.port


def _last_line(e: Exception) -> str:
    """The cause's own message: Ray wraps it under a remote traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def stop() -> None:
    """Take the application down, and only it: on a cluster other applications keep
    running, and a local Ray stops with the process that started it."""
    serve.delete(APP_NAME)
