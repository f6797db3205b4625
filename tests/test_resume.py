"""An interrupted experiment continues with --resume; a finished trial is not rerun, and
an Optuna search continues from what its searcher had seen."""

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


def run_until_killed(argv: list[str], env: dict, log_path, ready) -> None:
    """Run a job in a session of its own; once `ready()` holds, SIGKILL it (with its Ray,
    if it started one itself: RAY_ADDRESS=local)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + 600
            while not ready():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "the job did not get far enough in time"
                time.sleep(1)
            time.sleep(3)  # let Tune save its experiment state
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_resumed_optuna_search_continues_from_the_trials_it_had_seen(samples, ray_session, tmp_path):
    """ray-project/ray#30861: a restored searcher that started afresh would suggest the
    baseline again and know of no finished trial. The searcher notes, in its own saved
    state, which trials it had been told finished at each suggestion.

    The job runs on the session's Ray, as on a cluster whose driver died. (That Ray names
    its state API to its workers, as every job's does: with two Rays on the machine, Ray
    Train's placement-group cleaner otherwise cannot tell which to ask about a stopped
    trial, and its CPUs are never given back; see conftest's ray_session.)"""
    import ray

    from fashion_vit.search import read_searcher

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
        "optuna",
        "--num-samples",
        "2",
        "--epochs",
        "2",
        "--max-concurrent-trials",
        "1",
        "--output-dir",
        str(out),
        "--name",
        "fashion-vit-optuna",
    ]
    # No TUNE_GLOBAL_CHECKPOINT_S here: the job itself saves the experiment (and the
    # searcher) after every result, so that a trial that finished before the kill is on record.
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    # One trial at a time: a second Train run means the baseline finished.
    second_started = lambda: len(list(storage.glob("fashion-vit-optuna-train-*"))) >= 2
    run_until_killed(argv, env, tmp_path / "first.log", second_started)
    assert not (out / "vit_model.pth").exists()
    before = read_searcher(str(storage / "fashion-vit-optuna")).suggestions
    assert len(before) >= 2
    finished = sorted(storage.glob("fashion-vit-optuna-train-*"), key=lambda p: p.stat().st_mtime)[:1]
    checkpoints_before = {p: sorted(c.name for c in p.glob("checkpoint_*")) for p in finished}

    # Without --resume the same name is refused rather than mixed with a new run.
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run([*argv, "--resume"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    (tmp_path / "resumed.log").write_text(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    searcher = read_searcher(str(storage / "fashion-vit-optuna"))
    first_pid = searcher.suggestions[0]["pid"]
    made_before = [s["trial_id"] for s in searcher.suggestions if s["pid"] == first_pid]
    made_after = [s for s in searcher.suggestions if s["pid"] != first_pid]
    assert made_before == [s["trial_id"] for s in before], (searcher.suggestions, resumed.stderr[-4000:])
    assert made_after, "the resumed search suggested nothing"
    # Its first suggestion came once every trial of the first run had finished (the one
    # running at the kill continued from its checkpoint), and it knew of all of them.
    assert made_after[0]["completed"] == sorted(made_before)
    # Three trials in all, each suggested once; the study holds every one as finished.
    study = searcher._ot_study
    assert len(searcher.suggestions) == len(study.trials) == 3
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    summary = json.loads((out / "summary.json").read_text())
    trials = summary["trials"]
    assert [t["trial_id"] for t in trials] == [s["trial_id"] for s in searcher.suggestions]
    # The baseline ran once, as the first trial: a fresh searcher would have enqueued it again.
    baseline_lr = trials[0]["config"]["lr"]
    assert [t["config"]["lr"] == baseline_lr for t in trials] == [True, False, False]
    assert all(t["error"] is None for t in trials)
    assert [t["searcher_had_seen"] for t in trials] == [0, 1, 2]
    # The trials that had finished were not trained again, and kept their history.
    assert {p: sorted(c.name for c in p.glob("checkpoint_*")) for p in finished} == checkpoints_before
    assert all(t["epochs_run"] >= 1 for t in trials)
    assert (out / "vit_model.pth").exists()
    # The model card's table of trials says what the searcher had seen at each suggestion.
    card = (out / "report.md").read_text()
    assert all(f"| {t['searcher_had_seen']} finished |" in card for t in trials), card
