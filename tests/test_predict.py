"""Batch inference through the real Ray Data path."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion_vit.model import load_checkpoint
from fashion_vit.predict import PredictError, list_images
from fashion_vit.transforms import decode_image, preprocess
from tests.conftest import Exploit, run_main


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def messy_tree(tmp_path, shared_data):
    """Nested folders with every kind of file a crawl holds."""
    src = sorted((shared_data / "images").iterdir())[:12]
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    good = []
    for i, p in enumerate(src[:8]):
        dest = root / ("a" if i % 2 else "a/b") / (p.stem + (".JPG" if i == 3 else ".jpg"))
        shutil.copy(p, dest)
        good.append(dest)
    rgba = Image.open(src[8]).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "c" / "alpha.PNG")
    Image.open(src[9]).convert("L").save(root / "c" / "gray.jpeg")
    Image.open(src[10]).convert("CMYK").save(root / "c" / "cmyk.jpg")
    Image.open(src[11]).save(root / "c" / "photo.webp")
    good += [root / "c" / n for n in ("alpha.PNG", "gray.jpeg", "cmyk.jpg", "photo.webp")]
    data = src[0].read_bytes()
    (root / "c" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "c" / "zero.jpg").write_bytes(b"")
    (root / "c" / "text.jpg").write_text("this is not an image\n")
    (root / "notes.txt").write_text("ignore me")
    (root / "a" / "styles.csv").write_text("id\n1\n")
    bad = {"truncated.jpg": "truncated", "zero.jpg": "empty", "text.jpg": "not an image"}
    return root, good, bad


@pytest.mark.slow
def test_every_image_named_file_gets_exactly_one_row(trained, messy_tree, tmp_path, ray_session):
    from jobs import batch_predict

    root, good, bad = messy_tree
    out = tmp_path / "out" / "pred.csv"
    assert (
        batch_predict.main(
            ["--input", str(root), "--model", str(trained / "vit_model.pth"), "--output", str(out), "--top-k", "3"]
        )
        == 0
    )
    rows = read_csv(out)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert len(rows) == len(good) + len(bad)
    by_name = {os.path.basename(r["path"]): r for r in rows}
    for p in good:
        r = by_name[p.name]
        assert r["error"] == "" and r["predicted_category"] and 0 < float(r["confidence"]) <= 1
        assert r["label_1"] == r["predicted_category"] and float(r["prob_1"]) >= float(r["prob_2"]) >= float(
            r["prob_3"]
        )
    for name, reason in bad.items():
        r = by_name[name]
        assert reason in r["error"] and r["predicted_category"] == "" and r["confidence"] == ""
    # notes.txt and styles.csv are not images: counted, listed beside the output, not predicted.
    ignored = (out.parent / "pred.csv.ignored.txt").read_text().split()
    assert sorted(os.path.basename(p) for p in ignored) == ["notes.txt", "styles.csv"]
    assert sorted(os.listdir(out.parent)) == ["pred.csv", "pred.csv.ignored.txt"]  # no work folder or temp file left


@pytest.mark.slow
def test_ray_path_equals_a_direct_forward_pass(trained, samples, tmp_path, ray_session):
    from jobs import batch_predict

    model_path = trained / "vit_model.pth"
    folder = samples["holdout"] / "images"
    out = tmp_path / "pred.csv"
    assert (
        batch_predict.main(
            ["--input", str(folder), "--model", str(model_path), "--output", str(out), "--batch-size", "16"]
        )
        == 0
    )
    rows = read_csv(out)

    import torch

    saved = load_checkpoint(str(model_path))
    model, prep = saved.build()
    paths = sorted(str(p) for p in folder.iterdir())
    assert [r["path"] for r in rows] == paths
    with torch.no_grad():
        x = torch.from_numpy(np.stack([decode_image(Path(p).read_bytes(), prep.source_size) for p in paths]))
        probs = model(pixel_values=preprocess(x, prep)).logits.softmax(1)
    conf, idx = probs.max(1)
    for r, c, i in zip(rows, conf.tolist(), idx.tolist(), strict=False):
        assert r["predicted_category"] == saved.labels[i]
        assert float(r["confidence"]) == pytest.approx(c, abs=2e-6)


@pytest.mark.slow
def test_predictions_on_unseen_real_images_beat_the_majority_class(trained, samples, tmp_path, ray_session):
    from jobs import batch_predict

    out = tmp_path / "pred.csv"
    assert (
        batch_predict.main(
            ["--input", str(samples["holdout"]), "--model", str(trained / "vit_model.pth"), "--output", str(out)]
        )
        == 0
    )
    truth = {r[0]: r[2] for r in samples["holdout_rows"]}
    rows = read_csv(out)
    assert len(rows) == len(truth)
    correct = sum(r["predicted_category"] == truth[os.path.basename(r["path"]).split(".")[0]] for r in rows)
    majority = max(list(truth.values()).count(v) for v in set(truth.values()))
    assert correct / len(rows) > majority / len(rows) + 0.1, (correct, majority, len(rows))


def run_cli(capsys, *args) -> tuple[int, str]:
    from jobs import batch_predict

    return run_main(batch_predict.main, list(args), capsys)


def test_malicious_model_file_is_refused(tmp_path, messy_tree, capsys):
    root, _, _ = messy_tree
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    import torch

    torch.save({"format": "fashion-vit/1", "x": Exploit(marker)}, evil)  # a hostile .pth, as torch.save writes one
    code, err = run_cli(capsys, "--input", str(root), "--model", str(evil), "--output", str(tmp_path / "p.csv"))
    assert code == 1 and "refused" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_a_storage_no_filesystem_here_reads_is_one_line_and_leaves_no_run_behind(tmp_path, messy_tree, capsys):
    """https:// URLs (pyarrow reads local paths, file://, s3://, gs://): the folder is
    refused in one line, with no .partial folder left to refuse the next run; a table's
    web URL is that row's error, the other rows predicted."""
    from fashion_vit.files import read_bytes
    from fashion_vit.transforms import decode_images
    from tests.conftest import random_model

    root, _, _ = messy_tree
    model, out = str(random_model(tmp_path / "m.pth")), str(tmp_path / "p.csv")
    code, err = run_cli(capsys, "--input", "https://example.com/photos/", "--model", model, "--output", out)
    assert code == 1 and "https:// is not a storage" in err.splitlines()[-1] and "Traceback" not in err
    assert not os.path.exists(out + ".partial")
    assert run_cli(capsys, "--input", str(root), "--model", model, "--output", out, "--quiet")[0] == 0
    photo = next(str(p) for p in sorted(root.rglob("*.jpg")) if p.stat().st_size > 100)
    _, errors = decode_images(["https://example.com/a.jpg", photo], (32, 24), read=read_bytes)
    assert "https:// is not a storage" in errors[0] and errors[1] == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, code, message",
    [
        ("missing-input", 2, "is not a folder"),
        ("missing-model", 2, "does not exist"),
        ("no-images", 1, "no image files"),
        ("output-under-a-file", 2, "not writable"),
    ],
)
def test_bad_input_gives_one_line_and_non_zero_exit(case, code, message, tmp_path, trained, capsys):
    model = str(trained / "vit_model.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    (tmp_path / "afile").write_text("x")
    args = {
        "missing-input": ["--input", str(tmp_path / "nope"), "--model", model],
        "missing-model": ["--input", str(empty), "--model", str(tmp_path / "none.pth")],
        "no-images": ["--input", str(empty), "--model", model, "--output", str(tmp_path / "o.csv")],
        "output-under-a-file": ["--input", str(empty), "--model", model, "--output", str(tmp_path / "afile" / "o.csv")],
    }[case]
    got, err = run_cli(capsys, *args)
    assert got == code, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_interrupted_merge_keeps_the_previous_output(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fashion_vit import outputs

    shard = tmp_path / "shard.parquet"
    cols = outputs.columns(0)
    pq.write_table(pa.table({"path": ["b.jpg", "a.jpg"], "predicted_category": ["Apparel"] * 2,
                             "confidence": [0.5, 0.9], "error": ["", ""]}), shard)  # fmt: skip
    out = tmp_path / "pred.csv"
    out.write_text("previous complete output\n")

    def failing_rows(path, cols):
        yield ("a.jpg", "Apparel", 0.9, "")
        raise OSError("disk lost")

    monkeypatch.setattr(outputs, "_rows", failing_rows)
    with pytest.raises(OSError):
        outputs.merge_shards([str(shard)], str(tmp_path / "runs"), str(out), cols)
    assert out.read_text() == "previous complete output\n"
    assert sorted(os.listdir(tmp_path)) == ["pred.csv", "runs", "shard.parquet"]


def test_listing_recognises_extensions_in_any_case(tmp_path):
    for name in ("a.JPG", "b.Jpeg", "c.png", "d.TIFF", "e.tif", "f.bmp", "g.gif", "h.webp", "i.txt", "j"):
        (tmp_path / name).write_bytes(b"x")
    listed = list(list_images([str(tmp_path)]))
    paths = sorted(p for p, is_image in listed if is_image)
    ignored = sum(not is_image for _, is_image in listed)
    assert [os.path.basename(p) for p in paths] == [
        "a.JPG",
        "b.Jpeg",
        "c.png",
        "d.TIFF",
        "e.tif",
        "f.bmp",
        "g.gif",
        "h.webp",
    ]
    assert ignored == 2
    with pytest.raises(PredictError):
        list(list_images([str(tmp_path / "missing")]))


@pytest.mark.slow
def test_a_hugging_face_model_folder_works_as_model(trained, samples, tmp_path, ray_session):
    from jobs import batch_predict

    folder = tmp_path / "hf"
    load_checkpoint(str(trained / "vit_model.pth")).to_transformers().save_pretrained(folder)
    out = tmp_path / "pred.csv"
    assert (
        batch_predict.main(
            ["--input", str(samples["holdout"] / "images"), "--model", str(folder), "--output", str(out)]
        )
        == 0
    )
    rows = read_csv(out)
    truth = {r[0]: r[2] for r in samples["holdout_rows"]}
    assert len(rows) == len(truth) and all(r["error"] == "" for r in rows)
    correct = sum(r["predicted_category"] == truth[os.path.basename(r["path"]).split(".")[0]] for r in rows)
    majority = max(list(truth.values()).count(v) for v in set(truth.values()))
    assert correct > majority  # the folder's own weights and id2label, not a fresh head
