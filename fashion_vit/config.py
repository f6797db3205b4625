"""Job configurations: one dataclass per job. Each option is declared once, as a field
made by `option()`: its default, its command-line flag and help text, its value in the
scratch recipe, and whether a search varies it. The parsers (`fashion_vit.cli`), the
recipes and the list of searched hyperparameters are derived from these declarations.

`asdict()` of these is what reaches Ray and what is stored inside `vit_model.pth`,
so a checkpoint always says how it was made.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields, replace

from fashion_vit.files import is_uri

DEFAULT_DATASET = "ashraq/fashion-product-images-small"
DEFAULT_MODEL = "google/vit-base-patch16-224-in21k"
DEFAULT_LABEL_COLUMN = "masterCategory"
# The mission's label set for masterCategory; the single 'Home' row is outside it.
MASTER_CATEGORIES = (
    "Apparel",
    "Accessories",
    "Footwear",
    "Personal Care",
    "Free Items",
    "Sporting Goods",
)
VIT_SIZES = ("tiny", "small", "base")
SEARCHES = ("none", "asha", "optuna")
AUGMENTS = ("flip", "crop")
CLASS_WEIGHTS = ("none", "sqrt", "balanced")
SAMPLINGS = ("none", "sqrt", "balanced")
SPLITS = ("test", "val", "train", "all")
# How a model is run (engines.py): eager PyTorch, torch.compile, or ONNX Runtime.
ENGINES = ("torch", "compile", "onnx")
QUANTIZATIONS = ("int8",)
ONNX_EXTRA = "pip install -e '.[onnx]'"
# The metric that picks epochs, trials and the exported model: one name everywhere.
METRIC = "val_accuracy"


class FashionVitError(Exception):
    """A problem the user can fix; the jobs print it as one line, without a traceback."""


class ConfigError(FashionVitError):
    """An invalid flag or value, found before any work starts (exit status 2)."""


def positive_int(text: str) -> int:
    """argparse type for counts and sizes."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type for rates."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


NOT_IN_RECIPE = object()


def option(
    default=None,
    help: str | None = None,
    *,
    group: str | None = None,
    flag: str | None = None,
    scratch=NOT_IN_RECIPE,
    scratch_gpu=NOT_IN_RECIPE,
    pretrained_cpu=NOT_IN_RECIPE,
    searched: bool = False,
    negative: tuple[str, str] | None = None,
    cli_default=MISSING,
    default_factory=MISSING,
    **argparse_kwargs,
):
    """A config field declared once.

    default: the library default, which is also the pretrained recipe's value.
    help: the flag's help text; None leaves the field off the command line.
    group: the --help section. flag: the flag's name (default --field-name).
    scratch: the scratch recipe's value; a field with one is a recipe field, whose flag
      defaults to None so that a value the user gives can be told from the recipe's.
    scratch_gpu: the scratch recipe's value on GPU workers, where it differs (see `for_cluster`).
    pretrained_cpu: the pretrained-cpu recipe's value, where it differs from the seed's (`default`).
    searched: a search may vary it per trial (the space itself is in tune.search_space).
    negative: (flag, help) of a second flag that sets the field to False, exclusive with the first.
    cli_default: the flag's default when it differs from the field's (the help then says it).
    argparse_kwargs: type, choices, action, nargs, metavar, required, ... as argparse takes them.
    """
    metadata = {
        "help": help,
        "group": group,
        "flag": flag,
        "scratch": scratch,
        "scratch_gpu": scratch if scratch_gpu is NOT_IN_RECIPE else scratch_gpu,
        "pretrained_cpu": default if pretrained_cpu is NOT_IN_RECIPE else pretrained_cpu,
        "searched": searched,
        "negative": negative,
        "cli_default": cli_default,
        "argparse": argparse_kwargs,
    }
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


DATA, MODEL, TRAINING, SEARCH, RESOURCES = (
    "data",
    "model",
    "training (the baseline trial; --search varies these)",
    "search",
    "resources and outputs",
)


