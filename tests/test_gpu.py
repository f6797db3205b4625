"""Both jobs on a real GPU: training with bf16 autocast and without, batch inference with
a GPU predictor actor, evaluation on CUDA, and a model trained on the GPU used on a
CPU-only torch. Skipped in one line where CUDA is absent; `bench/gpu.sh` runs it on the
GPU machine (with FASHION_SMALL pointing at the carried images)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_script

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module", params=["bf16", "fp32"])
def trained_on_gpu(request, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"gpu-{request.param}")
    # The scratch-gpu recipe, CPU-sized where given: a tiny ViT at 32 px, 4 patches.
    flags = ["--data-dir", str(samples["train"]), "--from-scratch", "--vit-size", "tiny", "--image-size", "32",
             "--patch-size", "16", "--batch-size", "64", "--limit", "600", "--epochs", "3", "--gpu",
             "--output-dir", str(out)]  # fmt: skip
    if request.param == "fp32":
        flags.append("--no-bf16")
    proc = run_script("jobs/tune.py", *flags, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, request.param


def test_training_on_cuda_learns_and_records_its_precision(trained_on_gpu):
    out, precision = trained_on_gpu
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_config"]["use_gpu"] is True and summary["train_config"]["recipe"] == "scratch-gpu"
    assert summary["train_config"]["bf16"] is (precision == "bf16")
    counts = summary["data"]["class_counts"]["test"]
    assert summary["best"]["test"]["accuracy"] > max(counts) / sum(counts)


def test_batch_predict_on_a_gpu_actor_matches_the_model_loaded_on_cpu(trained_on_gpu, samples, tmp_path):
    out, _ = trained_on_gpu
    csv_path = tmp_path / "pred.csv"
    proc = run_script("jobs/batch_predict.py", "--input", str(samples["holdout"] / "images"),
                      "--model", str(out / "vit_model.pth"), "--output", str(csv_path), "--quiet", timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))

    # The file a GPU wrote, on a CPU-only torch: the same model, the same answers.
    from fashion_vit.model import read_checkpoint
    from fashion_vit.transforms import decode_image, preprocess

    saved = read_checkpoint(str(out / "vit_model.pth"))
    assert all(t.device.type == "cpu" for t in saved.state_dict.values())
    model, prep = saved.build()
    x = torch.from_numpy(np.stack([decode_image(Path(r["path"]).read_bytes(), prep.source_size) for r in rows]))
    with torch.no_grad():
        probs = model(pixel_values=preprocess(x, prep)).logits.softmax(1)
    conf, idx = probs.max(1)
    agree = [r["predicted_category"] == saved.labels[i] for r, i in zip(rows, idx.tolist(), strict=True)]
    # bf16 on the GPU against fp32 here: a near-tie may flip, nothing more.
    assert np.mean(agree) >= 0.98
    assert max(abs(float(r["confidence"]) - c) for r, c in zip(rows, conf.tolist(), strict=True)) < 0.05


def test_evaluate_on_cuda_agrees_with_the_stored_test_report(trained_on_gpu, tmp_path):
    out, _ = trained_on_gpu
    proc = run_script("jobs/evaluate.py", "--model", str(out / "vit_model.pth"), "--output", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    stored = json.loads((out / "summary.json").read_text())["best"]["test"]
    assert metrics["num_examples"] == stored["num_examples"]
    assert abs(metrics["accuracy"] - stored["accuracy"]) <= 2 / stored["num_examples"]


def test_serve_replica_takes_a_gpu_and_answers_like_the_model_on_cpu(trained, ray_session, shared_data):
    """jobs/serve.py's application on a GPU: the replica holds one GPU, and its answers
    (bf16 autocast) agree with the same model run on the CPU."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from fashion_vit import serve as serving
    from fashion_vit.config import ServeConfig
    from fashion_vit.model import read_checkpoint
    from fashion_vit.transforms import decode_image, preprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model_path = str(trained / "vit_model.pth")
    url = serving.run(ServeConfig(model=model_path, port=port, use_gpu=True).validate(), log=lambda *a: None)
    try:
        filters = [("class_name", "=", f"ServeReplica:{serving.APP_NAME}:{serving.DEPLOYMENT_NAME}")]
        (replica,) = list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, detail=True)
        assert replica.required_resources.get("GPU") == 1
        paths = sorted((shared_data / "images").iterdir())[:32]
        with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(16) as pool:
            post = lambda p: client.post("/predict", content=p.read_bytes(), headers={"content-type": "image/jpeg"})
            answers = [r.json() for r in pool.map(post, paths)]
    finally:
        serve.shutdown()
    saved = read_checkpoint(model_path)
    model, prep = saved.build()
    x = torch.from_numpy(np.stack([decode_image(p.read_bytes(), prep.source_size) for p in paths]))
    with torch.no_grad():
        conf, idx = model(pixel_values=preprocess(x, prep)).logits.softmax(1).max(1)
    agree = [a["predicted_category"] == saved.labels[i] for a, i in zip(answers, idx.tolist(), strict=True)]
    assert np.mean(agree) >= 0.95  # bf16 on the GPU against fp32 here: a near-tie may flip
    assert max(abs(a["confidence"] - c) for a, c in zip(answers, conf.tolist(), strict=True)) < 0.05


def _holdout_on_cuda(samples, prep) -> torch.Tensor:
    from fashion_vit.transforms import decode_image, preprocess

    paths = sorted((samples["holdout"] / "images").iterdir())
    images = torch.from_numpy(np.stack([decode_image(p.read_bytes(), prep.source_size) for p in paths]))
    return preprocess(images.cuda(), prep)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().argmax(1) == b.float().argmax(1)).float().mean())


def test_compile_on_cuda_agrees_with_the_eager_bf16_forward(trained, samples):
    from fashion_vit.engines import create_forward
    from fashion_vit.model import load_checkpoint

    saved = load_checkpoint(str(trained / "vit_model.pth"))
    x = _holdout_on_cuda(samples, saved.preprocessing)
    cuda = torch.device("cuda")
    eager = create_forward(saved, "torch", cuda, bf16=True)
    compiled = create_forward(saved, "compile", cuda, bf16=True)
    with torch.inference_mode():
        reference = eager(x)
        got = torch.cat([compiled(x[i : i + 64]) for i in range(0, len(x), 64)])  # 300: a short last batch
        single = compiled(x[:1])
    assert got.device.type == "cuda" and got.shape == reference.shape
    # Both bf16; the compiled kernels round in another order, so a near tie may flip.
    assert _agreement(got, reference) >= 0.98
    assert _agreement(single, reference[:1]) == 1.0


def test_onnx_runtime_cuda_agrees_with_the_eager_forward(trained, samples):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)")
    from fashion_vit import export
    from fashion_vit.engines import create_forward
    from fashion_vit.model import load_checkpoint

    saved = load_checkpoint(str(trained / "vit_model.pth"))
    x = _holdout_on_cuda(samples, saved.preprocessing)
    cuda = torch.device("cuda")
    onnx = create_forward(export.to_onnx_model(saved).data, "onnx", cuda)
    with torch.inference_mode():
        got = torch.cat([onnx(x[i : i + 64]) for i in range(0, len(x), 64)])
        fp32 = create_forward(saved, "torch", cuda, bf16=False)(x)
        bf16 = create_forward(saved, "torch", cuda, bf16=True)(x)
    assert got.device.type == "cuda"
    assert _agreement(got, fp32) >= 0.999  # both fp32 (TF32 may round matmuls on either side)
    assert _agreement(got, bf16) >= 0.98
