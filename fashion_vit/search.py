"""`--search optuna`: Ray Tune's OptunaSearch (TPE), recording what it knew at each
suggestion. In a module of its own because importing it imports optuna, which only
--search optuna needs, and because Tune pickles the searcher into the experiment
(tuner.pkl) and `--resume` must be able to import it back.
"""

from __future__ import annotations

import os

from ray.tune.search.optuna import OptunaSearch


class RecordingOptunaSearch(OptunaSearch):
    """OptunaSearch that notes, at every suggestion, which trials it had been told
    finished. The notes live in the searcher's own saved state (`save` pickles its
    __dict__), so after a `--resume` they show whether the restored searcher continued
    from the finished trials or started afresh (ray-project/ray#30861)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.suggestions: list[dict] = []  # {trial_id, pid, completed: trial ids}, in order

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        self.suggestions.append({"trial_id": trial_id, "pid": os.getpid(), "completed": sorted(self._completed_trials)})
        return config


def optuna_search(baseline: dict, num_trials: int, seed: int) -> RecordingOptunaSearch:
    """TPE over the Tuner's param_space (metric and mode come from TuneConfig), with
    `baseline` as the first trial. Optuna's TPE samples at random until
    n_startup_trials have finished (10 by default, for budgets of hundreds); here it
    models the space after a third of the budget, so that a 12-trial search is mostly
    guided rather than 10 random trials and 2 guided ones."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, num_trials // 3))
    return RecordingOptunaSearch(points_to_evaluate=[baseline], sampler=sampler)


def read_searcher(experiment_dir: str) -> RecordingOptunaSearch:
    """The searcher as last saved in an experiment folder on local storage: its
    `suggestions`, and in `_ot_study` the optuna study of every trial it was told of."""
    searcher = RecordingOptunaSearch()
    searcher.restore_from_dir(experiment_dir)
    return searcher