@dataclass
class TrainConfig:
    # --- data: one of --data-dir, --labels or --dataset (docs/data.md) ---
    data_dir: str | None = option(
        None,
        "a folder (or URI prefix): the Kaggle layout when it has styles.csv (+ images/<id>.jpg), else one folder "
        "per class, DIR/<label>/**/<image>, labelled by the folder names",
        group=DATA,
    )
    labels_table: str | None = option(
        None,
        "a label table, CSV or Parquet, local or at a URI: one row per image, with --image-column and --label-column",
        group=DATA,
        flag="--labels",
        metavar="TABLE",
    )
    dataset: str = option(
        DEFAULT_DATASET, "Hugging Face dataset id (any: --image-column and --label-column name its columns)", group=DATA
    )
    image_column: str = option(
        "image",
        "column of --labels or --dataset with the image: a path (absolute, or relative to the table's folder), a URI "
        "(s3://, gs://, file://), or on the hub the image itself",
        group=DATA,
    )
    label_column: str = option(
        DEFAULT_LABEL_COLUMN,
        "column to classify: masterCategory (6 labels), subCategory, articleType, ...; other labels come from the "
        "data (class folders: the folder names)",
        group=DATA,
    )
    limit: int | None = option(
        None, "train on a stratified sample of this many rows (quick runs)", group=DATA, type=positive_int
    )
    val_fraction: float = option(0.1)  # share of each class held out for validation
    test_fraction: float = option(0.1)  # share of each class held out for the final test
    # --- model ---
    model: str = option(DEFAULT_MODEL, "hub id or local folder of a pretrained ViT", group=MODEL)
    from_scratch: bool = option(
        False,
        "randomly initialised ViT of --vit-size instead of --model (offline machines)",
        group=MODEL,
        action="store_true",
    )
    vit_size: str = option(
        "base", "size for --from-scratch", group=MODEL, scratch="tiny", scratch_gpu="small", choices=VIT_SIZES
    )
    init_from: str | None = option(
        None,
        "start every trial from this vit_model.pth (its weights and label set), e.g. to fine-tune further on new data",
        group=MODEL,
    )
    reinit_head: bool = option(
        False,
        "with --init-from: train a new classifier head when the data's labels differ",
        group=MODEL,
        action="store_true",
    )
    image_size: int = option(
        224,
        "model input side in pixels, a multiple of the patch size",
        group=MODEL,
        scratch=32,
        scratch_gpu=64,
        pretrained_cpu=48,
        searched=True,
        type=positive_int,
    )
    patch_size: int = option(
        16,
        "side of the square patches a --from-scratch ViT cuts its input into (a pretrained checkpoint keeps its own): "
        "(image size / patch size)^2 tokens",
        group=MODEL,
        scratch=16,
        scratch_gpu=8,
        searched=True,
        type=positive_int,
    )
    # --- training: TrainConfig's defaults are the seed's recipe, RECIPES["pretrained"] ---
    recipe: str = option(
        "pretrained",
        "where unset training values come from (default: scratch with --from-scratch, scratch-gpu when the workers "
        "have GPUs, else pretrained; scratch and scratch-gpu imply --from-scratch; pretrained-cpu fine-tunes "
        "--model in about 15 minutes on 2 CPU cores, and is only ever used when asked for)",
        group=TRAINING,
        choices=("pretrained", "pretrained-cpu", "scratch", "scratch-gpu"),
        cli_default=None,
    )
    # The recipe fields (and "recipe") set on the command line (`with_recipe`); the others
    # may still follow the cluster: --from-scratch on GPU workers takes the scratch-gpu
    # values (`for_cluster`). None: a config built in code, whose values all stand.
    user_set: tuple[str, ...] | None = option(None)
    epochs: int = option(
        3, "epochs per trial", group=TRAINING, scratch=6, scratch_gpu=30, pretrained_cpu=3, type=positive_int
    )
    lr: float = option(
        2e-5,
        "AdamW learning rate",
        group=TRAINING,
        scratch=3e-4,
        scratch_gpu=5e-4,
        pretrained_cpu=1e-4,
        searched=True,
        type=positive_float,
    )
    batch_size: int = option(
        32,
        "images per step per worker",
        group=TRAINING,
        scratch=64,
        scratch_gpu=256,
        searched=True,
        type=positive_int,
    )
    weight_decay: float = option(0.0, "AdamW weight decay", group=TRAINING, scratch=0.05, searched=True, type=float)
    warmup_ratio: float = option(
        0.0,
        "share of steps with linear warmup before linear decay",
        group=TRAINING,
        scratch=0.1,
        searched=True,
        type=float,
    )
    layer_decay: float = option(
        1.0,
        "layer-wise learning-rate decay for a pretrained model: block i of L trains at lr x decay^(L + 1 - i), the "
        "embeddings at lr x decay^(L + 1), the head at lr; 1 for one rate throughout",
        group=TRAINING,
        scratch=1.0,
        searched=True,
        type=positive_float,
    )
    label_smoothing: float = option(
        0.0, "cross-entropy label smoothing", group=TRAINING, scratch=0.1, searched=True, type=float
    )
    max_grad_norm: float = option(
        1.0,
        "clip the gradient norm to this (transformers' Trainer default), 0 for no clipping",
        group=TRAINING,
        type=float,
    )
    augment: str = option(
        "flip",
        "flip: random horizontal flip; crop: also a random resized crop, on the device",
        group=TRAINING,
        scratch="flip",
        scratch_gpu="crop",
        searched=True,
        choices=AUGMENTS,
    )
    class_weights: str = option(
        "none",
        "cross-entropy weights against class imbalance: none, sqrt or balanced inverse frequency",
        group=TRAINING,
        scratch="none",
        searched=True,
        choices=CLASS_WEIGHTS,
    )
    sampling: str = option(
        "none",
        "oversample the rare classes' training images each epoch: none; sqrt (a class of n images is seen "
        "sqrt(n_max / n) times an epoch, in expectation); balanced (n_max / n times, at most 100)",
        group=TRAINING,
        scratch="none",
        scratch_gpu="sqrt",
        choices=SAMPLINGS,
    )
    bf16: bool = option(True, "train in fp32 on GPUs too", group=TRAINING, flag="--no-bf16", action="store_false")
    # --- tuning ---
    search: str = option(
        "none",
        "none: the baseline only; asha: baseline + --num-samples randomly sampled trials, stopped early by ASHA; "
        "optuna: the same, but Optuna's TPE picks each trial's values from the trials that finished before it",
        group=SEARCH,
        choices=SEARCHES,
    )
    num_samples: int = option(
        4, "trials after the baseline for --search asha or optuna", group=SEARCH, type=positive_int
    )
    search_image_sizes: tuple[int, ...] | None = option(
        None,
        "with --search, trials also sample the input size from these",
        group=SEARCH,
        scratch=(32, 48),
        scratch_gpu=(48, 64, 80),
        type=positive_int,
        nargs="+",
        metavar="SIZE",
    )
    max_concurrent_trials: int | None = option(
        None, "cap on trials running at once (default: as resources allow)", group=SEARCH, type=positive_int
    )
    num_to_keep: int = option(2)  # checkpoints kept per trial, best validation accuracy first
    # --- resources and outputs ---
    num_workers: int = option(1, "data-parallel workers per trial", group=RESOURCES, type=positive_int)
    use_gpu: bool | None = option(
        None,
        "one GPU per worker (default: when the cluster has GPUs)",
        group=RESOURCES,
        flag="--gpu",
        negative=("--cpu", "train on CPUs even if GPUs exist"),
    )
    cpus_per_worker: int | None = option(
        None,
        "CPUs (and torch threads) per CPU worker (default: the CPUs divided among the trials)",
        group=RESOURCES,
        type=positive_int,
    )
    address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS, else a local Ray)", group=RESOURCES)
    output_dir: str = option("results", "where vit_model.pth and summary.json go", group=RESOURCES)
    storage: str | None = option(
        None, "Ray experiment storage, a path or URI (default: <output-dir>/experiments)", group=RESOURCES
    )
    name: str | None = option(
        None, "experiment name (default: fashion-vit-<UTC time>; with --resume, the latest)", group=RESOURCES
    )
    resume: bool = option(
        False,
        "continue an interrupted experiment: finished trials are kept, unfinished ones continue from their last "
        "checkpoint, and a search from its searcher's saved state",
        group=RESOURCES,
        action="store_true",
    )
    seed: int = option(42, "seed for the split, sampling and init", group=RESOURCES, type=int)
    mlflow_uri: str | None = option(
        None,
        "log every trial to this MLflow tracking URI (a database such as sqlite:////abs/path/mlflow.db, or a "
        "server); the best trial's run also gets vit_model.pth, summary.json and report.md. Needs pip install -e '.[mlflow]'",
        group=RESOURCES,
    )
    mlflow_experiment: str = option("fashion-vit", "MLflow experiment for --mlflow-uri", group=RESOURCES)

    def validate(self) -> TrainConfig:
        """Check every value before Ray starts; raise ConfigError with one clear line."""
        _positive("--epochs", self.epochs)
        _positive("--batch-size", self.batch_size)
        _positive("--num-workers", self.num_workers)
        if self.cpus_per_worker is not None:
            _positive("--cpus-per-worker", self.cpus_per_worker)
        _positive("--num-to-keep", self.num_to_keep)
        if not (self.lr > 0 and self.lr < 1):
            raise ConfigError(f"--lr must be in (0, 1), got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        sizes = [("--image-size", self.image_size)] + [
            ("--search-image-sizes", s) for s in self.search_image_sizes or ()
        ]
        patch = self.patch_size if self.from_scratch else pretrained_patch_size(self.model)
        if not 2 <= self.patch_size <= 64:
            raise ConfigError(f"--patch-size must be between 2 and 64, got {self.patch_size}")
        for flag, size in sizes:
            if not patch <= size <= 1024 or size % patch:
                raise ConfigError(
                    f"{flag} must be a multiple of the patch size {patch} between {patch} and 1024, got {size}"
                )
        for name in ("augment", "class_weights", "sampling", "recipe", "vit_size", "search"):
            _one_of(self, name)
        if self.search != "none":
            _positive("--num-samples", self.num_samples)
        # Both are imported only when asked for: a GPU machine's bundle may lack them.
        if self.search == "optuna":
            _installed("optuna", "--search optuna", "pip install optuna")
        if self.mlflow_uri is not None:
            _installed("mlflow", "--mlflow-uri", "pip install -e '.[mlflow]'")
            # MLflow 3.13+ refuses the ./mlruns folder store, and fails only once Tune has started.
            folder = not is_uri(self.mlflow_uri) and not self.mlflow_uri.startswith("databricks")
            if folder or self.mlflow_uri.startswith("file:"):
                raise ConfigError(
                    f"--mlflow-uri {self.mlflow_uri!r}: MLflow no longer accepts a folder; give a database, "
                    "e.g. sqlite:////abs/path/mlflow.db, or a tracking server's http(s):// address"
                )
        if self.max_concurrent_trials is not None:
            _positive("--max-concurrent-trials", self.max_concurrent_trials)
        if self.limit is not None and self.limit < 20:
            raise ConfigError(f"--limit must be at least 20 rows, got {self.limit}")
        for flag, frac in (("--val-fraction", self.val_fraction), ("--test-fraction", self.test_fraction)):
            if not 0 < frac < 0.5:
                raise ConfigError(f"{flag} must be in (0, 0.5), got {frac}")
        check_source(
            self.data_dir, self.labels_table, self.dataset != DEFAULT_DATASET, self.image_column, self.label_column
        )
        if self.init_from is not None and not os.path.isfile(self.init_from):
            raise ConfigError(f"--init-from {self.init_from!r} is not a file (give a vit_model.pth)")
        if self.init_from is not None and self.from_scratch:
            raise ConfigError("--init-from and --from-scratch exclude each other")
        # A hub id is "org/name"; a path is what starts like one.
        if not self.from_scratch and self.model.startswith((".", "/", "~")) and not os.path.isdir(self.model):
            raise ConfigError(f"--model {self.model!r} looks like a path but is not a folder")
        return self


