"""Engines and export: the exported ONNX model against PyTorch on real images, the batch
job with --engine onnx and compile, a killed onnx run resumed, and the refusals."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashion_vit import export
from fashion_vit.config import PredictConfig
from fashion_vit.engines import EngineError, create_forward
from fashion_vit.model import load_checkpoint
from fashion_vit.predict import Predictor, open_work
from fashion_vit.transforms import decode_image
from tests.conftest import kill_after_first_commit, random_model, run_script, session_env


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def holdout(samples) -> tuple[list[Path], np.ndarray]:
    """The holdout's paths and their true label names, in path order."""
    truth = {r[0]: r[2] for r in samples["holdout_rows"]}
    paths = sorted((samples["holdout"] / "images").iterdir())
    return paths, np.array([truth[p.stem] for p in paths], dtype=object)


def predict_in_process(model, paths, engine="torch", size=None) -> dict:
    predictor = Predictor(model, engine=engine, top_k=1)
    source = size or predictor.prep.source_size
    images = np.stack([decode_image(p.read_bytes(), source) for p in paths])
    return predictor({"image": images})


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """jobs/export.py on the session's trained model, fp32 and int8, checked on its own
    training images (the default when no --images is given)."""
    from jobs import export as export_job

    out = tmp_path_factory.mktemp("export") / "model.onnx"
    assert export_job.main(["--model", str(trained / "vit_model.pth"), "--output", str(out), "--quantize", "int8"]) == 0
    return out


