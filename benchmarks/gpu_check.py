"""The GPU path, measured in one run: SPIN training steps of a ~1B Llama in bf16, and generation.

    python benchmarks/gpu_check.py            # one CUDA GPU, ~1.1B params, a few minutes
    python benchmarks/gpu_check.py --tiny     # the same script on the CPU in seconds (tests)

Builds a TinyLlama-1.1B-shaped Llama (22 layers, hidden 2048, GQA 32/4 heads, vocab 32000,
untied head) with random weights, locally (nothing is downloaded), and runs the project's own
trainer on it: :func:`spin_runtime.train.loop.build_session`, the reference pass
(``Runner.score``) and :func:`spin_runtime.train.loop.train_step`, logging included. Every
contender starts from the same weights and trains on the same random token pairs (8 pairs of a
256-token prompt and two 384-token answers: 10,240 sequence tokens a step, the prompt counted
twice as the trainer's ``tokens_per_s`` does), one after the other, so each one's peak GPU
memory is its own:

* ``spin``: bf16 (autocast over fp32 master weights), one process, AdamW, clipping;
* ``spin_gc``: the same with gradient checkpointing;
* ``spin_ddp`` / ``spin_fsdp``: the same wrapped in DDP / FSDP2 on a process group of one rank
  (NCCL), through :func:`spin_runtime.train.distributed.wrap`: the wrappers' own cost;
* ``lora``: ``--peft lora`` (rank 16, alpha 32, every linear layer but the head);
* ``floor``: forward + cross-entropy + backward + AdamW step over the same 16 sequences and
  nothing else (:func:`benchmarks.train_step.floor_step`);
* ``trl_precompute``: a TRL-style DPO step with precomputed reference log-probs: chosen and
  rejected concatenated (prompt computed twice), full logits, fp32 log-softmax over the whole
  vocabulary, sigmoid loss, clipping, AdamW (TRL itself is not on the GPU machine).

Per contender: median ``step_s`` (CUDA synchronized), ``tokens_per_s``, ``mfu`` = 6 · params ·
tokens / (step_s · 989e12) (H100/H200 dense bf16 peak; for LoRA this over-counts the backward,
which skips the frozen weights' gradients), ``peak_mem_gb`` (``max_memory_allocated``) and the
first step's loss minus ln 2. Then ``generation``: the runtime's transformers backend sampling
from the same model in bf16. ONE JSON line on stdout; a contender that fails is reported with
its error and the others still run (exit status 1). Targets (issue 20): MFU >= 0.40 for
``spin``, ``spin`` <= 1.10 x ``floor``, ``trl_precompute`` >= 1.3 x ``spin``, |first loss -
ln 2| <= 1e-3. Needs torch, transformers, numpy and peft; not boto3 or MLflow.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "runtime"), str(REPO)]

CONTENDERS = (
    "spin", "spin_gc", "spin_ddp", "spin_fsdp", "lora", "floor", "trl_precompute", "generation",
)  # fmt: skip # a word list, packed
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 (the MFU denominator)
BETA, LR, MAX_GRAD_NORM = 0.1, 1e-6, 1.0


@dataclass(frozen=True)
class Shape:
    """Model and workload of one run."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # 0: the tokenizer's size
    pairs: int
    prompt: int
    answer: int
    steps: int
    warmup: int
    gen_prompts: int
    gen_tokens: int


FULL = Shape(2048, 22, 32, 4, 5632, 32000, 8, 256, 384, 8, 3, 64, 128)  # TinyLlama-1.1B shape
TINY = Shape(64, 2, 4, 2, 128, 0, 2, 8, 8, 2, 1, 4, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_rank_group() -> Any:
    """A process group of one rank (NCCL on a GPU, gloo on the CPU), as torchrun
    --nproc_per_node 1 would set up, so DDP and FSDP2 can wrap the model."""
    from spin_runtime.train import distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        TORCHELASTIC_RUN_ID="gpu-check",
    )
    return distributed.init()