# A recipe is the training values a user gets without setting them; a flag given on the
# command line wins over its recipe's value (see `with_recipe`). Both come from the fields.
RECIPE_FIELDS = tuple(
    f.name for f in fields(TrainConfig) if f.metadata.get("scratch", NOT_IN_RECIPE) is not NOT_IN_RECIPE
)
RECIPES = {
    # The seed's fine-tune of a pretrained checkpoint, exactly: TrainConfig's own defaults.
    "pretrained": {f.name: f.default for f in fields(TrainConfig) if f.name in RECIPE_FIELDS},
    # Random weights. The images are 60x80: a tiny ViT at 32 px (4 patches of 16) trains
    # ~20x faster than at 224, so it gets many epochs, with the rate and regularisation
    # that random weights need. Measured choices: docs/training.md, "Training without pretrained weights".
    "scratch": {f.name: f.metadata["scratch"] for f in fields(TrainConfig) if f.name in RECIPE_FIELDS},
    # The same on GPUs, which do ~100x a CPU's arithmetic: a small ViT at 64 px in 8-pixel
    # patches (64 tokens instead of 4), random crops, rare classes seen more often, 30
    # epochs. Measured: docs/gpu.md and the rare-class table in docs/benchmarks.md.
    "scratch-gpu": {f.name: f.metadata["scratch_gpu"] for f in fields(TrainConfig) if f.name in RECIPE_FIELDS},
    # The seed's fine-tune takes hours on 2 CPU cores; this one fine-tunes the same kind of
    # checkpoint in about 15 minutes on all of fashion-small. Measured choices:
    # docs/training.md, "Pretrained weights on a CPU".
    "pretrained-cpu": {f.name: f.metadata["pretrained_cpu"] for f in fields(TrainConfig) if f.name in RECIPE_FIELDS},
}
SCRATCH_RECIPES = ("scratch", "scratch-gpu")
# Hyperparameters a trial may vary; the rest of TrainConfig is fixed for the experiment.
HYPERPARAMETERS = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("searched"))


