"""Searches: the Optuna searcher (TPE over the recipe's space, the baseline first), ASHA
stopping trials early, the picture of a search and the table of its trials, and every
trial tracked in MLflow with --mlflow-uri. One search runs here, end to end: ASHA, with
MLflow. An Optuna search runs end to end, killed and resumed, in tests/test_resume.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fashion_vit.config import RECIPES, ConfigError, TrainConfig
from fashion_vit.report import plot_search, stop_reason, trials_table
from fashion_vit.tune import describe_space, search_space, tracking_callbacks
from jobs.tune import parse_args
from tests.conftest import TINY_ARGS
from tests.test_report import assert_png


def test_the_optuna_searcher_starts_at_the_baseline_and_saves_what_it_saw(tmp_path):
    from ray import tune

    from fashion_vit.search import optuna_search, read_searcher

    space = {"lr": tune.loguniform(1e-4, 1e-2), "augment": tune.choice(["flip", "crop"]), "epochs": 3}
    searcher = optuna_search({"lr": 1e-3, "augment": "flip"}, num_trials=6, seed=0)
    assert searcher.set_search_properties("val_accuracy", "max", space)
    assert searcher.suggest("a") == {"lr": 1e-3, "augment": "flip"}
    searcher.on_trial_complete("a", {"val_accuracy": 0.5, "training_iteration": 1})
    searcher.suggest("b")
    searcher.save_to_dir(str(tmp_path), "1")

    restored = read_searcher(str(tmp_path))
    second = restored.suggest("c")
    assert second != {"lr": 1e-3, "augment": "flip"}  # the baseline is not asked for twice
    assert [(s["trial_id"], s["completed"]) for s in restored.suggestions] == [("a", []), ("b", ["a"]), ("c", ["a"])]
    assert [t.state.name for t in restored._ot_study.trials] == ["COMPLETE", "RUNNING", "RUNNING"]


def test_search_and_tracking_flags_are_checked_before_ray_starts():
    assert parse_args(["--from-scratch", "--search", "optuna"]).validate().search == "optuna"
    with pytest.raises(ConfigError, match=r"MLflow no longer accepts a folder; give a database, e\.g\. sqlite:///"):
        parse_args(["--mlflow-uri", "./mlruns"]).validate()
    with pytest.raises(ConfigError, match="no longer accepts a folder"):
        parse_args(["--mlflow-uri", "file:///tmp/mlruns"]).validate()
    # Without the flag, no callback (and mlflow is not imported: tests/test_tune.py runs a job with it blocked).
    assert tracking_callbacks(TrainConfig()) == []


def _trial(number, acc, epochs_run, error=None, **config):
    return {
        "trial_id": f"t{number}",
        "trial_number": number,
        "config": config,
        "epochs_run": epochs_run,
        "best_val_accuracy": acc,
        "error": error,
    }


def test_the_trials_table_ranks_by_accuracy_and_says_why_each_trial_stopped(tmp_path):
    trials = [
        _trial(1, 0.80, 3, lr=3e-4, augment="flip"),
        _trial(2, 0.90, 1, lr=5e-4, augment="crop"),
        _trial(3, None, 0, error="worker died", lr=1e-4, augment="flip"),
        _trial(4, 0.85, 2, lr=2e-4, augment="crop"),
    ]
    assert [stop_reason(t, 3) for t in trials] == [
        "finished",
        "stopped by ASHA after 1 epoch(s)",
        "error",
        "stopped by ASHA after 2 epoch(s)",
    ]
    rows = trials_table(trials, 3, ["lr", "augment"])
    assert rows[0] == "| # | trial | best val accuracy | epochs | stopped | lr | augment |"
    assert rows[2] == "| 2 | t2 | 0.9000 | 1 | stopped by ASHA after 1 epoch(s) | 5.00e-04 | crop |"
    assert [r.split(" | ")[1] for r in rows[2:]] == ["t2", "t4", "t1", "t3"]

    space = {"lr": {"loguniform": [1e-4, 9e-4]}, "augment": {"choice": ["flip", "crop"]}}
    plot_search(trials, space, 3, "t2", str(tmp_path / "search.png"))
    assert_png(tmp_path / "search.png", 600, 300)


@pytest.mark.slow
def test_an_asha_search_stops_a_trial_exports_the_best_pictures_the_search_and_logs_every_trial_to_mlflow(
    samples, ray_session, tmp_path
):
    """Trials run one after another, so each later trial needs the workers of an
    ASHA-stopped one to have been released."""
    from mlflow.tracking import MlflowClient

    from jobs import tune as tune_job

    database = tmp_path / "mlflow.db"
    out = tmp_path / "results"
    argv = [
        "--data-dir",
        str(samples["train"]),
        *TINY_ARGS,
        "--limit",
        "600",
        "--search",
        "asha",
        "--num-samples",
        "3",
        "--epochs",
        "3",
        "--max-concurrent-trials",
        "1",
        "--output-dir",
        str(out),
        "--mlflow-uri",
        f"sqlite:///{database}",
        "--mlflow-experiment",
        "search-test",
    ]
    assert tune_job.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    trials, best = summary["trials"], summary["best"]
    assert [t["trial_number"] for t in trials] == [1, 2, 3, 4]
    assert all(t["error"] is None and t["epochs_run"] >= 1 for t in trials)
    assert trials[0]["config"]["lr"] == pytest.approx(RECIPES["scratch"]["lr"])  # the baseline is the first trial
    assert any(t["epochs_run"] < 3 for t in trials), [(t["epochs_run"], t["best_val_accuracy"]) for t in trials]
    assert len({t["config"]["lr"] for t in trials}) == 4
    assert best["trial_number"] == next(t["trial_number"] for t in trials if t["trial_id"] == best["trial_id"])
    assert best["val"]["val_accuracy"] == max(t["best_val_accuracy"] for t in trials)
    assert summary["search_space"] == describe_space(search_space(parse_args(argv)))
    raw = torch.load(out / "vit_model.pth", weights_only=True)
    assert raw["train_config"]["lr"] == best["config"]["lr"]
    # The scratch recipe's search also samples the input size; the exported model and
    # the summary carry the size its trial trained at, the one prediction must use.
    assert {t["config"]["image_size"] for t in trials} <= {32, 48} and trials[0]["config"]["image_size"] == 32
    assert raw["preprocessing"]["image_size"] == best["config"]["image_size"] == summary["preprocessing"]["image_size"]
    assert raw["train_config"]["image_size"] == best["config"]["image_size"]

    assert_png(out / "search.png", 1200, 300)
    card = (out / "report.md").read_text()
    assert "search.png" in card
    table = card[card.index("| # | trial |") :].splitlines()[2:6]
    assert [row.split(" | ")[1] for row in table] == [
        t["trial_id"] for t in sorted(trials, key=lambda t: -t["best_val_accuracy"])
    ]
    for t in trials:
        reason = "finished" if t["epochs_run"] == 3 else f"stopped by ASHA after {t['epochs_run']} epoch(s)"
        assert f"| {t['trial_id']} | {t['best_val_accuracy']:.4f} | {t['epochs_run']} | {reason} |" in card

    # MLflow: one run per trial, the stopped ones too, tagged with the Tune experiment,
    # its values as params and every epoch's metrics; the best trial's run holds the
    # exported model.
    client = MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("search-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    name = summary["experiment"].rsplit("/", 1)[-1]
    # A run's trial_name is "<trainable>_<trial id>", and ASHA's trial ids hold an underscore.
    by_trial = {
        t["trial_id"]: r for t in trials for r in runs if r.data.tags["trial_name"].endswith(f"_{t['trial_id']}")
    }
    assert len(by_trial) == 4 and len({r.info.run_id for r in by_trial.values()}) == 4
    for t in trials:
        run = by_trial[t["trial_id"]]
        assert run.data.tags["tune_experiment"] == name
        assert float(run.data.params["lr"]) == pytest.approx(t["config"]["lr"])
        assert run.data.params["augment"] == t["config"]["augment"]
        for metric in ("val_accuracy", "val_loss", "train_loss"):
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
            assert logged == [(row["epoch"], pytest.approx(row[metric])) for row in t["history"]], metric
    best_run = by_trial[best["trial_id"]]
    assert best["mlflow_run_id"] == best_run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(best_run.info.run_id)}
    assert {"vit_model.pth", "summary.json", "report.md", "search.png"} <= artifacts
    logged_model = client.download_artifacts(best_run.info.run_id, "vit_model.pth", str(tmp_path))
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
    assert digest(logged_model) == digest(out / "vit_model.pth")
    # Artifacts sit beside the database, not in ./mlruns of whatever folder the job ran in.
    assert (tmp_path / "mlartifacts").is_dir()
    assert all(not client.list_artifacts(r.info.run_id) for r in runs if r is not best_run)