def _build(shape: Shape, device: Any) -> tuple[Any, Any]:
    """(tokenizer, fp32 model on the CPU) with random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spin_runtime import tiny

    tokenizer = tiny.train_tokenizer(tiny.make_task_rows(200, seed=0), 512)
    config = LlamaConfig(
        vocab_size=shape.vocab or len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model.float().cpu().eval()


def _pairs(shape: Shape, vocab: int) -> Any:
    """``shape.pairs`` training pairs of random token ids (a prompt, a real and a generated
    answer of fixed lengths)."""
    import numpy as np

    from spin_runtime.train import batches

    rng = np.random.default_rng(0)

    def ids(n: int) -> Any:
        return rng.integers(3, vocab, size=n, dtype=np.int64)

    return batches.PairSet(
        [
            batches.Pair(i, str(i), 0, ids(shape.prompt), ids(shape.answer), ids(shape.answer))
            for i in range(shape.pairs)
        ],
        [],
    )


class Clock:
    """Wall time of a step, the device synchronized on both ends; peak memory since reset."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        if not self.cuda:
            return None
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 2)

    def time(self, step: Callable[[int], Any], steps: int, warmup: int) -> tuple[list[float], Any]:
        """Run ``warmup`` then ``steps`` steps; (measured seconds, first step's result)."""
        times, first = [], None
        for i in range(warmup + steps):
            self.sync()
            t0 = time.perf_counter()
            out = step(i)
            self.sync()
            if i == 0:
                first = out
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return times, first


def _summary(times: list[float], tokens: int, params: int, clock: Clock) -> dict[str, Any]:
    step = statistics.median(times)
    return {
        "step_s": round(step, 4),
        "tokens_per_s": round(tokens / step, 1),
        "mfu": float(f"{6 * params * tokens / (step * PEAK_FLOPS):.4g}"),
        "peak_mem_gb": clock.peak_gb(),
    }


def spin_contender(
    ctx: Any, base: Any, pad_id: int, pairs: Any, shape: Shape, clock: Clock, **options: Any
) -> dict[str, Any]:
    """The trainer's own step under ``options`` (TrainConfig fields)."""
    from spin_runtime.train import batches, loop, metrics

    seq_len = shape.prompt + 2 * shape.answer
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work_dir:
        cfg = loop.TrainConfig(
            model="gpu-check",
            data=["gpu-check"],
            output=work_dir,
            work_dir=work_dir,
            beta=BETA,
            learning_rate=LR,
            epochs=1000,
            global_batch_size=shape.pairs,
            micro_batch_size=shape.pairs,
            max_length=seq_len,
            max_prompt_length=shape.prompt,
            optimizer="adamw",
            lr_scheduler="constant",
            warmup_ratio=0.0,
            max_grad_norm=MAX_GRAD_NORM,
            precision="bf16",
            **options,
        )
        cfg.validate()
        clock.reset()
        model = copy.deepcopy(base)
        session = loop.build_session(ctx, cfg, model, pad_id, pairs)
        runner = session.runner
        reference = runner.score(pairs.all, 2 * shape.pairs)
        log = metrics.MetricsLog(ctx, work_dir, keep_until_step=0)

        def step(i: int) -> float:
            order = batches.epoch_order(len(pairs.train), cfg.seed, i + 1)
            values = loop.train_step(
                runner, cfg, pairs, reference, order, 0, session.optimizer, session.scheduler
            )
            log.log({"event": "train", "step": i + 1, **values})
            return float(values["loss"])

        times, first_loss = clock.time(step, shape.steps, shape.warmup)
        tokens = sum(p.num_tokens for p in pairs.train)
        out = _summary(times, tokens, session.num_params, clock)
        out["first_loss_minus_ln2"] = first_loss - math.log(2.0)
        out["strategy"] = runner.strategy
        out["prompt_sharing"] = runner.shared_prompt
        if session.trainable_params != session.num_params:
            out["trainable_params"] = session.trainable_params
    return out


def floor_contender(base: Any, pad_id: int, pairs: Any, shape: Shape, clock: Clock) -> Any:
    import torch

    from benchmarks.train_step import floor_step

    clock.reset()
    model = copy.deepcopy(base).to(clock_device(clock)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)

    def amp() -> Any:
        return torch.autocast(clock_device(clock).type, dtype=torch.bfloat16)

    times, _ = clock.time(
        lambda i: floor_step(model, optimizer, pairs.train, pad_id, amp),
        shape.steps,
        shape.warmup,
    )
    out = _summary(times, sum(p.num_tokens for p in pairs.train), _params(model), clock)
    return out