def with_recipe(flags: dict) -> TrainConfig:
    """The TrainConfig for command-line `flags` (None: not given): the recipe fills every
    recipe field the user left unset. The recipe is `flags["recipe"]`, else "scratch"
    with --from-scratch (which `for_cluster` turns into "scratch-gpu" on GPU workers),
    else "pretrained"; --recipe scratch or scratch-gpu implies --from-scratch."""
    given = {k: v for k, v in flags.items() if v is not None}
    user_set = tuple(sorted(k for k in given if k in RECIPE_FIELDS or k == "recipe"))
    recipe = given.pop("recipe", None) or ("scratch" if given.get("from_scratch") else "pretrained")
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    scratch = recipe in SCRATCH_RECIPES
    if "patch_size" in given and not (given.get("from_scratch") or scratch):
        raise ConfigError("--patch-size applies to --from-scratch: a pretrained checkpoint keeps its own patch size")
    if scratch:
        if given.get("init_from") or given.get("model", DEFAULT_MODEL) != DEFAULT_MODEL:
            raise ConfigError(
                f"--recipe {recipe} trains from random weights: drop --model/--init-from, or use --recipe pretrained"
            )
        given["from_scratch"] = True
    if given.get("search_image_sizes") is not None:
        given["search_image_sizes"] = tuple(given["search_image_sizes"])
    return TrainConfig(**{**RECIPES[recipe], **given, "recipe": recipe, "user_set": user_set})


