"""What every command line of the project shares (koclip, koclip.query, koclip.app, pipelines.*,
jobs.*): one flag spelling and one way to report a mistake.

- Flags are spelled with hyphens (`--batch-size`); the underscore spelling (`--batch_size`) is
  accepted too, so neither habit fails. Beam's own flags (`--temp_location`) pass through as Beam
  spells them.
- `run_cli` turns a KoclipError (the user's to fix) into one line `PROG: error: ...` and exit
  status 2; any other exception is a programming error and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable

from koclip.errors import KoclipError

EXIT_USAGE = 2


def long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")}


def normalize_flags(argv: Iterable[str], flags: set[str]) -> list[str]:
    """argv with `--a_b[=v]` rewritten to `--a-b[=v]` where `--a-b` is one of `flags`; everything
    after a bare `--` is left alone."""
    out, passthrough = [], False
    for token in argv:
        if not passthrough and token.startswith("--") and len(token) > 2:
            name, eq, value = token.partition("=")
            hyphenated = "--" + name[2:].replace("_", "-")
            if name not in flags and hyphenated in flags:
                token = hyphenated + eq + value
        passthrough = passthrough or token == "--"
        out.append(token)
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that accepts both spellings of its long flags (module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # an abbreviation could pass for a Beam flag
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(normalize_flags(argv, long_flags(self)), namespace)


def run_cli(prog: str, run: Callable[[], int | None]) -> int:
    """Call `run()`; a KoclipError becomes one line on stderr and EXIT_USAGE. Returns the exit status."""
    try:
        status = run()
    except KoclipError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if status is None else status
