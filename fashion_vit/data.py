"""Data sources (Hugging Face hub, Kaggle-layout folder), labels, the stratified split,
and the Ray Datasets that feed training.

Everything up to `to_ray_datasets` is plain pandas/numpy on the driver, so the split is
deterministic and testable without Ray. For a folder (local, or an s3:// or gs://
prefix) the driver holds only each image's path: Ray tasks read and decode the images
where they live, so the driver's memory does not grow with the dataset's bytes, and on a
multi-node cluster the folder must be storage every node can read. The hub dataset
arrives as bytes (its cache is an Arrow file) and is handed to Ray as such.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from fashion_vit.config import MASTER_CATEGORIES, FashionVitError, TrainConfig
from fashion_vit.files import join, names_in, read_bytes
from fashion_vit.transforms import decode_batch, image_bytes

KAGGLE_COLUMNS = (
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
)


class DataError(FashionVitError):
    """The data could not be had or has no usable rows."""


@dataclass
class LoadedData:
    """Rows ready to split: `frame` has columns id, label (int index into `labels`) and
    image: the image's bytes (hub) or its path or URI (folder), as `image_bytes` takes."""

    frame: pd.DataFrame
    labels: list[str]
    source: str
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped
    repaired: int = 0  # styles.csv lines whose unquoted commas were rejoined

    def summary(self) -> str:
        parts = [f"{len(self.frame)} images from {self.source}", f"{len(self.labels)} labels"]
        if self.repaired:
            parts.append(f"{self.repaired} styles.csv lines repaired (unquoted commas in the last column)")
        parts += [f"{n} rows skipped: {why}" for why, n in self.dropped.items() if n]
        return "; ".join(parts)


def load_data(cfg: TrainConfig, labels: list[str] | None = None) -> LoadedData:
    """Load the configured source, keep rows with a label in the label set, subsample if asked.

    The label set is `labels` when given (a trained model's), else the six
    masterCategory labels, else the values found in `cfg.label_column`.
    """
    if cfg.data_dir is not None:
        table, dropped, repaired, source = _kaggle_table(cfg.data_dir, cfg.label_column)
    else:
        table, dropped, repaired, source = (
            _hub_table(cfg.dataset, [cfg.label_column]),
            {},
            0,
            f"hub dataset {cfg.dataset}",
        )

    values = table[cfg.label_column].astype("string").str.strip()
    missing = values.isna() | (values == "")
    dropped["no label"] = dropped.get("no label", 0) + int(missing.sum())
    table, values = table[~missing], values[~missing]

    if labels is not None:
        labels = list(labels)
    elif cfg.label_column == "masterCategory":
        labels = list(MASTER_CATEGORIES)
    else:
        labels = sorted(values.unique())
    if len(labels) < 2:
        raise DataError(f"label column {cfg.label_column!r} has fewer than 2 distinct values")
    outside = ~values.isin(labels)
    if outside.any():
        unknown = values[outside].value_counts()
        for name, n in unknown.items():
            dropped[f"label outside the label set ({name})"] = int(n)
    table, values = table[~outside], values[~outside]

    label_index = {name: i for i, name in enumerate(labels)}
    table = table.assign(label=values.map(label_index).astype(np.int64))
    # Sorting by id makes the split independent of the file's row order.
    table = table.sort_values("id", kind="stable").reset_index(drop=True)
    if cfg.limit is not None and cfg.limit < len(table):
        keep = stratified_sample(table["label"].to_numpy(), cfg.limit, cfg.seed)
        table = table.iloc[keep].reset_index(drop=True)

    if "image" not in table:  # Kaggle folder: where each image is; Ray tasks read it there
        table = table.assign(image=table["path"])
    frame = table[["id", "label", "image"]]
    if frame.empty:
        raise DataError(f"no usable rows in {source}")
    return LoadedData(frame=frame, labels=labels, source=source, dropped=dropped, repaired=repaired)