def for_cluster(cfg: TrainConfig) -> TrainConfig:
    """The config for the workers the cluster gave (`cfg.use_gpu` settled): --from-scratch
    without --recipe on GPU workers takes the scratch-gpu recipe's value for every recipe
    field not set on the command line. Anything else is returned as it is."""
    if cfg.user_set is None or "recipe" in cfg.user_set or not (cfg.use_gpu and cfg.recipe == "scratch"):
        return cfg
    unset = {k: v for k, v in RECIPES["scratch-gpu"].items() if k not in cfg.user_set}
    return replace(cfg, **unset, recipe="scratch-gpu").validate()


def recipe_help(name: str) -> str:
    """What each recipe sets a recipe field to, for --help."""
    show = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else str(v)
    pretrained, cpu, scratch, gpu = (
        RECIPES[r][name] for r in ("pretrained", "pretrained-cpu", "scratch", "scratch-gpu")
    )
    if pretrained == cpu == scratch == gpu:
        return f"default: {show(pretrained)}"
    parts = [f"default: {show(pretrained)}"]
    if cpu != pretrained:
        parts.append(f"{show(cpu)} with --recipe pretrained-cpu")
    if scratch != pretrained or gpu != scratch:
        parts.append(f"{show(scratch)} with --from-scratch" + (f", {show(gpu)} on GPUs" if gpu != scratch else ""))
    return "; ".join(parts)


