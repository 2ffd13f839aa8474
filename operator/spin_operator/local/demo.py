"""`spinctl demo`: SPIN end to end on this machine in a few minutes, with no downloads.

It builds a small instruction-following task with held-out prompts (`spin_runtime.tiny`: reverse
a word list, sort digits — one exact answer each, so exact match means something), trains a
tokenizer on it and a small transformer briefly (`spin_runtime.sft`: a *weak* SFT model — SPIN
gains little on a model already trained to a plateau), writes a ready SPINRun to
`DIR/spinrun.yaml` and runs it with `spinctl run`'s own code: artifacts in `DIR/artifacts`, MLflow
in `DIR/mlflow.db`. Each iteration prints its held-out exact match, SPIN margin and real-answer
log-likelihood next to the SFT model's. The defaults were chosen by measurement (see
docs/quickstart.md for the numbers, including how continuing plain SFT compares).

A rerun reuses the task and model it built (same settings) and resumes the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

RUN_NAME = "spin-demo"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo builds. Changing any field rebuilds the task and model."""

    seed: int = 0
    tasks: tuple[str, ...] = ("reverse", "sort")
    rows: int = 4000
    max_samples: int = 2000  # SPIN prompts (the SFT model trains on the same ones)
    eval_samples: int = 400  # held out from SFT and SPIN alike (400: one prompt = 0.25 points)
    size: str = "small"  # ~0.5 M parameters
    vocab_size: int = 512
    sft_steps: int = 250
    sft_batch_size: int = 32
    sft_learning_rate: float = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-work", help="where everything goes (default ./demo-work)")
    parser.add_argument("--seed", type=int, default=0, help="task, model and run seed")
    parser.add_argument("--iterations", type=int, default=2, help="SPIN iterations (default 2)")
    parser.add_argument("--no-run", action="store_true", help="only build the task, the model and spinrun.yaml")
    parser.add_argument(
        "--control-arm", action="store_true",
        help="also train and evaluate an equal-compute SFT control beside SPIN each iteration "
        "(spec.controlArm): says whether SPIN beat plain SFT continued for the same steps",
    )  # fmt: skip


def spinrun(workdir: Path, cfg: DemoConfig, iterations: int, control_arm: bool = False) -> dict[str, Any]:
    """The demo's SPINRun: the measured recipe for a tiny model on CPU (paper values would not
    move it: see the field notes in docs/quickstart.md)."""
    root = workdir.resolve()
    doc: dict[str, Any] = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SPINRun",
        "metadata": {"name": RUN_NAME},
        "spec": {
            "model": {"uri": str(root / "sft-model")},
            "dataset": {
                "uri": str(root / "task.jsonl"),
                "maxSamples": cfg.max_samples,
                "evalSamples": cfg.eval_samples,
                "seed": cfg.seed,
            },
            "iterations": iterations,
            "generation": {
                "backend": "transformers", "gpusPerReplica": 0, "temperature": 1.0,
                "maxNewTokens": 32, "seed": cfg.seed, "batchSize": 128, "replicas": 2,
            },
            "training": {
                "gpusPerNode": 0, "processesPerNode": 2, "beta": 2.0, "learningRate": 1.0e-4,
                "optimizer": "adamw", "epochs": 2, "globalBatchSize": 64, "microBatchSize": 32,
                "maxLength": 96, "maxPromptLength": 48, "precision": "fp32", "seed": cfg.seed,
            },
            "evaluation": {"gpus": 0, "maxNewTokens": 32},
            "storage": {"uri": str(root / "artifacts")},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "spin-demo"},
        },
    }  # fmt: skip
    if control_arm:
        doc["spec"]["controlArm"] = {"enabled": True}
    return doc


