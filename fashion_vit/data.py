"""Data sources, labels, the stratified split, and the Ray Datasets that feed training.

Each source shape has one small reader that ends in the same `Rows` frame: a stable key
(`id`, what the split sorts by), the image (a path or URI, or the image's bytes) and its
label as text, plus the rows it could not use, counted by reason:

    kaggle   --data-dir DIR with DIR/styles.csv: images/<id>.jpg, labels from a column
    folders  --data-dir DIR without it: DIR/<label>/**/<image>, labels from folder names
    table    --labels TABLE: a CSV or Parquet table of image references and labels
    hub      --dataset ID: any Hugging Face dataset with an image and a label column

`load_data` then settles the label set, drops what is outside it, sorts and samples;
everything up to `to_ray_datasets` is plain pandas/numpy on the driver, so the split is
deterministic and testable without Ray. For files (local, or at s3://, gs://, file://
URIs) the driver holds only each image's path: Ray tasks read and decode the images
where they live, so the driver's memory does not grow with the dataset's bytes, and on a
multi-node cluster the files must be on storage every node can read. A hub dataset
arrives as bytes (its cache is an Arrow file) and is handed to Ray as such.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from fashion_vit.config import DEFAULT_LABEL_COLUMN, MASTER_CATEGORIES, FashionVitError, TrainConfig
from fashion_vit.files import (
    absolute,
    files_present,
    is_file,
    is_image_name,
    join,
    names_in,
    parent,
    read_bytes,
    resolve,
    subfolders,
    walk_files,
)
from fashion_vit.tables import TableError, check_table, is_text, read_table, schema_of
from fashion_vit.transforms import decode_batch, image_bytes

# One image each for training, validation and test: a class with fewer cannot be measured.
MIN_CLASS_ROWS = 3


class DataError(FashionVitError):
    """The data could not be had or has no usable rows."""


@dataclass
class Rows:
    """What every reader ends in: `frame` with columns id (a stable key the split sorts
    by), image (what `image_bytes` takes: a path, a URI or the bytes) and label (text),
    and the rows it could not use, counted by reason."""

    frame: pd.DataFrame
    source: str
    dropped: dict[str, int] = field(default_factory=dict)
    label_column: str | None = None  # where the labels came from; None: the folder names
    repaired: int = 0  # styles.csv lines whose unquoted commas were rejoined


@dataclass
class LoadedData:
    """Rows ready to split: `frame` has columns id, label (int index into `labels`) and
    image: the image's bytes (hub) or its path or URI, as `image_bytes` takes."""

    frame: pd.DataFrame
    labels: list[str]
    source: str
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped
    repaired: int = 0  # styles.csv lines whose unquoted commas were rejoined
    small_classes: dict[str, int] = field(default_factory=dict)  # left out: fewer than MIN_CLASS_ROWS rows

    def summary(self) -> str:
        parts = [f"{len(self.frame)} images from {self.source}", f"{len(self.labels)} labels"]
        if self.repaired:
            parts.append(f"{self.repaired} styles.csv lines repaired (unquoted commas in the last column)")
        parts += [f"{n} rows skipped: {why}" for why, n in self.dropped.items() if n]
        if self.small_classes:
            named = ", ".join(f"{name} ({n})" for name, n in self.small_classes.items())
            parts.append(
                f"left out {len(self.small_classes)} classes with fewer than {MIN_CLASS_ROWS} images, too few to hold "
                f"one out for validation and one for test (add images to train on them): {named}"
            )
        return "; ".join(parts)


def load_data(cfg: TrainConfig, labels: list[str] | None = None, prefer: list[str] | None = None) -> LoadedData:
    """Read the configured source, keep rows with a label in the label set, sort them by
    their key (so the split does not depend on the source's order), subsample if asked.

    The label set is `labels` when given (a trained model's); else the six
    masterCategory labels for that column; else `prefer` (an --init-from model's, in
    its order) when the data's labels are among them; else the labels found, sorted,
    less those with fewer than MIN_CLASS_ROWS rows (counted, and named in the summary).
    """
    rows = READERS[source_shape(cfg)](cfg)
    frame, dropped = rows.frame, dict(rows.dropped)
    values = frame["label"].astype("string").str.strip()
    missing = values.isna() | (values == "")
    dropped["no label"] = dropped.get("no label", 0) + int(missing.sum())
    frame, values = frame[~missing], values[~missing]

    small: dict[str, int] = {}
    if labels is None:
        labels, small = label_set(values, rows.label_column, prefer)
    labels = list(labels)
    if len(labels) < 2:
        found = ", ".join(f"{k} ({n})" for k, n in values.value_counts().items()) or "none"
        raise DataError(
            f"{rows.source} has fewer than 2 labels with at least {MIN_CLASS_ROWS} images each (found: {found})"
        )
    outside = ~values.isin(labels)
    for name, n in values[outside].value_counts().items():
        reason = "class too small to split" if name in small else "label outside the label set"
        dropped[f"{reason} ({name})"] = int(n)
    frame, values = frame[~outside], values[~outside]

    label_index = {name: i for i, name in enumerate(labels)}
    frame = frame.assign(label=values.map(label_index).astype(np.int64))
    frame = frame.sort_values("id", kind="stable").reset_index(drop=True)
    if cfg.limit is not None and cfg.limit < len(frame):
        keep = stratified_sample(frame["label"].to_numpy(), cfg.limit, cfg.seed)
        frame = frame.iloc[keep].reset_index(drop=True)
    frame = frame[["id", "label", "image"]]
    if frame.empty:
        raise DataError(f"no usable rows in {rows.source}")
    return LoadedData(frame, labels, rows.source, dropped, rows.repaired, small)


