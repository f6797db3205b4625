"""Score a trained model on labelled images and write a report to look at.

    python jobs/evaluate.py --model results/vit_model.pth                 # its own test split
    python jobs/evaluate.py --model results/vit_model.pth --data-dir DIR  # a Kaggle-layout or class folder
    python jobs/evaluate.py --model results/vit_model.pth --labels labels.csv --label-column category

Writes metrics.json, per_class.csv, confusion_matrix.png and errors.png (the most
confident mistakes) to results/report/ (or --output).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import evaluate
from fashion_vit.cli import parse_config, run_job
from fashion_vit.config import EvalConfig


def parse_args(argv=None) -> EvalConfig:
    return EvalConfig(**parse_config(EvalConfig, argv, "evaluate.py", __doc__))


def main(argv=None) -> int:
    def job():
        cfg = parse_args(argv).validate()
        evaluate.run(cfg)
        print(f"report: {cfg.output}")

    return run_job("evaluate.py", job)


if __name__ == "__main__":
    sys.exit(main())
