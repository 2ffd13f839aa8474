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

from spin_common.errors import BAD_INPUT_FILE, UsageError

# command name -> module implementing it
COMMANDS = {
    "generate": "spin_runtime.generate.cli",
    "train": "spin_runtime.train.cli",
    "evaluate": "spin_runtime.evaluate",
    "check": "spin_runtime.check",
    "demo-build": "spin_runtime.demo_build",
}


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
        _leave_cause(args, str(exc))
        return 2


def _leave_cause(args: argparse.Namespace, message: str) -> None:
    """Put the cause of a bad-input exit where the operator can read it without pod logs: the
    step's own output folder in the run's storage, which it already reads for manifests. Never
    a manifest, so nothing looks complete; best effort (storage may be what is wrong)."""
    output = getattr(args, "output", None)
    if args.command not in ("generate", "train", "evaluate") or not output:
        return
    try:
        from spin_common import storage

        storage.write_text(storage.join(output, BAD_INPUT_FILE), message[:4000] + "\n")
    except Exception as exc:  # the exit status and stderr still say it
        logging.getLogger(__name__).debug("cause not written to %s: %s", output, exc)
