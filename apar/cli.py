"""The `apar` command line: one entry point, one module per command group.

Each command module exposes `register(subparsers)`, adding its parser(s) with `set_defaults(func=...)`.
A command function returns an exit code. Errors a user can cause are raised as `UserError` and printed
as one line on stderr (never a traceback), with exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from apar.engine.errors import UserError

# Modules that add commands; each has register(subparsers).
COMMAND_MODULES = (
    "apar.commands.generate",
    "apar.commands.model",
    "apar.commands.bench",
    "apar.commands.serve",
    "services.kvmanager.cli",
    "apar.data.cli",
    "apar.train.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apar", description="APAR serve: parallel-thread LLM decoding")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command group not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"apar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"apar {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's fault: still one line unless APAR_DEBUG is set
        if os.environ.get("APAR_DEBUG"):
            raise
        print(f"apar {args.command}: internal error: {type(exc).__name__}: {exc} (APAR_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
