"""What the jobs share on the command line: a parser built from a config dataclass's
`option()` declarations, and turning a FashionVitError into one line on stderr with a
non-zero exit."""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from fashion_vit.config import NOT_IN_RECIPE, ConfigError, FashionVitError, recipe_help

_FLAG_ACTIONS = ("store_true", "store_false", "store_const")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, not a screenful of usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(config_cls, prog: str, description: str) -> ArgumentParser:
    """One flag per field of `config_cls` that has help text, in the fields' order and
    groups. A recipe field's flag defaults to None (so a given value can be told from the
    recipe's) and its help names each recipe's value; other flags show their default."""
    parser = ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str | None, argparse._ArgumentGroup] = {}
    for f in fields(config_cls):
        meta = f.metadata
        if not meta.get("help"):
            continue
        group = meta["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group) if group else parser
        target = groups[group]
        kwargs = dict(meta["argparse"])
        help_text = meta["help"]
        if meta["scratch"] is not NOT_IN_RECIPE:
            default = None
            help_text += f" ({recipe_help(f.name)})"
        elif meta["cli_default"] is not MISSING:
            default = meta["cli_default"]
        else:
            default = f.default_factory() if f.default is MISSING else f.default
            if (
                default is not None
                and default != []
                and kwargs.get("action") not in _FLAG_ACTIONS
                and "(default" not in help_text
            ):
                help_text += " (default: %(default)s)"
        if meta["negative"]:
            target = target.add_mutually_exclusive_group()
            kwargs.update(action="store_const", const=True)
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if not kwargs.get("required"):
            kwargs["default"] = default
        target.add_argument(flag, dest=f.name, help=help_text, **kwargs)
        if meta["negative"]:
            negative, negative_help = meta["negative"]
            target.add_argument(negative, dest=f.name, action="store_const", const=False, help=negative_help)
    return parser


def parse_config(config_cls, argv, prog: str, description: str) -> dict:
    """The flags as a dict of field name -> value (None where a recipe field was not given)."""
    return vars(build_parser(config_cls, prog, description).parse_args(argv))


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