def label_set(
    values: pd.Series, column: str | None, prefer: list[str] | None = None
) -> tuple[list[str], dict[str, int]]:
    """(labels, small classes left out) for rows whose labels are `values`; see load_data."""
    if column == DEFAULT_LABEL_COLUMN:
        return list(MASTER_CATEGORIES), {}
    found = values.value_counts()
    if prefer is not None and set(found.index) <= set(prefer):
        return list(prefer), {}
    small = {str(k): int(n) for k, n in found.items() if n < MIN_CLASS_ROWS}
    return sorted(str(k) for k in found.index if k not in small), small


def source_shape(cfg: TrainConfig) -> str:
    """Which reader takes the configured data: a key of READERS."""
    if cfg.labels_table is not None:
        return "table"
    if cfg.data_dir is None:
        return "hub"
    return "kaggle" if is_file(join(absolute(cfg.data_dir), "styles.csv")) else "folders"


# --- the readers, one per source shape ------------------------------------------------------


def read_kaggle_folder(cfg: TrainConfig) -> Rows:
    """DIR/styles.csv (one row per product, `id` and the label column) + DIR/images/<id>.jpg."""
    assert cfg.data_dir is not None  # source_shape chose this reader for it
    data_dir = absolute(cfg.data_dir)
    table, repaired, short = read_styles_csv(join(data_dir, "styles.csv"))
    if cfg.label_column not in table.columns:
        raise DataError(
            f"label column {cfg.label_column!r} is not in {data_dir}/styles.csv (columns: {', '.join(table.columns)})"
        )
    table = table.assign(id=table["id"].str.strip())
    bad_id = ~table["id"].str.fullmatch(r"\d+")
    table = table[~bad_id]
    images_dir = join(data_dir, "images")
    present = set(names_in(images_dir))
    has_image = table["id"].map(lambda i: f"{i}.jpg" in present)
    dropped = {"malformed line": short + int(bad_id.sum()), "image file missing": int((~has_image).sum())}
    table = table[has_image]
    frame = pd.DataFrame({
        "id": table["id"].astype(np.int64).to_numpy(),
        "image": [join(images_dir, f"{i}.jpg") for i in table["id"]],
        "label": table[cfg.label_column].to_numpy(),
    })  # fmt: skip
    return Rows(frame, f"folder {cfg.data_dir}", dropped, cfg.label_column, repaired)


def read_class_folders(cfg: TrainConfig) -> Rows:
    """DIR/<label>/**/<image>, as torchvision's ImageFolder: one folder per class, the
    folder's name its label, images at any depth below it. The key is the image's path
    below DIR. Other files are counted, never used."""
    assert cfg.data_dir is not None
    root = absolute(cfg.data_dir).rstrip("/") or "/"
    dropped = Counter({"not in a class folder": len(names_in(root))})
    records = []
    dangling: list[str] = []
    for label in subfolders(root):
        folder = join(root, label)
        for path in walk_files(folder, dangling):
            key = label + path[len(folder) :]
            if any(part.startswith(".") for part in key.split("/")):
                dropped["hidden file or folder"] += 1
            elif not is_image_name(path):
                dropped["not an image file (by its extension)"] += 1
            else:
                records.append((key, path, label))
    for path in dangling:  # links to nothing: reading one would end the run
        dropped["image file missing" if is_image_name(path) else "not an image file (by its extension)"] += 1
    if not records:
        raise DataError(
            f"--data-dir {cfg.data_dir} has no styles.csv (the Kaggle layout) and no images in class folders "
            "(DIR/<label>/<image>)"
        )
    frame = pd.DataFrame(records, columns=["id", "image", "label"])
    return Rows(frame, f"class folders {cfg.data_dir}", dict(dropped))


