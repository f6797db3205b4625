"""Batch inference at catalogue scale: listing, resuming a run whose driver was killed,
progress on stderr, Parquet output, and the merge of shards into one sorted file."""

from __future__ import annotations

import csv
import io
import os
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fashion_vit import outputs
from fashion_vit.files import walk_files
from fashion_vit.predict import input_roots
from fashion_vit.progress import Progress
from tests.conftest import kill_after_first_commit, own_ray_env, random_model, run_script, session_env

PROGRESS_LINE = re.compile(r"^(\d+)/(\d+) files \([\d.]+%\), \d+ images/s, (\S+ left|time left unknown)$")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- listing and merging, without Ray -------------------------------------------------------


def test_walk_files_lists_nested_folders_once_without_following_folder_links(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x.jpg", "a/y.JPG", "a/b/z.png", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)  # a link loop would never end
    (tmp_path / "link.jpg").symlink_to(tmp_path / "x.jpg")  # a linked file is a file
    (tmp_path / "a" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # listed, to be reported missing
    expected = ["a/b/z.png", "a/gone.jpg", "a/notes.txt", "a/y.JPG", "link.jpg", "x.jpg"]
    assert sorted(os.path.relpath(p, tmp_path) for p in walk_files(str(tmp_path))) == expected
    # The same through a URI, the way s3:// and gs:// prefixes are listed.
    uri = f"file://{tmp_path}"
    assert sorted(p[len(uri) + 1 :] for p in walk_files(uri)) == expected
    assert all(p.startswith(uri + "/") for p in walk_files(uri))
    with pytest.raises(FileNotFoundError):
        list(walk_files(str(tmp_path / "missing")))


def test_nested_and_repeated_inputs_are_listed_once(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    a, b = str(tmp_path / "a"), str(tmp_path / "a" / "b")
    assert input_roots([b, a, a + "/", str(tmp_path / "ab")]) == [a, str(tmp_path / "ab")]


def _shard(path, paths, errors=None):
    n = len(paths)
    table = pa.table({
        "path": paths,
        "predicted_category": ["" if e else "Apparel" for e in (errors or [""] * n)],
        "confidence": [float("nan") if e else 0.5 + i / 1000 for i, e in enumerate(errors or [""] * n)],
        "error": errors or [""] * n,
    })  # fmt: skip
    pq.write_table(table, path)


def test_merge_sorts_across_shards_with_bounded_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "RUN_ROWS", 3)  # several sorted runs, merged lazily
    monkeypatch.setattr(outputs, "READ_ROWS", 2)
    _shard(tmp_path / "s1.parquet", ["d.jpg", "a.jpg"])
    _shard(tmp_path / "s2.parquet", ["c.jpg", "f.jpg", "b.jpg"], errors=["", "not an image", ""])
    _shard(tmp_path / "s3.parquet", ["e.jpg"])
    shards = sorted(str(p) for p in tmp_path.glob("s*.parquet"))
    rows, failed = outputs.merge_shards(shards, str(tmp_path / "runs"), str(tmp_path / "out.csv"), outputs.columns(0))
    assert (rows, failed) == (6, 1) and len(list((tmp_path / "runs").iterdir())) == 3
    out = read_csv(tmp_path / "out.csv")
    assert [r["path"] for r in out] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]
    assert out[5]["error"] == "not an image" and out[5]["confidence"] == "" and out[5]["predicted_category"] == ""
    assert out[0]["confidence"] == "0.501000"

    monkeypatch.setattr(outputs, "PART_ROWS", 4)
    outputs.merge_shards(shards, str(tmp_path / "runs2"), str(tmp_path / "parts.parquet") + "/", outputs.columns(0))
    parts = sorted((tmp_path / "parts.parquet").iterdir())
    assert [pq.read_metadata(p).num_rows for p in parts] == [4, 2]
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert table["path"].to_pylist() == [r["path"] for r in out]
    assert table["confidence"].to_pylist()[5] is None


def test_progress_lines_plain_off_a_terminal_and_a_bar_on_one():
    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    plain = Progress(lambda: 0, total=1000, before=200, stream=Stream(False))
    assert PROGRESS_LINE.match(plain.line(done=300, elapsed=10.0))
    assert plain.line(done=300, elapsed=10.0) == "500/1000 files (50.0%), 30 images/s, 16s left"
    assert plain.line(done=0, elapsed=1.0).endswith("time left unknown")
    tty = Progress(lambda: 0, total=1000, stream=Stream(True))
    assert tty.line(done=500, elapsed=10.0).startswith("[############............] 500/1000")
    stream = Stream(True)
    with Progress(lambda: 1000, total=1000, stream=stream):
        pass
    drawn = stream.getvalue()
    assert drawn.startswith("\r\x1b[K[########################] 1000/1000 files (100.0%)") and drawn.endswith(
        "0s left\n"
    )
    quiet = Stream(False)
    with Progress(lambda: 10, total=10, stream=quiet, quiet=True):
        time.sleep(0.6)
    assert quiet.getvalue() == ""


# --- the real job: kill, resume, Parquet -------------------------------------------------------


CRAWL_IMAGES = 1200


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A random ViT-tiny at 64 px, decoding at 160x120: blocks of 582 rows, so that a run
    over the crawl commits its first block while the others are still predicted."""
    return random_model(tmp_path_factory.mktemp("slow-model") / "vit_model.pth", 64, (160, 120))


@pytest.fixture(scope="module")
def crawl(shared_data, tmp_path_factory):
    """CRAWL_IMAGES real images in nested folders, one broken file and one non-image."""
    root = tmp_path_factory.mktemp("crawl")
    images = sorted((shared_data / "images").iterdir())[:CRAWL_IMAGES]
    for i, src in enumerate(images):
        folder = root / f"d{i % 7}" / f"e{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(src, folder / src.name)
    (root / "d0" / "broken.jpg").write_bytes(images[0].read_bytes()[:200])
    (root / "d1" / "readme.txt").write_text("not an image")
    return root


def predict(crawl, model, out, *extra):
    """A whole run, as a subprocess (its stdout and stderr as a user sees them) on the session's Ray."""
    args = ["--input", str(crawl), "--model", str(model), "--output", str(out), "--batch-size", "32", *extra]
    return run_script("jobs/batch_predict.py", *args, env=session_env(), timeout=900)


@pytest.fixture(scope="module")
def uninterrupted(crawl, slow_model, ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = predict(crawl, slow_model, tmp / "pred.csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "pred.csv", proc


@pytest.mark.slow
def test_progress_goes_to_stderr_as_plain_lines_off_a_terminal(uninterrupted):
    _, proc = uninterrupted
    lines = [line for line in proc.stderr.splitlines() if PROGRESS_LINE.match(line)]
    assert len(lines) >= 2 and PROGRESS_LINE.match(lines[-1]).group(1) == str(CRAWL_IMAGES + 1)
    assert "\r" not in proc.stderr and "[#" not in proc.stderr
    assert (
        f"predicted {CRAWL_IMAGES} images" in proc.stdout
        and "1 files failed" in proc.stdout
        and "1 files ignored" in proc.stdout
    )


@pytest.mark.slow
def test_a_killed_driver_is_resumed_redoing_only_unfinished_work(
    crawl, slow_model, uninterrupted, ray_session, tmp_path
):
    """The job's own local Ray is lost with its driver (all SIGKILLed: a lost machine);
    --resume on another Ray redoes only what was not committed."""
    out = tmp_path / "pred.csv"
    args = ["--input", str(crawl), "--model", str(slow_model), "--output", str(out), "--batch-size", "32"]
    kill_after_first_commit(args, out, own_ray_env(), tmp_path / "first.log")
    assert not out.exists()

    # The machine is back, with another Ray (the session's): without --resume the
    # partial run is refused, not mixed in or thrown away.
    env = session_env()
    refused = run_script("jobs/batch_predict.py", *args, env=env)
    assert refused.returncode == 2 and "--resume" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    resumed = run_script("jobs/batch_predict.py", *args, "--resume", env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    before, now = map(
        int, re.search(r"resumed: (\d+) files were done by the interrupted run, (\d+) now", resumed.stdout).groups()
    )
    assert before >= 32 and before + now == CRAWL_IMAGES + 1 and now < CRAWL_IMAGES + 1  # less work than a whole run

    # The same file an uninterrupted run writes, row for row. (Confidences are compared to
    # 2e-6: batches are grouped differently after a resume, and a CPU matmul's last bits
    # can depend on the batch.)
    expected, got = read_csv(uninterrupted[0]), read_csv(out)
    assert [r["path"] for r in got] == [r["path"] for r in expected] and len(got) == CRAWL_IMAGES + 1
    for g, e in zip(got, expected, strict=True):
        assert (g["predicted_category"], g["error"]) == (e["predicted_category"], e["error"])
        assert g["confidence"] == e["confidence"] or abs(float(g["confidence"]) - float(e["confidence"])) <= 2e-6
    assert not Path(str(out) + ".partial").exists()


@pytest.mark.slow
def test_parquet_output_holds_what_the_csv_holds(crawl, slow_model, uninterrupted, tmp_path):
    out = tmp_path / "pred.parquet"
    proc = predict(crawl, slow_model, out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if PROGRESS_LINE.match(line)]  # --quiet
    table = pq.read_table(out)
    assert table.column_names == ["path", "predicted_category", "confidence", "error"]
    expected = read_csv(uninterrupted[0])
    assert table["path"].to_pylist() == [r["path"] for r in expected]
    assert table["predicted_category"].to_pylist() == [r["predicted_category"] for r in expected]
    assert table["error"].to_pylist() == [r["error"] for r in expected]
    for got, e in zip(table["confidence"].to_pylist(), expected, strict=True):
        assert (got is None) == (e["confidence"] == "") and (got is None or abs(got - float(e["confidence"])) <= 2e-6)


@pytest.fixture
def table_run(shared_data, tmp_path):
    """768 rows (three blocks of 256 at the model's 224x224 decode size) of a product
    export: keys with leading zeros, absolute paths, some listed twice, one missing; and
    a random ViT-tiny at 64 px: the run can be killed between two blocks."""
    random_model(tmp_path / "m.pth", 64, (224, 224))
    images = sorted((shared_data / "images").iterdir())[3000:3760]
    paths = [str(p) for p in images] + [str(p) for p in images[:7]] + [str(tmp_path / "gone.jpg")]
    table = tmp_path / "export.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sku", "image", "title"])
        w.writerows([f"{i:07d}", p, f"product {i}"] for i, p in enumerate(paths))
    return table, tmp_path / "m.pth", [(f"{i:07d}", p) for i, p in enumerate(paths)]


@pytest.mark.slow
def test_a_killed_table_run_resumes_with_every_row_once_in_order(table_run, ray_session, tmp_path, capsys):
    """The driver is killed after its first block is committed, on the session's Ray (a
    cluster whose driver died); --resume with the same table and columns finishes the
    rest, and the output joins back to the table on its key, no row missing or doubled."""
    from jobs import batch_predict

    table, model, rows = table_run
    out = tmp_path / "pred.csv"
    args = ["--input-table", str(table), "--path-column", "image", "--keep-columns", "sku",
            "--model", str(model), "--output", str(out), "--batch-size", "64"]  # fmt: skip
    kill_after_first_commit(args, out, session_env(), tmp_path / "first.log")
    assert not out.exists()

    # A resume with other columns is another job: refused, like one without --resume.
    assert batch_predict.main([*args[:5], "sku,title", *args[6:], "--resume"]) == 2
    assert "a run with other input_table" in capsys.readouterr().err
    assert batch_predict.main(args) == 2 and "--resume" in capsys.readouterr().err

    assert batch_predict.main([*args, "--resume"]) == 0
    before, now = map(int, re.search(r"resumed: (\d+) files were done by the interrupted run, (\d+) now",
                                     capsys.readouterr().out).groups())  # fmt: skip
    assert before >= 256 and before + now == len(rows) and now < len(rows)
    got = read_csv(out)
    assert [(r["sku"], r["path"]) for r in got] == rows  # every row once, in the table's order
    assert [r["error"] == "" for r in got] == [True] * (len(rows) - 1) + [False]
    assert "No such file" in got[-1]["error"]
    first = {r["path"]: r["predicted_category"] for r in got[:7]}
    assert all(first[r["path"]] == r["predicted_category"] for r in got[760:767])  # a path listed twice: same answer
    assert not Path(str(out) + ".partial").exists()
