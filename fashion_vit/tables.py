"""Tables users keep: a CSV file, a Parquet file or a folder of Parquet files, local or
at a URI (s3://, gs://, file://). Training reads a label table whole (only the two
columns it needs: image references and labels); batch prediction streams a table of
paths in batches, so a table of millions of rows never sits in memory at once.

CSV values are read as text, exactly as written (a key such as 00123 stays 00123);
Parquet values keep their types. Errors are TableError, one line naming the table and,
for a missing column, the columns it has; callers turn it into their own error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa

from fashion_vit.files import filesystem, is_uri

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


class TableError(ValueError):
    """A table that cannot be used as given."""


def table_format(path: str) -> str:
    """ "csv" or "parquet", from the name (a folder is a Parquet dataset)."""
    name = path.lower().rstrip("/")
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(PARQUET_SUFFIXES) or path.endswith("/") or (not is_uri(path) and os.path.isdir(path)):
        return "parquet"
    raise TableError(f"{path!r} is not a table this reads: give a .csv, .parquet or a folder of .parquet files")


def check_table(path: str, wanted: list[tuple[str, str]]) -> None:
    """The table exists and has every column of `wanted` ((flag, column) pairs), else a
    TableError naming the flag, the column and the columns the table has."""
    have = columns_of(path)
    for flag, column in wanted:
        if column not in have:
            raise TableError(f"{flag} {column!r} is not a column of {path} (columns: {', '.join(have)})")


def columns_of(path: str) -> list[str]:
    """The table's column names, from its header or footer."""
    if table_format(path) == "csv":
        import pyarrow.csv as pacsv

        with _open(path) as f:
            try:
                reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16))
            except pa.ArrowInvalid as e:
                raise TableError(f"{path} is not a readable CSV table ({_first_line(e)})") from None
            return list(reader.schema.names)
    files = _parquet_files(path)
    import pyarrow.parquet as pq

    fs, _ = filesystem(path)
    return list(pq.read_schema(files[0], filesystem=fs).names)


def schema_of(path: str, columns: list[str]) -> pa.Schema:
    """The types `columns` are read with: text for CSV, the file's own for Parquet."""
    if table_format(path) == "csv":
        return pa.schema([(c, pa.string()) for c in columns])
    import pyarrow.parquet as pq

    fs, _ = filesystem(path)
    schema = pq.read_schema(_parquet_files(path)[0], filesystem=fs)
    return pa.schema([schema.field(c) for c in columns])


def is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def iter_table(path: str, columns: list[str], rows: int = 50_000) -> Iterator[pa.RecordBatch]:
    """The table's `columns` in batches of at most `rows`, in the table's row order
    (for a folder: its files sorted by name, each in its own order)."""
    check_table(path, [("column", c) for c in columns])
    if table_format(path) == "csv":
        yield from _iter_csv(path, columns, rows)
        return
    import pyarrow.parquet as pq

    fs, _ = filesystem(path)
    for name in _parquet_files(path):
        with fs.open_input_file(name) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=rows, columns=columns)


def read_table(path: str, columns: list[str]):
    """The table's `columns` whole, as a pandas DataFrame."""
    batches = list(iter_table(path, columns))
    table = pa.Table.from_batches(batches) if batches else schema_of(path, columns).empty_table()
    return table.to_pandas()


def _iter_csv(path: str, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pacsv

    convert = pacsv.ConvertOptions(
        include_columns=columns, column_types={c: pa.string() for c in columns}, strings_can_be_null=False
    )
    with _open(path) as f:
        reader = pacsv.open_csv(f, convert_options=convert)
        try:
            for batch in reader:
                for start in range(0, batch.num_rows, rows):
                    yield batch.slice(start, rows)
        except pa.ArrowInvalid as e:
            raise TableError(f"{path} is not a readable CSV table ({_first_line(e)})") from None


def _open(path: str):
    """A stream of the file's bytes, decompressed by its suffix (.gz)."""
    fs, inner = filesystem(path)
    try:
        return fs.open_input_stream(inner)
    except (FileNotFoundError, OSError) as e:
        raise TableError(f"cannot read the table {path} ({_first_line(e)})") from None


def _parquet_files(path: str) -> list[str]:
    """The Parquet files of a table (paths within its filesystem), sorted by name."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return [inner]
    if info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        files = sorted(i.path for i in found if i.type == pafs.FileType.File and i.path.endswith(PARQUET_SUFFIXES))
        if files:
            return files
        raise TableError(f"the folder {path} holds no .parquet files")
    raise TableError(f"cannot read the table {path} (no such file)")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
