"""Both jobs submitted with `ray job submit` to a real two-node Ray cluster on loopback.

The head node has no CPUs, so every task, actor and training worker must run on the
second node. Only the processes this test started are ended (by process group and by
the cluster's private temp dir); `ray stop` would end every Ray process on the machine.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_ARGS

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_leftovers(marker: str) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Short (Ray's socket paths must stay under 107 bytes), and one per node: two nodes on
    # one host sharing a temp dir would garbage-collect each other's working_dir packages.
    temp = Path(f"/tmp/fv-ray-{os.getpid()}")
    port, dashboard = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    nodes = []
    try:
        nodes.append(subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--temp-dir={temp}", "--disable-usage-stats"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for(lambda: subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode == 0, 120)
        nodes.append(subprocess.Popen(
            [RAY, "start", "--block", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             '--resources={"second_node": 1}', f"--temp-dir={temp}-node2", "--disable-usage-stats"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(lambda: "second_node" in subprocess.run(
            [RAY, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True, text=True).stdout, 120)
        yield {"address": address, "env": env}
    finally:
        for node in reversed(nodes):
            try:
                os.killpg(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        _kill_leftovers(str(temp))  # also matches the second node's f"{temp}-node2"


def _wait_for(condition, timeout: float) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "the cluster did not come up"
        time.sleep(2)


def submit(cluster, *entrypoint: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", "submit", "--address", cluster["address"], "--working-dir", str(ROOT), "--", *entrypoint],
        cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=timeout,
    )


def test_both_jobs_run_on_a_submitted_cluster(cluster, samples, tmp_path):
    out = tmp_path / "results"
    tune = submit(cluster, sys.executable, "jobs/tune.py", "--data-dir", str(samples["train"]), *TINY_ARGS,
                  "--limit", "600", "--epochs", "2", "--output-dir", str(out))
    assert tune.returncode == 0 and "succeeded" in tune.stdout.lower(), tune.stdout[-4000:] + tune.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"][0]["epochs_run"] == 2 and (out / "vit_model.pth").exists()

    csv_path = tmp_path / "pred.csv"
    predict = submit(cluster, sys.executable, "jobs/batch_predict.py", "--input", str(samples["holdout"] / "images"),
                     "--model", str(out / "vit_model.pth"), "--output", str(csv_path))
    assert predict.returncode == 0 and "succeeded" in predict.stdout.lower(), predict.stdout[-4000:] + predict.stderr[-2000:]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(samples["holdout_rows"]) and all(r["predicted_category"] for r in rows)