def comma_list(text: str) -> list[str]:
    """argparse type for a,b,c."""
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass
class PredictConfig:
    inputs: list[str] = option(
        help="folder (or s3://, gs:// prefix) searched recursively for images; repeatable",
        flag="--input",
        action="append",
        default_factory=list,
    )
    input_table: str | None = option(
        None,
        "a table (CSV or Parquet, local or URI) listing images to label, one per row, beside or instead of --input: "
        "every row gets exactly one output row",
        metavar="TABLE",
    )
    path_column: str = option(
        "path", "column of --input-table with each image's path or URI (relative: from the table's folder)"
    )
    keep_columns: list[str] = option(
        help="columns of --input-table copied into the output unchanged, e.g. product_id,sku",
        type=comma_list,
        metavar="COL,COL",
        default_factory=list,
    )
    model: str = option(
        "results/vit_model.pth",
        "vit_model.pth from jobs/tune.py, a Hugging Face model folder, or a model.onnx from jobs/export.py "
        "(with --engine onnx)",
    )
    engine: str | None = option(
        None,
        "what runs the model: torch (eager PyTorch), compile (torch.compile, compiled at each actor's start) or "
        f"onnx (ONNX Runtime; needs {ONNX_EXTRA}); default: onnx for a .onnx model, else torch. See docs/engines.md",
        choices=ENGINES,
    )
    output: str = option(
        "results/predictions.csv",
        "file to write when complete, .csv or .parquet (a name ending in / writes a folder of Parquet parts): the "
        "rows of --input-table in its order, then the files of --input folders sorted by path",
    )
    batch_size: int = option(64, "images per model call", type=positive_int)
    top_k: int = option(0, "also write the k most likely labels and their probabilities", type=int)
    num_actors: int | None = option(None, "predictor actors (default: one per GPU, else one)", type=positive_int)
    threads: int | None = option(
        None, "torch threads per CPU actor (default: the machine's CPU count)", type=positive_int
    )
    resume: bool = option(
        False,
        "continue the interrupted run for this --output (its <output>.partial folder): only unfinished files are "
        "predicted; without one, start a new run",
        action="store_true",
    )
    work_dir: str | None = option(
        None,
        "where the run keeps its listing and shards until the output is complete (default: <output>.partial; "
        "on a multi-node cluster it must be storage every node can write)",
    )
    quiet: bool = option(False, "no progress line on stderr", action="store_true")
    address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS, else a local Ray)")

    def validate(self) -> PredictConfig:
        if not self.inputs and self.input_table is None:
            raise ConfigError("give at least one --input folder, or --input-table TABLE")
        for path in self.inputs:
            if not is_uri(path) and not os.path.isdir(path):
                raise ConfigError(f"--input {path!r} is not a folder")
        self._check_table()
        _positive("--batch-size", self.batch_size)
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if self.num_actors is not None:
            _positive("--num-actors", self.num_actors)
        if self.threads is not None:
            _positive("--threads", self.threads)
        _model_exists(self.model, uri_ok=True)
        settle_engine(self)
        parts = self.output.endswith(("/", os.sep))
        if os.path.isdir(self.output) and not parts:
            raise ConfigError(
                f"--output {self.output!r} is a folder; give a file such as predictions.csv, or end it with / for Parquet parts"
            )
        for flag, path in (("--output", self.output), ("--work-dir", self.work_dir or "")):
            if is_uri(path):
                raise ConfigError(f"{flag} {path!r}: give a local or shared-filesystem path, not a URI")
        parent = os.path.dirname(os.path.abspath(self.output.rstrip("/" + os.sep)))
        while not os.path.exists(parent):  # the nearest existing ancestor must be a writable folder
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ConfigError(f"--output {self.output!r} is not writable ({parent} is not a writable folder)")
        return self

    def _check_table(self) -> None:
        """--input-table has --path-column and every --keep-columns; a kept column may not
        take the name of one the output already has."""
        from fashion_vit.outputs import columns

        if self.input_table is None:
            if self.keep_columns:
                raise ConfigError("--keep-columns copies columns of --input-table: give --input-table TABLE")
            return
        taken = set(columns(self.top_k))
        for name in self.keep_columns:
            if name in taken:
                raise ConfigError(
                    f"--keep-columns {name!r}: the output has its own {name!r} column (the columns it writes: "
                    f"{', '.join(columns(self.top_k))}); leave it out, or rename it in the table"
                )
        if len(set(self.keep_columns)) < len(self.keep_columns):
            raise ConfigError(f"--keep-columns names a column twice ({','.join(self.keep_columns)})")
        wanted = [("--path-column", self.path_column), *(("--keep-columns", c) for c in self.keep_columns)]
        check_table_flag("--input-table", self.input_table, wanted)


@dataclass
class EvalConfig:
    model: str = option("results/vit_model.pth", "vit_model.pth to score")
    data_dir: str | None = option(
        None,
        "a folder to score, Kaggle layout or class folders (default: the data the model was trained on)",
    )
    labels_table: str | None = option(
        None, "a label table to score, CSV or Parquet (see jobs/tune.py --labels)", flag="--labels", metavar="TABLE"
    )
    dataset: str | None = option(None, "Hugging Face dataset id to score instead")
    image_column: str | None = option(
        None, "image column of --labels or --dataset (default: the model's training one, else image)"
    )
    label_column: str | None = option(None, "label column (default: the one the model was trained on)")
    split: str = option("test", "which split of the training data; other data is scored whole", choices=SPLITS)
    output: str = option("results/report", "report folder: metrics.json, per_class.csv and the plots")

    def validate(self) -> EvalConfig:
        _one_of(self, "split")
        _model_exists(self.model, uri_ok=False)
        check_source(self.data_dir, self.labels_table, self.dataset is not None, self.image_column, self.label_column)
        return self


def pretrained_patch_size(model: str) -> int:
    """A pretrained checkpoint's own patch size: from a save_pretrained folder's
    config.json; 16 (ViT's default, and the baseline's) for a hub id, which is only
    read once the job loads it."""
    try:
        with open(os.path.join(model, "config.json")) as f:
            return int(json.load(f).get("patch_size", 16))
    except (OSError, ValueError):
        return 16


# Measured on the 2-core machine with the scratch model (docs/serving.md, "Choosing the batch").
SERVE_MAX_BATCH_SIZE = 16
SERVE_BATCH_WAIT_MS = 2.0


