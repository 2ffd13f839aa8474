"""The runtime CLI: the only contract between the operator and what runs inside Jobs.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and
``run(args) -> int``. Those modules import only argparse-level things at import time and keep
torch/transformers imports inside ``run``, so ``--help`` stays fast and light.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command name -> module implementing it
COMMANDS = {
    "generate": "spin_runtime.generate.cli",
    "train": "spin_runtime.train.cli",
    "evaluate": "spin_runtime.evaluate",
    "check": "spin_runtime.check",
}


class UsageError(Exception):
    """Bad input: the message names the flag or field; the CLI exits with status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spin_runtime", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="Python logging level")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    module = importlib.import_module(COMMANDS[args.command])
    try:
        return int(module.run(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
