"""Batch inference: a Ray Data job that maps a trained model over image folders (or
s3://, gs:// prefixes) and writes one file of predicted categories, sorted by path.

    list files (driver, streamed into a Parquet manifest)
      -> read + decode (CPU tasks) -> `Predictor` (actor pool, one GPU each where GPUs exist)
      -> Parquet shards (Ray's writer, with Ray Data's job-level checkpoint on the path column)
      -> merged into one sorted CSV or Parquet file (outputs.py), which appears only when complete.

All of it lives in a work folder beside the output (`<output>.partial`) until the
output is complete. A run whose driver was killed is continued with --resume: the
manifest is reused and Ray Data's checkpoint filters out every path whose shard was
committed, so only unfinished work is redone; the merge then gives the same file an
uninterrupted run writes. Without --resume an existing partial run is refused, never mixed in.

`Predictor` needs no Ray: it takes a batch dict and returns one, so tests and the
evaluation stage call it directly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fashion_vit.cluster import cluster_nodes, describe, placeable, start_ray
from fashion_vit.config import ConfigError, FashionVitError, PredictConfig, is_onnx
from fashion_vit.engines import create_forward
from fashion_vit.export import OnnxModel, read_onnx, to_onnx_model
from fashion_vit.files import atomic_open, read_bytes, walk_files
from fashion_vit.model import SavedModel, load_checkpoint
from fashion_vit.outputs import columns, merge_shards, output_format
from fashion_vit.progress import Progress
from fashion_vit.transforms import IMAGE_EXTENSIONS, decode_images, preprocess

# A block is the unit of decoding, of writing and of Ray Data's checkpoint commit: at
# most this many bytes of decoded images, and between the two row counts (fewer rows
# cost per-block overhead; more make a resume redo more).
BLOCK_BYTES = 32 * 1024**2
BLOCK_ROWS = (256, 4096)
MANIFEST_ROWS = 50_000  # paths per manifest file while listing
# Logical CPUs the stages ask Ray for. On resume Ray Data adds a checkpoint-filter actor
# that takes a whole CPU, and its file listing task takes another, neither of which can
# be configured: with whole CPUs everywhere a 2-CPU machine would have none left and wait
# forever (seen). So the light stages (manifest reads, shard writes) ask for a quarter,
# and on CPU-only clusters the decode+predict actor asks for none: it sizes its torch
# threads to the node itself, so the number is bookkeeping, not a limit.
LIGHT_CPUS = 0.25
CPU_PREDICTOR_CPUS = 0


class PredictError(FashionVitError):
    """Batch inference could not produce its output."""


@dataclass
class PredictOutcome:
    output: str
    predicted: int  # rows with a prediction
    failed: int  # rows with an error instead
    ignored: int  # files skipped as not images (by extension)
    seconds: float
    done_before: int = 0  # files an interrupted run had finished (--resume)
    ignored_list: str | None = None  # where the ignored files are listed
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        rate = (self.predicted + self.failed - self.done_before) / self.seconds if self.seconds else 0.0
        lines = [f"predicted {self.predicted} images -> {self.output}"]
        if self.failed:
            lines.append(
                f"{self.failed} files failed (not readable as images): in the same file, with the reason in the error column"
            )
        if self.ignored:
            lines.append(
                f"{self.ignored} files ignored (not image files by their extension): listed in {self.ignored_list}"
            )
        if self.done_before:
            lines.append(
                f"resumed: {self.done_before} files were done by the interrupted run, {self.predicted + self.failed - self.done_before} now"
            )
        lines.append(f"{rate:.1f} images/s over {self.seconds:.1f}s")
        return "\n".join(lines)


class Predictor:
    """Loads the model once; each call adds predictions to a batch of decoded images.

    In: {"image": uint8 (B, H, W, 3), optional "error": str (B,), other columns passed through}.
    Out: the same columns minus image, plus predicted_category, confidence and, with
    top_k, label_i / prob_i. Rows with an error get an empty prediction.
    """

    def __init__(
        self,
        model,
        top_k: int = 0,
        threads: int | None = None,
        bf16: bool = True,
        progress=None,
        engine: str = "torch",
    ):
        """model: a SavedModel or an exported OnnxModel, a path load_model takes, or a Ray
        ObjectRef of either (the driver puts it in the object store once for all actors).
        engine: torch, compile or onnx (engines.py); an OnnxModel runs only with onnx.
        progress: a Counter actor told how many rows each call finished, or None."""
        if isinstance(model, str):
            model = load_model(model)
        elif not isinstance(model, SavedModel | OnnxModel):
            import ray

            model = ray.get(model)
        self.prep = model.preprocessing
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Ray pins actors to 1 thread (OMP_NUM_THREADS); a CPU predictor wants the node.
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.bf16 = bf16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        source = model.data if isinstance(model, OnnxModel) else model
        self.forward = create_forward(source, engine, self.device, threads or os.cpu_count(), self.bf16)
        self.engine = engine
        self.labels = np.array(model.labels, dtype=object)
        self.top_k = min(top_k, len(self.labels))
        self.progress = progress

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
            probs = self.forward(preprocess(x, self.prep)).float().softmax(dim=1)
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
        if self.progress is not None:
            self.progress.add.remote(n)  # fire and forget: the driver's progress line polls it
        return batch


def load_model(path: str) -> SavedModel | OnnxModel:
    """A model.onnx from jobs/export.py, else what load_checkpoint takes (vit_model.pth,
    a Hugging Face folder)."""
    return read_onnx(path) if is_onnx(path) else load_checkpoint(path)


def run(cfg: PredictConfig, log=print) -> PredictOutcome:
    """The whole `jobs/batch_predict.py`."""
    t0 = time.perf_counter()
    timings = {}
    assert cfg.engine is not None, "PredictConfig.validate() settles the engine"
    saved = load_model(cfg.model)  # fail fast, before Ray starts, on a bad model file
    work = open_work(cfg)
    if cfg.engine == "onnx" and isinstance(saved, SavedModel):
        t = time.perf_counter()
        log("exporting the model to ONNX in memory (jobs/export.py writes it once, for every run) ...")
        saved = to_onnx_model(saved, cfg.model)
        timings["export_s"] = time.perf_counter() - t
    listing = work.listing()
    if listing is None:
        t = time.perf_counter()
        log(f"listing {', '.join(cfg.inputs)} ...")
        listing = list_to_manifest(cfg.inputs, work)
        timings["listing_s"] = time.perf_counter() - t
    if listing["found"] == 0:
        work.remove()
        raise PredictError(f"no image files under {', '.join(cfg.inputs)} ({listing['ignored']} other files ignored)")
    log(f"{listing['found']} image files, {listing['ignored']} other files ignored")

    t = time.perf_counter()
    start_ray(cfg.address)
    check_actors_fit(cfg.num_actors, cluster_nodes())
    timings["ray_start_s"] = time.perf_counter() - t
    done_before = work.committed_rows()
    if done_before:
        log(f"resuming: {done_before} of {listing['found']} files were done by the interrupted run")

    t = time.perf_counter()
    counter = make_counter()
    count = lambda: _ray_get(counter.value.remote())
    with Progress(count, listing["found"], before=done_before, quiet=cfg.quiet) as progress:
        predict_to_shards(work, saved, cfg, counter, cfg.engine)
    timings["predict_s"] = time.perf_counter() - t
    if progress.first_done_at is not None:
        timings["first_prediction_s"] = t - t0 + progress.first_done_at  # from the job's start
        timings["predict_first_s"] = progress.first_done_at  # from the predict phase's start

    t = time.perf_counter()
    shards = work.shard_files()
    written = work.rows_in(shards)
    if written != listing["found"]:
        # Shards written on another node's local disk never reach this one.
        raise PredictError(
            f"{listing['found'] - written} of {listing['found']} predictions are missing from {work.root}: "
            "on a multi-node cluster the output's folder must be storage every node can write (or pass --work-dir)"
        )
    rows, failed = merge_shards(shards, work.path("runs"), cfg.output, columns(cfg.top_k))
    timings["merge_s"] = time.perf_counter() - t
    ignored_list = work.keep_ignored_list(cfg.output) if listing["ignored"] else None
    work.remove()
    return PredictOutcome(
        cfg.output,
        rows - failed,
        failed,
        listing["ignored"],
        time.perf_counter() - t0,
        done_before,
        ignored_list,
        timings,
    )


# --- the work folder ----------------------------------------------------------------


@dataclass
class WorkDir:
    """<output>.partial: what a run keeps until its output is complete.

    job.json (what the run is: inputs, model, columns), manifest/ and listing.json (the
    paths found, written once), shards/ and checkpoint/ (Ray Data's), runs/ (the merge's)."""

    root: str

    def path(self, *names: str) -> str:
        return os.path.join(self.root, *names)

    def listing(self) -> dict | None:
        """The finished listing's counts, or None if the listing never finished."""
        try:
            with open(self.path("listing.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def committed_rows(self) -> int:
        """Rows whose shard Ray Data committed: what a resumed run will not redo."""
        folder = self.path("checkpoint")
        if not os.path.isdir(folder):
            return 0
        names = [n for n in os.listdir(folder) if n.endswith(".parquet") and ".pending" not in n]
        return self.rows_in([os.path.join(folder, n) for n in names])

    @staticmethod
    def rows_in(files: list[str]) -> int:
        """Rows in Parquet files, from their footers."""
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    def shard_files(self) -> list[str]:
        folder = self.path("shards")
        if not os.path.isdir(folder):
            return []
        return [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".parquet")]

    def keep_ignored_list(self, output: str) -> str:
        target = output.rstrip("/" + os.sep) + ".ignored.txt"
        os.replace(self.path("ignored.txt"), target)
        return target

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


JOB_VERSION = 1


def open_work(cfg: PredictConfig) -> WorkDir:
    """The run's work folder: a new one, or with --resume the interrupted run's, which
    must be the same job (inputs, model, engine, columns). An existing one without
    --resume is refused: a partial run is never mixed in silently."""
    work = WorkDir(cfg.work_dir or cfg.output.rstrip("/" + os.sep) + ".partial")
    job = {
        "version": JOB_VERSION,
        "inputs": list(cfg.inputs),
        "model": os.path.abspath(cfg.model),
        "model_size": _size(cfg.model),
        "top_k": cfg.top_k,
        "output_format": output_format(cfg.output),
        "engine": cfg.engine,
    }
    if os.path.exists(work.path("job.json")):
        with open(work.path("job.json")) as f:
            previous = json.load(f)
        if not cfg.resume:
            done = work.committed_rows()
            raise ConfigError(
                f"{work.root} holds an unfinished run for --output {cfg.output!r} ({done} files done): "
                "pass --resume to continue it, or delete that folder to start over"
            )
        previous.setdefault("engine", "torch")  # the only engine before it was recorded
        if previous["engine"] != cfg.engine:
            # No two engines give bit-identical probabilities, so a mixed output would
            # depend on where the interruption fell.
            raise ConfigError(
                f"--resume: {work.root} was started with --engine {previous['engine']}, whose predictions differ "
                f"in the last bits from --engine {cfg.engine}'s: resume with --engine {previous['engine']}, "
                "or delete that folder to start over"
            )
        changed = [k for k in job if previous.get(k) != job[k]]
        if changed:
            raise ConfigError(
                f"--resume: {work.root} is a run with other {', '.join(changed)} "
                f"({', '.join(f'{k}={previous.get(k)!r}' for k in changed)}); delete it to start over"
            )
        return work
    os.makedirs(work.root, exist_ok=True)
    with atomic_open(work.path("job.json")) as f:
        json.dump(job, f, indent=2)
    return work


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)
    return os.path.getsize(path)


