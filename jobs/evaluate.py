"""Score a trained model on labelled images and write a report to look at.

    python jobs/evaluate.py --model results/vit_model.pth                 # its own test split
    python jobs/evaluate.py --model results/vit_model.pth --data-dir DIR  # any Kaggle-layout folder

Writes metrics.json, per_class.csv, confusion_matrix.png and errors.png (the most
confident mistakes) to results/report/ (or --output).
"""

from __future__ import annotations

import os
import sys
from argparse import RawDescriptionHelpFormatter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import report  # noqa: E402
from fashion_vit.cli import ArgumentParser, run_job  # noqa: E402
from fashion_vit.config import SPLITS, EvalConfig  # noqa: E402


def parse_args(argv=None) -> EvalConfig:
    d = EvalConfig()
    p = ArgumentParser(prog="evaluate.py", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="vit_model.pth to score (default: %(default)s)")
    p.add_argument("--data-dir", help="Kaggle-layout folder to score (default: the data the model was trained on)")
    p.add_argument("--dataset", help="Hugging Face dataset id to score instead")
    p.add_argument("--split", choices=SPLITS, default=d.split, help="which split of the training data (default: %(default)s); other data is scored whole")
    p.add_argument("--output", default=d.output, help="report folder (default: %(default)s)")
    return EvalConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    def job():
        cfg = parse_args(argv).validate()
        report.run_evaluation(cfg)
        print(f"report: {cfg.output}")

    return run_job("evaluate.py", job)


if __name__ == "__main__":
    sys.exit(main())
