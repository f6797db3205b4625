"""SIGTERM, a scheduler's notice before it kills: both jobs save what they finished, exit
143 and print the exact command that continues them, and that command finishes the
job with nothing lost or doubled. Also what a lost node leaves in summary.json, and the
warning for a state folder only one node has."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    TINY_ARGS,
    committed_shards,
    expected_predictions,
    own_ray_env,
    random_model,
    session_env,
)
from tests.test_nodes import reported_epochs

# --- the pieces, without Ray ------------------------------------------------------------------


def test_the_continue_command_is_the_same_command_with_the_flags_added():
    from fashion_vit.cli import continue_command

    script = str(ROOT / "jobs" / "tune.py")
    argv = ["--data-dir", "my data", "--name", "old", "--epochs=3", "--name=older"]
    command = continue_command(script, argv, ["--resume", "--name", "fashion-vit-x"])
    expected = [sys.executable, os.path.relpath(script), "--data-dir", "my data", "--epochs=3", "--resume"]
    assert shlex.split(command) == [*expected, "--name", "fashion-vit-x"]
    # Given again, --resume is not doubled.
    again = continue_command(script, ["--resume", "--input", "a"], ["--resume"])
    assert shlex.split(again)[2:] == ["--input", "a", "--resume"]


def test_a_preempted_job_prints_the_command_and_exits_143(capsys):
    from fashion_vit.cli import run_job
    from fashion_vit.preemption import Preempted

    def job():
        raise Preempted("stopped by SIGTERM: 10 of 20 files done", ["--resume"])

    assert run_job("batch_predict.py", job, ["--input", "x"], "jobs/batch_predict.py") == 143
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "batch_predict.py: stopped by SIGTERM: 10 of 20 files done; continue it with:"
    assert shlex.split(err[1]) == [sys.executable, "jobs/batch_predict.py", "--input", "x", "--resume"]

    def interrupted():  # tune stopped by Ctrl+C: the same, with Ctrl+C's status
        raise Preempted("stopped by Ctrl+C", ["--resume", "--name", "x"], exit_code=130)

    assert run_job("tune.py", interrupted, [], "jobs/tune.py") == 130
    assert capsys.readouterr().err.startswith("tune.py: stopped by Ctrl+C; continue it with:\n")


def test_sigterm_stops_tune_as_ctrl_c_does_while_it_runs_and_at_once_otherwise():
    from fashion_vit.preemption import Preempted
    from fashion_vit.tune import StopOnSigterm

    stop, asked = StopOnSigterm(), []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: asked.append(signum))  # as Tune's own handler
    try:
        with pytest.raises(Preempted):  # before Tune runs: nothing to save, stop now
            stop(signal.SIGTERM, None)
        stop = StopOnSigterm()
        with stop.tuning():
            stop(signal.SIGTERM, None)  # Tune is asked to stop and save; no exception
            assert asked == [signal.SIGINT] and stop.received
            with pytest.raises(Preempted):  # a second notice does not wait
                stop(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_trial_summary_says_what_each_restore_cost():
    from fashion_vit.tune import restores

    history = [
        {"epoch": 1, "val_accuracy": 0.5},
        {"epoch": 2, "val_accuracy": 0.6, "restored_from_epoch": 1.0, "seconds_since_checkpoint": 41.5},
        {"epoch": 3, "val_accuracy": 0.7},
    ]
    assert restores(history) == {
        "restores": [{"from_checkpoint_of_epoch": 1, "seconds_since_checkpoint": 41.5}],
        "epochs_redone": 1,
    }
    assert all("restored_from_epoch" not in row for row in history)  # taken out of the epoch rows
    assert restores([{"epoch": 1}]) == {"restores": [], "epochs_redone": 0}


def test_a_path_some_nodes_cannot_see_gets_one_line():
    from fashion_vit.cluster import unshared_warnings

    given = [("--storage", "/local/exp"), ("--input", "/data/a"), ("--input", "/data/b")]
    lines = unshared_warnings(given, [["10.0.0.3", "10.0.0.2"], [], ["10.0.0.2"]], nodes=3)
    assert lines == [
        "warning: --storage /local/exp is on this node's disk only: 2 of the cluster's 3 nodes cannot see it "
        "(10.0.0.2, 10.0.0.3); what is kept there is lost with this node, and the others cannot use it "
        "(use a shared filesystem, or a URI)",
        "warning: --input /data/b is on this node's disk only: 1 of the cluster's 3 nodes cannot see it "
        "(10.0.0.2); what is kept there is lost with this node, and the others cannot use it "
        "(use a shared filesystem, or a URI)",
    ]


def test_predictions_made_again_do_not_take_the_progress_line_past_the_end():
    from fashion_vit.progress import Progress

    line = Progress(lambda: 0, total=1000, before=200).line(done=900, elapsed=10.0)  # 100 made twice
    assert line.startswith("1000/1000 files (100.0%), 90 images/s, 0s left"), line


@pytest.mark.slow
def test_the_probe_asks_the_node_itself(ray_session, tmp_path):
    """The task pinned to a node answers from that node's disk (here the only node)."""
    import ray

    from fashion_vit.cluster import _not_seen

    here = {ray.get_runtime_context().get_node_id(): "this node"}
    assert _not_seen(here, [str(tmp_path), str(tmp_path / "missing")]) == [[], ["this node"]]


# --- SIGTERM to a running job ----------------------------------------------------------------


