"""Both jobs submitted with `ray job submit` to a real two-node Ray cluster on loopback,
with token authentication on, as docs/cluster.md sets one up.

Both nodes have CPUs (2 each), so the cluster has 4 CPUs in all but no node has more
than 2: default sizing must fit a node, not the total. The cluster brings its own
token (RAY_AUTH_TOKEN, for both nodes and every client) and its own home folder, so
it neither needs nor writes ~/.ray/auth_token. Only the processes this test started
are ended (tests/loopback.py); `ray stop` would end every Ray process on the machine.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_ARGS
from tests.loopback import RAY, LoopbackCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LoopbackCluster(tmp_path_factory.mktemp("cluster-home"))
    try:
        c.start_head(cpus=2)
        c.add_node("second", cpus=2)
        yield c
    finally:
        c.stop()


def submit(cluster, *entrypoint: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", "submit", "--address", cluster.address, "--working-dir", str(ROOT), "--", *entrypoint],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_client_without_the_token_is_refused(cluster):
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    proc = subprocess.run(
        [RAY, "job", "list", "--address", cluster.address], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "authentication token" in proc.stderr.lower(), proc.stderr[-2000:]


def test_both_jobs_with_default_flags_on_nodes_that_each_have_cpus(cluster, samples, tmp_path):
    out = tmp_path / "results"
    data = str(samples["train"])
    tune = submit(cluster, sys.executable, "jobs/tune.py", "--data-dir", data, *TINY_ARGS, "--limit", "300",
                  "--epochs", "2", "--output-dir", str(out))  # fmt: skip
    assert tune.returncode == 0 and "succeeded" in tune.stdout.lower(), tune.stdout[-4000:] + tune.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"][0]["epochs_run"] == 2 and (out / "vit_model.pth").exists()
    # Sized to a node (2 CPUs), not to the cluster's total of 4, which no node holds.
    assert summary["train_config"]["cpus_per_worker"] == 2 and summary["train_config"]["use_gpu"] is False

    csv_path = tmp_path / "pred.csv"
    predict = submit(cluster, sys.executable, "jobs/batch_predict.py", "--input", str(samples["holdout"] / "images"),
                     "--model", str(out / "vit_model.pth"), "--output", str(csv_path))  # fmt: skip
    assert predict.returncode == 0 and "succeeded" in predict.stdout.lower(), (
        predict.stdout[-4000:] + predict.stderr[-2000:]
    )
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(samples["holdout_rows"]) and all(r["predicted_category"] for r in rows)
    # The token came from the environment: nothing was written to the home folder.
    assert not (cluster.home / ".ray" / "auth_token").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--cpus-per-worker", "64"],
            "--cpus-per-worker 64 cannot be placed: the largest node has 2 CPU(s) (2 node(s): 2 CPU, 2 CPU)",
        ),
        (["--gpu"], "the cluster has no GPUs (2 node(s): 2 CPU, 2 CPU)"),
    ],
    ids=["cpus", "gpu"],
)
def test_an_impossible_request_fails_at_once_in_one_line(cluster, samples, tmp_path, flags, message):
    # A hang here (the old behaviour) ends in the subprocess timeout, not in a pass.
    proc = submit(cluster, sys.executable, "jobs/tune.py", "--data-dir", str(samples["train"]), *TINY_ARGS,
                  "--limit", "100", "--output-dir", str(tmp_path), *flags, timeout=240)  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-3000:]
    # ray job submit prints the job's output, then repeats its tail in the status message.
    errors = {line for line in proc.stdout.splitlines() if line.startswith("tune.py: error:")}
    assert len(errors) == 1 and message in errors.pop(), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout


def test_batch_predict_asking_for_more_actors_than_fit_fails_at_once(cluster, trained, samples, tmp_path):
    proc = submit(cluster, sys.executable, "jobs/batch_predict.py", "--input", str(samples["holdout"] / "images"),
                  "--model", str(trained / "vit_model.pth"), "--output", str(tmp_path / "p.csv"),
                  "--num-actors", "64", timeout=240)  # fmt: skip
    assert proc.returncode != 0
    errors = {line for line in proc.stdout.splitlines() if line.startswith("batch_predict.py: error:")}
    assert len(errors) == 1 and "--num-actors 64" in errors.pop(), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
