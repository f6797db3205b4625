"""The GPU resource plan, checked on CPUs: Ray is started with 2 logical GPUs and both
jobs run as they would on a GPU cluster, while the arithmetic runs on the CPU (torch has
no CUDA here). What Ray scheduled is read back from its state API: trial concurrency
follows the GPUs, every Train worker and predictor actor holds one GPU, and decoding
stays in CPU-only tasks apart from the predictor. The whole run ending at all shows that
nothing waits forever."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_script

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
from fashion_vit.cluster import start_ray
start_ray(None, num_cpus=2, num_gpus=2)
from jobs import batch_predict, tune
data, out, images = sys.argv[1:4]
# The recipe follows the GPUs (scratch-gpu); the given flags keep the model CPU-sized.
rc_tune = tune.main(["--data-dir", data, "--from-scratch", "--limit", "300", "--epochs", "2", "--search", "asha",
                     "--num-samples", "1", "--vit-size", "tiny", "--image-size", "32", "--patch-size", "16",
                     "--search-image-sizes", "32", "--batch-size", "64", "--output-dir", out])
rc_predict = batch_predict.main(["--input", images, "--model", out + "/vit_model.pth", "--output", out + "/pred.csv",
                                 "--quiet"])
from ray.util.state import list_actors, list_tasks
actors = [{"id": a.actor_id, "cls": a.class_name, "res": a.required_resources}
          for a in list_actors(detail=True, limit=10000)]
tasks = [{"name": t.name, "res": t.required_resources, "actor": t.actor_id, "start": t.start_time_ms,
          "end": t.end_time_ms} for t in list_tasks(detail=True, limit=10000)]
print("PLAN " + json.dumps({"rc": [rc_tune, rc_predict], "actors": actors, "tasks": tasks}))
"""


@pytest.fixture(scope="module")
def plan(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-plan")
    proc = run_script("-c", SCRIPT, str(samples["train"]), str(out), str(samples["holdout"] / "images"), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PLAN "))[5:])
    assert report["rc"] == [0, 0], proc.stdout[-3000:] + proc.stderr[-3000:]
    return report, out


def held(resources: dict, kind: str) -> float:
    """What a task or actor holds of `kind`: Train's workers ask inside a placement group,
    where Ray names the resource after the bundle (GPU_group_0_<group id>)."""
    if kind in resources:
        return resources[kind]
    return sum(v for k, v in resources.items() if re.fullmatch(rf"{kind}_group_\d+_[0-9a-f]+", k))


def test_every_train_worker_holds_one_gpu_and_trials_run_as_many_as_gpus(plan):
    report, out = plan
    workers = [a for a in report["actors"] if a["cls"] == "RayTrainWorker"]
    assert len(workers) >= 2  # the baseline and a sampled trial, one worker each
    assert all(held(a["res"], "GPU") == 1 for a in workers), [a["res"] for a in workers]
    # Trial concurrency follows the 2 GPUs: at most 2 workers busy at once, and 2 at some
    # point. A worker is busy from its first task's start to its last task's end.
    spans = []
    for a in workers:
        mine = [t for t in report["tasks"] if t["actor"] == a["id"] and t["start"]]
        spans.append((min(t["start"] for t in mine), max(t["end"] or float("inf") for t in mine)))
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    alive, peak = 0, 0
    for _, step in events:
        alive += step
        peak = max(peak, alive)
    assert peak == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_config"]["use_gpu"] is True and summary["train_config"]["cpus_per_worker"] == 1
    assert summary["train_config"]["recipe"] == "scratch-gpu" and summary["train_config"]["sampling"] == "sqrt"
    assert len(summary["trials"]) == 2 and all(t["error"] is None for t in summary["trials"])


def test_predictor_actors_hold_one_gpu_and_decoding_stays_in_cpu_tasks(plan):
    report, out = plan
    predictors = [a for a in report["actors"] if "Predictor" in a["cls"]]
    assert predictors and all(a["res"].get("GPU") == 1 for a in predictors), predictors
    # Not fused: on GPUs the decode stage is its own CPU task, not part of the GPU actor.
    assert not any("read_and_decode" in a["cls"] for a in predictors)
    decode = [t for t in report["tasks"] if "read_and_decode" in t["name"]]
    assert decode and all(not t["res"].get("GPU") and t["res"].get("CPU", 0) >= 1 for t in decode), decode[:3]
    assert (out / "pred.csv").exists()
