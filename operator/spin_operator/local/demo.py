"""`spinctl demo`: SPIN end to end on this machine in a few minutes, with no downloads.

It builds a small instruction-following task with held-out prompts and a weak SFT model on it
(`python -m spin_runtime demo-build`, in a subprocess: torch never loads in spinctl), writes a ready SPINRun to
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
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

RUN_NAME = "spin-demo"


# The task and model come from the runtime's `demo-build` command (spin_runtime/demo_build.py,
# where each of its knobs is declared), run as a subprocess so torch never loads in spinctl.
# It writes its settings here; the SPINRun below reads the dataset split from them.
SETTINGS = "demo.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", default="demo-work", help="where everything goes (default ./demo-work)"
    )
    parser.add_argument("--seed", type=int, default=0, help="task, model and run seed")
    parser.add_argument("--iterations", type=int, default=2, help="SPIN iterations (default 2)")
    parser.add_argument(
        "--no-run", action="store_true", help="only build the task, the model and spinrun.yaml"
    )
    parser.add_argument(
        "--control-arm",
        action="store_true",
        help="also train and evaluate an equal-compute SFT control beside SPIN each iteration "
        "(spec.controlArm): says whether SPIN beat plain SFT continued for the same steps",
    )


def spinrun(
    workdir: Path, cfg: dict[str, Any], iterations: int, control_arm: bool = False
) -> dict[str, Any]:
    """The demo's SPINRun for the task `demo-build` made with settings `cfg`: the measured recipe
    for a tiny model on CPU (paper values would not move it: see docs/quickstart.md)."""
    seed = int(cfg["seed"])
    root = workdir.resolve()
    doc: dict[str, Any] = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SPINRun",
        "metadata": {"name": RUN_NAME},
        "spec": {
            "model": {"uri": str(root / "sft-model")},
            "dataset": {
                "uri": str(root / "task.jsonl"),
                "maxSamples": int(cfg["max_samples"]),
                "evalSamples": int(cfg["eval_samples"]),
                "seed": seed,
            },
            "iterations": iterations,
            "generation": {
                "backend": "transformers",
                "gpusPerReplica": 0,
                "temperature": 1.0,
                "maxNewTokens": 32,
                "seed": seed,
                "batchSize": 128,
                "replicas": 2,
            },
            "training": {
                "gpusPerNode": 0,
                "processesPerNode": 2,
                "beta": 2.0,
                "learningRate": 1.0e-4,
                "optimizer": "adamw",
                "epochs": 2,
                "globalBatchSize": 64,
                "microBatchSize": 32,
                "maxLength": 96,
                "maxPromptLength": 48,
                "precision": "fp32",
                "seed": seed,
            },
            "evaluation": {"gpus": 0, "maxNewTokens": 32},
            "storage": {"uri": str(root / "artifacts")},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "spin-demo"},
        },
    }
    if control_arm:
        doc["spec"]["controlArm"] = {"enabled": True}
    return doc


def build(
    workdir: Path, seed: int, extra: tuple[str, ...] = (), env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Build (or reuse) the task and weak SFT model under `workdir` with the runtime's
    `demo-build` (`extra`: more of its flags, e.g. a smaller task for tests; `env`: its
    environment, None for this process's); returns the settings it used."""
    argv = [sys.executable, "-m", "spin_runtime", "--log-level", "WARNING", "demo-build"]
    argv += ["--workdir", str(workdir), "--seed", str(seed), *extra]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"building the demo task and model failed (exit {done.returncode}): {' '.join(argv)}"
        )
    settings: dict[str, Any] = json.loads((workdir / SETTINGS).read_text())
    return settings


def demo_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the demo's processes (its build and every step): `environ` with the
    demo's defaults where it does not set them."""
    defaults = {
        "HF_HUB_OFFLINE": "1",
        # A tiny model is a stream of small kernels: one thread per process (two shards, two DDP
        # ranks) uses both cores without the thread barriers that stall when the CPU is shared.
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return {**defaults, **environ}


def run(args: argparse.Namespace) -> int:
    from spin_operator.local.preflight import BadInput, load, preflight
    from spin_operator.local.runner import EXIT_BAD_INPUT, LocalRun

    if args.iterations < 1:
        print("error: --iterations must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    env = demo_env(os.environ)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = build(workdir, args.seed, env=env)
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
    code = LocalRun(loaded, env=env).run()
    db = (workdir / "mlflow.db").resolve()
    print("\nOpen the runs, metrics, datasets and model versions in MLflow (http://127.0.0.1:5000,")
    print("Model training > spin-demo: the chart view plots heldout/* over the iterations; expand")
    print("spin-demo, tick iter-000 and iter-001 and press Compare to set them side by side):")
    print(
        f"  {mlflow_command()} ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000"
    )
    return code


def mlflow_command() -> str:
    """The mlflow script of this environment, relative to the current directory when inside it
    (`.venv/bin/mlflow` from the repository root)."""
    script = Path(sys.executable).with_name("mlflow")
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)