def run_until(argv: list[str], env: dict, log: Path, ready, timeout: float = 900):
    """Start a job in a session of its own; once ready() holds, the job and what ready() gave."""
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + timeout
    while not (found := ready()):
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the job did not get far enough (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, found


def stop_with_sigterm(proc: subprocess.Popen, log: Path) -> list[str]:
    """SIGTERM to the driver alone, as a scheduler sends it; the job's exit status must be
    143, and its last stderr line the command that continues it (returned, split)."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = log.read_text().splitlines()
    assert code == 143, "\n".join(lines[-40:])
    assert "Traceback (most recent call last):" not in lines, "\n".join(lines[-60:])  # one line, no wall of trace
    said = [i for i, line in enumerate(lines) if line.endswith("; continue it with:")]
    assert len(said) == 1, "\n".join(lines[-40:])
    return shlex.split(lines[said[0] + 1])


@pytest.mark.slow
def test_sigterm_to_tune_saves_the_experiment_and_the_printed_command_continues_it(samples, ray_session, tmp_path):
    out, name = tmp_path / "results", "fashion-vit-sigterm"
    args = ["--data-dir", str(samples["train"]), *TINY_ARGS, "--limit", "400", "--epochs", "3",
            "--output-dir", str(out), "--name", name]  # fmt: skip
    env = session_env()
    reported = lambda: reported_epochs(out, name)
    proc, seen = run_until([sys.executable, "jobs/tune.py", *args], env, tmp_path / "first.log", reported)
    done = max(seen, reported())  # a count never goes down; a read can lag (tests/test_nodes.py)
    command = stop_with_sigterm(proc, tmp_path / "first.log")
    assert command == [sys.executable, "jobs/tune.py", *args[:-2], "--resume", "--name", name]
    assert "no model was exported" in (tmp_path / "first.log").read_text()
    assert not (out / "vit_model.pth").exists()  # a half-trained trial is not exported as if finished

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    (trial,) = json.loads((out / "summary.json").read_text())["trials"]
    assert [r["epoch"] for r in trial["history"]] == [1, 2, 3]
    # The trial continued from its last checkpoint, not from scratch: the one reported
    # before the notice, or the next, when the epoch in hand finished while Tune stopped.
    (restore,) = trial["restores"]
    assert done <= restore["from_checkpoint_of_epoch"] < 3
    assert (out / "vit_model.pth").exists()


@pytest.mark.slow
def test_sigterm_to_batch_predict_commits_what_it_finished_and_the_printed_command_continues_it(samples, tmp_path):
    """1,800 files in three folders and a table naming one more: a FIFO, whose read
    hangs until someone writes to it, as a stalled network read does. Its block cannot
    finish, so the notice always comes mid-run whatever the machine's speed (a race on
    speed alone was lost on a fast CI machine: all 1,800 done before the notice). Two
    predictor actors: while one waits on the FIFO, the other commits blocks. The blocks
    committed when the notice comes are kept, and only the rest is predicted again."""
    model = random_model(tmp_path / "vit_model.pth", 64, (224, 224))
    images = sorted((samples["train"] / "images").iterdir())[:600]
    inputs = []
    for copy in range(3):  # three folders of links to the same 600 real images
        folder = tmp_path / f"copy{copy}"
        folder.mkdir()
        for image in images:
            (folder / image.name).symlink_to(image)
        inputs.append(str(folder))
    stalled = tmp_path / "stalled.jpg"
    os.mkfifo(stalled)
    table = tmp_path / "late.csv"
    table.write_text(f"path\n{stalled}\n")
    out = tmp_path / "pred.csv"
    args = ["--input-table", str(table), *(a for d in inputs for a in ("--input", d)),
            "--model", str(model), "--output", str(out), "--num-actors", "2"]  # fmt: skip
    # A Ray of its own: on the session's, after the SIGTERM tune test, the first commit
    # waited ~150 s with most files predicted and every CPU free (docs/benchmarks.md).
    env = own_ray_env()
    try:
        first = [sys.executable, "jobs/batch_predict.py", *args]
        proc, _ = run_until(first, env, tmp_path / "first.log", lambda: committed_shards(out))
        command = stop_with_sigterm(proc, tmp_path / "first.log")
    finally:
        release(stalled)
    assert command == [*first, "--resume"]
    message = next(line for line in (tmp_path / "first.log").read_text().splitlines() if "stopped by SIGTERM" in line)
    done = int(message.split("stopped by SIGTERM: ")[1].split()[0])
    total = 1 + len(inputs) * len(images)
    assert 0 < done < total and not out.exists()

    stalled.unlink()  # the read that hung now finds the image
    stalled.symlink_to(images[0])
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed: {done} files were done by the interrupted run, {total - done} now" in resumed.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    # The table's row first, then the folders' files in path order.
    assert [r["path"] for r in rows] == [str(stalled), *sorted(str(Path(d) / i.name) for d in inputs for i in images)]
    expected = expected_predictions(model, [str(Path(inputs[0]) / i.name) for i in images])
    by_name = {Path(path).name: category for path, (category, _) in expected.items()}
    by_name[stalled.name] = by_name[images[0].name]
    assert [r["predicted_category"] for r in rows] == [by_name[Path(r["path"]).name] for r in rows]


def release(fifo: Path) -> None:
    """Let a read still waiting on the FIFO end (it then reads no bytes)."""
    with contextlib.suppress(OSError):  # no reader left
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
