"""Generation throughput: the same prompts through each backend on the ~3 M-param tiny model.

Prints one JSON line: ``transformers_tokens_per_s``, ``vllm_tokens_per_s`` (null only when no
vLLM build is installed, i.e. ``.venv-vllm`` is absent) and the settings used. The vLLM part runs
in ``.venv-vllm`` through a subprocess of this same file (``--worker vllm``). Each backend
loads once, warms up on a few prompts, then the full prompt set is timed ``--repeats`` times;
the median is reported. Engine start-up is excluded (reported separately as ``*_load_s``).

    .venv/bin/python benchmarks/generate.py [--num-prompts 256] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _prompts(model_dir: str, num_prompts: int, seed: int) -> tuple[Any, list[list[int]]]:
    from spin_runtime import formatting, models, tiny

    tokenizer = models.load_tokenizer(model_dir)
    rows = tiny.make_task_rows(num_prompts, seed=seed + 1)
    prompts = []
    for row in rows:
        messages = row["messages"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        prompts.append(formatting.prompt_ids(tokenizer, system, messages[-2]["content"]))
    return tokenizer, prompts


def measure(backend_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load the backend, warm up, time the prompt set; runs in the current environment."""
    import torch

    from spin_runtime import models
    from spin_runtime.generate.backends import SamplingConfig
    from spin_runtime.generate.factory import make_backend

    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer, prompts = _prompts(args.model, args.num_prompts, args.seed)
    began = time.perf_counter()
    if backend_name == "vllm":
        from spin_runtime.generate.vllm_backend import VLLMBackend

        backend: Any = VLLMBackend(models.resolve(args.model), tokenizer, seed=args.seed)
    else:
        backend = make_backend(
            backend_name, models.resolve(args.model), tokenizer, batch_size=args.batch_size
        )
    load_s = time.perf_counter() - began
    params = SamplingConfig(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    budgets = [args.max_new_tokens] * len(prompts)
    backend.generate(prompts[:8], params, budgets[:8])  # warm-up
    rates, tokens = [], 0
    for _ in range(args.repeats):
        began = time.perf_counter()
        completions = backend.generate(prompts, params, budgets)
        elapsed = time.perf_counter() - began
        tokens = sum(len(c.token_ids) for c in completions)
        rates.append(tokens / elapsed)
    backend.close()
    return {
        "tokens_per_s": round(statistics.median(rates), 1),
        "runs_tokens_per_s": [round(r, 1) for r in rates],
        "generated_tokens": tokens,
        "load_s": round(load_s, 2),
    }


def _vllm(args: argparse.Namespace) -> dict[str, Any] | None:
    if not VLLM_PYTHON.exists() or (VLLM_PYTHON.parents[1] / ".spin-vllm-unavailable").exists():
        return None
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
    }
    if args.threads:  # vLLM's CPU worker binds its OpenMP threads to these cores
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}"
    cmd = [str(VLLM_PYTHON), __file__, "--worker", "vllm", "--model", args.model,
           "--num-prompts", str(args.num_prompts), "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", str(args.temperature), "--repeats", str(args.repeats),
           "--seed", str(args.seed), "--threads", str(args.threads)]  # fmt: skip # argv: a flag beside its value
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"vLLM benchmark failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="checkpoint dir (default: build the demo tiny model)"
    )
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="transformers backend batch")
    parser.add_argument("--temperature", type=float, default=1.0, help="SPIN's sampling default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for both backends (0 = torch's default, all cores); on a loaded "
        "machine 1 avoids OpenMP oversubscription stalls",
    )
    parser.add_argument("--worker", choices=["vllm"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="spin-bench-generate-") as tmp:
        from spin_runtime import models, tiny

        if args.model is None:
            args.model = str(tiny.build_tiny(tmp, size="demo", seed=args.seed, dataset_name=None))
        params = tiny.num_parameters(models.load_model(args.model))
        hf = measure("transformers", args)
        vllm = _vllm(args)
    result = {
        "transformers_tokens_per_s": hf["tokens_per_s"],
        "vllm_tokens_per_s": vllm["tokens_per_s"] if vllm else None,
        "vllm_speedup": round(vllm["tokens_per_s"] / hf["tokens_per_s"], 2) if vllm else None,
        "settings": {
            "model_params": params,
            "num_prompts": args.num_prompts,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "transformers_batch_size": args.batch_size,
            "repeats": args.repeats,
            "dtype": "float32",
            "cpu_threads": args.threads or os.cpu_count(),
            "vllm_build": "vllm-cpu 0.32.0 (.venv-vllm)" if vllm else None,
        },
        "transformers": hf,
        "vllm": vllm,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
