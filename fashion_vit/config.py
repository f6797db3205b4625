"""Job configurations: one dataclass per job, every field defaulted and commented.

`asdict()` of these is what reaches Ray and what is stored inside `vit_model.pth`,
so a checkpoint always says how it was made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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
SEARCHES = ("none", "asha")
AUGMENTS = ("flip", "crop")  # flip: random horizontal flip; crop: + random resized crop
CLASS_WEIGHTS = ("none", "sqrt", "balanced")  # loss weight per class: 1, or (n / (k * n_c)) ** 0.5 or ** 1
# The metric that picks epochs, trials and the exported model: one name everywhere.
METRIC = "val_accuracy"


class FashionVitError(Exception):
    """A problem the user can fix; the jobs print it as one line, without a traceback."""


class ConfigError(FashionVitError):
    """An invalid flag or value, found before any work starts (exit status 2)."""


@dataclass
class TrainConfig:
    # --- data ---
    data_dir: str | None = None  # Kaggle-layout folder (styles.csv + images/); None: the hub dataset
    dataset: str = DEFAULT_DATASET  # Hugging Face dataset id, used when data_dir is None
    label_column: str = DEFAULT_LABEL_COLUMN  # column to classify; other columns take labels from the data
    limit: int | None = None  # stratified subsample of this many rows (quick runs, tests)
    val_fraction: float = 0.1  # share of each class held out for validation
    test_fraction: float = 0.1  # share of each class held out for the final test
    # --- model ---
    model: str = DEFAULT_MODEL  # hub id or local directory of a saved ViT
    from_scratch: bool = False  # random init on purpose (offline machines, tests); ignores `model`
    vit_size: str = "base"  # tiny | small | base, only with from_scratch
    image_size: int = 224  # model input side; below the checkpoint's, position embeddings are resampled
    init_from: str | None = None  # start from a vit_model.pth (its weights and label set) instead of `model`
    reinit_head: bool = False  # with init_from: a new classifier head when the label sets differ
    # --- baseline hyperparameters: the seed's recipe, RECIPES["pretrained"] ---
    recipe: str = "pretrained"  # the recipe the unset values below came from (jobs/tune.py)
    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 32  # per worker
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # share of steps with linear warmup; then linear decay to 0
    label_smoothing: float = 0.0
    max_grad_norm: float = 1.0  # clip the global gradient norm (transformers' Trainer default); 0: off
    augment: str = "flip"  # flip | crop (flip + random resized crop), on the device
    class_weights: str = "none"  # none | sqrt | balanced: cross-entropy weights against class imbalance
    bf16: bool = True  # bf16 autocast on GPUs that support it; no effect on CPU
    # --- tuning ---
    search: str = "none"  # none: the baseline only; asha: baseline + num_samples sampled trials
    num_samples: int = 4  # sampled trials added by --search asha
    search_image_sizes: tuple[int, ...] | None = None  # with asha: trials also sample the input size from these
    max_concurrent_trials: int | None = None  # None: as many as the resources allow
    num_to_keep: int = 2  # checkpoints kept per trial, best validation accuracy first
    # --- resources ---
    num_workers: int = 1  # data-parallel Ray Train workers per trial
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: int | None = None  # also each CPU worker's torch threads; None: share the CPUs among the trials
    address: str | None = None  # Ray cluster address; None: RAY_ADDRESS or a local Ray
    # --- outputs ---
    output_dir: str = "results"  # vit_model.pth and summary.json land here
    storage: str | None = None  # Ray experiment storage; None: <output_dir>/experiments
    name: str | None = None  # experiment name; None: fashion-vit-<UTC time>, or with resume the latest
    resume: bool = False  # continue an interrupted experiment instead of starting one
    seed: int = 42

    def validate(self) -> "TrainConfig":
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
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        sizes = [("--image-size", self.image_size)] + [("--search-image-sizes", s) for s in self.search_image_sizes or ()]
        for flag, size in sizes:
            if not 16 <= size <= 1024 or size % 16:
                raise ConfigError(f"{flag} must be a multiple of the patch size 16 between 16 and 1024, got {size}")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.vit_size not in VIT_SIZES:
            raise ConfigError(f"--vit-size must be one of {', '.join(VIT_SIZES)}, got {self.vit_size!r}")
        if self.search not in SEARCHES:
            raise ConfigError(f"--search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.search == "asha":
            _positive("--num-samples", self.num_samples)
        if self.max_concurrent_trials is not None:
            _positive("--max-concurrent-trials", self.max_concurrent_trials)
        if self.limit is not None and self.limit < 20:
            raise ConfigError(f"--limit must be at least 20 rows, got {self.limit}")
        for flag, frac in (("--val-fraction", self.val_fraction), ("--test-fraction", self.test_fraction)):
            if not 0 < frac < 0.5:
                raise ConfigError(f"{flag} must be in (0, 0.5), got {frac}")
        if self.data_dir is not None:
            if not os.path.isdir(self.data_dir):
                raise ConfigError(f"--data-dir {self.data_dir!r} is not a folder")
            styles = os.path.join(self.data_dir, "styles.csv")
            if not os.path.isfile(styles):
                raise ConfigError(f"--data-dir {self.data_dir!r} has no styles.csv (expected the Kaggle layout: styles.csv + images/)")
            with open(styles, encoding="utf-8", errors="replace") as f:
                header = [h.strip() for h in f.readline().strip().split(",")]
            if self.label_column not in header:
                raise ConfigError(f"--label-column {self.label_column!r} is not a column of {styles} (columns: {', '.join(header)})")
        if self.init_from is not None and not os.path.isfile(self.init_from):
            raise ConfigError(f"--init-from {self.init_from!r} is not a file (give a vit_model.pth)")
        if self.init_from is not None and self.from_scratch:
            raise ConfigError("--init-from and --from-scratch exclude each other")
        # A hub id is "org/name"; a path is what starts like one.
        if not self.from_scratch and self.model.startswith((".", "/", "~")) and not os.path.isdir(self.model):
            raise ConfigError(f"--model {self.model!r} looks like a path but is not a folder")
        return self


# A recipe is the training values a user gets without setting them; a flag given on the
# command line wins over its recipe's value (see `with_recipe`).
RECIPE_FIELDS = (
    "vit_size", "image_size", "epochs", "lr", "batch_size", "weight_decay", "warmup_ratio",
    "label_smoothing", "augment", "class_weights", "search_image_sizes",
)
RECIPES = {
    # The seed's fine-tune of a pretrained checkpoint, exactly: TrainConfig's own defaults.
    "pretrained": {f: getattr(TrainConfig, f) for f in RECIPE_FIELDS},
    # Random weights. The images are 60x80: a tiny ViT at 32 px (4 patches of 16) trains
    # ~20x faster than at 224, so it gets many epochs, with the rate and regularisation
    # that random weights need. Measured choices: README, "Training without pretrained weights".
    "scratch": dict(
        vit_size="tiny", image_size=32, epochs=6, lr=3e-4, batch_size=64, weight_decay=0.05, warmup_ratio=0.1,
        label_smoothing=0.1, augment="flip", class_weights="none", search_image_sizes=(32, 48),
    ),
}


def with_recipe(flags: dict) -> TrainConfig:
    """The TrainConfig for command-line `flags` (None: not given): the recipe fills every
    recipe field the user left unset. The recipe is `flags["recipe"]`, else "scratch"
    with --from-scratch, else "pretrained"; --recipe scratch implies --from-scratch."""
    given = {k: v for k, v in flags.items() if v is not None}
    recipe = given.pop("recipe", None) or ("scratch" if given.get("from_scratch") else "pretrained")
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if recipe == "scratch":
        if given.get("init_from") or given.get("model", DEFAULT_MODEL) != DEFAULT_MODEL:
            raise ConfigError("--recipe scratch trains from random weights: drop --model/--init-from, or use --recipe pretrained")
        given["from_scratch"] = True
    if given.get("search_image_sizes") is not None:
        given["search_image_sizes"] = tuple(given["search_image_sizes"])
    return TrainConfig(**{**RECIPES[recipe], **given, "recipe": recipe})


@dataclass
class PredictConfig:
    inputs: list[str] = field(default_factory=list)  # folders (or URIs) searched recursively for images
    model: str = "results/vit_model.pth"  # vit_model.pth from jobs/tune.py, or a Hugging Face model folder
    output: str = "results/predictions.csv"  # one CSV, written atomically
    batch_size: int = 64  # images per model call
    top_k: int = 0  # extra columns with the k best labels and probabilities
    num_actors: int | None = None  # predictor actors; None: one per GPU, or one on CPU
    threads: int | None = None  # torch threads per CPU actor; None: the node's CPU count
    address: str | None = None  # Ray cluster address; None: RAY_ADDRESS or a local Ray

    def validate(self) -> "PredictConfig":
        if not self.inputs:
            raise ConfigError("give at least one --input folder")
        for path in self.inputs:
            if "://" not in path and not os.path.isdir(path):
                raise ConfigError(f"--input {path!r} is not a folder")
        _positive("--batch-size", self.batch_size)
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if self.num_actors is not None:
            _positive("--num-actors", self.num_actors)
        if self.threads is not None:
            _positive("--threads", self.threads)
        if "://" not in self.model and not os.path.exists(self.model):
            raise ConfigError(f"--model {self.model!r} does not exist (train one with jobs/tune.py)")
        if os.path.isdir(self.output):
            raise ConfigError(f"--output {self.output!r} is a folder; give a file path such as predictions.csv")
        parent = os.path.dirname(os.path.abspath(self.output))
        while not os.path.exists(parent):  # the nearest existing ancestor must be a writable folder
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ConfigError(f"--output {self.output!r} is not writable ({parent} is not a writable folder)")
        return self


SPLITS = ("test", "val", "train", "all")


@dataclass
class EvalConfig:
    model: str = "results/vit_model.pth"  # checkpoint to score
    data_dir: str | None = None  # Kaggle-layout folder; None: the data the checkpoint was trained on
    dataset: str | None = None  # Hugging Face dataset id instead of data_dir
    split: str = "test"  # test | val | train (of the training data's split) | all rows
    output: str = "results/report"  # folder for metrics.json, per_class.csv and the plots

    def validate(self) -> "EvalConfig":
        if self.split not in SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not os.path.exists(self.model):
            raise ConfigError(f"--model {self.model!r} does not exist (train one with jobs/tune.py)")
        if self.data_dir is not None and not os.path.isfile(os.path.join(self.data_dir, "styles.csv")):
            raise ConfigError(f"--data-dir {self.data_dir!r} is not a Kaggle-layout folder (no styles.csv)")
        if self.data_dir is not None and self.dataset is not None:
            raise ConfigError("give --data-dir or --dataset, not both")
        return self


def _positive(flag: str, value: int) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{flag} must be a positive integer, got {value}")
