"""The tuning driver: data and model checks on the driver, then Ray Tune runs one trial
per configuration, each trial a Ray Train `TorchTrainer`; the best checkpoint over all
trials is scored once on the test split and exported as `vit_model.pth`.

Shaped like Ray's Train-in-Tune guide: Tune drives a function trainable
(`train_driver_fn`) that builds the TorchTrainer and forwards its reports to Tune
through `TuneReportCallback`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from fashion_vit.config import METRIC, ConfigError, TrainConfig
from fashion_vit.data import DataError, class_counts, infer_source_size, load_data, stratified_split, to_ray_datasets
from fashion_vit.files import atomic_open
from fashion_vit.metrics import classification_report, confusion_matrix, format_report
from fashion_vit.model import ModelError, atomic_torch_save, create_model, read_checkpoint
from fashion_vit.report import plot_learning_curves, write_model_card
from fashion_vit.train import MODEL_FILE, train_loop_per_worker
from fashion_vit.transforms import Preprocessing

# Hyperparameters a trial may vary; the rest of TrainConfig is fixed for the experiment.
HYPERPARAMETERS = (
    "lr", "batch_size", "weight_decay", "warmup_ratio", "label_smoothing", "augment", "class_weights", "image_size",
)
CHECKPOINT_PATH = "checkpoint_path"  # key TuneReportCallback adds to a result that has a checkpoint


@dataclass
class TuneOutcome:
    model_path: str
    summary_path: str
    best: dict  # the best trial: config, validation metrics, test report
    trials: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def search_space(cfg: TrainConfig) -> dict:
    """What `--search asha` samples, centred on the trial's recipe; batch size moves the
    step count, so it is searched on a small grid. Anything not searched stays at the
    baseline's value."""
    from ray import tune

    space = baseline(cfg)
    if cfg.recipe == "scratch":
        # Random weights: the rate matters within a factor of a few, and what fights
        # overfitting (decay, smoothing, crops) and the imbalance is worth trying.
        space.update(
            lr=tune.loguniform(cfg.lr / 3, min(cfg.lr * 3, 0.5)),
            weight_decay=tune.choice([0.05, 0.1]),
            label_smoothing=tune.choice([0.0, 0.1]),
            augment=tune.choice(["flip", "crop"]),
            class_weights=tune.choice(["none", "sqrt"]),
        )
    else:
        space.update(
            # A decade either side of the fine-tuning rate.
            lr=tune.loguniform(cfg.lr / 10, min(cfg.lr * 10, 0.5)),
            batch_size=tune.choice(sorted({max(8, cfg.batch_size // 2), cfg.batch_size, cfg.batch_size * 2})),
            weight_decay=tune.choice([0.0, 0.01, 0.05]),
            warmup_ratio=tune.choice([0.0, 0.05, 0.1]),
            label_smoothing=tune.choice([0.0, 0.1]),
        )
    if cfg.search_image_sizes:
        # The position embeddings are resampled to each trial's size (model.resize_image_size).
        space["image_size"] = tune.choice(sorted(set(cfg.search_image_sizes)))
    return space


def baseline(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in HYPERPARAMETERS}


def trials_that_fit(cfg: TrainConfig, use_gpu: bool) -> int:
    """How many trials' worker groups the cluster holds at once. Tune cannot see the
    resources a trial's TorchTrainer will ask for, and a trial started without room for
    its workers would wait for them and time out."""
    import ray

    resources = ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0) // cfg.num_workers))
    return max(1, int(resources.get("CPU", 1) // (cfg.num_workers * cfg.cpus_per_worker)))


def train_driver_fn(config: dict, setup: dict, datasets: dict) -> None:
    """One Tune trial: a TorchTrainer over the trial's hyperparameters."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = TrainConfig(**setup["train_config"])
    trial_cfg = replace(cfg, **{k: config[k] for k in HYPERPARAMETERS if k in config})
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**setup, "train_config": asdict(trial_cfg)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=setup["use_gpu"],
            resources_per_worker=None if setup["use_gpu"] else {"CPU": cfg.cpus_per_worker},
        ),
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


EXPERIMENT_PREFIX = "fashion-vit-"


def resolve_experiment(cfg: TrainConfig, storage: str) -> str:
    """The experiment's name: a new timestamped one, or with --resume the one to continue.

    Never silently mixes a new run into an existing experiment of the same name."""
    from ray import tune

    def exists(name: str) -> bool:
        return tune.Tuner.can_restore(_join(storage, name))

    if cfg.resume:
        # The latest experiment; Train runs live beside it under the same prefix.
        names = [cfg.name] if cfg.name else [n for n in _experiments(storage) if exists(n)][-1:]
        if not names or not exists(names[0]):
            what = f"experiment {cfg.name!r}" if cfg.name else "experiment"
            raise ConfigError(f"--resume: no {what} to continue under {storage}")
        return names[0]
    name = cfg.name or EXPERIMENT_PREFIX + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if exists(name):
        raise ConfigError(f"experiment {name!r} already exists under {storage}: pass --resume to continue it, or another --name")
    return name


def _experiments(storage: str) -> list[str]:
    """Names of this project's experiments under storage, oldest first (names sort by time)."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(storage if "://" in storage else os.path.abspath(storage))
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(EXPERIMENT_PREFIX))


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else os.path.join(storage, name)


def run(cfg: TrainConfig, log=print) -> TuneOutcome:
    """The whole `jobs/tune.py`: load and split data, tune, export the best model."""
    timings = {}
    storage = cfg.storage if cfg.storage and "://" in cfg.storage else os.path.abspath(cfg.storage or os.path.join(cfg.output_dir, "experiments"))
    cfg = replace(cfg, name=resolve_experiment(cfg, storage))
    log(f"experiment {cfg.name} in {storage}" + (" (resuming)" if cfg.resume else ""))
    t = time.perf_counter()
    data = load_data(cfg)
    splits = stratified_split(data.frame["label"].to_numpy(), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    log(data.summary())
    log("split: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    split_counts = {k: class_counts(data.frame["label"].to_numpy()[v], len(data.labels)) for k, v in splits.items()}
    if len(splits["val"]) == 0 or len(splits["test"]) == 0:
        raise DataError("too few rows to hold out validation and test images; use more data")
    # Check the model can be had before any trial starts (and get its mean/std).
    init_payload = read_checkpoint(cfg.init_from) if cfg.init_from else None
    _, (mean, std) = create_model(cfg, data.labels, init_payload)
    # Decoded once for every trial: at the largest input size any trial may use.
    sizes = [cfg.image_size, *(cfg.search_image_sizes or ())] if cfg.search == "asha" else [cfg.image_size]
    source_size = infer_source_size(data.frame["image"], max(sizes))
    prep = Preprocessing(image_size=cfg.image_size, source_size=source_size, mean=tuple(mean), std=tuple(std))
    timings["data_load_s"] = time.perf_counter() - t

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = time.perf_counter()
    ray.init(address=cfg.address, ignore_reinit_error=True, log_to_driver=True)
    timings["ray_start_s"] = time.perf_counter() - t
    # Per-shard progress bars from every worker, every epoch, drown the epoch lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    t = time.perf_counter()
    datasets, undecodable = to_ray_datasets(data.frame, splits, source_size)
    if undecodable:
        log(f"{undecodable} images skipped: they did not decode")
    test_ds = datasets.pop("test")
    timings["decode_s"] = time.perf_counter() - t

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    if cfg.cpus_per_worker is None:
        # One baseline trial gets the whole machine; a search shares it among its trials.
        trials = 1 + (cfg.num_samples if cfg.search == "asha" else 0)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        cfg = replace(cfg, cpus_per_worker=1 if use_gpu else max(1, cpus // (cfg.num_workers * trials)))
    setup = {
        "train_config": asdict(cfg),
        "labels": data.labels,
        "preprocessing": prep.to_dict(),
        "train_rows": datasets["train"].count(),
        "class_counts": split_counts["train"],  # for --class-weights
        "use_gpu": use_gpu,
        "storage": storage,
        # One copy in the object store; workers need not see the driver's disk.
        "init_payload": ray.put(init_payload) if init_payload is not None else None,
    }
    searching = cfg.search == "asha"
    concurrency = cfg.max_concurrent_trials or trials_that_fit(cfg, use_gpu)
    tune_config = tune.TuneConfig(
        metric=METRIC,
        mode="max",
        # The baseline is always the first trial; --search adds num_samples sampled ones.
        # (A search_alg passed in ignores TuneConfig.max_concurrent_trials: set it here.)
        search_alg=BasicVariantGenerator(points_to_evaluate=[baseline(cfg)], max_concurrent=concurrency, random_state=cfg.seed),
        num_samples=1 + (cfg.num_samples if searching else 0),
        scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg.epochs, grace_period=1, reduction_factor=2)
        if searching
        else None,
    )
    trainable = tune.with_parameters(train_driver_fn, setup=setup, datasets=datasets)
    # The trial function only waits on its TorchTrainer; its workers hold the CPUs/GPUs.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": 256 * 1024**2})
    param_space = search_space(cfg) if searching else baseline(cfg)
    if cfg.resume:
        # Finished trials stay finished; unfinished ones restart, and their TorchTrainer
        # (same run name and storage) continues from its latest checkpoint.
        tuner = tune.Tuner.restore(
            _join(storage, cfg.name), trainable, resume_unfinished=True, restart_errored=True, param_space=param_space
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune_config,
            run_config=tune.RunConfig(name=cfg.name, storage_path=storage, verbose=1),
        )
    t = time.perf_counter()
    results = tuner.fit()
    timings["tune_s"] = time.perf_counter() - t

    trials = [_trial_summary(r) for r in results]
    candidates = [(trial, row) for trial in trials for row in trial["history"] if row.get(CHECKPOINT_PATH)]
    if not candidates:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials if t["error"]) or "no checkpoint was reported"
        raise RuntimeError(f"no trial produced a checkpoint ({errors})")
    # Best validation accuracy, then lowest validation loss. A tied epoch may have lost its
    # checkpoint to num_to_keep, so fall through to the next candidate if it is gone.
    candidates.sort(key=lambda c: (c[1][METRIC], -c[1]["val_loss"]), reverse=True)
    t = time.perf_counter()
    for best_trial, best_row in candidates:
        payload = _read_remote_checkpoint(best_row[CHECKPOINT_PATH])
        if payload is not None:
            break
    else:
        raise RuntimeError("the best checkpoints were reported but none can be read back from storage")
    test_report = score_test_split(payload, test_ds, data.labels)
    payload["metrics"]["test"] = test_report
    model_path = os.path.join(cfg.output_dir, "vit_model.pth")
    atomic_torch_save(payload, model_path)
    timings["test_and_export_s"] = time.perf_counter() - t

    best = {
        "trial_id": best_trial["trial_id"],
        "epoch": best_row["epoch"],
        "config": best_trial["config"],
        "val": {k: best_row[k] for k in (METRIC, "val_macro_f1", "val_loss")},
        "test": test_report,
        "checkpoint": best_row[CHECKPOINT_PATH],
    }
    summary = {
        "data": {
            "source": data.source,
            "labels": data.labels,
            "dropped": data.dropped,
            "repaired_lines": data.repaired,
            "undecodable": undecodable,
            "split_sizes": {k: int(len(v)) for k, v in splits.items()},
            "class_counts": split_counts,
        },
        "preprocessing": payload["preprocessing"],  # the best trial's (its input size may be searched)
        "train_config": asdict(cfg),
        "experiment": _join(storage, cfg.name),
        "best": best,
        "trials": [{k: v for k, v in t.items()} for t in trials],
        "timings": timings,
    }
    summary_path = os.path.join(cfg.output_dir, "summary.json")
    with atomic_open(summary_path) as f:
        json.dump(summary, f, indent=2, default=_json_default)
    plot_learning_curves(trials, best["trial_id"], os.path.join(cfg.output_dir, "learning_curves.png"))
    write_model_card(os.path.join(cfg.output_dir, "report.md"), summary, "learning_curves.png")
    log(format_report(test_report))
    return TuneOutcome(model_path=model_path, summary_path=summary_path, best=best, trials=trials, timings=timings)


def score_test_split(payload: dict, test_ds, labels: list[str]) -> dict:
    """Test metrics of one checkpoint, computed once, with the batch-inference predictor."""
    from fashion_vit.predict import predict_labelled

    y_true, y_pred = predict_labelled(payload, test_ds)
    return classification_report(confusion_matrix(y_true, y_pred, len(labels)), labels)


def _trial_summary(result) -> dict:
    df = result.metrics_dataframe
    keep = ["epoch", "train_loss", "val_loss", METRIC, "val_macro_f1", "epoch_seconds", "images_per_second", CHECKPOINT_PATH]
    history = [] if df is None or df.empty else df[[c for c in keep if c in df.columns]].to_dict("records")
    history = [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))} for row in history]
    config = {k: result.config[k] for k in HYPERPARAMETERS if k in result.config}
    return {
        "trial_id": result.metrics.get("trial_id") if result.metrics else None,
        "config": config,
        "epochs_run": len(history),
        "best_" + METRIC: max((r[METRIC] for r in history), default=None),
        "error": str(result.error).splitlines()[0] if result.error else None,
        "history": history,
    }


def _read_remote_checkpoint(path: str) -> dict:
    """Read vit_model.pth out of a Train checkpoint wherever storage put it (local, NFS,
    s3://); None if that checkpoint no longer exists."""
    import ray.train

    try:
        with ray.train.Checkpoint(path).as_directory() as d:
            return read_checkpoint(os.path.join(d, MODEL_FILE))
    except (FileNotFoundError, ModelError):
        return None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)
