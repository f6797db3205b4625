"""A whole node lost mid-job, on a real loopback cluster (tests/loopback.py): its raylet
and every process on it SIGKILLed by process id, as a reclaimed spot instance or a
machine that vanishes. Both jobs finish with nothing lost or doubled, and a node that
joins mid-run is used.

One head node (2 CPUs) serves the whole module; each test adds the worker node it
kills. To make the job's work land on that node, an actor pinned to the head holds
the head's CPUs until the node is dead (then it is released, or a new node joins
instead). The driver, the Tune trial and the Train controller stay on the head, as
they would on a real cluster (tune.trial_resources). The checkpoints and shards are
on the machine's one disk, which every node sees: the shared filesystem the jobs need.

Each test prints what it measured (-s shows it): docs/cluster.md's failure table.
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_ARGS
from tests.loopback import LoopbackCluster, wait_for

pytestmark = pytest.mark.slow
TIMEOUT = 1500  # seconds for a job on 2 loaded cores
_names = itertools.count(2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, trained):
    # `trained` first: a tune run on the suite's Ray while this cluster's Ray also runs on
    # the machine would not give back its trial's CPUs (docs/cluster.md, two Ray instances).
    c = LoopbackCluster(tmp_path_factory.mktemp("nodes-home"))
    try:
        c.start_head(cpus=2)
        yield c
    finally:
        c.stop()


@pytest.fixture
def node(cluster):
    """A new worker node, with the head's CPUs held so that the job's work goes to it."""
    name = f"n{next(_names)}"
    cluster.hold_cpus("head", 2)
    cluster.add_node(name, cpus=2)
    yield name
    for other in [n for n in cluster.nodes if n != "head"]:
        if cluster.nodes[other].poll() is None:
            cluster.kill_node(other)
    cluster.release_cpus()


def job_log(path: Path) -> str:
    return path.read_text(errors="replace")


def wait_while_running(job, log: Path, condition, what: str):
    """condition() once true, failing if the job ends first."""

    def check():
        assert job.poll() is None, f"the job ended before {what}:\n" + job_log(log)[-4000:]
        return condition()

    return wait_for(check, TIMEOUT, f"timed out waiting for {what}", every=0.5)


# --- the tune job ----------------------------------------------------------------------------


def reported_epochs(out: Path, name: str) -> int:
    """Epochs whose result reached Tune (its result.json): by then Ray Train has registered
    the epoch's checkpoint. A checkpoint folder on disk alone is not enough: one lost
    before Train registered it is not restored from (seen: the trial began again at epoch 1)."""
    results = list((out / "experiments" / name).glob("train_driver_fn_*/result.json"))
    return sum(1 for line in results[0].read_text().splitlines() if line.strip()) if results else 0


@pytest.mark.parametrize("replacement", ["head", "new node"])
def test_tune_continues_from_its_checkpoint_when_the_node_training_it_is_lost(
    cluster, node, samples, tmp_path, replacement
):
    """(a) the trial's worker is on the lost node; the head takes over once it is free.
    (c) the head stays full and a new node joins: the trial continues there."""
    from fashion_vit.config import METRIC
    from fashion_vit.model import read_checkpoint

    out, log, name = tmp_path / "results", tmp_path / "tune.log", "fashion-vit-nodes"
    job = cluster.submit(sys.executable, "jobs/tune.py", "--data-dir", str(samples["train"]), *TINY_ARGS,
                         "--limit", "400", "--epochs", "3", "--output-dir", str(out), "--name", name,
                         log=log)  # fmt: skip
    lost = cluster.node_id(node)
    wait_while_running(job, log, lambda: reported_epochs(out, name), "the first epoch's result")
    workers = cluster.actors_on(lost, "RayTrainWorker")
    done_at_kill = reported_epochs(out, name)
    killed_at = time.time()
    cluster.kill_node(node)
    assert workers, "the trial was not training on the node that was killed"
    assert done_at_kill < 3, "the kill came after the last epoch"
    last_checkpoint_at = sorted((out / "experiments").glob(f"{name}-train-*/checkpoint_*"))[-1].stat().st_mtime

    if replacement == "head":
        cluster.release_cpus()
    else:
        new = f"n{next(_names)}"
        cluster.add_node(new, cpus=2)
        joined_at = time.time()
        wait_while_running(
            job, log, lambda: cluster.actors_on(cluster.node_id(new), "RayTrainWorker"), "a worker on the new node"
        )
        moved = f" (a worker on it {time.time() - joined_at:.0f}s after it joined)"
    assert job.wait(timeout=TIMEOUT) == 0, job_log(log)[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    (trial,) = summary["trials"]
    assert [r["epoch"] for r in trial["history"]] == [1, 2, 3] and trial["error"] is None
    # It continued from the checkpoint it had when the node died, not from scratch.
    assert [r["from_checkpoint_of_epoch"] for r in trial["restores"]] == [done_at_kill]
    assert trial["epochs_redone"] == 1
    lost_s = trial["restores"][0]["seconds_since_checkpoint"]
    assert lost_s >= killed_at - last_checkpoint_at
    # The exported model is the best epoch over every trial, pre-kill checkpoints included.
    exported = read_checkpoint(str(out / "vit_model.pth"))
    best = max(r[METRIC] for t in summary["trials"] for r in t["history"])
    assert exported.metrics[METRIC] == pytest.approx(best)
    print(
        f"\n[tune, node lost, {replacement} takes over] killed {killed_at - last_checkpoint_at:.1f}s after the "
        f"checkpoint of epoch {done_at_kill}; training started again {lost_s - (killed_at - last_checkpoint_at):.1f}s "
        f"after the kill"
        + (moved if replacement != "head" else "")
        + f"; time lost {lost_s:.1f}s; epochs redone {trial['epochs_redone']} (epoch {done_at_kill + 1})"
    )


# --- the batch job ----------------------------------------------------------------------------


def expected_predictions(model: Path, paths: list[str]) -> dict[str, tuple[str, float]]:
    """path -> (category, confidence), from the same decoding and Predictor in this
    process, without Ray: what an undisturbed run writes."""
    from fashion_vit.model import load_checkpoint
    from fashion_vit.predict import Predictor, read_and_decode

    saved = load_checkpoint(str(model))
    predictor = Predictor(saved, threads=1)
    out = {}
    for i in range(0, len(paths), 256):
        batch = read_and_decode({"path": np.array(paths[i : i + 256], dtype=object)}, saved.preprocessing.source_size)
        batch = predictor(batch)
        out.update(zip(batch["path"], zip(batch["predicted_category"], batch["confidence"], strict=True), strict=True))
    return out


def test_batch_loses_the_node_of_its_predictor_and_a_new_node_takes_over(cluster, node, trained, samples, tmp_path):
    """(b) the predictor actor's node is lost; (c) the head stays full and a new node
    joins: Ray Data restarts the actor there. Every file once, the same predictions."""
    inputs = [str(samples["train"] / "images"), str(samples["holdout"] / "images")]
    out, log = tmp_path / "pred.csv", tmp_path / "predict.log"
    argv = [sys.executable, "jobs/batch_predict.py", "--input", inputs[0], "--input", inputs[1],
            "--model", str(trained / "vit_model.pth"), "--output", str(out), "--batch-size", "1"]  # fmt: skip
    job = cluster.submit(*argv, log=log)
    lost = cluster.node_id(node)
    predictors = wait_while_running(job, log, lambda: cluster.actors_on(lost, "MapWorker"), "a predictor actor")
    time.sleep(2)  # into its batches
    assert job.poll() is None, "the job finished before its node could be killed"
    killed_at = time.time()
    cluster.kill_node(node)
    assert predictors, "no predictor actor was on the node that was killed"

    new = f"n{next(_names)}"
    cluster.add_node(new, cpus=2)
    joined_at = time.time()
    wait_while_running(
        job, log, lambda: cluster.actors_on(cluster.node_id(new), "MapWorker"), "an actor on the new node"
    )
    restarted_at = time.time()
    code = job.wait(timeout=TIMEOUT)
    text = job_log(log)
    resumed = None
    if code != 0:  # Ray could not finish it in-process: the same command with --resume must
        resumed = cluster.submit(*argv, "--resume", log=tmp_path / "resume.log")
        assert resumed.wait(timeout=TIMEOUT) == 0, job_log(tmp_path / "resume.log")[-4000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    paths = [r["path"] for r in rows]
    assert paths == sorted(str(p) for d in inputs for p in Path(d).iterdir())  # each file exactly once
    expected = expected_predictions(trained / "vit_model.pth", paths)
    assert [r["predicted_category"] for r in rows] == [expected[p][0] for p in paths]
    assert np.allclose([float(r["confidence"]) for r in rows], [expected[p][1] for p in paths], atol=1e-4)
    redone = next((line.split()[0] for line in text.splitlines() if "predictions were made again" in line), "0")
    print(
        f"\n[batch, node lost, a new node joins] {'finished in-process' if resumed is None else 'failed; --resume finished it'}"
        f"; a predictor ran on the new node {restarted_at - joined_at:.1f}s after it joined "
        f"({restarted_at - killed_at:.1f}s after the kill); predictions made again: {redone}"
    )
