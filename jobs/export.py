"""Export a trained model as ONNX, checked against PyTorch on real images: `fashion-vit export` as a script, for a checkout and
`ray job submit --working-dir .`. Flags: `python jobs/export.py --help`; the code is
fashion_vit/commands.py."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import commands

HOW = commands.Invocation.script(__file__)


def parse_args(argv=None):
    return commands.parse_export(argv, HOW)


def main(argv=None) -> int:
    return commands.export(argv, HOW)


if __name__ == "__main__":
    sys.exit(main())
