"""The tuning driver's phases, each on its own and without Ray: choosing the best
checkpoint, sizing workers to the nodes that exist, naming experiments, preparing data."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fashion_vit.config import ConfigError, TrainConfig
from fashion_vit.train import EARLIER_EPOCHS
from fashion_vit.tune import (
    CHECKPOINT_PATH,
    Node,
    TrainingError,
    _creation_order,
    pick_best,
    prepare,
    recipe_inputs,
    resolve_experiment,
    root_error,
    size_workers,
    trials_that_fit,
    with_earlier_epochs,
)


def trial(trial_id, *rows, error=None):
    history = [
        {"epoch": i + 1, "val_accuracy": acc, "val_loss": loss, **({CHECKPOINT_PATH: path} if path else {})}
        for i, (acc, loss, path) in enumerate(rows)
    ]
    return {"trial_id": trial_id, "config": {}, "history": history, "error": error}


def test_best_is_highest_accuracy_then_lowest_loss():
    trials = [
        trial("a", (0.80, 0.50, "a1"), (0.90, 0.40, "a2")),
        trial("b", (0.90, 0.30, "b1"), (0.85, 0.20, "b2")),
    ]
    read = {"a1": "A1", "a2": "A2", "b1": "B1", "b2": "B2"}.get
    best_trial, row, saved = pick_best(trials, read)
    assert (best_trial["trial_id"], row["epoch"], saved) == ("b", 1, "B1")


def test_exact_ties_go_to_the_earlier_trial_and_epoch():
    trials = [trial("a", (0.9, 0.3, "a1"), (0.9, 0.3, "a2")), trial("b", (0.9, 0.3, "b1"))]
    _, row, saved = pick_best(trials, lambda p: p.upper())
    assert saved == "A1" and row["epoch"] == 1


def test_a_checkpoint_gone_from_storage_falls_through_to_the_next_best():
    trials = [trial("a", (0.95, 0.1, "gone"), (0.90, 0.2, "kept")), trial("b", (0.92, 0.1, None))]
    read = {"kept": "KEPT"}.get  # "gone" was deleted by num_to_keep; b's epoch had no checkpoint
    best_trial, row, saved = pick_best(trials, read)
    assert (best_trial["trial_id"], row["epoch"], saved) == ("a", 2, "KEPT")


def test_no_checkpoint_at_all_names_the_trial_errors():
    with pytest.raises(TrainingError, match=r"no trial produced a checkpoint: worker died$"):
        pick_best([trial("a"), trial("b", error="worker died")], lambda p: p)
    with pytest.raises(RuntimeError, match="none can be read back"):
        pick_best([trial("a", (0.9, 0.1, "x"))], lambda p: None)


def test_trials_are_ordered_as_they_were_made_not_as_the_result_grid_lists_them():
    # After a --resume the ResultGrid is in another order; Tune's experiment tag starts
    # with its counter. A trial without any result keeps its place in the grid.
    grid = [SimpleNamespace(metrics={"experiment_tag": "3_lr=0.1"}), SimpleNamespace(metrics={"experiment_tag": "1"})]
    grid.append(SimpleNamespace(metrics={}))
    assert sorted(range(3), key=lambda i: _creation_order(grid[i], i)) == [1, 2, 0]


def test_the_history_has_each_epoch_once_whatever_tune_kept_before_a_restore():
    import json

    def ep(n, **extra):
        return {"epoch": n, "val_accuracy": n / 10, **extra}

    def restored(n, earlier, **extra):
        return ep(n, restored_from_epoch=n - 1, **{EARLIER_EPOCHS: json.dumps(earlier)}, **extra)

    def epochs(history):
        return [r["epoch"] for r in history]

    # --resume after a SIGTERM that came as epoch 2 was reported: Tune saved 1, the checkpoint holds 1 and 2.
    merged = with_earlier_epochs([ep(1), restored(3, [ep(1), ep(2)])])
    assert epochs(merged) == [1, 2, 3] and EARLIER_EPOCHS not in merged[2]
    # Tune reports afresh after --resume: the epochs before come from the checkpoint alone.
    assert epochs(with_earlier_epochs([restored(3, [ep(1), ep(2)])])) == [1, 2, 3]
    # Epoch 2 reported, then lost with its checkpoint and done again: once, as done again.
    merged = with_earlier_epochs([ep(1), ep(2, val_accuracy=0.5), restored(2, [ep(1)]), ep(3)])
    assert epochs(merged) == [1, 2, 3] and merged[1]["val_accuracy"] == 0.2
    # A lost worker during epoch 2, then --resume from epoch 3's checkpoint: both restores kept.
    merged = with_earlier_epochs([ep(1), restored(2, [ep(1)]), ep(3), restored(4, [ep(1), ep(2), ep(3)])])
    assert epochs(merged) == [1, 2, 3, 4]
    assert [r.get("restored_from_epoch") for r in merged] == [None, 1, None, 3]
    assert epochs(with_earlier_epochs([ep(1), ep(2)])) == [1, 2]  # never restored


TWO_BY_TWO = [Node(cpus=2, gpus=0), Node(cpus=2, gpus=0)]


def test_default_workers_fit_the_largest_node_not_the_cluster_total():
    # The failure this replaces: 4 CPUs in all, so one worker of 4 that no node holds.
    cfg = size_workers(TrainConfig(), TWO_BY_TWO)
    assert cfg.cpus_per_worker == 2 and cfg.use_gpu is False
    assert trials_that_fit(cfg, TWO_BY_TWO) == 2
    # A head without CPUs does not count.
    assert size_workers(TrainConfig(), [Node(0, 0), Node(8, 0)]).cpus_per_worker == 8


def test_default_workers_share_the_cpus_among_a_search():
    cfg = size_workers(TrainConfig(search="asha", num_samples=3), [Node(8, 0)])
    assert cfg.cpus_per_worker == 2 and trials_that_fit(cfg, [Node(8, 0)]) == 4
    # More trials than CPUs: one CPU each, as many at once as the CPUs hold.
    cfg = size_workers(TrainConfig(search="asha", num_samples=8), TWO_BY_TWO)
    assert cfg.cpus_per_worker == 1 and trials_that_fit(cfg, TWO_BY_TWO) == 4


def test_data_parallel_workers_are_sized_so_that_all_of_them_can_be_placed():
    cfg = size_workers(TrainConfig(num_workers=2), [Node(3, 0), Node(3, 0)])
    assert cfg.cpus_per_worker == 3  # one worker on each node
    cfg = size_workers(TrainConfig(num_workers=3), [Node(4, 0), Node(2, 0)])
    assert cfg.cpus_per_worker == 2  # 2 + 1 workers of 2 CPUs; 3 CPUs each would not fit
    assert trials_that_fit(cfg, [Node(4, 0), Node(2, 0)]) == 1


def test_impossible_requests_fail_at_once_naming_the_request_and_the_nodes():
    with pytest.raises(
        ConfigError,
        match=r"--cpus-per-worker 64 cannot be placed: the largest node has 2 CPU\(s\) \(2 node\(s\): 2 CPU, 2 CPU\)",
    ):
        size_workers(TrainConfig(cpus_per_worker=64), TWO_BY_TWO)
    with pytest.raises(ConfigError, match=r"--gpu .* the cluster has no GPUs \(2 node\(s\)"):
        size_workers(TrainConfig(use_gpu=True), TWO_BY_TWO)
    with pytest.raises(ConfigError, match="--num-workers 5 CPU workers cannot be placed"):
        size_workers(TrainConfig(num_workers=5), TWO_BY_TWO)
    with pytest.raises(ConfigError, match="--num-workers 3 with one GPU each cannot be placed: 2 GPU"):
        size_workers(TrainConfig(num_workers=3), [Node(16, 2)])


def test_gpu_workers_take_one_gpu_and_trials_follow_the_gpus():
    nodes = [Node(16, 2), Node(16, 2)]
    cfg = size_workers(TrainConfig(), nodes)
    assert cfg.use_gpu is True and cfg.cpus_per_worker == 1
    assert trials_that_fit(cfg, nodes) == 4
    assert trials_that_fit(size_workers(TrainConfig(num_workers=2), nodes), nodes) == 2
    # --cpu on a GPU cluster keeps to CPUs.
    assert size_workers(TrainConfig(use_gpu=False), nodes).use_gpu is False


def test_experiment_names_are_new_or_resumed_never_mixed(tmp_path):
    storage = str(tmp_path)
    name = resolve_experiment(TrainConfig(), storage)
    assert name.startswith("fashion-vit-")
    with pytest.raises(ConfigError, match="no experiment to continue"):
        resolve_experiment(TrainConfig(resume=True), storage)
    with pytest.raises(ConfigError, match="'other'"):
        resolve_experiment(TrainConfig(resume=True, name="other"), storage)


def test_prepare_splits_checks_the_model_and_settles_the_decode_size(samples):
    cfg = TrainConfig(
        data_dir=str(samples["train"]),
        from_scratch=True,
        vit_size="tiny",
        image_size=32,
        limit=300,
        search="asha",
        search_image_sizes=(32, 48),
        recipe="scratch",
    )
    prepared = prepare(cfg, log=lambda *_: None)
    assert sum(len(v) for v in prepared.splits.values()) == 300
    assert sum(prepared.split_counts["train"]) == len(prepared.splits["train"])
    # Decoded once at the largest size a trial may use (60x80 images shrunk to fit 48).
    assert max(prepared.prep.source_size) == 48 and prepared.prep.image_size == 32
    assert prepared.init is None


def test_gpu_workers_settle_the_recipes_inputs_again(samples):
    """--from-scratch is prepared with the CPU recipe before Ray starts; once the workers
    turn out to have GPUs, the scratch-gpu recipe's decode size and epoch are settled again
    from the same split (what jobs/tune.py does between Ray's start and decoding)."""
    from dataclasses import replace

    from fashion_vit.config import for_cluster
    from jobs.tune import parse_args

    cfg = parse_args(["--data-dir", str(samples["train"]), "--from-scratch", "--limit", "300"])
    prepared = prepare(cfg, log=lambda *_: None)
    assert max(prepared.prep.source_size) == 32 and len(prepared.epoch) == len(prepared.splits["train"])
    gpu = for_cluster(replace(cfg, use_gpu=True))
    again = recipe_inputs(gpu, prepared.data, prepared.splits, (prepared.prep.mean, prepared.prep.std))
    assert again["prep"].source_size == (64, 48) and again["prep"].image_size == 64  # 60x80 shrunk to fit 64
    assert (again["prep"].mean, again["prep"].std) == (prepared.prep.mean, prepared.prep.std)
    assert len(again["epoch"]) > len(prepared.splits["train"])  # sqrt sampling repeats the rare classes
    assert set(again["epoch"]) == set(prepared.splits["train"])  # from the training split only


def test_a_failed_trial_is_summed_up_by_the_error_its_worker_raised():
    # What Ray 2.60's ResultGrid holds for a trial whose worker raised (abridged from a real run).
    text = (
        "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=4171, ip=192.0.2.2, repr=train_driver_fn)\n"
        '  File "/x/ray/train/v2/api/data_parallel_trainer.py", line 1, in fit\n'
        "ray.train.WorkerGroupError: Training failed due to worker errors:\n"
        "[Rank 0 Error Snippet]:\n"
        "Traceback (most recent call last):\n"
        '  File "/work/fashion_vit/train.py", line 53, in train_loop_per_worker\n'
        "fashion_vit.model.ModelError: could not load model 'm'\n"
    )
    assert root_error(text) == "fashion_vit.model.ModelError: could not load model 'm'"
    assert root_error("\x1b[36m(TrainController pid=7)\x1b[0m worker died\n") == "worker died"
