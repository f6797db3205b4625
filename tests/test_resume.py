"""An interrupted experiment continues with --resume; a finished trial is not rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, TINY_ARGS

pytestmark = pytest.mark.slow


def test_resume_after_the_driver_is_killed(samples, tmp_path):
    out = tmp_path / "results"
    storage = out / "experiments"
    argv = [
        sys.executable,
        "jobs/tune.py",
        "--data-dir",
        str(samples["train"]),
        *TINY_ARGS,
        "--limit",
        "600",
        "--search",
        "asha",
        "--num-samples",
        "1",
        "--epochs",
        "2",
        "--max-concurrent-trials",
        "1",
        "--output-dir",
        str(out),
        "--name",
        "fashion-vit-resume",
    ]
    env = dict(os.environ, RAY_ADDRESS="local")  # its own Ray, which dies with it
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            # Trials run one at a time: the second trial's Train run appearing means the first finished.
            deadline = time.time() + 600
            while not any(p.name.endswith("_00001") for p in storage.glob("fashion-vit-resume-train-*")):
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.time() < deadline, "the first trial did not finish in time"
                time.sleep(1)
            time.sleep(3)  # let Tune save its experiment state
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "vit_model.pth").exists()
    first_trial = next(storage.glob("fashion-vit-resume-train-*_00000"))
    checkpoints_before = sorted(p.name for p in first_trial.glob("checkpoint_*"))

    # Without --resume the same name is refused rather than mixed with a new run.
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run([*argv, "--resume"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert sorted(p.name for p in first_trial.glob("checkpoint_*")) == checkpoints_before  # not trained again
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["trials"]) == 2
    assert next(len(t["history"]) for t in summary["trials"]) == 2
    assert all(t["error"] is None for t in summary["trials"])
    assert (out / "vit_model.pth").exists()
