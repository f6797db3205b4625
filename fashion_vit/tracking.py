"""`--mlflow-uri`: every trial logged to MLflow through Ray Tune's own
`MLflowLoggerCallback` (one run per trial: its hyperparameters as params, each epoch's
results as metrics at step = epoch), and the exported model logged to the best trial's
run. mlflow is imported here only, and only when the flag is given.
"""

from __future__ import annotations

import os
from pathlib import Path

# Tag on every run: which Tune experiment (under --storage) the run belongs to.
EXPERIMENT_TAG = "tune_experiment"


def mlflow_callback(uri: str, experiment: str, tune_experiment: str):
    """The Tune callback that logs each trial as a run of `experiment` (created if missing)."""
    from mlflow.tracking import MlflowClient
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        # The callback would create it with the default artifact location, ./mlruns
        # under whatever folder the driver runs in.
        client.create_experiment(experiment, artifact_location=artifact_location(uri))
    return MLflowLoggerCallback(
        tracking_uri=uri, experiment_name=experiment, tags={EXPERIMENT_TAG: tune_experiment}, save_artifact=False
    )


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database file (as `mlflow server`
    keeps them in ./mlartifacts); a tracking server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        database = os.path.abspath(uri.removeprefix("sqlite:///"))
        return Path(database).parent.joinpath("mlartifacts").as_uri()
    return None


def trial_run_id(uri: str, experiment: str, tune_experiment: str, trial_id: str) -> str | None:
    """The run the callback made for `trial_id`; a trial continued by --resume has a
    second run, and the newest is the one that saw it finish. None if there is none
    (e.g. the experiment was started without --mlflow-uri)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    # The callback names each run and tags it trial_name = "<trainable>_<trial id>".
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.{EXPERIMENT_TAG} = '{tune_experiment}' AND tags.trial_name LIKE '%{trial_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def log_files(uri: str, run_id: str, paths: list[str]) -> None:
    """Each existing file of `paths` as an artifact of the run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for path in paths:
        if os.path.isfile(path):
            client.log_artifact(run_id, path)
