"""The installed `fashion-vit` command: the same jobs as jobs/*.py, by name."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fashion_vit import __version__, commands
from fashion_vit.preemption import Preempted

FASHION_VIT = Path(sys.executable).with_name("fashion-vit")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(FASHION_VIT), *args], capture_output=True, text=True, timeout=120)


def test_the_setup_installs_the_command_and_it_knows_its_version():
    assert FASHION_VIT.exists(), "pip install -e '.[torch,test]' installs fashion-vit beside python"
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"fashion-vit {__version__}"
    assert __version__ != "0+unknown"  # read from the installed package's metadata
    listing = run("--help")
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines() if line.startswith("  ")] == list(commands.COMMANDS)


@pytest.mark.parametrize("name", list(commands.COMMANDS))
def test_each_command_has_the_jobs_flags_under_its_own_name(name, capsys):
    job = {"predict": "batch_predict"}.get(name, name)
    with pytest.raises(SystemExit) as e:
        commands.main([name, "--help"])
    assert e.value.code == 0
    ours = capsys.readouterr().out
    assert ours.startswith(f"usage: fashion-vit {name} ") and f"fashion-vit {name} --" in ours
    proc = subprocess.run([sys.executable, f"jobs/{job}.py", "--help"], capture_output=True, text=True, timeout=120)
    theirs = proc.stdout
    flags = lambda text: sorted({w.strip("[],") for w in text.split() if w.startswith(("--", "[--"))})
    assert flags(ours) == flags(theirs)
    assert f"python jobs/{job}.py --" in theirs  # each shows the examples as it is run


def test_bad_input_is_one_line_and_exit_2_by_either_name(tmp_path):
    missing = str(tmp_path / "nowhere")
    proc = run("predict", "--input", missing)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fashion-vit predict: error: --input {missing!r} is not a folder"
    proc = subprocess.run(
        [sys.executable, "jobs/batch_predict.py", "--input", missing], capture_output=True, text=True, timeout=120
    )
    assert (
        proc.returncode == 2 and proc.stderr.strip() == f"batch_predict.py: error: --input {missing!r} is not a folder"
    )
    unknown = run("train")
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1 and "tune" in unknown.stderr


def test_a_stopped_job_says_how_to_continue_it_with_the_command_it_was_started_by(capsys):
    from fashion_vit.cli import run_job

    def job():
        raise Preempted("stopped by SIGTERM: 3 of 9 files done", ["--resume"])

    assert run_job("fashion-vit predict", job, ["--input", "a b"], ["fashion-vit", "predict"]) == 143
    err = capsys.readouterr().err.splitlines()
    assert shlex.split(err[1]) == ["fashion-vit", "predict", "--input", "a b", "--resume"]
