"""Helpers for the trainer tests: generated-data directories in the published shard format, and
running ``train`` in-process or under torchrun. (A test module so it stays in the trainer's
files; its one test checks the helper itself.)"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SHARD_KIND = "generated-shard"  # what spin_runtime.generate publishes


def task_records(
    rows: Sequence[dict[str, Any]], eval_count: int, shift: int, iteration: int = 0
) -> list[dict]:
    """Generation records for tiny task rows: the first ``eval_count`` rows are held out; the
    "generated" answer of row i is the real answer of row i + shift (a fluent wrong answer, as
    an SFT model's would be)."""
    records = []
    n = len(rows)
    for i, row in enumerate(rows):
        messages = row["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        real = next(m["content"] for m in messages if m["role"] == "assistant")
        other = rows[(i + shift) % n]["messages"][-1]["content"]
        records.append(
            {
                "id": i,
                "split": "eval" if i < eval_count else "train",
                "system": system,
                "prompt": prompt,
                "real": real,
                "generated": other if other != real else real + " " + real,
                "finish_reason": "stop",
                "num_generated_tokens": 0,
                "iteration": iteration,
            }
        )
    return records


def write_generated(directory: str | Path, records: Sequence[dict], num_shards: int = 2) -> str:
    """Publish records as ``shard-IIIII-of-NNNNN.jsonl`` + their manifests, as generation does."""
    import tempfile

    from spin_common import layout, manifest, storage

    uri = str(directory)
    for index in range(num_shards):
        part = records[
            index * len(records) // num_shards : (index + 1) * len(records) // num_shards
        ]
        with tempfile.TemporaryDirectory() as tmp:
            name = layout.shard_name(index, num_shards)
            local = Path(tmp) / name
            local.write_text("".join(json.dumps(r) + "\n" for r in part))
            meta = {"records": len(part), "iteration": 0}
            manifest.write_file_artifact(local, storage.join(uri, name), SHARD_KIND, meta)
    return uri


def train_argv(
    model: str | Path, data: Sequence[str | Path], output: str | Path, work_dir: str | Path, **flags
) -> list[str]:
    """``train`` argv with small-model defaults; ``flags`` override (``None`` drops a flag)."""
    settings: dict[str, Any] = {
        "beta": 1.0,
        "learning-rate": 3e-3,
        "epochs": 2,
        "global-batch-size": 8,
        "micro-batch-size": 2,
        "max-length": 96,
        "max-prompt-length": 64,
        "optimizer": "adamw",
        "lr-scheduler": "constant",
        "warmup-ratio": 0.0,
        "seed": 0,
    }
    settings.update({k.replace("_", "-"): v for k, v in flags.items()})
    argv = ["train", "--model", str(model), "--output", str(output), "--work-dir", str(work_dir)]
    for uri in data:
        argv += ["--data", str(uri)]
    for key, value in settings.items():
        if value is None or value is False:
            continue
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return argv


def run_train(argv: Sequence[str]) -> int:
    """``python -m spin_runtime train ...`` in-process (exit status as the dispatcher gives it)."""
    import argparse

    from spin_common.errors import UsageError
    from spin_runtime.train import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    try:
        return cli.run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "runtime"), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    return env


def torchrun(nproc: int, argv: Sequence[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=N -m spin_runtime <argv>`` on CPU (gloo)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
        "-m", "spin_runtime", *argv,
    ]  # fmt: skip # argv: a flag beside its value
    return subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is faster and far steadier
    (OpenMP threads spin against other processes), as torchrun's default OMP_NUM_THREADS=1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def metrics(work_dir: str | Path, event: str = "train") -> list[dict]:
    path = Path(work_dir) / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in lines if r.get("event") == event]


def test_records_helper_makes_distinct_pairs(tiny_rows):
    records = task_records(tiny_rows[:20], eval_count=4, shift=1)
    assert [r["split"] for r in records].count("eval") == 4
    assert all(r["real"] != r["generated"] for r in records)
