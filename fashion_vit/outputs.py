"""The batch job's output: its columns, and merging the shards Ray wrote into one file
sorted by path, as CSV (the default) or Parquet (`--output x.parquet`, or a folder of
Parquet parts with `--output x.parquet/`).

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


def merge_shards(shards: list[str], runs_dir: str, output: str, cols: list[str]) -> tuple[int, int]:
    """Write the rows of the Parquet `shards` to `output`, sorted by path, atomically;
    returns (rows, rows with an error). `runs_dir` is scratch space for sorted runs."""
    runs = _sorted_runs(shards, runs_dir)
    failed = 0
    error = cols.index("error")

    def counted(rows):
        nonlocal failed
        for row in rows:
            failed += row[error] != ""
            yield row

    rows = counted(heapq.merge(*(_rows(r, cols) for r in runs), key=lambda row: row[0]))
    fmt = output_format(output)
    if fmt == "csv":
        n = _write_csv(rows, output, cols)
    else:
        n = _write_parquet(rows, output, cols, parts=fmt == "parquet-parts")
    return n, failed


def _sorted_runs(shards: list[str], runs_dir: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(runs_dir, exist_ok=True)
    groups, group, size = [], [], 0
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
        pq.write_table(table.sort_by("path"), path)
        runs.append(path)
    return runs


def _rows(path: str, cols: list[str]):
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=cols):
        yield from zip(*(batch.column(c).to_pylist() for c in cols), strict=True)


def _write_csv(rows, output: str, cols: list[str]) -> int:
    floats = [i for i, c in enumerate(cols) if _is_float(c)]
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


def _write_parquet(rows, output: str, cols: list[str], parts: bool) -> int:
    """One file, or (parts) a folder of part-NNNNN.parquet files of PART_ROWS rows each,
    sorted across parts; written beside `output` and renamed onto it when complete.
    A failure has an empty predicted_category, a null confidence and its reason in error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.float64() if _is_float(c) else pa.string()) for c in cols])
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
                    pa.array([_none_if_nan(v) for v in col], type=f.type)
                    for col, f in zip(columns, schema, strict=True)
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