@pytest.mark.slow
def test_export_reloads_with_its_metadata_and_agrees_with_pytorch(trained, samples, exported, capsys):
    saved = load_checkpoint(str(trained / "vit_model.pth"))
    onnx_model = export.read_onnx(str(exported))
    assert onnx_model.labels == saved.labels and onnx_model.preprocessing == saved.preprocessing
    meta = json.loads(Path(export.json_path(str(exported))).read_text())
    assert meta["check"]["agreement"] >= 0.999 and meta["check"]["images"] >= 100
    assert meta["check"]["folder"] == str(samples["train"] / "images")  # the checkpoint's own data
    assert meta["labels"] == saved.labels and meta["image_size"] == saved.preprocessing.image_size
    import hashlib

    assert meta["sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()

    # Unseen real images: ONNX Runtime against eager PyTorch, then int8 against both.
    paths, truth = holdout(samples)
    reference = predict_in_process(saved, paths)
    fp32 = predict_in_process(onnx_model, paths, engine="onnx")
    int8 = predict_in_process(export.read_onnx(export.int8_path(str(exported))), paths, engine="onnx")
    agree = np.mean(fp32["predicted_category"] == reference["predicted_category"])
    assert agree >= 0.999
    assert np.abs(fp32["confidence"] - reference["confidence"]).max() < 1e-4
    agree8 = np.mean(int8["predicted_category"] == reference["predicted_category"])
    accuracy = {k: np.mean(v["predicted_category"] == truth) for k, v in (("fp32", reference), ("int8", int8))}
    with capsys.disabled():
        print(f"\nholdout {len(paths)}: int8 agreement {agree8:.4f}, accuracy fp32 {accuracy['fp32']:.4f}, "
              f"int8 {accuracy['int8']:.4f}")  # fmt: skip
    assert agree8 >= 0.99 and accuracy["int8"] >= accuracy["fp32"] - 0.01
    assert exported.stat().st_size > 3 * Path(export.int8_path(str(exported))).stat().st_size
    # 7-bit weights: with full 8-bit ones, CPUs without VNNI saturate and answer differently
    # (export.quantize_int8). This machine has VNNI, so the holdout above cannot show it.
    import onnx.numpy_helper

    weights = [
        onnx.numpy_helper.to_array(t)
        for t in onnx.load(export.int8_path(str(exported))).graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    ]
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64


@pytest.mark.slow
def test_the_metadata_alone_is_enough_to_run_the_model(samples, exported):
    """A user without this package: PIL, numpy and onnxruntime, and what the file says."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    labels, size = json.loads(meta["labels"]), int(meta["image_size"])
    (h, w), mean, std = json.loads(meta["source_size"]), json.loads(meta["mean"]), json.loads(meta["std"])
    paths, _ = holdout(samples)
    paths = paths[:100]
    x = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((w, h), Image.BILINEAR).resize((size, size), Image.BILINEAR)
        x.append(((np.asarray(img, np.float32) / 255 - mean) / std).transpose(2, 0, 1))
    logits = session.run(None, {session.get_inputs()[0].name: np.stack(x).astype(np.float32)})[0]
    theirs = np.array(labels, dtype=object)[logits.argmax(1)]
    ours = predict_in_process(export.read_onnx(str(exported)), paths, engine="onnx")["predicted_category"]
    # PIL's resize and torch's differ in the last pixels: a near tie may flip, not more.
    assert np.mean(theirs == ours) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["onnx", "compile"])
def test_batch_predict_with_an_engine_matches_eager_pytorch(engine, trained, samples, tmp_path, ray_session):
    """From vit_model.pth: onnx exports it in memory in the driver, compile compiles in the actor."""
    from jobs import batch_predict

    paths, _ = holdout(samples)
    folder = samples["holdout"] / "images"
    if engine == "compile":  # one compilation is the cost; a few batches show it serves them all
        folder = tmp_path / "few"
        folder.mkdir()
        for p in paths[:70]:
            os.symlink(p, folder / p.name)
        paths = sorted(folder.iterdir())
    out = tmp_path / "pred.csv"
    model = trained / "vit_model.pth"
    argv = [
        "--input",
        str(folder),
        "--model",
        str(model),
        "--output",
        str(out),
        "--engine",
        engine,
        "--batch-size",
        "32",
    ]
    assert batch_predict.main(argv) == 0
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    reference = predict_in_process(load_checkpoint(str(model)), paths)
    got = np.array([r["predicted_category"] for r in rows], dtype=object)
    assert np.mean(got == reference["predicted_category"]) >= 0.999
    assert np.abs(np.array([float(r["confidence"]) for r in rows]) - reference["confidence"]).max() < 1e-4


# --- kill and resume with the onnx engine ----------------------------------------------------


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory, shared_data):
    """A random ViT-tiny at 64 px exported to ONNX, decoding at 240x180 so that blocks
    hold ~260 rows: a run of 1,200 images commits several shards, slowly enough to be
    killed between them."""
    folder = tmp_path_factory.mktemp("slow-onnx")
    saved = load_checkpoint(str(random_model(folder / "vit_model.pth", 64, (240, 180))))
    path = folder / "model.onnx"
    path.write_bytes(export.to_onnx_model(saved, str(folder / "vit_model.pth")).data)
    crawl = folder / "crawl"
    for i, src in enumerate(sorted((shared_data / "images").iterdir())[:1200]):
        (crawl / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        os.symlink(src, crawl / f"d{i % 4}" / src.name)
    return path, crawl


@pytest.mark.slow
def test_a_killed_onnx_run_is_resumed_with_the_same_engine(slow_onnx, ray_session, tmp_path):
    """The driver is killed on the session's Ray (a cluster whose driver died)."""
    model, crawl = slow_onnx
    out = tmp_path / "pred.csv"
    args = ["--input", str(crawl), "--model", str(model), "--output", str(out), "--engine", "onnx", "--quiet"]
    env = session_env()
    kill_after_first_commit(args, out, env, tmp_path / "first.log", timeout=300)
    job = json.loads((Path(str(out) + ".partial") / "job.json").read_text())
    assert job["engine"] == "onnx" and not out.exists()

    resumed = run_script("jobs/batch_predict.py", *args, "--resume", env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    before, now = map(int, re.search(r"resumed: (\d+) files were done by the interrupted run, (\d+) now", resumed.stdout).groups())  # fmt: skip
    assert before >= 256 and before + now == 1200 and now < 1200
    rows = read_csv(out)
    paths = sorted(str(p) for p in crawl.rglob("*.jpg"))
    assert [r["path"] for r in rows] == paths  # each file once, none lost
    # The rows of both runs are what the same engine gives in one process.
    sample = [Path(p) for p in paths[:: len(paths) // 60]]
    direct = predict_in_process(export.read_onnx(str(model)), sample, engine="onnx")
    by_path = {r["path"]: r for r in rows}
    assert [by_path[str(p)]["predicted_category"] for p in sample] == list(direct["predicted_category"])
    for p, c in zip(sample, direct["confidence"], strict=True):
        assert abs(float(by_path[str(p)]["confidence"]) - c) <= 2e-6


def test_resume_with_another_engine_is_refused_in_one_line(tmp_path, shared_data):
    model = random_model(tmp_path / "vit_model.pth")
    src = tmp_path / "in"
    src.mkdir()
    os.symlink(next((shared_data / "images").iterdir()), src / "a.jpg")
    out = tmp_path / "pred.csv"
    cfg = PredictConfig(inputs=[str(src)], model=str(model), output=str(out), engine="onnx")
    open_work(cfg)  # what an interrupted --engine onnx run leaves
    proc = run_script("jobs/batch_predict.py", "--input", str(src), "--model", str(model), "--output", str(out),
                      "--resume", "--engine", "torch")  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "--engine onnx" in proc.stderr and "--engine torch" in proc.stderr
    # A work folder from before engines were recorded was an eager run.
    job = Path(str(out) + ".partial") / "job.json"
    job.write_text(json.dumps({k: v for k, v in json.loads(job.read_text()).items() if k != "engine"}))
    with pytest.raises(Exception, match="--engine torch"):
        open_work(PredictConfig(inputs=[str(src)], model=str(model), output=str(out), engine="compile", resume=True))


# --- refusals ---------------------------------------------------------------------------------


def test_exporting_what_is_not_a_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    from jobs import export as export_job

    bogus = tmp_path / "notes.pth"
    bogus.write_text("not a model")
    assert (
        export_job.main(["--model", str(bogus), "--output", str(tmp_path / "m.onnx"), "--images", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err
    assert "not a fashion-vit checkpoint" in err and len(err.strip().splitlines()) == 1
    # No images given and none the checkpoint can point at: ask for --images.
    model = random_model(tmp_path / "vit_model.pth")
    assert export_job.main(["--model", str(model), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--images" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.onnx"))


def test_without_onnxruntime_each_entry_names_the_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    from jobs import batch_predict
    from jobs import export as export_job

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    model = random_model(tmp_path / "vit_model.pth")
    argv = ["--input", str(tmp_path), "--model", str(model), "--output", str(tmp_path / "p.csv"), "--engine", "onnx"]
    assert batch_predict.main(argv) == 2
    assert export_job.main(["--model", str(model), "--images", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("pip install -e '.[onnx]'" in line for line in lines)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an import then finds
    with pytest.raises(EngineError, match=re.escape("pip install -e '.[onnx]'")):
        create_forward(b"", "onnx", torch.device("cpu"))


@pytest.mark.slow
def test_a_failed_check_leaves_nothing_under_the_final_name(exported, tmp_path, shared_data, monkeypatch, capsys):
    """An export whose graph does not compute the checkpoint's function (here: the graph
    of another model, the trained one) fails its check: no .onnx, no JSON, no temp file."""
    import onnx

    from jobs import export as export_job

    model = random_model(tmp_path / "vit_model.pth")
    monkeypatch.setattr(export, "to_onnx", lambda saved: onnx.load(str(exported)))
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((shared_data / "images").iterdir())[:64]:
        os.symlink(p, images / p.name)
    out = tmp_path / "out" / "model.onnx"
    argv = ["--model", str(model), "--output", str(out), "--images", str(images), "--check-images", "64"]
    assert export_job.main(argv) == 1
    err = capsys.readouterr().err
    assert "disagrees with PyTorch" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(out.parent) == []


def test_an_onnx_model_runs_only_with_the_onnx_engine(tmp_path, capsys):
    from jobs import batch_predict

    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    argv = ["--input", str(tmp_path), "--model", str(model), "--output", str(tmp_path / "p.csv")]
    assert batch_predict.main([*argv, "--engine", "compile"]) == 2
    err = capsys.readouterr().err
    assert "run it with --engine onnx" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(EngineError, match="only with engine onnx"):
        create_forward(b"x", "torch", torch.device("cpu"))


def test_a_serve_replica_runs_the_engine_asked_for_like_the_batch_job(trained, samples, exported):
    """jobs/serve.py --engine: the replica's Predictor (made in one place) on a model.onnx,
    and on the .pth exported in memory, labels the holdout as eager PyTorch does."""
    from fashion_vit.config import ServeConfig
    from fashion_vit.predict import load_model
    from fashion_vit.serve import make_predictor, model_info

    paths, _ = holdout(samples)
    pth = str(trained / "vit_model.pth")
    images = np.stack([decode_image(p.read_bytes(), load_checkpoint(pth).preprocessing.source_size) for p in paths])
    want = Predictor(pth, top_k=1)({"image": images})
    for cfg in (ServeConfig(model=str(exported)), ServeConfig(model=pth, engine="onnx")):
        cfg.validate()
        assert cfg.engine == "onnx"
        saved = load_model(cfg.model)
        predictor = make_predictor(saved, cfg)
        assert predictor.engine == "onnx"
        got = predictor({"image": images})
        assert np.mean(got["predicted_category"] == want["predicted_category"]) >= 0.99
        assert np.abs(got["confidence"] - want["confidence"]).max() < 1e-3
        info = model_info(saved, cfg)
        assert info["engine"] == "onnx" and info["labels"] == list(load_checkpoint(pth).labels)
        assert info["test_metrics"] == load_checkpoint(pth).metrics.get("test", {})
