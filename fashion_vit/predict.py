"""Batch inference: a Ray Data job that maps a trained model over the rows of a table of
paths (--input-table) and over image folders (or s3://, gs:// prefixes), and writes one
file of predicted categories: the table's rows in its order, then the folders' files
sorted by path.

    list rows and files (driver, streamed into a Parquet manifest of (_key, path))
      -> read + decode (CPU tasks) -> `Predictor` (actor pool, one GPU each where GPUs exist)
      -> Parquet shards (Ray's writer, with Ray Data's job-level checkpoint on the _key column)
      -> merged into one CSV or Parquet file sorted by _key, with the table's --keep-columns
         joined back (outputs.py); it appears only when complete.

`_key` is one per output row: "0:<row number>" for a table row (zero-padded, so keys sort
in the table's order, and a path listed twice is two rows), "1:<path>" for a file found
in a folder. All of it lives in a work folder beside the output (`<output>.partial`)
until the output is complete. A run whose driver was killed is continued with --resume:
the manifest is reused and Ray Data's checkpoint filters out every key whose shard was
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

from fashion_vit.cluster import cluster_nodes, describe, placeable, start_ray, warn_if_not_shared
from fashion_vit.config import ConfigError, FashionVitError, PredictConfig, is_onnx
from fashion_vit.engines import create_forward
from fashion_vit.export import OnnxModel, read_onnx, to_onnx_model
from fashion_vit.files import absolute, atomic_open, filesystem, is_image_name, parent, read_bytes, resolve, walk_files
from fashion_vit.model import SavedModel, load_checkpoint
from fashion_vit.outputs import Kept, columns, merge_shards, output_format
from fashion_vit.preemption import Preempted, Sigterm, on_sigterm, raise_preempted
from fashion_vit.progress import Progress
from fashion_vit.tables import TableError, iter_table
from fashion_vit.transforms import decode_images, preprocess

# The manifest's row key (see the module's docstring): table rows sort before files.
KEY = "_key"
TABLE_KEY, FILE_KEY = "0:", "1:"
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
# and on CPU-only clusters the decode+predict actor asks for a sliver: it sizes its
# torch threads to the node itself, so the number is bookkeeping, not a limit; but not
# none, or Ray places it (and restarts it, when its node is lost) on a node whose CPUs
# are all taken as readily as on a free one (seen in tests/test_nodes.py). On a single
# node there is nowhere else to go, and the sliver made the job wait forever beside a
# Serve replica holding one of 2 CPUs (seen in tests/test_serve.py): none there. (Scoring the test split after training keeps none: a trial's CPUs may not be given
# back yet, see docs/cluster.md, two Ray instances.)
LIGHT_CPUS = 0.25
CPU_PREDICTOR_CPUS = 0.01  # on clusters of several nodes; 0 on one


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
    redone: int = 0  # predictions made again: the batches a lost actor or node had in hand

    def summary(self) -> str:
        rate = (self.predicted + self.failed - self.done_before) / self.seconds if self.seconds else 0.0
        lines = [f"predicted {self.predicted} images -> {self.output}"]
        if self.failed:
            lines.append(
                f"{self.failed} files failed (missing, unreadable or not images): in the same file, with the reason in the error column"
            )
        if self.ignored:
            lines.append(
                f"{self.ignored} files ignored (not image files by their extension): listed in {self.ignored_list}"
            )
        if self.done_before:
            lines.append(
                f"resumed: {self.done_before} files were done by the interrupted run, {self.predicted + self.failed - self.done_before} now"
            )
        if self.redone:
            lines.append(f"{self.redone} predictions were made again (work a lost actor or node had in hand)")
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
        categories: np.ndarray = np.full(n, "", dtype=object)
        confidence = np.full(n, np.nan)
        top_labels: np.ndarray = np.full((n, self.top_k), "", dtype=object)
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
    """The whole `jobs/batch_predict.py`. SIGTERM stops it at once: every block whose
    shard was written is already committed (Ray Data commits each as it writes it),
    and Preempted says how many files are done and carries the flags that continue it."""
    t0 = time.perf_counter()
    assert cfg.engine is not None, "PredictConfig.validate() settles the engine"
    saved = load_model(cfg.model)  # fail fast, before Ray starts, on a bad model file
    work = open_work(cfg)
    try:
        with on_sigterm(raise_preempted):
            return _run(cfg, saved, work, t0, log)
    except (Preempted, Sigterm) as e:
        found = (work.listing() or {}).get("found")
        if found is None:
            done = f"the listing of the inputs was not finished ({work.root})"
        else:
            done = f"{work.committed_rows()} of {found} files done and committed in {work.root}"
        raise Preempted(f"{e}: {done}", ["--resume"]) from None


def _run(cfg: PredictConfig, saved: SavedModel | OnnxModel, work: WorkDir, t0: float, log) -> PredictOutcome:
    timings = {}
    if cfg.engine == "onnx" and isinstance(saved, SavedModel):
        t = time.perf_counter()
        log("exporting the model to ONNX in memory (jobs/export.py writes it once, for every run) ...")
        saved = to_onnx_model(saved, cfg.model)
        timings["export_s"] = time.perf_counter() - t
    listing = work.listing()
    if listing is None:
        t = time.perf_counter()
        log(f"listing {', '.join(filter(None, [cfg.input_table, *cfg.inputs]))} ...")
        listing = list_or_clean_up(cfg, work)
        timings["listing_s"] = time.perf_counter() - t
    if listing["found"] == 0:
        work.remove()
        found = [f"no rows in the table {cfg.input_table}"] if cfg.input_table else []
        if cfg.inputs:
            found.append(f"no image files under {', '.join(cfg.inputs)} ({listing['ignored']} other files ignored)")
        raise PredictError(" and ".join(found))
    from_table = f" ({listing['table_rows']} table rows)" if listing.get("table_rows") else ""
    log(f"{listing['found']} image files{from_table}, {listing['ignored']} other files ignored")

    t = time.perf_counter()
    start_ray(cfg.address)
    check_actors_fit(cfg.num_actors, cluster_nodes())
    # The shards and Ray Data's checkpoint must outlive any one node, and every node reads the inputs.
    warn_if_not_shared(
        write=[("--work-dir" if cfg.work_dir else "--output", work.root)],
        read=[("--input", path) for path in cfg.inputs] + [("--input-table", cfg.input_table or "")],
    )
    timings["ray_start_s"] = time.perf_counter() - t
    done_before = work.committed_rows()
    if done_before:
        log(f"resuming: {done_before} of {listing['found']} files were done by the interrupted run")

    t = time.perf_counter()
    counter = make_counter()
    count = lambda: _ray_get(counter.value.remote())
    with Progress(count, listing["found"], before=done_before, quiet=cfg.quiet) as progress:
        predict_to_shards(work, saved, cfg, counter)
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
    kept = Kept(sorted(work.kept_files()), TABLE_KEY) if cfg.keep_columns else None
    rows, failed = merge_shards(shards, work.path("runs"), cfg.output, columns(cfg.top_k), KEY, kept)
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
        redone=max(0, _predicted_rows(counter) - (written - done_before)),
    )


# --- the work folder ----------------------------------------------------------------


@dataclass
class WorkDir:
    """<output>.partial: what a run keeps until its output is complete.

    job.json (what the run is: inputs, table, model, columns), manifest/, kept/ (the
    table's --keep-columns, in its order) and listing.json (written once, when the listing
    is complete), shards/ and checkpoint/ (Ray Data's), runs/ (the merge's)."""

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

    def kept_files(self) -> list[str]:
        folder = self.path("kept")
        return [os.path.join(folder, n) for n in os.listdir(folder)] if os.path.isdir(folder) else []

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


JOB_VERSION = 2  # 2: the manifest is keyed by _key, and a job may have an input table


def open_work(cfg: PredictConfig) -> WorkDir:
    """The run's work folder: a new one, or with --resume the interrupted run's, which
    must be the same job (inputs, table and its columns, model, engine, output columns).
    An existing one without --resume is refused: a partial run is never mixed in silently."""
    work = WorkDir(cfg.work_dir or cfg.output.rstrip("/" + os.sep) + ".partial")
    job = {
        "version": JOB_VERSION,
        "inputs": list(cfg.inputs),
        "input_table": _table_job(cfg),
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


def _table_job(cfg: PredictConfig) -> dict | None:
    """What a resume must find unchanged about --input-table: where it is, the columns
    read, and its size and modification time (a changed table would renumber its rows)."""
    import pyarrow.fs as pafs

    if cfg.input_table is None:
        return None
    fs, inner = filesystem(cfg.input_table)
    info = fs.get_file_info(inner)
    infos = (
        [info] if info.type != pafs.FileType.Directory else fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    )
    return {
        "table": absolute(cfg.input_table),
        "path_column": cfg.path_column,
        "keep_columns": list(cfg.keep_columns),
        "bytes": sum(i.size or 0 for i in infos),
        "modified": max((str(i.mtime) for i in infos), default=None),
    }


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
    roots: list[str] = []
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
                yield path, is_image_name(path)
        except FileNotFoundError:
            raise PredictError(f"input {root!r} is not a folder") from None


def list_or_clean_up(cfg: PredictConfig, work: WorkDir) -> dict:
    """list_to_manifest; where it fails, the work folder goes too. Nothing in it can be
    resumed (no row is predicted before the listing ends), and left behind it would
    refuse the next run until deleted by hand. A SIGTERM keeps it, as it says."""
    try:
        return list_to_manifest(cfg, work)
    except (Preempted, Sigterm):
        raise
    except Exception:
        work.remove()
        raise


def list_to_manifest(cfg: PredictConfig, work: WorkDir) -> dict:
    """Stream the table's rows, then the folders' files, into manifest/part-*.parquet
    (_key, path: what to predict) and the table's kept columns into kept/part-*.parquet
    (in the table's order), never holding more than MANIFEST_ROWS rows; files without an
    image extension go to ignored.txt. Returns the counts, also written to listing.json,
    which marks the listing complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for folder in ("manifest", "kept"):
        shutil.rmtree(work.path(folder), ignore_errors=True)  # an interrupted listing starts over
        os.makedirs(work.path(folder))
    parts = iter(range(1 << 62))

    def write(keys: list[str], paths: list[str], kept=None) -> None:
        part = f"part-{next(parts):05d}.parquet"
        pq.write_table(pa.table({KEY: pa.array(keys, pa.string()), "path": pa.array(paths, pa.string())}),
                       work.path("manifest", part))  # fmt: skip
        if kept is not None:
            pq.write_table(kept, work.path("kept", part))

    table_rows = list_table(cfg, write) if cfg.input_table else 0
    found = ignored = 0
    batch: list[str] = []
    with open(work.path("ignored.txt"), "w") as skipped:
        for path, is_image in list_images(cfg.inputs):
            if not is_image:
                skipped.write(path + "\n")
                ignored += 1
                continue
            batch.append(path)
            found += 1
            if len(batch) >= MANIFEST_ROWS:
                write([FILE_KEY + p for p in batch], batch)
                batch.clear()
        if batch:
            write([FILE_KEY + p for p in batch], batch)
    counts = {"found": table_rows + found, "ignored": ignored, "table_rows": table_rows}
    with atomic_open(work.path("listing.json")) as f:
        json.dump(counts, f)
    return counts


def list_table(cfg: PredictConfig, write) -> int:
    """Each row of --input-table, in order, as (key, path) with its kept columns; a
    relative path is taken from the table's folder, an empty one stays empty (its row
    gets an error). Returns the number of rows."""
    import pyarrow as pa

    assert cfg.input_table is not None
    folder = parent(absolute(cfg.input_table))
    wanted = list(dict.fromkeys([cfg.path_column, *cfg.keep_columns]))
    n = 0
    try:
        for batch in iter_table(cfg.input_table, wanted, MANIFEST_ROWS):
            refs = [("" if v is None else str(v).strip()) for v in batch.column(cfg.path_column).to_pylist()]
            paths = [resolve(r, folder) if r else "" for r in refs]
            keys = [f"{TABLE_KEY}{i:012d}" for i in range(n, n + len(paths))]
            kept = pa.Table.from_batches([batch]).select(cfg.keep_columns) if cfg.keep_columns else None
            write(keys, paths, kept)
            n += len(paths)
    except TableError as e:
        raise PredictError(str(e)) from None
    return n


# --- the Ray Data job ----------------------------------------------------------------


def read_and_decode(batch: dict, source_size: tuple[int, int]) -> dict:
    """Ray Data task: read each path's bytes and decode; a failure becomes the row's error."""
    paths = np.asarray(batch["path"], dtype=object)
    images, errors = decode_images(paths, source_size, read=read_listed)
    return {**batch, "path": paths, "image": images, "error": errors}


def read_listed(path: str) -> bytes:
    if not path:
        raise ValueError("no path in the table")
    return read_bytes(path)


def predict_to_shards(work: WorkDir, saved: SavedModel | OnnxModel, cfg: PredictConfig, counter) -> None:
    """manifest -> decode -> Predictor -> shards/, with Ray Data's job-level checkpoint
    keyed on the row key: on a rerun, rows whose shard was committed are filtered out
    right after the read, and a shard whose commit was cut short is deleted and redone."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    assert cfg.engine is not None, "PredictConfig.validate() settles the engine"
    context = ray.data.DataContext.get_current()
    previous = context.checkpoint_config
    # Rows in any order: the merge sorts them, and not waiting for stragglers is faster.
    context.execution_options.preserve_order = False
    context.checkpoint_config = CheckpointConfig(
        id_column=KEY, checkpoint_path=os.path.abspath(work.path("checkpoint")), delete_checkpoint_on_success=False
    )
    try:
        nodes = cluster_nodes()
        gpus = sum(n.gpus for n in nodes) > 0
        cpus = CPU_PREDICTOR_CPUS if len(nodes) > 1 else 0
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
            num_cpus=1 if gpus else cpus,
        )
        ds = add_predictions(
            ds,
            saved,
            cfg.batch_size,
            cfg.top_k,
            cfg.threads,
            cfg.num_actors,
            counter,
            cpus=cpus,
            engine=cfg.engine,
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
    cpus: float = 0,
    engine: str = "torch",
):
    """Map `Predictor` over a dataset with a decoded `image` column, on an actor pool:
    one GPU per actor where the cluster has GPUs, CPU actors (asking for `cpus`) otherwise."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = int(ray.cluster_resources().get("GPU", 0))
    # No CPU reserved beside the GPU: its host-side work is a thread's worth, and with
    # Ray Data's default of one CPU per GPU actor, a node with as many GPUs as CPUs had
    # none left for decoding and waited forever (seen with 2 GPUs on 2 CPUs).
    resources = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": cpus}
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
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, n: int) -> None:
            self.n += n

        def value(self) -> int:
            return self.n

    # On the driver's node: the count must outlive the loss of any other node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # ray.remote called, not used as a decorator: mypy keeps a decorated class's own type, which has no .options.
    return ray.remote(num_cpus=0)(Counter).options(scheduling_strategy=here).remote()


def _predicted_rows(counter) -> int:
    """Rows the predictors were called on, redone ones included (the actors tell the
    counter without waiting, so the last batch may not have landed yet)."""
    try:
        return int(_ray_get(counter.value.remote()))
    except Exception:  # a count that cannot be had says nothing was redone, and ends no job
        return 0


def _ray_get(ref):
    import ray

    return ray.get(ref, timeout=10)