def trl_style_contender(base: Any, pad_id: int, pairs: Any, shape: Shape, clock: Clock) -> Any:
    """DPO as TRL computes it with ``precompute_ref_log_probs=True``: reference log-probs of
    every pair once, then per step one forward of chosen + rejected concatenated (each with its
    prompt), full logits, fp32 log-softmax over the vocabulary, the sigmoid loss."""
    import torch
    import torch.nn.functional as F

    from spin_runtime.train import batches

    device = clock_device(clock)
    clock.reset()
    model = copy.deepcopy(base).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    b = len(pairs.train)
    batch = batches.collate(pairs.train, pairs.train[0], pad_id).to(device)
    s = batch.scored

    def logps() -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        per_token = logits.float().log_softmax(-1).flatten(0, 1)[s.positions]
        picked = per_token.gather(1, s.targets[:, None]).squeeze(1)
        return torch.zeros(s.num_sequences, device=device).index_add(0, s.segments, picked)

    with torch.no_grad():
        reference = logps()

    def step(i: int) -> float:
        out = logps()
        margin = (out[:b] - reference[:b]) - (out[b:] - reference[b:])
        loss = -F.logsigmoid(BETA * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    times, first = clock.time(step, shape.steps, shape.warmup)
    out = _summary(times, sum(p.num_tokens for p in pairs.train), _params(model), clock)
    out["first_loss_minus_ln2"] = first - math.log(2.0)
    return out


def generation_contender(
    base: Any, tokenizer: Any, shape: Shape, clock: Clock, bf16: bool
) -> dict[str, Any]:
    """Sampling (temperature 1) through the runtime's transformers backend, from a checkpoint
    of the same model saved in bf16 (fp32 on the CPU)."""
    import numpy as np
    import torch

    from spin_runtime.generate.backends import SamplingConfig
    from spin_runtime.generate.transformers_backend import TransformersBackend

    clock.reset()
    dtype = "bfloat16" if bf16 else "float32"
    with tempfile.TemporaryDirectory(prefix="gpu-check-model-") as tmp:
        copy.deepcopy(base).to(getattr(torch, dtype)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        backend = TransformersBackend(tmp, tokenizer, dtype=dtype, batch_size=shape.gen_prompts)
    rng = np.random.default_rng(1)
    vocab = base.config.vocab_size
    prompts = [rng.integers(3, vocab, size=shape.prompt).tolist() for _ in range(shape.gen_prompts)]
    budgets = [shape.gen_tokens] * len(prompts)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=shape.gen_tokens, seed=0)
    backend.generate(prompts[:2], sampling, [4, 4])  # warm-up
    clock.sync()
    t0 = time.perf_counter()
    done = backend.generate(prompts, sampling, budgets)
    clock.sync()
    elapsed = time.perf_counter() - t0
    backend.close()
    new_tokens = sum(len(c.token_ids) for c in done)
    return {
        "tokens_per_s": round(new_tokens / elapsed, 1),
        "new_tokens": new_tokens,
        "prompts": len(prompts),
        "seconds": round(elapsed, 3),
        "dtype": dtype,
        "peak_mem_gb": clock.peak_gb(),
    }


def clock_device(clock: Clock) -> Any:
    import torch

    return torch.device("cuda" if clock.cuda else "cpu")


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _ratio(results: dict[str, Any], a: str, b: str, key: str = "step_s") -> float | None:
    x, y = results.get(a, {}).get(key), results.get(b, {}).get(key)
    return round(x / y, 3) if x and y else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (tests)")
    parser.add_argument("--steps", type=int, help="measured steps per contender")
    parser.add_argument("--warmup", type=int, help="unmeasured first steps")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated contenders to run (default: all), e.g. to rerun one that failed",
    )
    args = parser.parse_args(argv)
    only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(only) - set(CONTENDERS))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: not one of {', '.join(CONTENDERS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()

    import torch

    shape = TINY if args.tiny else FULL
    if args.steps is not None or args.warmup is not None:
        from dataclasses import replace

        shape = replace(
            shape,
            steps=args.steps if args.steps is not None else shape.steps,
            warmup=args.warmup if args.warmup is not None else shape.warmup,
        )
    if not args.tiny and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device (use --tiny for the CPU)"}))
        return 0
    if args.tiny:
        torch.set_num_threads(1)

    import transformers

    from spin_runtime.train import distributed
    from spin_runtime.train.lora import LoraSettings

    ctx = _one_rank_group()
    clock = Clock(ctx.device)
    tokenizer, base = _build(shape, ctx.device)
    pad_id = int(tokenizer.pad_token_id)
    params = _params(base)
    pairs = _pairs(shape, base.config.vocab_size)
    peft_version = None
    with contextlib.suppress(Exception):
        import peft

        peft_version = peft.__version__

    contenders: dict[str, Callable[[], dict[str, Any]]] = {
        "spin": lambda: spin_contender(ctx, base, pad_id, pairs, shape, clock),
        "spin_gc": lambda: spin_contender(
            ctx, base, pad_id, pairs, shape, clock, gradient_checkpointing=True
        ),
        "spin_ddp": lambda: spin_contender(ctx, base, pad_id, pairs, shape, clock, strategy="ddp"),
        "spin_fsdp": lambda: spin_contender(
            ctx, base, pad_id, pairs, shape, clock, strategy="fsdp"
        ),
        "lora": lambda: spin_contender(
            ctx, base, pad_id, pairs, shape, clock, lora=LoraSettings(rank=16, alpha=32)
        ),
        "floor": lambda: floor_contender(base, pad_id, pairs, shape, clock),
        "trl_precompute": lambda: trl_style_contender(base, pad_id, pairs, shape, clock),
        "generation": lambda: generation_contender(
            base, tokenizer, shape, clock, bf16=ctx.device.type == "cuda"
        ),
    }
    results: dict[str, Any] = {}
    failed = False
    assert tuple(contenders) == CONTENDERS
    for name, run in contenders.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            results[name] = run()
        except Exception as exc:  # report and go on: a GPU hour is too scarce to stop here
            failed = True
            tail = traceback.format_exc().strip().splitlines()[-3:]
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500], "trace": tail}
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    distributed.shutdown(ctx)

    spin = results.get("spin", {})
    line = {
        "device": torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft_version,
            "python": sys.version.split()[0],
        },
        "params": params,
        "settings": {
            "tiny": args.tiny,
            "pairs": shape.pairs,
            "prompt_tokens": shape.prompt,
            "answer_tokens": shape.answer,
            "sequence_tokens_per_step": sum(p.num_tokens for p in pairs.train),
            "steps": shape.steps,
            "warmup": shape.warmup,
            "beta": BETA,
            "lr": LR,
            "optimizer": "adamw",
            "precision": "bf16",
            "layers": shape.layers,
            "hidden": shape.hidden,
            "vocab": base.config.vocab_size,
            "peak_flops": PEAK_FLOPS,
        },
        **results,
        "ratios": {
            "spin_vs_floor": _ratio(results, "spin", "floor"),
            "trl_precompute_vs_spin": _ratio(results, "trl_precompute", "spin"),
            "gc_vs_plain": _ratio(results, "spin_gc", "spin"),
            "ddp_vs_plain": _ratio(results, "spin_ddp", "spin"),
            "fsdp_vs_plain": _ratio(results, "spin_fsdp", "spin"),
            "lora_vs_full_step": _ratio(results, "lora", "spin"),
            "lora_vs_full_mem": _ratio(results, "lora", "spin", "peak_mem_gb"),
        },
        "targets": {
            "mfu_ge_0.40": spin.get("mfu", 0) >= 0.40,
            "spin_le_1.10x_floor": (_ratio(results, "spin", "floor") or 9) <= 1.10,
            "trl_precompute_ge_1.3x_spin": (_ratio(results, "trl_precompute", "spin") or 0) >= 1.3,
            "first_loss_within_1e-3_of_ln2": abs(spin.get("first_loss_minus_ln2", 1)) <= 1e-3,
        },
        "wall_s": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(line))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
