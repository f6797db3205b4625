"""Batch inference: a Ray Data pipeline that maps a trained model over image folders
and writes one CSV of predicted categories.

list files (driver) -> read + decode (CPU tasks) -> `Predictor` (actor pool, one GPU
each where GPUs exist) -> rows streamed back in path order into one CSV that appears
only when complete.

`Predictor` needs no Ray: it takes a batch dict and returns one, so tests and the
tune driver's test scoring call it directly.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from fashion_vit.cluster import cluster_nodes, describe, placeable, start_ray
from fashion_vit.config import ConfigError, FashionVitError, PredictConfig
from fashion_vit.files import atomic_open, filesystem, is_uri, read_bytes
from fashion_vit.model import SavedModel, load_checkpoint
from fashion_vit.transforms import decode_images, preprocess

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PATHS_PER_BLOCK = 512  # rows per read/decode task: small enough to spread, big enough to amortise


class PredictError(FashionVitError):
    """Batch inference could not produce its CSV."""


@dataclass
class PredictOutcome:
    output: str
    predicted: int
    failed: int
    ignored: int
    seconds: float

    def summary(self) -> str:
        rate = self.predicted / self.seconds if self.seconds else 0.0
        return (
            f"predicted {self.predicted} images, {self.failed} files failed, "
            f"{self.ignored} files ignored, {rate:.1f} images/s -> {self.output}"
        )


class Predictor:
    """Loads the model once; each call adds predictions to a batch of decoded images.

    In: {"image": uint8 (B, H, W, 3), optional "error": str (B,), other columns passed through}.
    Out: the same columns minus image, plus predicted_category, confidence and, with
    top_k, label_i / prob_i. Rows with an error get an empty prediction.
    """

    def __init__(self, model, top_k: int = 0, threads: int | None = None, bf16: bool = True):
        """model: a SavedModel, a path load_checkpoint takes, or a Ray ObjectRef of a
        SavedModel (the driver puts it in the object store once for all actors)."""
        if isinstance(model, str):
            model = load_checkpoint(model)
        elif not isinstance(model, SavedModel):
            import ray

            model = ray.get(model)
        self.model, self.prep = model.build()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Ray pins actors to 1 thread (OMP_NUM_THREADS); a CPU predictor wants the node.
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.model.to(self.device)
        self.bf16 = bf16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.labels = np.array(model.labels, dtype=object)
        self.top_k = min(top_k, len(self.labels))

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        images = batch.pop("image")
        n = len(images)
        errors = batch.get("error")
        ok = np.ones(n, bool) if errors is None else (np.asarray(errors) == "")
        categories = np.full(n, "", dtype=object)
        confidence = np.full(n, np.nan)
        top_labels = np.full((n, self.top_k), "", dtype=object)
        top_probs = np.full((n, self.top_k), np.nan)
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(images[ok])).to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(pixel_values=preprocess(x, self.prep)).logits
            probs = logits.float().softmax(dim=1)
            k = max(1, self.top_k)
            p, idx = probs.topk(k, dim=1)
            p, idx = p.cpu().numpy(), idx.cpu().numpy()
            categories[ok] = self.labels[idx[:, 0]]
            confidence[ok] = p[:, 0]
            top_labels[ok] = self.labels[idx[:, : self.top_k]]
            top_probs[ok] = p[:, : self.top_k]
        batch["predicted_category"] = categories
        batch["confidence"] = confidence
        for j in range(self.top_k):
            batch[f"label_{j + 1}"] = top_labels[:, j]
            batch[f"prob_{j + 1}"] = top_probs[:, j]
        return batch


def list_images(inputs: list[str]) -> tuple[list[str], int]:
    """Image paths under `inputs` (recursive, by extension in any case), sorted, and the
    number of other files ignored. Works for local folders and pyarrow URIs (s3://, gs://)."""
    import pyarrow.fs as pafs

    paths, ignored = [], 0
    for root in inputs:
        if is_uri(root):
            fs, base = filesystem(root)
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            scheme = root.split("://", 1)[0]
            found = [f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File]
        else:
            if not os.path.isdir(root):
                raise PredictError(f"input {root!r} is not a folder")
            found = [os.path.join(d, name) for d, _, names in os.walk(root) for name in names]
        for p in found:
            if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS:
                paths.append(p)
            else:
                ignored += 1
    return sorted(set(paths)), ignored


def read_and_decode(batch: dict, source_size: tuple[int, int]) -> dict:
    """Ray Data task: read each path's bytes and decode; a failure becomes the row's error."""
    paths = np.asarray(batch["path"], dtype=object)
    images, errors = decode_images(paths, source_size, read=read_bytes)
    return {"path": paths, "image": images, "error": errors}


def run(cfg: PredictConfig, log=print) -> PredictOutcome:
    """The whole `jobs/batch_predict.py`."""
    t0 = time.perf_counter()
    saved = load_checkpoint(cfg.model)  # fail fast, before Ray starts, on a bad model file
    paths, ignored = list_images(cfg.inputs)
    if not paths:
        raise PredictError(f"no image files under {', '.join(cfg.inputs)} ({ignored} other files ignored)")
    log(f"{len(paths)} image files, {ignored} other files ignored")

    start_ray(cfg.address)
    check_actors_fit(cfg.num_actors, cluster_nodes())
    ds = predict_dataset(paths_dataset(paths), saved, cfg)
    columns = ["path", "predicted_category", "confidence", "error"]
    columns += [c for j in range(1, cfg.top_k + 1) for c in (f"label_{j}", f"prob_{j}")]
    predicted, failed = _write_csv(ds, cfg.output, columns)
    return PredictOutcome(cfg.output, predicted, failed, ignored, time.perf_counter() - t0)


def check_actors_fit(num_actors: int | None, nodes) -> None:
    """--num-actors must fit the cluster (one GPU, else one CPU, per actor): Ray Data
    would otherwise wait for actors that can never start."""
    if num_actors is None:
        return
    gpus = sum(n.gpus for n in nodes) > 0
    fit = placeable(nodes, cpus=0 if gpus else 1, gpus=1 if gpus else 0)
    if num_actors > fit:
        unit = "GPU" if gpus else "CPU"
        raise ConfigError(
            f"--num-actors {num_actors} asks for {num_actors} {unit}s, but the cluster holds {fit} ({describe(nodes)})"
        )


def paths_dataset(paths: list[str]):
    import pandas as pd
    import ray

    chunks = [paths[i : i + PATHS_PER_BLOCK] for i in range(0, len(paths), PATHS_PER_BLOCK)]
    return ray.data.from_pandas([pd.DataFrame({"path": c}) for c in chunks])


def predict_dataset(ds, saved: SavedModel, cfg: PredictConfig):
    """Add decode and prediction stages to a dataset of paths."""
    import ray

    # Output rows in input (path) order, so the CSV streams out already sorted.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ds.map_batches(
        read_and_decode, fn_kwargs={"source_size": saved.preprocessing.source_size}, batch_size=PATHS_PER_BLOCK
    )
    return add_predictions(ds, saved, cfg.batch_size, cfg.top_k, cfg.threads, cfg.num_actors)


