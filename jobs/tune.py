"""Fine-tune a ViT on fashion product images with Ray Train inside Ray Tune: `fashion-vit tune` as a script, for a checkout and
`ray job submit --working-dir .`. Flags: `python jobs/tune.py --help`; the code is
fashion_vit/commands.py."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import commands

HOW = commands.Invocation.script(__file__)


def parse_args(argv=None):
    return commands.parse_tune(argv, HOW)


def main(argv=None) -> int:
    return commands.tune(argv, HOW)


if __name__ == "__main__":
    sys.exit(main())