@dataclass
class ServeConfig:
    model: str = option(
        "results/vit_model.pth",
        "vit_model.pth from jobs/tune.py, a Hugging Face model folder, or a model.onnx from jobs/export.py",
    )
    engine: str | None = option(
        None,
        "what runs the model in each replica: torch, compile or onnx, as for jobs/batch_predict.py; default: onnx "
        "for a .onnx model, else torch. See docs/engines.md",
        choices=ENGINES,
    )
    host: str = option(
        "127.0.0.1",
        "address to listen on; 0.0.0.0 exposes the endpoint to the network, which has no authentication of its own "
        "(put a gateway in front: docs/serving.md)",
    )
    port: int = option(8000, "HTTP port", type=positive_int)
    num_replicas: int | None = option(
        None, "replicas serving the model (default: 1); exclusive with --max-replicas", type=positive_int
    )
    max_replicas: int | None = option(
        None, "scale between --min-replicas and this many replicas with the load (Serve autoscaling)", type=positive_int
    )
    min_replicas: int = option(1, "with --max-replicas: the fewest replicas kept", type=int)
    use_gpu: bool | None = option(
        None,
        "one GPU per replica (default: when the cluster has GPUs)",
        flag="--gpu",
        negative=("--cpu", "serve on CPUs even if GPUs exist"),
    )
    cpus_per_replica: int = option(
        1, "CPUs each replica reserves; a CPU replica runs this many torch threads", type=positive_int
    )
    max_batch_size: int = option(SERVE_MAX_BATCH_SIZE, "most images in one forward pass", type=positive_int)
    batch_wait_ms: float = option(
        SERVE_BATCH_WAIT_MS, "how long a batch waits for more images after its first, in ms; 0: no waiting", type=float
    )
    max_image_mb: float = option(
        20.0, "largest request body in MB (one image, or all the files of a multipart request)", type=positive_float
    )
    max_image_mpx: float = option(
        50.0,
        "largest image in megapixels, read from its header before decoding (a decompression bomb is refused)",
        type=positive_float,
    )
    max_files: int = option(16, "most files in one multipart request", type=positive_int)
    max_ongoing_requests: int = option(
        64,
        "requests a replica takes at once (they wait in its batch queue); more wait in Serve's proxy, which retries "
        "with a backoff of up to 0.5 s: keep it above the clients' concurrency per replica",
        type=positive_int,
    )
    access_log: bool = option(
        False, "log every request (Serve's access log: the replicas' log files, and this console)", action="store_true"
    )
    address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS, else a local Ray)")

    def validate(self) -> ServeConfig:
        _model_exists(self.model, uri_ok=True)
        settle_engine(self)
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535, got {self.port}")
        if self.num_replicas is not None and self.max_replicas is not None:
            raise ConfigError("give --num-replicas (a fixed count) or --max-replicas (autoscaling), not both")
        if self.num_replicas is not None:
            _positive("--num-replicas", self.num_replicas)
        if self.max_replicas is not None:
            _positive("--max-replicas", self.max_replicas)
            if not 0 <= self.min_replicas <= self.max_replicas:
                raise ConfigError(
                    f"--min-replicas must be between 0 and --max-replicas ({self.max_replicas}), got {self.min_replicas}"
                )
        for flag, value in (
            ("--cpus-per-replica", self.cpus_per_replica),
            ("--max-batch-size", self.max_batch_size),
            ("--max-files", self.max_files),
            ("--max-ongoing-requests", self.max_ongoing_requests),
        ):
            _positive(flag, value)
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConfigError(f"--batch-wait-ms must be between 0 and 1000, got {self.batch_wait_ms}")
        if not self.max_image_mb > 0 or not self.max_image_mpx > 0:
            raise ConfigError("--max-image-mb and --max-image-mpx must be positive")
        return self


@dataclass
class ExportConfig:
    model: str = option("results/vit_model.pth", "vit_model.pth to export (or a Hugging Face model folder)")
    output: str = option("results/model.onnx", "the ONNX file to write; its metadata as JSON goes beside it (.json)")
    images: str | None = option(
        None,
        "folder of real images the export is checked on against PyTorch (default: the images of the data the "
        "checkpoint was trained on, when that folder is readable)",
    )
    check_images: int = option(256, "images the check runs", type=positive_int)
    quantize: str | None = option(
        None,
        "also write <output stem>.int8.onnx, dynamically quantised by ONNX Runtime (int8 weights, activations "
        "quantised per batch), checked the same way with a looser agreement",
        choices=QUANTIZATIONS,
    )

    def validate(self) -> ExportConfig:
        for module in ("onnx", "onnxscript", "onnxruntime"):
            _installed(module, "jobs/export.py", ONNX_EXTRA)
        _model_exists(self.model, uri_ok=False)
        if not is_onnx(self.output):
            raise ConfigError(f"--output {self.output!r} must end in .onnx")
        if os.path.isdir(self.output):
            raise ConfigError(f"--output {self.output!r} is a folder")
        if self.images is not None and not os.path.isdir(self.images):
            raise ConfigError(f"--images {self.images!r} is not a folder")
        _positive("--check-images", self.check_images)
        if self.quantize is not None:
            _one_of(self, "quantize")
        return self


