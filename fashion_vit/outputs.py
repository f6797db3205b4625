"""The batch job's output: its columns, and merging the shards Ray wrote into one file
sorted by a key (the path, or the job's row key: table rows in order, then files by
path), as CSV (the default) or Parquet (`--output x.parquet`, or a folder of Parquet
parts with `--output x.parquet/`). Columns kept from an input table are joined back on
the way out, from the copy the listing made of them, so they never travel through Ray.

The merge holds at most one run of RUN_ROWS rows, plus a small batch per run, in memory,
whatever the number of rows: shards are grouped into runs, each run is sorted and
spilled to disk, and the runs are merged lazily.
"""

from __future__ import annotations

import csv
import heapq
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from fashion_vit.files import atomic_open

BASE_COLUMNS = ["path", "predicted_category", "confidence", "error"]
RUN_ROWS = 50_000  # rows sorted in memory at once (~10 MB of Arrow)
READ_ROWS = 2_048  # rows read from each run at a time while merging
WRITE_ROWS = 65_536  # rows per Parquet row group
PART_ROWS = 1_000_000  # rows per Parquet part when --output is a folder


def columns(top_k: int) -> list[str]:
    return BASE_COLUMNS + [c for j in range(1, top_k + 1) for c in (f"label_{j}", f"prob_{j}")]


def output_format(output: str) -> str:
    """ "parquet-parts" for a path ending in "/", "parquet" for *.parquet, else "csv"."""
    if output.endswith(("/", os.sep)):
        return "parquet-parts"
    return "parquet" if output.lower().endswith(".parquet") else "csv"


@dataclass
class Kept:
    """Columns of an input table carried into the output: `files` (Parquet, in name
    order) hold them for every table row, in the table's order. The rows whose key
    starts with `prefix` are the table's, and their keys sort in the table's order."""

    files: list[str]
    prefix: str

    def schema(self):
        import pyarrow.parquet as pq

        return pq.read_schema(self.files[0])

    def rows(self) -> Iterator[tuple]:
        import pyarrow.parquet as pq

        for name in self.files:
            for batch in pq.ParquetFile(name).iter_batches(batch_size=READ_ROWS):
                yield from zip(*(c.to_pylist() for c in batch.columns), strict=True)


def merge_shards(
    shards: list[str], runs_dir: str, output: str, cols: list[str], key: str = "path", kept: Kept | None = None
) -> tuple[int, int]:
    """Write the rows of the Parquet `shards` to `output`, sorted by `key`, atomically,
    with `kept`'s columns first; returns (rows, rows with an error). `runs_dir` is
    scratch space for sorted runs."""
    import pyarrow as pa

    read = [key, *(c for c in cols if c != key)]  # the key first: the merge compares it
    runs = _sorted_runs(shards, runs_dir, key)
    rows = heapq.merge(*(_rows(r, read) for r in runs), key=lambda row: row[0])
    pick = [read.index(c) for c in cols]
    width = len(kept.schema()) if kept else 0
    schema = pa.schema([*(kept.schema() if kept else []), *_fields(cols)])
    failed = 0

    def output_rows():
        nonlocal failed
        for values, row in _with_kept(rows, kept):
            out = (*values, *(row[i] for i in pick))
            failed += out[width + cols.index("error")] != ""
            yield out

    fmt = output_format(output)
    if fmt == "csv":
        n = _write_csv(output_rows(), output, schema.names, width)
    else:
        n = _write_parquet(output_rows(), output, schema, width, parts=fmt == "parquet-parts")
    return n, failed


def _with_kept(rows, kept: Kept | None):
    """(kept values, row) for each merged row: the next table row's values for a table
    row, nulls for a file found in a folder. A table row without exactly one prediction
    stops the merge: the output would no longer line up with the table."""
    if kept is None:
        for row in rows:
            yield (), row
        return
    table, expected = kept.rows(), 0
    empty = (None,) * len(kept.schema())
    for row in rows:
        if not row[0].startswith(kept.prefix):
            yield empty, row
            continue
        number = int(row[0][len(kept.prefix) :])
        if number != expected:
            raise ValueError(
                f"table row {min(number, expected)} has {'no' if number > expected else 'a second'} prediction"
            )
        expected += 1
        yield next(table), row


def _fields(cols: list[str]) -> list[tuple]:
    import pyarrow as pa

    return [(c, pa.float64() if _is_float(c) else pa.string()) for c in cols]


def _sorted_runs(shards: list[str], runs_dir: str, key: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(runs_dir, exist_ok=True)
    groups: list[list[str]] = []
    group: list[str] = []
    size = 0
    for shard in sorted(shards):
        n = pq.ParquetFile(shard).metadata.num_rows
        if group and size + n > RUN_ROWS:
            groups.append(group)
            group, size = [], 0
        group.append(shard)
        size += n
    if group:
        groups.append(group)
    runs = []
    for i, group in enumerate(groups):
        table = pa.concat_tables([pq.read_table(s) for s in group], promote_options="permissive")
        path = os.path.join(runs_dir, f"run-{i:05d}.parquet")
        pq.write_table(table.sort_by(key), path)
        runs.append(path)
    return runs


def _rows(path: str, cols: list[str]):
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=cols):
        yield from zip(*(batch.column(c).to_pylist() for c in cols), strict=True)


def _write_csv(rows, output: str, cols: list[str], first_own: int = 0) -> int:
    """Our own floats (columns from `first_own` on) with 6 decimals, empty for none;
    kept values as Python writes them."""
    floats = [i for i, c in enumerate(cols) if i >= first_own and _is_float(c)]
    n = 0
    with atomic_open(output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for row in rows:
            row = list(row)
            for i in floats:
                v = row[i]
                row[i] = "" if v is None or math.isnan(v) else f"{v:.6f}"
            writer.writerow(row)
            n += 1
    return n


def _write_parquet(rows, output: str, schema, first_own: int, parts: bool) -> int:
    """One file, or (parts) a folder of part-NNNNN.parquet files of PART_ROWS rows each,
    sorted across parts; written beside `output` and renamed onto it when complete.
    A failure has an empty predicted_category, a null confidence and its reason in error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = iter(rows)

    def write_file(path: str, limit: float) -> int:
        written = 0
        with pq.ParquetWriter(path, schema) as writer:
            while written < limit:
                chunk = list(islice(rows, int(min(WRITE_ROWS, limit - written))))
                if not chunk:
                    break
                columns = zip(*chunk, strict=True)
                arrays = [
                    pa.array([_none_if_nan(v) for v in col] if i >= first_own else list(col), type=f.type)
                    for i, (col, f) in enumerate(zip(columns, schema, strict=True))
                ]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                written += len(chunk)
        return written

    target = output.rstrip("/" + os.sep)
    tmp = os.path.join(os.path.dirname(os.path.abspath(target)), f".{os.path.basename(target)}.tmp")
    _remove(tmp)
    try:
        if not parts:
            n = write_file(tmp, math.inf)
        else:
            os.makedirs(tmp)
            n, part = 0, 0
            while True:
                written = write_file(os.path.join(tmp, f"part-{part:05d}.parquet"), PART_ROWS)
                if written == 0 and part > 0:
                    os.unlink(os.path.join(tmp, f"part-{part:05d}.parquet"))
                n, part = n + written, part + 1
                if written < PART_ROWS:
                    break
        _remove(target)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    return n


def _is_float(column: str) -> bool:
    return column == "confidence" or column.startswith("prob_")


def _none_if_nan(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