def add_predictions(
    ds, saved: SavedModel, batch_size: int, top_k: int = 0, threads: int | None = None, num_actors: int | None = None
):
    """Map `Predictor` over a dataset with a decoded `image` column, on an actor pool:
    one GPU per actor where the cluster has GPUs, CPU actors otherwise."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = int(ray.cluster_resources().get("GPU", 0))
    return ds.map_batches(
        Predictor,
        # One copy in the object store for all actors, not one pickled per actor.
        fn_constructor_kwargs={"model": ray.put(saved), "top_k": top_k, "threads": threads},
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=num_actors or max(1, gpus)),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
    )


def predict_labelled(saved: SavedModel, ds) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) label indices over a dataset with columns image and label."""
    out = add_predictions(ds, saved, batch_size=256)
    label_index = {name: i for i, name in enumerate(saved.labels)}
    y_true, y_pred = [], []
    for batch in out.iter_batches(batch_size=4096, batch_format="numpy"):
        y_true.append(batch["label"])
        y_pred.append([label_index[c] for c in batch["predicted_category"]])
    return np.concatenate(y_true).astype(np.int64), np.concatenate(y_pred).astype(np.int64)


def _write_csv(ds, output: str, columns: list[str]) -> tuple[int, int]:
    """Stream rows into a temp file beside `output`, then rename: a crash leaves no
    half file under the real name, and an existing output survives until replaced."""
    predicted = failed = 0
    try:
        with atomic_open(output, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                errors = batch["error"]
                failed += int(np.sum(errors != ""))
                predicted += int(np.sum(errors == ""))
                writer.writerows(zip(*(_csv_column(batch[c]) for c in columns), strict=False))
    except OSError as e:
        raise PredictError(f"cannot write {output!r}: {e.strerror or e}") from None
    return predicted, failed


def _csv_column(values: np.ndarray) -> list:
    if values.dtype.kind == "f":
        return ["" if np.isnan(v) else f"{v:.6f}" for v in values]
    return [str(v) for v in values]
