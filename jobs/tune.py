"""Fine-tune a ViT on fashion product images with Ray Train inside Ray Tune.

    python jobs/tune.py                                   # the baseline fine-tune
    python jobs/tune.py --search asha --num-samples 8     # + 8 sampled trials under ASHA
    python jobs/tune.py --data-dir DIR --from-scratch     # offline: the scratch recipe

Training values not given on the command line come from a recipe: "pretrained" (the
seed's fine-tune) or, with --from-scratch, "scratch" (a tiny ViT at 32 px, 6 epochs).

The best-accuracy model lands in results/vit_model.pth, a summary in results/summary.json.
"""

from __future__ import annotations

import os
from argparse import RawDescriptionHelpFormatter
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import tune  # noqa: E402
from fashion_vit.cli import ArgumentParser, positive_float, positive_int, run_job  # noqa: E402
from fashion_vit.config import AUGMENTS, CLASS_WEIGHTS, RECIPES, SEARCHES, VIT_SIZES, TrainConfig, with_recipe  # noqa: E402


def _recipe_default(name: str) -> str:
    """Help text for a recipe field: what each recipe sets it to (the flag's default is
    None, so that a value the user gives can be told from one the recipe gives)."""
    pretrained, scratch = RECIPES["pretrained"][name], RECIPES["scratch"][name]
    show = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
    if pretrained == scratch:
        return f"default: {show(pretrained)}"
    return f"default: {show(pretrained)}; {show(scratch)} with --from-scratch"


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = ArgumentParser(prog="tune.py", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="local folder in the Kaggle layout (styles.csv + images/<id>.jpg) instead of the hub dataset")
    g.add_argument("--dataset", default=d.dataset, help="Hugging Face dataset id (default: %(default)s)")
    g.add_argument("--label-column", default=d.label_column, help="column to classify: masterCategory (6 labels), subCategory, articleType, ... (default: %(default)s)")
    g.add_argument("--limit", type=positive_int, help="train on a stratified sample of this many rows (quick runs)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="hub id or local folder of a pretrained ViT (default: %(default)s)")
    g.add_argument("--from-scratch", action="store_true", help="randomly initialised ViT of --vit-size instead of --model (offline machines)")
    g.add_argument("--vit-size", choices=VIT_SIZES, help=f"size for --from-scratch ({_recipe_default('vit_size')})")
    g.add_argument("--init-from", help="start every trial from this vit_model.pth (its weights and label set), e.g. to fine-tune further on new data")
    g.add_argument("--reinit-head", action="store_true", help="with --init-from: train a new classifier head when the data's labels differ")
    g.add_argument("--image-size", type=positive_int, help=f"model input side in pixels, a multiple of 16 ({_recipe_default('image_size')})")
    g = p.add_argument_group("training (the baseline trial; --search varies these)")
    g.add_argument("--recipe", choices=tuple(RECIPES), help="where unset training values come from (default: scratch with --from-scratch, else pretrained; scratch implies --from-scratch)")
    g.add_argument("--epochs", type=positive_int, help=f"epochs per trial ({_recipe_default('epochs')})")
    g.add_argument("--lr", type=positive_float, help=f"AdamW learning rate ({_recipe_default('lr')})")
    g.add_argument("--batch-size", type=positive_int, help=f"images per step per worker ({_recipe_default('batch_size')})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay ({_recipe_default('weight_decay')})")
    g.add_argument("--warmup-ratio", type=float, help=f"share of steps with linear warmup before linear decay ({_recipe_default('warmup_ratio')})")
    g.add_argument("--label-smoothing", type=float, help=f"cross-entropy label smoothing ({_recipe_default('label_smoothing')})")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the gradient norm to this, 0 for no clipping (default: %(default)s)")
    g.add_argument("--augment", choices=AUGMENTS, help=f"flip: random horizontal flip; crop: also a random resized crop ({_recipe_default('augment')})")
    g.add_argument("--class-weights", choices=CLASS_WEIGHTS, help=f"cross-entropy weights against class imbalance: none, sqrt or balanced inverse frequency ({_recipe_default('class_weights')})")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 on GPUs too")
    g = p.add_argument_group("search")
    g.add_argument("--search", choices=SEARCHES, default=d.search, help="none: the baseline only; asha: baseline + --num-samples sampled trials, stopped early by ASHA (default: %(default)s)")
    g.add_argument("--num-samples", type=positive_int, default=d.num_samples, help="sampled trials for --search asha (default: %(default)s)")
    g.add_argument("--search-image-sizes", type=positive_int, nargs="+", metavar="SIZE", help=f"with --search asha, trials also sample the input size from these ({_recipe_default('search_image_sizes')})")
    g.add_argument("--max-concurrent-trials", type=positive_int, help="cap on trials running at once (default: as resources allow)")
    g = p.add_argument_group("resources and outputs")
    g.add_argument("--num-workers", type=positive_int, default=d.num_workers, help="data-parallel workers per trial (default: %(default)s)")
    g.add_argument("--cpus-per-worker", type=positive_int, default=d.cpus_per_worker, help="CPUs (and torch threads) per CPU worker (default: the CPUs divided among the trials)")
    gpu = g.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="use_gpu", action="store_const", const=True, help="one GPU per worker (default: when the cluster has GPUs)")
    gpu.add_argument("--cpu", dest="use_gpu", action="store_const", const=False, help="train on CPUs even if GPUs exist")
    g.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("--output-dir", default=d.output_dir, help="where vit_model.pth and summary.json go (default: %(default)s)")
    g.add_argument("--storage", help="Ray experiment storage, a path or URI (default: <output-dir>/experiments)")
    g.add_argument("--name", help="experiment name (default: fashion-vit-<UTC time>; with --resume, the latest)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted experiment: finished trials are kept, unfinished ones continue from their last checkpoint")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for the split, sampling and init (default: %(default)s)")
    args = p.parse_args(argv)
    return with_recipe(vars(args))


def main(argv=None) -> int:
    def job():
        cfg = parse_args(argv).validate()
        outcome = tune.run(cfg)
        best = outcome.best
        print(
            f"best trial {best['trial_id']} (epoch {best['epoch']}): val_accuracy {best['val']['val_accuracy']:.4f}, "
            f"test accuracy {best['test']['accuracy']:.4f}, test macro-F1 {best['test']['macro_f1']:.4f}\n"
            f"model: {outcome.model_path}\nsummary: {outcome.summary_path}\n"
            "time: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}s" for k, v in outcome.timings.items())
        )

    return run_job("tune.py", job)


if __name__ == "__main__":
    sys.exit(main())
