"""Label image folders, or the images a table lists, with a trained model, using Ray Data.

    python jobs/batch_predict.py --input photos/ [--input more/] [--model results/vit_model.pth]
    python jobs/batch_predict.py --input-table catalogue.csv --path-column image --keep-columns product_id,sku
    python jobs/batch_predict.py --input photos/ --model results/model.onnx   # ONNX Runtime (jobs/export.py)
    python jobs/batch_predict.py --input photos/ --engine compile             # torch.compile

Writes one CSV ([kept columns,] path, predicted_category, confidence, error[, label_i,
prob_i]): one row per table row, in the table's order, then the folders' files sorted
by path. A file that is missing or cannot be decoded gets a row with the reason in `error`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import predict
from fashion_vit.cli import parse_config, run_job
from fashion_vit.config import PredictConfig


def parse_args(argv=None) -> PredictConfig:
    return PredictConfig(**parse_config(PredictConfig, argv, "batch_predict.py", __doc__))


def main(argv=None) -> int:
    def job():
        print(predict.run(parse_args(argv).validate()).summary())

    return run_job("batch_predict.py", job, argv, __file__)


if __name__ == "__main__":
    sys.exit(main())
