"""What the jobs share on the command line: a parser built from a config dataclass's
`option()` declarations, and turning a FashionVitError into one line on stderr with a
non-zero exit (and a job stopped by SIGTERM into the command that continues it)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import MISSING, fields

from fashion_vit.config import NOT_IN_RECIPE, ConfigError, FashionVitError, recipe_help
from fashion_vit.files import StorageError
from fashion_vit.preemption import Preempted

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
    # The parser itself takes the ungrouped flags: a value is a parser or a group, whose common base this is.
    groups: dict[str | None, argparse._ActionsContainer] = {}
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
            # option() gives every field a default or a default_factory. callable(), not `is MISSING`:
            # after the `is not MISSING` test above, mypy takes MISSING for Any in this branch.
            default = f.default_factory() if callable(f.default_factory) else f.default
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


def run_job(prog: str, fn, argv: list[str] | None = None, script: str | list[str] | None = None) -> int:
    """Run `fn()`; a user-fixable error prints `prog: error: ...` and returns 2 for a bad
    flag (before any work starts) or 1 for a failure while running. A job stopped by
    SIGTERM (`Preempted`) prints the command that continues it and returns 143 (130
    for a tune job stopped by Ctrl+C).

    argv, script: the job's flags (default sys.argv[1:]) and its file (or the words that
    start it, such as ["fashion-vit", "tune"]), for that command."""
    try:
        fn()
    except Preempted as e:
        command = continue_command(script or sys.argv[0], sys.argv[1:] if argv is None else argv, e.resume)
        verb = "continue it" if "--resume" in e.resume else "start it again"
        print(f"{prog}: {e}; {verb} with:\n  {command}", file=sys.stderr)
        return e.exit_code
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (FashionVitError, StorageError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def continue_command(script: str | list[str], argv: list[str], flags: list[str]) -> str:
    """The same command line with `flags` added (a flag already given, with its value,
    is replaced), as one shell-quoted line: `python jobs/tune.py ... --resume --name x`."""
    argv = list(argv)
    for i, flag in enumerate(flags):
        if not flag.startswith("--"):
            continue
        takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        argv = _without(argv, flag, takes_value)
    if isinstance(script, str):
        script = [sys.executable, script]
    start = [os.path.relpath(w) if w.endswith(".py") and not os.path.relpath(w).startswith("..") else w for w in script]
    return shlex.join([*start, *argv, *flags])


def _without(argv: list[str], flag: str, takes_value: bool) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = takes_value
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out