def read_styles_csv(path: str) -> tuple[pd.DataFrame, int, int]:
    """Read a Kaggle styles.csv, tolerating its known quirks.

    Lines with more fields than the header have unquoted commas in the last column
    (productDisplayName): the extra fields are joined back, since only that column can
    hold them. Lines with fewer fields are skipped. Returns (table, repaired, skipped).
    """
    try:
        text = read_bytes(path).decode("utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e})") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path} is empty") from None
        if "id" not in header:
            raise DataError(f"{path} has no 'id' column (header: {', '.join(header[:10])})")
        rows, repaired, skipped = [], 0, 0
        n = len(header)
        for fields in reader:
            if not fields:
                continue
            if len(fields) > n:
                fields = [*fields[: n - 1], ",".join(fields[n - 1 :])]
                repaired += 1
            elif len(fields) < n:
                skipped += 1
                continue
            rows.append(fields)
    return pd.DataFrame(rows, columns=header), repaired, skipped


def _kaggle_table(data_dir: str, label_column: str) -> tuple[pd.DataFrame, dict[str, int], int, str]:
    table, repaired, short = read_styles_csv(join(data_dir, "styles.csv"))
    if label_column not in table.columns:
        raise DataError(
            f"label column {label_column!r} is not in {data_dir}/styles.csv (columns: {', '.join(table.columns)})"
        )
    table = table.assign(id=table["id"].str.strip())
    bad_id = ~table["id"].str.fullmatch(r"\d+")
    table = table[~bad_id]
    images_dir = join(data_dir, "images")
    present = set(names_in(images_dir))
    has_image = table["id"].map(lambda i: f"{i}.jpg" in present)
    dropped = {"malformed line": short + int(bad_id.sum()), "image file missing": int((~has_image).sum())}
    table = table[has_image]
    table = table.assign(
        path=[join(images_dir, f"{i}.jpg") for i in table["id"]],
        id=table["id"].astype(np.int64),
    )
    return table, dropped, repaired, f"folder {data_dir}"