def read_label_table(cfg: TrainConfig) -> Rows:
    """A table with an image reference and a label per row. A reference is an absolute
    path, a path relative to the table's folder, or a URI (s3://, gs://, file://); the
    resolved reference is the row's key. See `usable_references` for what is dropped."""
    assert cfg.labels_table is not None
    path, image_column = cfg.labels_table, cfg.image_column
    try:
        check_table(path, [("--image-column", image_column), ("--label-column", cfg.label_column)])
        kind = schema_of(path, [image_column]).field(0).type
        table = read_table(path, [image_column, cfg.label_column])
    except TableError as e:
        raise DataError(str(e)) from None
    if not is_text(kind):
        raise DataError(f"--image-column {image_column!r} of {path} holds {kind}, not image paths or URIs")
    folder = parent(absolute(path))
    refs = table[image_column].fillna("").astype(str).str.strip()
    frame = pd.DataFrame({
        "image": [resolve(r, folder) if r else "" for r in refs],
        "label": table[cfg.label_column].astype("string").str.strip().to_numpy(),
    })  # fmt: skip
    frame, dropped = usable_references(frame)
    return Rows(frame.assign(id=frame["image"]), f"table {path}", dropped, cfg.label_column)


def usable_references(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows of a label table (columns image, label) that can train: a reference to a
    file that exists, each image once. An image listed twice with the same label is kept
    once (twice, it could land in both training and test); listed with different labels,
    it is dropped altogether, since either label may be the wrong one."""
    no_ref = frame["image"] == ""
    frame = frame[~no_ref]
    present = np.asarray(files_present(frame["image"].tolist()), dtype=bool)
    frame, missing = frame[present], int((~present).sum())
    labelled = frame["label"].fillna("")
    kinds = labelled[labelled != ""].groupby(frame["image"]).nunique()
    conflicting = frame["image"].isin(kinds.index[kinds > 1])
    duplicate = ~conflicting & frame["image"].duplicated(keep="first")
    dropped = {
        "no image reference": int(no_ref.sum()),
        "image file missing": missing,
        "duplicate image (kept once)": int(duplicate.sum()),
        "image listed with different labels": int(conflicting.sum()),
    }
    return frame[~conflicting & ~duplicate], dropped


def read_hub(cfg: TrainConfig) -> Rows:
    """A Hugging Face dataset's train split (a hub id, or a local dataset folder):
    --image-column holds images (kept as their encoded bytes: Ray tasks decode them) or
    paths; --label-column text or class ids (ClassLabel). The key is the dataset's `id`
    column where it has one, else the row's number."""
    import datasets

    ds = _load_hub(cfg.dataset)
    image, label = cfg.image_column, cfg.label_column
    for flag, column in (("--image-column", image), ("--label-column", label)):
        if column not in ds.column_names:
            raise DataError(
                f"{flag} {column!r} is not a column of {cfg.dataset} (columns: {', '.join(ds.column_names)})"
            )
    if isinstance(ds.features[image], datasets.Image):
        ds = ds.cast_column(image, datasets.Image(decode=False))
    key = "id" if "id" in ds.column_names and "id" not in (image, label) else None
    table = ds.select_columns([c for c in (key, image, label) if c]).to_pandas()
    labels = table[label]
    if isinstance(ds.features[label], datasets.ClassLabel):  # class ids; -1 means no label
        names = ds.features[label].names
        labels = pd.Series([names[int(v)] if v is not None and v >= 0 else None for v in labels], dtype="object")
    images = [(v.get("bytes") or v.get("path")) if isinstance(v, dict) else v for v in table[image]]
    frame = pd.DataFrame({
        "id": table[key].to_numpy() if key else np.arange(len(table)),
        "image": images,
        "label": labels.to_numpy(),
    })  # fmt: skip
    no_image = frame["image"].isna()
    return Rows(frame[~no_image], f"hub dataset {cfg.dataset}", {"no image": int(no_image.sum())}, label)


def _load_hub(dataset: str):
    import datasets

    try:
        return datasets.load_dataset(dataset, split="train")
    except Exception as e:  # offline, unknown id, auth: all end the same way for the user
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(
            f"could not load the Hugging Face dataset {dataset!r} ({type(e).__name__}: {reason}). "
            "Without network access, pass --data-dir DIR (a Kaggle-layout or class-folder copy) or --labels TABLE"
        ) from None


READERS: dict[str, Callable[[TrainConfig], Rows]] = {
    "kaggle": read_kaggle_folder,
    "folders": read_class_folders,
    "table": read_label_table,
    "hub": read_hub,
}


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


# --- labels and the split ------------------------------------------------------------------------


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
    sizes: Counter[tuple[int, int]] = Counter()
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
