"""`python -m spin_runtime check`: the dataset and the model checked before any real work.

Run as the first thing of a run (`spinctl run`'s preflight calls the same functions in-process,
spin_common/check.py; see docs/runtime.md and docs/datasets.md). Prints the dataset profile as one
JSON line on stdout (and writes it to ``--output`` when given); exits 2 with every problem, cause
first, when the run cannot work.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from spin_common.check import check_dataset, check_model_uris
from spin_common.errors import UsageError


def add_parser(sub: Any) -> None:
    from spin_common.data import add_dataset_flags

    p = sub.add_parser("check", help="check the dataset and the model before a run")
    p.add_argument(
        "--model", default=None, help="θ0 checkpoint URI (local or s3://; hub ids are not checked)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer URI (default: the model's)")
    p.add_argument("--chat-template", default=None, help="jinja chat template URI override")
    add_dataset_flags(p)
    p.add_argument("--output", default=None, help="where to write the report (JSON)")


def run(args: argparse.Namespace) -> int:
    from spin_common import storage

    report, problems = check_dataset(args.dataset, args.max_skipped_fraction, args.eval_samples)
    problems += check_model_uris(args.model, args.tokenizer, args.chat_template)
    doc = {"ok": not problems, "dataset": report, "problems": problems}
    print(json.dumps(doc, sort_keys=True), flush=True)
    if args.output:
        storage.write_text(args.output, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if problems:
        raise UsageError("\n".join(problems))
    return 0