def settle_engine(cfg) -> None:
    """cfg.engine (of a PredictConfig or ServeConfig) chosen when not given, and usable
    with cfg.model."""
    if cfg.engine is None:
        # Measured (docs/engines.md): on a vit_model.pth, compile and onnx pay their
        # compilation or export at every start, which only a long run wins back; an
        # exported model.onnx has paid it once.
        cfg.engine = "onnx" if is_onnx(cfg.model) else "torch"
    _one_of(cfg, "engine")
    if cfg.engine == "onnx":
        _installed("onnxruntime", "--engine onnx", ONNX_EXTRA)
    if is_onnx(cfg.model) and cfg.engine != "onnx":
        raise ConfigError(f"--model {cfg.model!r} is an ONNX model: run it with --engine onnx")


def is_onnx(path: str) -> bool:
    return path.lower().endswith(".onnx")


def check_source(
    data_dir: str | None,
    labels_table: str | None,
    dataset_given: bool,
    image_column: str | None,
    label_column: str | None,
) -> None:
    """At most one of --data-dir, --labels and --dataset; a local folder or table exists
    and has the columns named (None: not known yet). A URI is checked when the data is
    read: that needs its filesystem, and credentials."""
    given = [f for f, v in (("--data-dir", data_dir), ("--labels", labels_table), ("--dataset", dataset_given)) if v]
    if len(given) > 1:
        raise ConfigError(f"give one of --data-dir, --labels or --dataset, not {' and '.join(given)}")
    if data_dir is not None:
        check_data_dir("--data-dir", data_dir, label_column)
    if labels_table is not None:
        named = [("--image-column", image_column), ("--label-column", label_column)]
        check_table_flag("--labels", labels_table, [(flag, c) for flag, c in named if c is not None])


def check_data_dir(flag: str, folder: str, label_column: str | None = None) -> None:
    """A folder in the Kaggle layout (styles.csv, with the label column if given), or
    with class folders."""
    if is_uri(folder):
        return
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {folder!r} is not a folder")
    styles = os.path.join(folder, "styles.csv")
    if not os.path.isfile(styles):
        if not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(folder)):
            raise ConfigError(
                f"{flag} {folder!r} has neither styles.csv (the Kaggle layout: styles.csv + images/) nor class folders "
                "(DIR/<label>/<image>)"
            )
        return
    if label_column is not None:
        with open(styles, encoding="utf-8", errors="replace") as f:
            header = [h.strip() for h in f.readline().strip().split(",")]
        if label_column not in header:
            raise ConfigError(
                f"--label-column {label_column!r} is not a column of {styles} (columns: {', '.join(header)})"
            )


def check_table_flag(flag: str, path: str, wanted: list[tuple[str, str]]) -> None:
    """A table this reads (by its name); a local one exists and has the `wanted`
    columns ((flag, column) pairs), else one line naming the columns it has."""
    from fashion_vit.tables import TableError, check_table, table_format

    if not is_uri(path) and not os.path.exists(path):
        raise ConfigError(f"{flag} {path!r} does not exist")
    try:
        table_format(path)
    except TableError as e:
        raise ConfigError(f"{flag}: {e}") from None
    if not is_uri(path):
        try:
            check_table(path, wanted)
        except TableError as e:
            raise ConfigError(str(e)) from None


def _one_of(cfg, name: str) -> None:
    """The field's value is one of its declared choices."""
    meta = next(f.metadata for f in fields(cfg) if f.name == name)
    choices, value = meta["argparse"]["choices"], getattr(cfg, name)
    if value not in choices:
        flag = meta["flag"] or "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def _installed(module: str, flag: str, fix: str) -> None:
    """`module` can be imported (found without importing it)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{flag} needs the {module} package, which is not installed ({fix})")


def _model_exists(model: str, uri_ok: bool) -> None:
    """The --model check each job makes before Ray starts (a URI is read later, where it is used)."""
    if not (uri_ok and is_uri(model)) and not os.path.exists(model):
        raise ConfigError(f"--model {model!r} does not exist (train one with jobs/tune.py)")


def _positive(flag: str, value: int) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{flag} must be a positive integer, got {value}")
