"""Fine-tune a ViT on fashion product images with Ray Train inside Ray Tune.

    python jobs/tune.py                                   # the baseline fine-tune
    python jobs/tune.py --search asha --num-samples 8     # + 8 sampled trials under ASHA
    python jobs/tune.py --search optuna --num-samples 8   # the same, chosen by Optuna's TPE
    python jobs/tune.py --data-dir DIR --from-scratch     # offline: the scratch recipe
    python jobs/tune.py --data-dir photos/                # class folders: photos/<label>/<image>
    python jobs/tune.py --labels labels.parquet --image-column path --label-column category

Data: --data-dir (Kaggle layout or class folders), --labels (a CSV or Parquet table) or
--dataset (a Hugging Face dataset); docs/data.md says what each reads and skips.

Training values not given on the command line come from a recipe: "pretrained" (the
seed's fine-tune) or, with --from-scratch, "scratch" (a tiny ViT at 32 px, 6 epochs), which
becomes "scratch-gpu" when the workers have GPUs (a small ViT at 64 px, 30 epochs).

The best-accuracy model lands in results/vit_model.pth, a summary in results/summary.json.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import tune
from fashion_vit.cli import parse_config, run_job
from fashion_vit.config import TrainConfig, with_recipe


def parse_args(argv=None) -> TrainConfig:
    return with_recipe(parse_config(TrainConfig, argv, "tune.py", __doc__))


def main(argv=None) -> int:
    def job():
        outcome = tune.run(parse_args(argv).validate())
        print(outcome.summary())

    return run_job("tune.py", job, argv, __file__)


if __name__ == "__main__":
    sys.exit(main())
