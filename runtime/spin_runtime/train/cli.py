"""``train``: one SPIN iteration, θt -> θt+1 (flags: docs/runtime.md).

Run it under torchrun for several processes or nodes; a plain ``python -m spin_runtime train``
is a world of one. Importing this module stays light (no torch): the dispatcher builds every
subcommand's parser for ``--help``.
"""

from __future__ import annotations

import argparse
import sys

from spin_common.train_config import TrainConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "train",
        help="train θt+1 from θt on (real, generated) pairs",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    TrainConfig.add_flags(p)  # each flag once, with its default and meaning
    return p


def run(args: argparse.Namespace) -> int:
    from spin_runtime.train.loop import run as train
    from spin_runtime.train.step import TrainingError

    try:
        train(TrainConfig.from_args(args))
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
