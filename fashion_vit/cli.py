"""What both jobs share on the command line: argparse types that say what they expect,
and turning a FashionVitError into one line on stderr with a non-zero exit."""

from __future__ import annotations

import argparse
import sys

from fashion_vit.config import ConfigError, FashionVitError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, not a screenful of usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_job(prog: str, fn) -> int:
    """Run `fn()`; a user-fixable error prints `prog: error: ...` and returns 2 for a bad
    flag (before any work starts) or 1 for a failure while running."""
    try:
        fn()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except FashionVitError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value
