"""Shared fixtures: real images from ../shared/data/fashion-small, one Ray for the
whole session, and one tiny model trained through jobs/tune.py for the tests that
need a trained model.

The suite runs as on a brand-new machine: before anything imports Ray, HOME, the
caches and Ray's temp folder point at a new empty folder, and no Ray address or token
is inherited. A test can then neither pass on what an earlier run left behind
(~/.ray/auth_token, a Hugging Face cache, a running Ray) nor leave anything in the
user's home. Subprocesses inherit the same environment.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Short: Ray's socket paths under RAY_TMPDIR must stay under 107 bytes.
FRESH = tempfile.mkdtemp(prefix="fvt-", dir="/tmp")
for _var in (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "TORCH_HOME",
):
    os.environ.pop(_var, None)
os.environ.update(HOME=os.path.join(FRESH, "home"), RAY_TMPDIR=os.path.join(FRESH, "tmp"))
os.makedirs(os.environ["HOME"])
os.makedirs(os.environ["RAY_TMPDIR"])

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FASHION_SMALL", ROOT.parent / "shared" / "data" / "fashion-small"))
# Real ImageNet-pretrained ViT-Tiny/16 weights in the save_pretrained layout.
PRETRAINED = Path(
    os.environ.get("FASHION_VIT_PRETRAINED", ROOT.parent / "shared" / "models" / "vit-tiny-patch16-224-augreg")
)
# Small real samples: CI runs on 2 cores.
TRAIN_ROWS = 1500
HOLDOUT_ROWS = 300


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python <script> args` from the repository root as a user would; output captured."""
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout
    )


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """A job's main(argv) in this process, as its script runs it (the scripts themselves
    are run in tests/test_commands.py): its exit status and what it wrote to stderr.
    argparse's own errors leave through SystemExit, as they do from the script."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def session_env() -> dict:
    """The environment of a job run as a subprocess on the session's Ray (as `ray job
    submit` runs it on a cluster): no Ray of its own to start and stop."""
    import ray

    return dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)


def own_ray_env() -> dict:
    """A subprocess job that starts a local Ray of its own, in its own temp folder (for
    the tests that lose that whole Ray). Short: socket paths must stay under 107 bytes."""
    temp = tempfile.mkdtemp(prefix="j", dir=os.environ["RAY_TMPDIR"])
    return dict(os.environ, RAY_ADDRESS="local", RAY_TMPDIR=temp)


def kill_after_first_commit(args: list[str], output: Path, env: dict, log: Path, timeout: float = 600) -> None:
    """Run jobs/batch_predict.py until the first shard of `output` is committed to its
    checkpoint, then SIGKILL the driver and everything in its session: a lost machine."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "jobs/batch_predict.py", *args], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + timeout
        while not committed_shards(output):
            assert proc.poll() is None, "the job ended before it could be killed:\n" + log.read_text()[-3000:]
            assert time.time() < deadline, f"no shard committed in {timeout:.0f} s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if env.get("RAY_ADDRESS") == "local":  # its own Ray's workers notice their raylet is gone within seconds
        deadline = time.time() + 60
        while _still_running(env["RAY_TMPDIR"]) and time.time() < deadline:
            time.sleep(0.5)


def committed_shards(output: Path) -> list[Path]:
    """The batch job's shards of `output` that its checkpoint has committed so far."""
    checkpoint = Path(str(output) + ".partial") / "checkpoint"
    return [p for p in checkpoint.glob("*.parquet") if ".pending" not in p.name]


def _still_running(marker: str) -> bool:
    return any(marker in cmd for _, cmd in process_table().values())


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
        table[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return table


def random_model(path: Path, image_size: int = 32, source_size=(80, 60), seed: int = 0) -> Path:
    """A seeded random ViT-tiny saved as vit_model.pth: its predictions are as fixed as a
    trained one's, and it needs no training. Its speed is set by image_size (32 px: fast;
    128 px, 64 patches: slow enough to act in the middle of a run), its blocks by
    source_size (the batch job's rows per block follow the decoded size)."""
    import torch

    from fashion_vit.config import MASTER_CATEGORIES, TrainConfig
    from fashion_vit.model import create_model, save_checkpoint
    from fashion_vit.transforms import Preprocessing

    torch.manual_seed(seed)
    model, (mean, std) = create_model(
        TrainConfig(from_scratch=True, vit_size="tiny", image_size=image_size), list(MASTER_CATEGORIES)
    )
    save_checkpoint(str(path), model, Preprocessing(image_size, source_size, mean, std), {}, {})
    return path


def expected_predictions(model: Path, paths: list[str]) -> dict[str, tuple[str, float]]:
    """path -> (category, confidence), from the same decoding and Predictor in this
    process, without Ray: what an undisturbed run writes."""
    import numpy as np

    from fashion_vit.model import load_checkpoint
    from fashion_vit.predict import Predictor, read_and_decode

    saved = load_checkpoint(str(model))
    predictor = Predictor(saved)
    out = {}
    for i in range(0, len(paths), 256):
        batch = read_and_decode({"path": np.array(paths[i : i + 256], dtype=object)}, saved.preprocessing.source_size)
        batch = predictor(batch)
        out.update(zip(batch["path"], zip(batch["predicted_category"], batch["confidence"], strict=True), strict=True))
    return out


class Exploit:
    """Pickles into a call of os.system: what a hostile model file would hold. Loading
    one must never create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(FRESH, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "styles.csv").is_file():
        pytest.fail(f"real test data not found at {SHARED} (set FASHION_SMALL to a Kaggle-layout folder)")
    return SHARED


@pytest.fixture(scope="session")
def pretrained_weights() -> Path:
    if not (PRETRAINED / "config.json").is_file():
        pytest.fail(
            f"pretrained weights not found at {PRETRAINED} (set FASHION_VIT_PRETRAINED to a save_pretrained folder)"
        )
    return PRETRAINED


@pytest.fixture(scope="session")
def styles_rows(shared_data) -> tuple[list[str], list[list[str]]]:
    with open(shared_data / "styles.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def make_kaggle_folder(dest: Path, header: list[str], rows: list[list[str]], images: Path) -> Path:
    """A Kaggle-layout folder whose images are symlinks to the real ones."""
    (dest / "images").mkdir(parents=True)
    with open(dest / "styles.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    for row in rows:
        os.symlink(images / f"{row[0]}.jpg", dest / "images" / f"{row[0]}.jpg")
    return dest


@pytest.fixture(scope="session")
def samples(styles_rows, shared_data, tmp_path_factory):
    """Disjoint seeded samples of real rows: a training folder and a holdout folder."""
    header, rows = styles_rows
    rows = [r for r in rows if r[2] != "Home"]
    random.Random(1234).shuffle(rows)
    train = make_kaggle_folder(tmp_path_factory.mktemp("train"), header, rows[:TRAIN_ROWS], shared_data / "images")
    holdout = make_kaggle_folder(
        tmp_path_factory.mktemp("holdout"), header, rows[TRAIN_ROWS : TRAIN_ROWS + HOLDOUT_ROWS], shared_data / "images"
    )
    return {"train": train, "holdout": holdout, "holdout_rows": rows[TRAIN_ROWS : TRAIN_ROWS + HOLDOUT_ROWS]}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session; the jobs' own ray.init() reuses it. Started as the
    jobs start theirs, so that its workers are told its state API: with another Ray on
    the machine (an own-Ray test's, a loopback cluster), Ray Train's
    placement-group cleaner cannot tell which to ask, and a trial that ASHA stopped kept
    its CPUs for the rest of the session (CI on cbfa108: four later tests waited 900 s)."""
    import ray

    from fashion_vit.cluster import start_ray

    start_ray(None, num_cpus=2)
    # The raylet and its workers have it now; other tests' subprocess jobs start Rays of
    # their own, and would tell their workers this one's.
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    yield
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def session_ray_released():
    """After each module, every CPU of the session's Ray is free again. A module that
    leaves one held (a placement group, an actor) fails here, by name, and what it held
    is released: otherwise the leak shows up later as other tests' 900 s timeouts, far
    from its cause (CI on ed245c0: four trainings after test_serve waited 900 s each)."""
    yield
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    deadline = time.monotonic() + 60  # a finished trial's group and actors go within seconds
    while _held_cpus(ray) and time.monotonic() < deadline:
        time.sleep(0.5)
    if held := _held_cpus(ray):
        leaks = _release_leaks(ray)
        pytest.fail(f"the module left {held:g} of the session's CPUs held: {'; '.join(leaks) or 'by nothing listed'}")


def _held_cpus(ray) -> float:
    return ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)


def _release_leaks(ray) -> list[str]:
    """Remove the placement groups still held and kill the named actors that hold CPUs
    (Serve's replicas are named); say what each was."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors

    leaks = []
    for pg_id, pg in ray.util.placement_group_table().items():
        if pg["state"] != "REMOVED":
            leaks.append(f"placement group {pg['name'] or pg_id} {pg['bundles']}")
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
    address = ray.get_runtime_context().gcs_address
    for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
        if (actor.required_resources or {}).get("CPU", 0) > 0 and not actor.placement_group_id:
            leaks.append(f"actor {actor.class_name} (pid {actor.pid})")
            if actor.name:
                ray.kill(ray.get_actor(actor.name, namespace=actor.ray_namespace), no_restart=True)
    return leaks


# The scratch recipe (a tiny ViT at 32x32) learns the coarse categories in a few CPU
# epochs; the tests give --epochs themselves.
TINY_ARGS = ["--from-scratch"]


@pytest.fixture(scope="session")
def trained(samples, ray_session, tmp_path_factory):
    """jobs/tune.py run once, end to end, on the real training sample."""
    from jobs import tune as tune_job

    out = tmp_path_factory.mktemp("results")
    argv = ["--data-dir", str(samples["train"]), *TINY_ARGS, "--epochs", "4", "--output-dir", str(out)]
    assert tune_job.main(argv) == 0
    return out
