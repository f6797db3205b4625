"""Paths and URIs, and writing outputs so that a reader never sees half a file.

Every place that must tell a local path from a URI (s3://, gs://, any pyarrow
filesystem) goes through `is_uri`; local paths use the os module, URIs pyarrow.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (it travels to Ray workers); a URI unchanged."""
    return path if is_uri(path) else os.path.abspath(path)


def join(base: str, *names: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def filesystem(path: str):
    """(pyarrow FileSystem, path within it) for a local path or a URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(absolute(path))


def read_bytes(path: str) -> bytes:
    if is_uri(path):
        fs, inner = filesystem(path)
        with fs.open_input_file(inner) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def subfolders(path: str) -> list[str]:
    """Names of the folders directly under `path` (local or URI), sorted; [] if it is missing."""
    import pyarrow.fs as pafs

    fs, base = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """Open a hidden temp file beside `path`; rename it onto `path` only when the block
    completes. On any error the temp file is removed and an existing `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
