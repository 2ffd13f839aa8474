"""`python -m spin_runtime demo-build`: the demo's task and weak SFT model, built from nothing.

`spinctl demo` runs this as a subprocess (torch never loads inside `spinctl`): a small
instruction-following task with held-out prompts (`spin_runtime.tiny`: reverse a word list, sort
digits — one exact answer each, so exact match means something), a tokenizer trained on it and a
small transformer trained briefly (`spin_runtime.sft`: a *weak* SFT model — SPIN gains little on
a model already trained to a plateau). The defaults were chosen by measurement (see
docs/quickstart.md).

Writes `WORKDIR/task.jsonl`, `WORKDIR/sft-model/` and `WORKDIR/demo.json` (the settings, which
`spinctl demo` reads back to write the SPINRun). A second run with the same settings reuses
them; other settings rebuild them and remove the results of the earlier model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

STAMP = "demo.json"
MODEL_DIR = "sft-model"
TASK_FILE = "task.jsonl"


def _knob(default: Any, meaning: str) -> Any:
    return field(default=default, metadata={"help": meaning})


@dataclass(frozen=True)
class DemoConfig:
    """What the demo builds, each knob once: it also builds the CLI. Changing any rebuilds."""

    seed: int = _knob(0, "task, model and run seed")
    tasks: tuple[str, ...] = _knob(("reverse", "sort"), "task families (comma-separated)")
    rows: int = _knob(4000, "task rows in all")
    max_samples: int = _knob(2000, "SPIN prompts (the SFT model trains on the same ones)")
    eval_samples: int = _knob(
        400, "held out from SFT and SPIN alike (400: one prompt = 0.25 points)"
    )
    size: str = _knob(
        "small", "model shape from spin_runtime.tiny.SIZES (small: ~0.5 M parameters)"
    )
    vocab_size: int = _knob(512, "tokenizer vocabulary")
    sft_steps: int = _knob(250, "SFT optimizer steps")
    sft_batch_size: int = _knob(32, "SFT batch size")
    sft_learning_rate: float = _knob(1e-3, "SFT learning rate")

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            kind = (lambda s: tuple(s.split(","))) if f.name == "tasks" else type(f.default)
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                type=kind,
                default=f.default,
                help=f.metadata["help"],
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo-build", help="build the demo's task and weak SFT model (spinctl demo)")
    p.add_argument("--workdir", required=True, help="where the task, model and demo.json go")
    DemoConfig.add_flags(p)


def run(args: argparse.Namespace) -> int:
    build(Path(args.workdir), DemoConfig.from_args(args))
    return 0


def build(workdir: Path, cfg: DemoConfig, say: Any = print) -> Path:
    """Task rows, tokenizer and weak SFT model under `workdir` (skipped when already built with
    the same settings). Returns the model directory."""
    from spin_common import data
    from spin_runtime import sft, tiny

    sft.quiet_progress_bars()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, task_path, stamp = workdir / MODEL_DIR, workdir / TASK_FILE, workdir / STAMP
    wanted = json.dumps(asdict(cfg), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted and (model_dir / "config.json").is_file():
        say(f"reusing the task and SFT model in {workdir}")
        return model_dir
    stamp.unlink(missing_ok=True)
    stale = [
        p
        for p in (workdir / "artifacts", workdir / "mlflow.db", workdir / "mlartifacts")
        if p.exists()
    ]
    if stale:  # results of a model this build replaces: they would contradict the new one
        say(f"removing the results of an earlier demo build: {', '.join(str(p) for p in stale)}")
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    began = time.monotonic()
    rows = tiny.make_task_rows(cfg.rows, seed=cfg.seed, tasks=cfg.tasks)
    tiny.write_jsonl(rows, task_path)
    shape = tiny.SIZES[cfg.size]
    tokenizer = tiny.train_tokenizer(
        rows, cfg.vocab_size, model_max_length=shape.max_position_embeddings
    )
    model = tiny.make_model(tokenizer, shape, seed=cfg.seed)
    split = data.load_split(str(task_path), cfg.seed, cfg.max_samples, cfg.eval_samples)
    say(
        f"task: {len(rows)} prompts ({', '.join(cfg.tasks)}) in {task_path}; SPIN uses "
        f"{len(split.train)}, {len(split.eval)} held out"
    )
    say(
        f"training a weak SFT model: {tiny.num_parameters(model) / 1e6:.2f} M parameters, {cfg.sft_steps} steps"
    )
    sft_cfg = sft.SFTConfig(
        steps=cfg.sft_steps,
        batch_size=cfg.sft_batch_size,
        learning_rate=cfg.sft_learning_rate,
        seed=cfg.seed,
    )
    tty = sys.stdout.isatty()

    def progress(step: int, loss: float) -> None:
        if tty:  # one line redrawn in place; nothing when piped into a log
            done = int(20 * step / max(cfg.sft_steps, 1))
            sys.stdout.write(
                f"\r\x1b[2K  sft [{'#' * done}{'.' * (20 - done)}] step {step}/{cfg.sft_steps} loss {loss:.3f}"
            )
            sys.stdout.flush()

    losses = sft.train_sft(model, tokenizer, split.train, sft_cfg, on_step=progress)
    if tty:
        sys.stdout.write("\r\x1b[2K")
    tiny.save_tiny(model_dir, tokenizer, model)
    stamp.write_text(wanted)
    say(
        f"  SFT loss {losses[0]:.2f} -> {losses[-1]:.2f} in {time.monotonic() - began:.0f}s; saved to {model_dir}"
    )
    return model_dir
