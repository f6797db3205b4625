"""Label image folders, or the images a table lists, with a trained model, using Ray Data: `fashion-vit predict` as a script, for a checkout and
`ray job submit --working-dir .`. Flags: `python jobs/batch_predict.py --help`; the code is
fashion_vit/commands.py."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import commands

HOW = commands.Invocation.script(__file__)


def parse_args(argv=None):
    return commands.parse_predict(argv, HOW)


def main(argv=None) -> int:
    return commands.predict(argv, HOW)


if __name__ == "__main__":
    sys.exit(main())
