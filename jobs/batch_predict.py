"""Label image folders with a trained model, using Ray Data.

    python jobs/batch_predict.py --input photos/ [--input more/] [--model results/vit_model.pth]

Writes one CSV (path, predicted_category, confidence, error[, label_i, prob_i]) sorted
by path; files that cannot be decoded get a row with the reason in `error`.
"""

from __future__ import annotations

import os
from argparse import RawDescriptionHelpFormatter
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import predict  # noqa: E402
from fashion_vit.cli import ArgumentParser, positive_int, run_job  # noqa: E402
from fashion_vit.config import PredictConfig  # noqa: E402


def parse_args(argv=None) -> PredictConfig:
    d = PredictConfig()
    p = ArgumentParser(prog="batch_predict.py", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--input", dest="inputs", action="append", required=True, help="folder (or s3://, gs:// URI) searched recursively for images; repeatable")
    p.add_argument("--model", default=d.model, help="vit_model.pth from jobs/tune.py, or a Hugging Face model folder (default: %(default)s)")
    p.add_argument("--output", default=d.output, help="CSV to write (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per model call (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="also write the k most likely labels and their probabilities (default: %(default)s)")
    p.add_argument("--num-actors", type=positive_int, help="predictor actors (default: one per GPU, else one)")
    p.add_argument("--threads", type=positive_int, help="torch threads per CPU actor (default: the machine's CPU count)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    return PredictConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    def job():
        cfg = parse_args(argv).validate()
        print(predict.run(cfg).summary())

    return run_job("batch_predict.py", job)


if __name__ == "__main__":
    sys.exit(main())