# --- listing -------------------------------------------------------------------------


def input_roots(inputs: list[str]) -> list[str]:
    """The inputs without repeats and without any that lies inside another, so that
    every file is listed once."""
    from fashion_vit.files import absolute

    keys = {root: absolute(root).rstrip("/") + "/" for root in inputs}
    roots = []
    for root in inputs:
        key = keys[root]
        inside = any(other != root and key.startswith(keys[other]) and key != keys[other] for other in inputs)
        if not inside and key not in {keys[r] for r in roots}:
            roots.append(root)
    return roots


def list_images(inputs: list[str]):
    """Yield (path, is_image) for every file under `inputs`, recursively; an image is a
    file with an image extension, in any case. Raises PredictError for a missing input."""
    for root in input_roots(inputs):
        try:
            for path in walk_files(root):
                yield path, os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
        except FileNotFoundError:
            raise PredictError(f"input {root!r} is not a folder") from None


def list_to_manifest(inputs: list[str], work: WorkDir) -> dict:
    """Stream the listing into manifest/part-*.parquet (the paths to predict) and
    ignored.txt, never holding more than MANIFEST_ROWS paths; returns the counts, also
    written to listing.json, which marks the listing complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = work.path("manifest")
    shutil.rmtree(manifest, ignore_errors=True)  # an interrupted listing starts over
    os.makedirs(manifest)
    found = ignored = part = 0
    batch: list[str] = []

    def flush():
        nonlocal part
        if batch:
            pq.write_table(
                pa.table({"path": pa.array(batch, pa.string())}), os.path.join(manifest, f"part-{part:05d}.parquet")
            )
            part += 1
            batch.clear()

    with open(work.path("ignored.txt"), "w") as skipped:
        for path, is_image in list_images(inputs):
            if is_image:
                batch.append(path)
                found += 1
                if len(batch) >= MANIFEST_ROWS:
                    flush()
            else:
                skipped.write(path + "\n")
                ignored += 1
        flush()
    counts = {"found": found, "ignored": ignored}
    with atomic_open(work.path("listing.json")) as f:
        json.dump(counts, f)
    return counts


# --- the Ray Data job ----------------------------------------------------------------


def read_and_decode(batch: dict, source_size: tuple[int, int]) -> dict:
    """Ray Data task: read each path's bytes and decode; a failure becomes the row's error."""
    paths = np.asarray(batch["path"], dtype=object)
    images, errors = decode_images(paths, source_size, read=read_bytes)
    return {"path": paths, "image": images, "error": errors}


def predict_to_shards(work: WorkDir, saved: SavedModel | OnnxModel, cfg: PredictConfig, counter, engine: str) -> None:
    """manifest -> decode -> Predictor -> shards/, with Ray Data's job-level checkpoint
    keyed on the path: on a rerun, paths whose shard was committed are filtered out
    right after the read, and a shard whose commit was cut short is deleted and redone."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    context = ray.data.DataContext.get_current()
    previous = context.checkpoint_config
    # Rows in any order: the merge sorts them, and not waiting for stragglers is faster.
    context.execution_options.preserve_order = False
    context.checkpoint_config = CheckpointConfig(
        id_column="path", checkpoint_path=os.path.abspath(work.path("checkpoint")), delete_checkpoint_on_success=False
    )
    try:
        gpus = sum(n.gpus for n in cluster_nodes()) > 0
        ds = ray.data.read_parquet(os.path.abspath(work.path("manifest")), num_cpus=LIGHT_CPUS)
        # The read makes one block per manifest file; a shard is committed per block.
        rows = block_rows(saved.preprocessing.source_size)
        ds = ds.repartition(target_num_rows_per_block=rows)
        ds = ds.map_batches(
            read_and_decode,
            fn_kwargs={"source_size": saved.preprocessing.source_size},
            batch_size=rows,
            # On CPUs the same resources as the predictor, so Ray fuses decoding into its
            # actor (measured: as fast as separate decode tasks on 2 cores, 1117 against
            # 1024 images/s); on GPUs whole-CPU tasks, kept apart from the GPU actors.
            num_cpus=1 if gpus else CPU_PREDICTOR_CPUS,
        )
        ds = add_predictions(
            ds, saved, cfg.batch_size, cfg.top_k, cfg.threads, cfg.num_actors, progress=counter, engine=engine
        )
        ds.write_parquet(os.path.abspath(work.path("shards")), ray_remote_args={"num_cpus": LIGHT_CPUS})
    finally:
        context.checkpoint_config = previous


