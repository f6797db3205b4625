"""Fault injection: a training worker or a predictor actor killed mid-run costs nothing."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_ARGS, process_table

pytestmark = pytest.mark.slow


def ray_pids(name: str, exclude: set[int] = frozenset()) -> set[int]:
    """Processes whose title starts with `ray::<name>` (Ray renames its workers so)."""
    return {pid for pid, (_, cmd) in process_table().items() if pid not in exclude and cmd.startswith(f"ray::{name}")}


def wait_for(condition, proc, log: Path, timeout: float = 600):
    deadline = time.time() + timeout
    while not (found := condition()):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)
    return found


def run_and_kill(argv: list[str], log: Path, process: str, ready=lambda: True, settle: float = 2) -> None:
    """Run a job with its own local Ray; once `ready()` holds, SIGKILL its `ray::<process>`
    workers mid-run, and require the job to finish successfully anyway."""
    before = ray_pids(process)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, RAY_ADDRESS="local"),
            start_new_session=True,
        )
        try:
            wait_for(ready, proc, log)
            victims = wait_for(lambda: ray_pids(process, before), proc, log)
            time.sleep(settle)
            assert proc.poll() is None, "the job finished before its workers could be killed"
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_killed_training_worker_resumes_from_its_checkpoint(samples, tmp_path):
    out = tmp_path / "results"
    argv = [
        sys.executable,
        "jobs/tune.py",
        "--data-dir",
        str(samples["train"]),
        *TINY_ARGS,
        "--limit",
        "600",
        "--epochs",
        "3",
        "--output-dir",
        str(out),
        "--name",
        "fashion-vit-faults",
    ]
    # After the first epoch's checkpoint, kill the worker during the second epoch.
    first_checkpoint = lambda: list((out / "experiments").glob("fashion-vit-faults-train-*/checkpoint_*"))
    run_and_kill(argv, tmp_path / "tune.log", "RayTrainWorker", ready=first_checkpoint)
    summary = json.loads((out / "summary.json").read_text())
    history = summary["trials"][0]["history"]
    assert [r["epoch"] for r in history][-1] == 3 and summary["trials"][0]["error"] is None
    assert (out / "vit_model.pth").exists()


def test_a_killed_predictor_actor_loses_and_duplicates_no_row(trained, samples, tmp_path):
    out = tmp_path / "pred.csv"
    inputs = [str(samples["train"] / "images"), str(samples["holdout"] / "images")]
    argv = [
        sys.executable,
        "jobs/batch_predict.py",
        "--input",
        inputs[0],
        "--input",
        inputs[1],
        "--model",
        str(trained / "vit_model.pth"),
        "--output",
        str(out),
        "--batch-size",
        "1",
    ]
    run_and_kill(argv, tmp_path / "predict.log", "MapWorker", settle=3)  # mid-run: some batches done, most not
    with open(out) as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    expected = sorted(str(p) for d in inputs for p in Path(d).iterdir())
    assert paths == expected  # each input exactly once, in order