def build(workdir: Path, cfg: DemoConfig, say: Any = print) -> Path:
    """Task rows, tokenizer and weak SFT model under `workdir` (skipped when already built with
    the same settings). Returns the model directory."""
    from spin_runtime import data, sft, tiny

    sft.quiet_progress_bars()

    model_dir, task_path, stamp = workdir / "sft-model", workdir / "task.jsonl", workdir / "demo.json"
    wanted = json.dumps(asdict(cfg), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted and (model_dir / "config.json").is_file():
        say(f"reusing the task and SFT model in {workdir}")
        return model_dir
    stamp.unlink(missing_ok=True)
    stale = [p for p in (workdir / "artifacts", workdir / "mlflow.db", workdir / "mlartifacts") if p.exists()]
    if stale:  # results of a model this build replaces: they would contradict the new one
        say(f"removing the results of an earlier demo build: {', '.join(str(p) for p in stale)}")
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    began = time.monotonic()
    rows = tiny.make_task_rows(cfg.rows, seed=cfg.seed, tasks=cfg.tasks)
    tiny.write_jsonl(rows, task_path)
    shape = tiny.SIZES[cfg.size]
    tokenizer = tiny.train_tokenizer(rows, cfg.vocab_size, model_max_length=shape.max_position_embeddings)
    model = tiny.make_model(tokenizer, shape, seed=cfg.seed)
    split = data.load_split(str(task_path), cfg.seed, cfg.max_samples, cfg.eval_samples)
    say(
        f"task: {len(rows)} prompts ({', '.join(cfg.tasks)}) in {task_path}; SPIN uses "
        f"{len(split.train)}, {len(split.eval)} held out"
    )
    say(f"training a weak SFT model: {tiny.num_parameters(model) / 1e6:.2f} M parameters, {cfg.sft_steps} steps")
    sft_cfg = sft.SFTConfig(
        steps=cfg.sft_steps, batch_size=cfg.sft_batch_size,
        learning_rate=cfg.sft_learning_rate, seed=cfg.seed,
    )  # fmt: skip
    tty = sys.stdout.isatty()

    def progress(step: int, loss: float) -> None:
        if tty:
            from spin_operator.local.display import bar

            sys.stdout.write(f"\r\x1b[2K  sft {bar(step, cfg.sft_steps)} step {step}/{cfg.sft_steps} loss {loss:.3f}")
            sys.stdout.flush()

    losses = sft.train_sft(model, tokenizer, split.train, sft_cfg, on_step=progress)
    if tty:
        sys.stdout.write("\r\x1b[2K")
    tiny.save_tiny(model_dir, tokenizer, model)
    stamp.write_text(wanted)
    say(f"  SFT loss {losses[0]:.2f} -> {losses[-1]:.2f} in {time.monotonic() - began:.0f}s; saved to {model_dir}")
    return model_dir


def run(args: argparse.Namespace) -> int:
    from spin_operator.local.preflight import BadInput, load, preflight
    from spin_operator.local.runner import EXIT_BAD_INPUT, LocalRun

    if args.iterations < 1:
        print("error: --iterations must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A tiny model is a stream of small kernels: one thread per process (two shards, two DDP
    # ranks) uses both cores without the thread barriers that stall when the CPU is shared.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = DemoConfig(seed=args.seed)
    build(workdir, cfg)
    spec_path = workdir / "spinrun.yaml"
    doc = spinrun(workdir, cfg, args.iterations, control_arm=getattr(args, "control_arm", False))
    spec_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"SPINRun written to {spec_path}")
    if args.no_run:
        print(f"run it with: spinctl run {spec_path}")
        return 0
    try:
        loaded = load(spec_path)
        preflight(loaded)
    except BadInput as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    code = LocalRun(loaded).run()
    db = (workdir / "mlflow.db").resolve()
    print("\nOpen the runs, metrics, datasets and model versions in MLflow (http://127.0.0.1:5000,")
    print("Model training > spin-demo: the chart view plots heldout/* over the iterations; expand")
    print("spin-demo, tick iter-000 and iter-001 and press Compare to set them side by side):")
    print(f"  {mlflow_command()} ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000")
    return code


def mlflow_command() -> str:
    """The mlflow script of this environment, relative to the current directory when inside it
    (`.venv/bin/mlflow` from the repository root)."""
    script = Path(sys.executable).with_name("mlflow")
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)