def _hub_table(dataset: str, columns: list[str]) -> pd.DataFrame:
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split="train")
    except Exception as e:  # offline, unknown id, auth: all end the same way for the user
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(
            f"could not load the Hugging Face dataset {dataset!r} ({type(e).__name__}: {reason}). "
            "Without network access, pass --data-dir DIR with a local copy in the Kaggle layout "
            "(styles.csv + images/<id>.jpg)."
        ) from None
    for column in columns:
        if column not in ds.column_names:
            raise DataError(f"label column {column!r} is not in {dataset} (columns: {', '.join(ds.column_names)})")
    # Keep the JPEG bytes as they are: decoding happens once, in Ray tasks.
    ds = ds.cast_column("image", datasets.Image(decode=False))
    table = ds.select_columns(["id", *columns, "image"]).to_pandas()
    return table.assign(image=[d["bytes"] if isinstance(d, dict) else d for d in table["image"]])


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-proportional sample of `n` rows (largest-remainder rounding), sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / counts.sum()
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=False)]
    return np.sort(np.concatenate(chosen))


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Deterministic per-class split into sorted index arrays {'train', 'val', 'test'}.

    Every class with at least 3 rows gets at least one validation and one test row, so
    rare classes (Sporting Goods: ~25 of 44k) are measured at all.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
        n_val = max(1, round(n * val_fraction)) if n >= 3 else 0
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def infer_source_size(images: pd.Series, image_size: int, sample: int = 256) -> tuple[int, int]:
    """The (height, width) to keep decoded images at: the most common size in a sample
    of the data, scaled down to fit `image_size` (never store more pixels than the model
    will see). `images`: what `image_bytes` takes."""
    sizes = Counter()
    for item in images.iloc[:: max(1, len(images) // sample)][:sample]:
        try:
            with Image.open(io.BytesIO(image_bytes(item))) as img:
                sizes[(img.height, img.width)] += 1
        except Exception:
            continue
    if not sizes:
        raise DataError("none of the sampled images could be read")
    h, w = sizes.most_common(1)[0][0]
    scale = min(1.0, image_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


MAX_REPEAT = 100


def oversample(rows: np.ndarray, labels: np.ndarray, mode: str, seed: int) -> np.ndarray:
    """The training rows of one epoch for --sampling: a class of n rows is seen
    (n_max / n) ** p times as often (p = 1/2 for "sqrt", 1 for "balanced"; at most
    MAX_REPEAT), in a seeded random order so that the copies of an image are spread over
    the epoch instead of sitting in one batch. A fractional factor is met in expectation:
    with 1.5, every row once and a random half of them twice (rounding would double a
    class that should grow by half). "none": the rows as they are."""
    if mode == "none":
        return rows
    counts = np.bincount(labels[rows])
    present = counts > 0
    power = 0.5 if mode == "sqrt" else 1.0
    factor = np.ones(len(counts))
    factor[present] = np.clip((counts.max() / counts[present]) ** power, 1, MAX_REPEAT)
    rng = np.random.default_rng(seed)
    wanted = factor[labels[rows]]
    copies = np.floor(wanted).astype(np.int64) + (rng.random(len(rows)) < wanted - np.floor(wanted))
    return rng.permutation(np.repeat(rows, copies))


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def to_ray_datasets(
    frame: pd.DataFrame, splits: dict[str, np.ndarray], source_size: tuple[int, int]
) -> tuple[dict, int]:
    """One materialised Ray Dataset per split, columns image (uint8 H,W,3) and label,
    and the number of rows dropped because their image did not decode.

    Materialising reads and decodes every image exactly once, in Ray tasks; each epoch
    then streams uint8 arrays from the object store (~14 KB per 60x80 image). An image a
    worker cannot read at all (as opposed to one that does not decode) stops the job
    with one line: it is almost always a folder the worker's node cannot see.
    """
    import ray
    from ray.data import TaskPoolStrategy

    # The decoding tasks ask for no CPU, and at most as many run at once as the cluster
    # has CPUs. A node lost mid-training takes the decoded blocks it held with it; Ray
    # re-runs their tasks (lineage reconstruction) outside Ray Data's resource budget,
    # and a task that asked for a CPU would wait behind the training workers, which hold
    # every CPU while they wait for those very blocks (seen: a trial stuck for good).
    decoders = TaskPoolStrategy(size=max(1, int(ray.cluster_resources().get("CPU", 1))))
    out, undecodable = {}, 0
    for name, idx in splits.items():
        part = frame.iloc[idx][["image", "label"]]
        # Several blocks so decoding runs in parallel tasks and shards split evenly.
        n_blocks = max(1, min(len(part) // 256, 64))
        chunks = [c for c in np.array_split(np.arange(len(part)), n_blocks) if len(c)]
        ds = ray.data.from_pandas([part.iloc[c].reset_index(drop=True) for c in chunks])
        ds = ds.map_batches(
            decode_batch, fn_kwargs={"source_size": source_size}, batch_size=256, num_cpus=0, compute=decoders
        )
        try:
            out[name] = ds.materialize()
        except Exception as e:
            unreadable = _unreadable(e)
            if unreadable is None:
                raise
            raise DataError(
                f"a Ray worker could not read {unreadable}: on a multi-node cluster the training images must be "
                "on storage every node can read (a shared filesystem, or an s3:// or gs:// --data-dir)"
            ) from None
        undecodable += len(part) - out[name].count()
    return out, undecodable


def _unreadable(error: BaseException) -> str | None:
    """What an UnreadableImage raised in a Ray task said, from the error Ray Data raises
    here (it wraps the task's error; the original lives on in its text)."""
    import re

    match = re.search(r"UnreadableImage: (.*)", str(error))
    return match.group(1).strip() if match else None