def block_rows(source_size: tuple[int, int]) -> int:
    """Rows per block for images decoded at source_size (BLOCK_BYTES, within BLOCK_ROWS)."""
    h, w = source_size
    return int(min(max(BLOCK_BYTES // (h * w * 3), BLOCK_ROWS[0]), BLOCK_ROWS[1]))


def add_predictions(
    ds,
    saved: SavedModel | OnnxModel,
    batch_size: int,
    top_k: int = 0,
    threads: int | None = None,
    num_actors: int | None = None,
    progress=None,
    engine: str = "torch",
):
    """Map `Predictor` over a dataset with a decoded `image` column, on an actor pool:
    one GPU per actor where the cluster has GPUs, CPU actors otherwise."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = int(ray.cluster_resources().get("GPU", 0))
    # No CPU reserved beside the GPU: its host-side work is a thread's worth, and with
    # Ray Data's default of one CPU per GPU actor, a node with as many GPUs as CPUs had
    # none left for decoding and waited forever (seen with 2 GPUs on 2 CPUs).
    resources = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": CPU_PREDICTOR_CPUS}
    return ds.map_batches(
        Predictor,
        # One copy in the object store for all actors, not one pickled per actor.
        fn_constructor_kwargs={
            "model": ray.put(saved),
            "top_k": top_k,
            "threads": threads,
            "progress": progress,
            "engine": engine,
        },
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=num_actors or max(1, gpus)),
        **resources,
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


def make_counter():
    """A tiny actor the predictors tell how many rows they finished."""
    import ray

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, n: int) -> None:
            self.n += n

        def value(self) -> int:
            return self.n

    return Counter.remote()


def _ray_get(ref):
    import ray

    return ray.get(ref, timeout=10)
