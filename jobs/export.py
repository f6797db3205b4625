"""Export a trained model as ONNX, checked against PyTorch on real images.

    python jobs/export.py --model results/vit_model.pth                      # -> results/model.onnx + model.json
    python jobs/export.py --model results/vit_model.pth --images photos/     # check on these images
    python jobs/export.py --model results/vit_model.pth --quantize int8      # also results/model.int8.onnx

The ONNX file's metadata (and the JSON beside it) holds the labels, the input size,
mean/std and the resize the model expects. Run it with
`jobs/batch_predict.py --engine onnx --model results/model.onnx`, or any ONNX runtime.
Needs pip install -e '.[onnx]'.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import export
from fashion_vit.cli import parse_config, run_job
from fashion_vit.config import ExportConfig


def parse_args(argv=None) -> ExportConfig:
    return ExportConfig(**parse_config(ExportConfig, argv, "export.py", __doc__))


def main(argv=None) -> int:
    def job():
        print(export.run(parse_args(argv).validate()).summary())

    return run_job("export.py", job)


if __name__ == "__main__":
    sys.exit(main())
