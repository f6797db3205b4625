"""The tuning driver: data and model checks on the driver, then Ray Tune runs one trial
per configuration, each trial a Ray Train `TorchTrainer`; the best checkpoint over all
trials is scored once on the test split and exported as `vit_model.pth`.

Shaped like Ray's Train-in-Tune guide: Tune drives a function trainable
(`train_driver_fn`) that builds the TorchTrainer and forwards its reports to Tune
through `TuneReportCallback`. `run` reads as its phases: name the experiment, prepare
the data, start Ray, size the workers to the cluster, tune, pick the best checkpoint,
export and summarise (and, with --mlflow-uri, log the export to the best trial's run).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from fashion_vit.cluster import Node, cluster_nodes, describe, placeable, start_ray, warn_if_not_shared
from fashion_vit.config import (
    HYPERPARAMETERS,
    METRIC,
    SCRATCH_RECIPES,
    ConfigError,
    FashionVitError,
    TrainConfig,
    for_cluster,
)
from fashion_vit.data import (
    MIN_CLASS_ROWS,
    DataError,
    LoadedData,
    class_counts,
    infer_source_size,
    load_data,
    oversample,
    stratified_split,
    to_ray_datasets,
)
from fashion_vit.evaluate import score_test_split
from fashion_vit.files import absolute, atomic_open, is_uri, join, subfolders
from fashion_vit.metrics import format_report
from fashion_vit.model import ModelError, SavedModel, create_model, load_pretrained, read_checkpoint
from fashion_vit.preemption import EXIT_PREEMPTED, Preempted, on_sigterm
from fashion_vit.report import plot_learning_curves, plot_search, write_model_card
from fashion_vit.train import EARLIER_EPOCHS, MODEL_FILE, train_loop_per_worker
from fashion_vit.transforms import Preprocessing


class TrainingError(FashionVitError):
    """No trial trained: the job ends with one line saying why."""


CHECKPOINT_PATH = "checkpoint_path"  # key TuneReportCallback adds to a result that has a checkpoint
EXPERIMENT_PREFIX = "fashion-vit-"


@dataclass
class TuneOutcome:
    model_path: str
    summary_path: str
    best: dict  # the best trial: config, validation metrics, test report
    trials: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        best = self.best
        return (
            f"best trial {best['trial_id']} (trial {best['trial_number']} of {len(self.trials)}, epoch {best['epoch']}): "
            f"val_accuracy {best['val'][METRIC]:.4f}, "
            f"test accuracy {best['test']['accuracy']:.4f}, test macro-F1 {best['test']['macro_f1']:.4f}\n"
            f"model: {self.model_path}\nsummary: {self.summary_path}\n"
            "time: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}s" for k, v in self.timings.items())
        )


@dataclass
class Prepared:
    """The data and preprocessing every trial shares, settled on the driver before Ray
    (and its `recipe_inputs` again if the workers change the recipe)."""

    data: LoadedData
    splits: dict[str, np.ndarray]  # split name -> row indices into data.frame
    epoch: np.ndarray  # the training rows of one epoch: splits["train"], oversampled with --sampling
    split_counts: dict[str, list[int]]  # split name -> images per class
    prep: Preprocessing  # decoding size and normalisation; image_size is the baseline's
    init: SavedModel | None  # the starting weights: --init-from's, or the pretrained checkpoint's; None from scratch


def run(cfg: TrainConfig, log=print) -> TuneOutcome:
    """The whole `jobs/tune.py`: load and split data, tune, export the best model.

    SIGTERM stops it as Ctrl+C stops Tune (`StopOnSigterm`): the experiment state is
    saved, no model is exported, and Preempted carries the flags that continue it."""
    storage = absolute(cfg.storage or os.path.join(cfg.output_dir, "experiments"))
    if os.path.isdir(cfg.model):  # recorded in the checkpoint: say which folder, from anywhere
        cfg = replace(cfg, model=os.path.abspath(cfg.model))
    name = resolve_experiment(cfg, storage)
    cfg = replace(cfg, name=name)
    log(f"experiment {name} in {storage}" + (" (resuming)" if cfg.resume else ""))
    stop = StopOnSigterm()
    try:
        with on_sigterm(stop):
            return _run(cfg, storage, stop, log)
    except Preempted as e:
        from ray import tune

        saved = tune.Tuner.can_restore(join(storage, name))
        e.resume = ["--resume", "--name", name] if saved else ["--name", name]
        raise


def _run(cfg: TrainConfig, storage: str, stop: StopOnSigterm, log) -> TuneOutcome:
    assert cfg.name is not None, "run() resolves the experiment's name"
    experiment = join(storage, cfg.name)
    timings = {}
    t = time.perf_counter()
    prepared = prepare(cfg, log)
    timings["data_load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    start_ray(cfg.address)
    settled = for_cluster(size_workers(cfg, cluster_nodes()))
    if settled.recipe != cfg.recipe:
        log("GPU workers: the scratch-gpu recipe fills the values not given (--recipe scratch keeps the CPU one)")
        mean_std = (prepared.prep.mean, prepared.prep.std)
        prepared = replace(prepared, **recipe_inputs(settled, prepared.data, prepared.splits, mean_std))
    cfg = settled
    # Checkpoints and the experiment state must outlive any one node (docs/cluster.md).
    warn_if_not_shared(write=[("--storage" if cfg.storage else "--output-dir", storage)])
    timings["ray_start_s"] = time.perf_counter() - t

    t = time.perf_counter()
    epoch_splits = {**prepared.splits, "train": prepared.epoch}
    datasets, undecodable = to_ray_datasets(prepared.data.frame, epoch_splits, prepared.prep.source_size)
    if undecodable:
        log(f"{undecodable} images skipped: they did not decode")
    test_ds = datasets.pop("test")
    timings["decode_s"] = time.perf_counter() - t

    t = time.perf_counter()
    # Tune copies each trial's results to --storage only when it saves the experiment,
    # by default at most every 10 s: a trial that finished just before the driver was
    # killed came back from --resume with no history (seen in a test). Results come once
    # an epoch, so saving after each costs nothing; a value you set still wins.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    with stop.tuning():
        results = build_tuner(cfg, prepared, datasets, storage).fit()
    if stop.received or len(results) > results.num_terminated + results.num_errors:
        # fit() returned on SIGTERM or Ctrl+C (Tune's own stop-and-save): trials are
        # unfinished, and the best of what they reported so far is not the job's result.
        how, code = ("SIGTERM", EXIT_PREEMPTED) if stop.received else ("Ctrl+C", 130)
        raise Preempted(f"stopped by {how}: the experiment state is saved and no model was exported", exit_code=code)
    timings["tune_s"] = time.perf_counter() - t
    trials = summarise_trials(results)
    if cfg.search == "optuna":
        _add_searcher_notes(trials, experiment, log)
    return export_best(cfg, prepared, undecodable, trials, test_ds, experiment, timings, log)


def export_best(cfg, prepared: Prepared, undecodable: int, trials, test_ds, experiment: str, timings, log):
    """Score the best checkpoint over all trials on the test split, save it as
    vit_model.pth, and write summary.json and the reports beside it."""
    t = time.perf_counter()
    best_trial, best_row, saved = pick_best(trials, _read_remote_checkpoint)
    saved.metrics["test"] = score_test_split(saved, test_ds)
    model_path = os.path.join(cfg.output_dir, "vit_model.pth")
    saved.save(model_path)
    timings["test_and_export_s"] = time.perf_counter() - t

    best = {
        "trial_id": best_trial["trial_id"],
        "trial_number": best_trial["trial_number"],  # how far into the search it was found
        "epoch": best_row["epoch"],
        "config": best_trial["config"],
        "val": {k: best_row[k] for k in (METRIC, "val_macro_f1", "val_loss")},
        "test": saved.metrics["test"],
        "checkpoint": best_row[CHECKPOINT_PATH],
    }
    if cfg.mlflow_uri:
        from fashion_vit.tracking import trial_run_id

        best["mlflow_run_id"] = trial_run_id(cfg.mlflow_uri, cfg.mlflow_experiment, cfg.name, best["trial_id"])
    space = describe_space(search_space(cfg)) if cfg.search != "none" else {}
    summary_path = write_summary(cfg, prepared, undecodable, saved, best, trials, timings, experiment, space)
    if cfg.mlflow_uri:
        log_to_mlflow(cfg, best, model_path, log)
    log(format_report(best["test"]))
    return TuneOutcome(model_path=model_path, summary_path=summary_path, best=best, trials=trials, timings=timings)


class StopOnSigterm:
    """The tune job's SIGTERM handler. While Tune runs (`tuning()`), the first SIGTERM
    does what Ctrl+C does to Tune: Tune saves the experiment state one last time and
    fit() returns, with `received` set. At any other time, or a second time, it raises
    Preempted at once."""

    def __init__(self) -> None:
        self.received = False
        self._tuning = False

    @contextlib.contextmanager
    def tuning(self):
        self._tuning = True
        try:
            yield
        finally:
            self._tuning = False

    def __call__(self, signum, frame) -> None:
        first, self.received = not self.received, True
        # Tune installs its stop-and-save handler for SIGINT while fit() runs (unless
        # TUNE_DISABLE_SIGINT_HANDLER is set, which leaves Python's default).
        tune_stop = signal.getsignal(signal.SIGINT)
        if first and self._tuning and callable(tune_stop) and tune_stop is not signal.default_int_handler:
            tune_stop(signal.SIGINT, frame)
            return
        raise Preempted("stopped by SIGTERM")


# --- experiment naming -------------------------------------------------------------


def resolve_experiment(cfg: TrainConfig, storage: str) -> str:
    """The experiment's name: a new timestamped one, or with --resume the one to continue.

    Never silently mixes a new run into an existing experiment of the same name."""
    from ray import tune

    def exists(name: str) -> bool:
        return tune.Tuner.can_restore(join(storage, name))

    if cfg.resume:
        # The latest experiment; names sort by time. Train runs live beside it under the same prefix.
        ours = [n for n in subfolders(storage) if n.startswith(EXPERIMENT_PREFIX)]
        names = [cfg.name] if cfg.name else [n for n in ours if exists(n)][-1:]
        if not names or not exists(names[0]):
            what = f"experiment {cfg.name!r}" if cfg.name else "experiment"
            raise ConfigError(f"--resume: no {what} to continue under {storage}")
        return names[0]
    name = cfg.name or EXPERIMENT_PREFIX + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if exists(name):
        raise ConfigError(
            f"experiment {name!r} already exists under {storage}: pass --resume to continue it, or another --name"
        )
    return name


# --- data ----------------------------------------------------------------------------


def prepare(cfg: TrainConfig, log=print) -> Prepared:
    """Load and split the data, check the model can be had (and get its mean/std), and
    settle the size images are decoded at: the largest input size any trial may use."""
    init = read_checkpoint(cfg.init_from) if cfg.init_from else None
    # An --init-from model keeps its label order when the data's labels are among its own.
    data = load_data(cfg, prefer=init.labels if init is not None and not cfg.reinit_head else None)
    labels = data.frame["label"].to_numpy()
    splits = stratified_split(labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    log(data.summary())
    log("split: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    if len(splits["val"]) == 0 or len(splits["test"]) == 0:
        raise DataError("too few rows to hold out validation and test images; use more data")
    counts = np.bincount(labels, minlength=len(data.labels))
    unmeasured = [f"{data.labels[i]} ({n})" for i, n in enumerate(counts) if 0 < n < MIN_CLASS_ROWS]
    if unmeasured:
        log(f"trained on but not measured (fewer than {MIN_CLASS_ROWS} images): {', '.join(unmeasured)}")
    if init is None and not cfg.from_scratch:
        init = load_pretrained(cfg.model, data.labels)
        log(f"pretrained weights: {cfg.model}, a new {len(data.labels)}-way head")
    # Builds the trials' model once here: a label mismatch or an impossible size fails before Ray.
    _, (mean, std) = create_model(cfg, data.labels, init)
    return Prepared(
        data=data,
        splits=splits,
        split_counts={k: class_counts(labels[v], len(data.labels)) for k, v in splits.items()},
        init=init,
        **recipe_inputs(cfg, data, splits, (tuple(mean), tuple(std))),
    )


def recipe_inputs(cfg: TrainConfig, data: LoadedData, splits: dict, mean_std: tuple) -> dict:
    """What depends on the recipe's values, which the cluster may still change: the
    preprocessing, whose decode size is the largest input size any trial may use (its
    mean and std are the model's), and one epoch's training rows (--sampling)."""
    sizes = [cfg.image_size, *(cfg.search_image_sizes or ())] if cfg.search != "none" else [cfg.image_size]
    source_size = infer_source_size(data.frame["image"], max(sizes))
    return {
        "epoch": oversample(splits["train"], data.frame["label"].to_numpy(), cfg.sampling, cfg.seed),
        "prep": Preprocessing(cfg.image_size, source_size, *mean_std),
    }


def size_workers(cfg: TrainConfig, nodes: list[Node]) -> TrainConfig:
    """Settle use_gpu and cpus_per_worker so that a trial's workers fit on the nodes that
    exist, or fail at once with one line saying what was asked and what the nodes have
    (a request no node can hold would otherwise wait forever).

    GPU workers take one GPU and one CPU each. CPU workers without --cpus-per-worker get
    the cluster's CPUs shared among the trials, but never more than one node holds, and
    few enough that all of a trial's workers can be placed."""
    total_gpus = sum(n.gpus for n in nodes)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else total_gpus > 0
    have = describe(nodes)
    if use_gpu:
        if total_gpus == 0:
            raise ConfigError(f"--gpu asks for {cfg.num_workers} GPU worker(s), but the cluster has no GPUs ({have})")
        if placeable(nodes, cpus=1, gpus=1) < cfg.num_workers:
            raise ConfigError(
                f"--num-workers {cfg.num_workers} with one GPU each cannot be placed: {total_gpus} GPU(s) in all ({have})"
            )
        return replace(cfg, use_gpu=True, cpus_per_worker=1)

    largest = max((n.cpus for n in nodes), default=0)
    if cfg.cpus_per_worker is not None:
        cpus = cfg.cpus_per_worker
        if placeable(nodes, cpus=cpus) < cfg.num_workers:
            raise ConfigError(
                f"--num-workers {cfg.num_workers} x --cpus-per-worker {cpus} cannot be placed: "
                f"the largest node has {largest} CPU(s) ({have})"
            )
        return replace(cfg, use_gpu=False, cpus_per_worker=cpus)
    trials = 1 + (cfg.num_samples if cfg.search != "none" else 0)
    share = sum(n.cpus for n in nodes) // (cfg.num_workers * trials)
    for cpus in range(max(1, min(share, largest)), 0, -1):
        if placeable(nodes, cpus=cpus) >= cfg.num_workers:
            return replace(cfg, use_gpu=False, cpus_per_worker=cpus)
    raise ConfigError(f"--num-workers {cfg.num_workers} CPU workers cannot be placed: the cluster has {have}")


def trials_that_fit(cfg: TrainConfig, nodes: list[Node]) -> int:
    """How many trials' worker groups the nodes hold at once. Tune cannot see the
    resources a trial's TorchTrainer will ask for, and a trial started without room for
    its workers would wait for them and time out."""
    if cfg.use_gpu:
        return max(1, placeable(nodes, cpus=1, gpus=1) // cfg.num_workers)
    assert cfg.cpus_per_worker is not None, "size_workers() settles it before trials are counted"
    return max(1, placeable(nodes, cpus=cfg.cpus_per_worker) // cfg.num_workers)


# --- tuning ------------------------------------------------------------------------------


def search_space(cfg: TrainConfig) -> dict:
    """What `--search` samples (asha at random, optuna by TPE), centred on the trial's
    recipe; batch size moves the step count, so it is searched on a small grid. Every
    choice holds the baseline's own value, so the baseline is a point of the space (as
    Optuna requires of its first trial). Anything not searched stays at the baseline's
    value."""
    from ray import tune

    space = baseline(cfg)
    choice = lambda name, values: tune.choice(values if space[name] in values else [space[name], *values])
    if cfg.recipe in SCRATCH_RECIPES:
        # Random weights: the rate matters within a factor of a few, and what fights
        # overfitting (decay, smoothing, crops) and the imbalance is worth trying.
        space.update(
            lr=tune.loguniform(cfg.lr / 3, min(cfg.lr * 3, 0.5)),
            weight_decay=choice("weight_decay", [0.05, 0.1]),
            label_smoothing=choice("label_smoothing", [0.0, 0.1]),
            augment=choice("augment", ["flip", "crop"]),
            class_weights=choice("class_weights", ["none", "sqrt"]),
            # Smaller patches: 4x the tokens from the same small image, which a GPU affords.
            patch_size=choice("patch_size", sorted({max(2, cfg.patch_size // 2), cfg.patch_size})),
        )
    else:
        space.update(
            # A decade either side of the fine-tuning rate.
            lr=tune.loguniform(cfg.lr / 10, min(cfg.lr * 10, 0.5)),
            batch_size=tune.choice(sorted({max(8, cfg.batch_size // 2), cfg.batch_size, cfg.batch_size * 2})),
            weight_decay=choice("weight_decay", [0.0, 0.01, 0.05]),
            warmup_ratio=choice("warmup_ratio", [0.0, 0.05, 0.1]),
            label_smoothing=choice("label_smoothing", [0.0, 0.1]),
            layer_decay=choice("layer_decay", [1.0, 0.75]),
        )
    if cfg.search_image_sizes:
        # The position embeddings are resampled to each trial's size (model.resize_image_size).
        space["image_size"] = tune.choice(sorted({cfg.image_size, *cfg.search_image_sizes}))
    return space


def describe_space(space: dict) -> dict:
    """The searched part of a search space in plain values, for summary.json and
    search.png: {"lr": {"loguniform": [low, high]}, "augment": {"choice": ["flip", "crop"]}}."""
    from ray.tune.search.sample import Categorical, Float, LogUniform

    described = {}
    for name, domain in space.items():
        if isinstance(domain, Categorical):
            described[name] = {"choice": list(domain.categories)}
        elif isinstance(domain, Float):
            kind = "loguniform" if isinstance(domain.get_sampler(), LogUniform) else "uniform"
            described[name] = {kind: [domain.lower, domain.upper]}
    return described


def baseline(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in HYPERPARAMETERS}


def train_driver_fn(config: dict, setup: dict, datasets: dict) -> None:
    """One Tune trial: a TorchTrainer over the trial's hyperparameters."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = TrainConfig(**setup["train_config"])
    trial_cfg = replace(cfg, **{k: config[k] for k in HYPERPARAMETERS if k in config})
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**setup, "train_config": asdict(trial_cfg)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=None if cfg.use_gpu else {"CPU": cfg.cpus_per_worker},
        ),
        # NCCL only where GPUs talk to each other: one worker never communicates, and gloo
        # also starts where torch has no CUDA (the tests' logical GPUs).
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu and cfg.num_workers > 1 else "gloo"),
        datasets=datasets,
        # Only training data is sharded: an equal split drops up to N-1 rows, which is
        # fine for SGD but would make validation metrics miss images.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-train-{trial_id}",
            storage_path=setup["storage"],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute=METRIC,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def build_tuner(cfg: TrainConfig, prepared: Prepared, datasets: dict, storage: str):
    """The Tuner over `train_driver_fn`: the baseline first, then the search's trials;
    or, with --resume, the interrupted experiment restored (its searcher included)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_parameters(
        train_driver_fn, setup=trial_setup(cfg, prepared, datasets, storage), datasets=datasets
    )
    trainable = tune.with_resources(trainable, trial_resources())
    searching = cfg.search != "none"
    param_space = search_space(cfg) if searching else baseline(cfg)
    if cfg.resume:
        assert cfg.name is not None, "run() resolves the experiment's name"
        # Finished trials stay finished; unfinished ones restart, and their TorchTrainer
        # (same run name and storage) continues from its latest checkpoint.
        return tune.Tuner.restore(
            join(storage, cfg.name), trainable, resume_unfinished=True, restart_errored=True, param_space=param_space
        )
    num_trials = 1 + (cfg.num_samples if searching else 0)
    concurrency = cfg.max_concurrent_trials or trials_that_fit(cfg, cluster_nodes())
    search_alg, max_concurrent_trials = search_algorithm(cfg, param_space, num_trials, concurrency)
    tune_config = tune.TuneConfig(
        metric=METRIC,
        mode="max",
        search_alg=search_alg,
        max_concurrent_trials=max_concurrent_trials,
        num_samples=num_trials,
        scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg.epochs, grace_period=1, reduction_factor=2)
        if searching
        else None,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(name=cfg.name, storage_path=storage, verbose=1, callbacks=tracking_callbacks(cfg)),
    )


def trial_resources():
    """What a trial's own process asks for: no CPU (it only waits on its TorchTrainer,
    whose workers hold the CPUs/GPUs), on the driver's node. Ray Train attaches its
    controller to the node of the process that calls fit(), so the trial function,
    the controller and the driver then share a node, and losing any other node costs
    only workers, which Train restarts from the last checkpoint. A trial function on
    the lost node would have ended its trial."""
    import ray
    from ray import tune

    here = ray.get_runtime_context().get_node_id()
    return tune.PlacementGroupFactory(
        [{"CPU": 0, "memory": 256 * 1024**2}], bundle_label_selector=[{"ray.io/node-id": here}]
    )


def trial_setup(cfg: TrainConfig, prepared: Prepared, datasets: dict, storage: str) -> dict:
    """What every trial's workers get besides their hyperparameters (train_loop_per_worker's config)."""
    import ray

    return {
        "train_config": asdict(cfg),
        "labels": prepared.data.labels,
        "preprocessing": prepared.prep.to_dict(),
        "train_rows": datasets["train"].count(),
        "class_counts": prepared.split_counts["train"],  # for --class-weights
        "storage": storage,
        # One copy in the object store; workers need not see the driver's disk.
        "init": ray.put(prepared.init) if prepared.init is not None else None,
    }


def search_algorithm(cfg: TrainConfig, param_space: dict, num_trials: int, concurrency: int):
    """(search_alg, TuneConfig.max_concurrent_trials): the baseline is always the first
    trial, then random sampling (none, asha) or Optuna's TPE (optuna)."""
    if cfg.search == "optuna":
        from fashion_vit.search import optuna_search

        # Optuna's first point names exactly the searched values; Tune adds the constants.
        point = {k: v for k, v in baseline(cfg).items() if k in describe_space(param_space)}
        # TuneConfig wraps a Searcher in a ConcurrencyLimiter of max_concurrent_trials.
        return optuna_search(point, num_trials, cfg.seed), concurrency
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # A SearchGenerator ignores TuneConfig.max_concurrent_trials: set it here.
    return BasicVariantGenerator(
        points_to_evaluate=[baseline(cfg)], max_concurrent=concurrency, random_state=cfg.seed
    ), None


def tracking_callbacks(cfg: TrainConfig) -> list:
    """Tune callbacks for --mlflow-uri; without it none, and mlflow is not imported."""
    if not cfg.mlflow_uri:
        return []
    assert cfg.name is not None, "run() resolves the experiment's name"
    from fashion_vit.tracking import mlflow_callback

    return [mlflow_callback(cfg.mlflow_uri, cfg.mlflow_experiment, cfg.name)]


# --- the best checkpoint ------------------------------------------------------------------


def pick_best(trials: list[dict], read) -> tuple[dict, dict, SavedModel]:
    """(trial, epoch row, saved model) of the best reported checkpoint over all trials:
    highest validation accuracy, then lowest validation loss. A tied epoch may have lost
    its checkpoint to num_to_keep, so `read(path)` returning None falls through to the
    next candidate."""
    candidates = [(trial, row) for trial in trials for row in trial["history"] if row.get(CHECKPOINT_PATH)]
    if not candidates:
        errors = {t["error"] for t in trials if t["error"]}
        raise TrainingError(f"no trial produced a checkpoint: {'; '.join(sorted(errors)) or 'none reported one'}")
    # sorted() is stable: among exact ties, the earlier trial and epoch win.
    for trial, row in sorted(candidates, key=lambda c: (-c[1][METRIC], c[1]["val_loss"])):
        saved = read(row[CHECKPOINT_PATH])
        if saved is not None:
            return trial, row, saved
    raise RuntimeError("the best checkpoints were reported but none can be read back from storage")


def root_error(text: str) -> str:
    """The line that names what went wrong in a failed trial's error text (Ray wraps the
    worker's exception in its own, whose first line is only the actor's name): the last
    "SomeError: message" line, without Ray's colour codes and log prefixes."""
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [re.sub(r"^\(\w+ pid=\d+\)\s*", "", line).strip() for line in plain.splitlines()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (named[-1] if named else next((line for line in lines if line), "unknown error"))[:500]


def summarise_trials(results) -> list[dict]:
    """One summary per trial, numbered 1 (the baseline), 2, ... in the order the trials
    were made (a resumed ResultGrid lists them in another order)."""
    made = sorted(range(len(results)), key=lambda i: _creation_order(results[i], i))
    return [_trial_summary(results[i], number) for number, i in enumerate(made, start=1)]


def log_to_mlflow(cfg: TrainConfig, best: dict, model_path: str, log=print) -> None:
    """The exported model and its reports as artifacts of the best trial's MLflow run."""
    from fashion_vit.tracking import log_files

    assert cfg.mlflow_uri, "called only with --mlflow-uri"
    if not best.get("mlflow_run_id"):
        log(f"MLflow: no run of trial {best['trial_id']} found at {cfg.mlflow_uri}; the model was not logged there")
        return
    names = ("summary.json", "report.md", "learning_curves.png", "search.png")
    log_files(cfg.mlflow_uri, best["mlflow_run_id"], [model_path, *(os.path.join(cfg.output_dir, n) for n in names)])
    log(f"MLflow: the model is logged to run {best['mlflow_run_id']} at {cfg.mlflow_uri}")


def _read_remote_checkpoint(path: str) -> SavedModel | None:
    """vit_model.pth out of a Train checkpoint wherever storage put it (local, NFS,
    s3://); None if that checkpoint no longer exists."""
    import ray.train

    try:
        with ray.train.Checkpoint(path).as_directory() as d:
            return read_checkpoint(os.path.join(d, MODEL_FILE))
    except (FileNotFoundError, ModelError):
        return None


def _creation_order(result, position: int) -> int:
    """Sorts trials in the order they were made: Tune tags each trial "<n>_<its values>"
    with a counter when it makes it (from 0 for asha's generator, from 1 for a
    Searcher). The ResultGrid lists trials in that order only until a --resume. A trial
    that reported nothing keeps its `position` in the grid."""
    tag = (result.metrics or {}).get("experiment_tag", "")
    number = tag.split("_", 1)[0]
    return int(number) if number.isdigit() else position


def _trial_summary(result, number: int) -> dict:
    df = result.metrics_dataframe
    keep = [
        "epoch",
        "train_loss",
        "val_loss",
        METRIC,
        "val_macro_f1",
        "epoch_seconds",
        "images_per_second",
        CHECKPOINT_PATH,
        *RESTORE_KEYS,
        EARLIER_EPOCHS,
    ]
    history = [] if df is None or df.empty else df[[c for c in keep if c in df.columns]].to_dict("records")
    history = [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))} for row in history]
    history = with_earlier_epochs(history)
    config = {k: result.config[k] for k in HYPERPARAMETERS if k in result.config}
    return {
        "trial_id": result.metrics.get("trial_id") if result.metrics else None,
        "trial_number": number,
        "config": config,
        "epochs_run": len(history),
        "best_" + METRIC: max((r[METRIC] for r in history), default=None),
        "error": root_error(str(result.error)) if result.error else None,
        **restores(history),
        "history": history,
    }


def with_earlier_epochs(history: list[dict]) -> list[dict]:
    """The trial's epochs, once each. The first report after a restore carries the
    checkpoint's own epoch rows (train.EARLIER_EPOCHS), and they stand for every epoch
    before it: Tune's rows may lack some (a trial resumed with --resume reports afresh,
    and Tune may save the experiment before the last report before a stop reaches it)
    or hold an epoch done twice (reported, then lost with its checkpoint). What an
    earlier restore cost stays on the epoch it was reported with."""
    merged: list[dict] = []
    for row in history:
        text = row.pop(EARLIER_EPOCHS, None)
        if isinstance(text, str) and "epoch" in row:
            costs = {r["epoch"]: {k: r[k] for k in RESTORE_KEYS if k in r} for r in merged if "epoch" in r}
            merged = [
                {**r, **costs.get(r.get("epoch"), {})} for r in json.loads(text) if r.get("epoch", 0) < row["epoch"]
            ]
        merged.append(row)
    return merged


# What train.restore adds to the first epoch after its workers started again from a checkpoint.
RESTORE_KEYS = ("restored_from_epoch", "seconds_since_checkpoint")


def restores(history: list[dict]) -> dict:
    """What the trial lost to failures (a lost worker or node) and interruptions
    (--resume), from its epoch rows (taking train.restore's keys out of them):
    restores, one {"from_checkpoint_of_epoch", "seconds_since_checkpoint"} per
    time its workers started again from a checkpoint; and epochs_redone, the epochs
    begun again from their start, one per restore (the epoch in progress when the
    workers stopped; how far into it they were is in seconds_since_checkpoint, with the
    time it took to notice and restart)."""
    found = []
    for row in history:
        if "restored_from_epoch" in row:
            found.append(
                {
                    "from_checkpoint_of_epoch": int(row.pop("restored_from_epoch")),
                    "seconds_since_checkpoint": row.pop("seconds_since_checkpoint", None),
                }
            )
    return {"restores": found, "epochs_redone": len(found)}


def _add_searcher_notes(trials: list[dict], experiment: str, log=print) -> None:
    """trial["searcher_had_seen"]: how many finished trials the Optuna searcher had been
    told of when it suggested the trial (the baseline: 0). Read from the searcher's
    saved state, which Tune keeps in the experiment folder; skipped for URI storage."""
    if is_uri(experiment):
        log("searcher notes not read: the experiment is not on local storage")
        return
    from fashion_vit.search import read_searcher

    seen: dict[str, int] = {}
    for s in read_searcher(experiment).suggestions:
        seen.setdefault(s["trial_id"], len(s["completed"]))
    for t in trials:
        t["searcher_had_seen"] = seen.get(t["trial_id"])


# --- summary ---------------------------------------------------------------------------------


def write_summary(
    cfg, prepared: Prepared, undecodable: int, saved: SavedModel, best: dict, trials, timings, experiment, space
) -> str:
    """summary.json, the learning curves, the picture of the search (with --search) and
    the model card beside vit_model.pth. `space`: describe_space of what was searched."""
    data = prepared.data
    summary = {
        "data": {
            "source": data.source,
            "labels": data.labels,
            "dropped": data.dropped,
            "small_classes_left_out": data.small_classes,
            "repaired_lines": data.repaired,
            "undecodable": undecodable,
            "split_sizes": {k: len(v) for k, v in prepared.splits.items()},
            "epoch_rows": len(prepared.epoch),  # training rows per epoch, after --sampling
            "class_counts": prepared.split_counts,
        },
        "preprocessing": saved.preprocessing.to_dict(),  # the best trial's (its input size may be searched)
        "train_config": asdict(cfg),
        "experiment": experiment,
        "search_space": space,
        "best": best,
        "trials": trials,
        "timings": timings,
    }
    path = os.path.join(cfg.output_dir, "summary.json")
    with atomic_open(path) as f:
        json.dump(summary, f, indent=2, default=_json_default)
    plot_learning_curves(trials, best["trial_id"], os.path.join(cfg.output_dir, "learning_curves.png"))
    if space:
        plot_search(trials, space, cfg.epochs, best["trial_id"], os.path.join(cfg.output_dir, "search.png"))
    write_model_card(
        os.path.join(cfg.output_dir, "report.md"), summary, "learning_curves.png", "search.png" if space else None
    )
    return path


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    return str(o)
