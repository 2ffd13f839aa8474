"""Training step cost on one CPU machine: this trainer vs a bare step vs TRL's DPOTrainer.

    .venv/bin/python benchmarks/train_step.py [--steps 15] [--warmup 3] [--threads 1]

One tiny Llama (~3 M params, tiny.DEMO), one batch of 8 pairs = 16 sequences x 128 tokens
(8 real + 8 generated, no padding), the same tokens for everyone (checked by digest), fused
AdamW (transformers' default) lr 1e-5, constant schedule, beta 0.1, sigmoid loss, max grad norm 1, fp32. Each contender runs
in its own process (so its peak RSS is its own) and times whole optimizer steps: data
collation, forward, backward, clipping, optimizer, logging, whatever it does per step. Steps
are interleaved: the parent runs one step of each contender in turn while the others wait, so
a change of load on a shared machine hits all of them alike. Medians, as ONE JSON line:

* ``spin_step_s``: :func:`spin_runtime.train.loop.train_step`, the trainer's own step, logging
  included (reference log-probs computed once by the trainer before its first step, as in a
  real run; that pass is reported separately as ``spin_reference_pass_s``);
* ``floor_step_s``: forward + cross-entropy + backward + ``optimizer.step`` over the same 16
  sequences, nothing else (no reference, no clipping, no logging);
* ``lora_step_s``: the same trainer step with ``--peft lora`` (rank 16, alpha 32, every
  linear layer but the head; base weights frozen), ``lora_peak_rss_mb`` its process's peak;
* ``trl_step_s``: TRL ``DPOTrainer`` with ``precompute_ref_log_probs=False`` (a frozen copy
  of the model runs a forward every step), ``trl_precompute_step_s`` with ``True``.

Targets: ``spin_step_s <= 1.10 * floor_step_s`` and ``trl_precompute_step_s >= 1.3 *
spin_step_s``. ``--threads`` sets torch's intra-op threads in every contender (1 by default:
steadier on a shared machine; torchrun also runs 1 per process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

PAIRS, SEQ_LEN, PROMPT_WORDS, ANSWER_WORDS = 8, 128, 48, 100
CONTENDERS = ("spin", "spin_lora", "floor", "trl", "trl_precompute")
LORA_RANK, LORA_ALPHA = 16, 32  # on every linear layer but the head (--peft lora defaults)
BETA, LR, MAX_GRAD_NORM = 0.1, 1e-5, 1.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _texts(seed: int) -> list[dict[str, str]]:
    """Prompts and two answers of single-token words, so prompt + answer tokenizes to the
    prompt's tokens followed by the answer's (TRL and this trainer then see the same ids)."""
    from spin_runtime import tiny

    rng = random.Random(seed)
    words = tiny._WORDS

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    return [
        {
            "prompt": "reverse: " + text(PROMPT_WORDS),
            "chosen": " " + text(ANSWER_WORDS),
            "rejected": " " + text(ANSWER_WORDS),
        }
        for _ in range(PAIRS)
    ]


TokenPair = tuple[list[int], list[int], list[int]]


def _token_pairs(tokenizer: Any, rows: list[dict[str, str]]) -> list[TokenPair]:
    """(prompt, real, generated) ids as TRL builds them for plain text (prompt, then prompt +
    answer + EOS, answer = the difference) and cut to SEQ_LEN tokens like its collator."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        answers = []
        for key in ("chosen", "rejected"):
            full = tokenizer(row["prompt"] + row[key] + tokenizer.eos_token)["input_ids"]
            assert full[: len(prompt)] == prompt, "prompt is not a token prefix"
            answers.append(list(full[len(prompt) : SEQ_LEN]))
        out.append((list(prompt), answers[0], answers[1]))
    return out


def _digest(pairs: list[TokenPair]) -> str:
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


class Conductor:
    """The child side of the step protocol: the parent says when to run each measured step
    (one contender at a time); the child answers with the seconds it took. Protocol lines are
    prefixed ``@@`` on stdout, anything else there is ignored."""

    def send(self, payload: dict[str, Any]) -> None:
        sys.stdout.write("@@" + json.dumps(payload) + "\n")
        sys.stdout.flush()

    def wait(self) -> str:
        return sys.stdin.readline().strip()


def _serve(warmup: int, step: Any, summary: Any) -> None:
    """``warmup`` unmeasured steps, then one measured step per ``step`` command; ``summary()``
    answers the final ``done``."""
    conductor = Conductor()
    for i in range(warmup):
        step(i)
    conductor.send({"ready": True})
    i = warmup
    while conductor.wait() == "step":
        t0 = time.perf_counter()
        step(i)
        conductor.send({"t": time.perf_counter() - t0})
        i += 1
    conductor.send(summary())


# ---------------------------------------------------------------------------------------------
# contenders (each in its own process)


def part_spin(model_dir: str, warmup: int, lora: bool = False) -> None:
    import numpy as np

    from spin_runtime import models
    from spin_runtime.train import batches, distributed, loop, metrics
    from spin_runtime.train.lora import LoraSettings

    tokenizer = models.load_tokenizer(model_dir)
    token_pairs = _token_pairs(tokenizer, _texts(0))
    pairs = batches.PairSet(
        [
            batches.Pair(i, str(i), 0, np.array(p), np.array(r), np.array(g))
            for i, (p, r, g) in enumerate(token_pairs)
        ],
        [],
    )
    cfg = loop.TrainConfig(
        model=model_dir,
        data=["bench"],
        output="unused",
        work_dir=tempfile.mkdtemp(),
        beta=BETA,
        learning_rate=LR,
        epochs=1000,
        global_batch_size=PAIRS,
        micro_batch_size=PAIRS,
        max_length=SEQ_LEN,
        max_prompt_length=SEQ_LEN - 1,
        optimizer="adamw",
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        precision="fp32",
        lora=LoraSettings(rank=LORA_RANK, alpha=LORA_ALPHA) if lora else None,
    )
    ctx = distributed.init()
    hf_model = models.load_model(model_dir, "float32", "cpu", tokenizer=tokenizer)
    session = loop.build_session(ctx, cfg, hf_model, int(tokenizer.pad_token_id), pairs)
    t0 = time.perf_counter()
    reference = session.runner.score(pairs.all, 2 * PAIRS)
    reference_s = time.perf_counter() - t0
    log = metrics.MetricsLog(ctx, cfg.work_dir, keep_until_step=0)
    first: dict[str, Any] = {}

    def step(i: int) -> None:
        order = batches.epoch_order(len(pairs.train), cfg.seed, i + 1)
        values = loop.train_step(
            session.runner, cfg, pairs, reference, order, 0, session.optimizer, session.scheduler
        )
        log.log({"event": "train", "step": i + 1, **values})
        if i == 0:
            first.update(values)

    def summary() -> dict[str, Any]:
        return {
            "reference_s": reference_s,
            "first_loss": first["loss"],
            "tokens": _digest(token_pairs),
            "rss": _peak_rss_mb(),
        }

    _serve(warmup, step, summary)


def floor_step(
    model: Any, optimizer: Any, pairs: Sequence[Any], pad_id: int, amp: Any = None
) -> None:
    """The bare step: forward + cross-entropy on the answer tokens + backward +
    ``optimizer.step`` over the pairs' 2B sequences (real and generated, each with its prompt),
    nothing else. ``amp``: an autocast context factory (bf16 on a GPU), or None."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from spin_runtime.train import batches

    device = next(model.parameters()).device
    batch = batches.collate(pairs, pairs[0], pad_id).to(device)
    labels = torch.full((batch.input_ids.numel(),), -100, dtype=torch.long, device=device)
    labels[batch.scored.positions] = batch.scored.targets  # the answer tokens, shifted
    with amp() if amp is not None else contextlib.nullcontext():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=-100)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def part_floor(model_dir: str, warmup: int) -> None:
    import numpy as np
    import torch

    from spin_runtime import models
    from spin_runtime.train import batches

    tokenizer = models.load_tokenizer(model_dir)
    token_pairs = _token_pairs(tokenizer, _texts(0))
    pairs = [
        batches.Pair(i, str(i), 0, np.array(p), np.array(r), np.array(g))
        for i, (p, r, g) in enumerate(token_pairs)
    ]
    model = models.load_model(model_dir, "float32", "cpu").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)

    def step(i: int) -> None:
        floor_step(model, optimizer, pairs, int(tokenizer.pad_token_id))

    _serve(warmup, step, lambda: {"tokens": _digest(token_pairs), "rss": _peak_rss_mb()})


def part_trl(model_dir: str, steps: int, warmup: int, precompute: bool) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from spin_runtime import models

    tokenizer = models.load_tokenizer(model_dir)
    rows = _texts(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    conductor = Conductor()
    started = [0.0]

    class Clock(TrainerCallback):  # type: ignore[misc]
        """A measured step runs from the parent's command, taken at the end of the previous
        step, to the end of this one: logging, next batch, forward, backward, optimizer."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step > warmup:
                conductor.send({"t": time.perf_counter() - started[0]})
            elif state.global_step == warmup:
                conductor.send({"ready": True})
            if state.global_step >= warmup:
                if conductor.wait() != "step":
                    control.should_training_stop = True
                started[0] = time.perf_counter()

    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=PAIRS,
        gradient_accumulation_steps=1,
        max_steps=warmup + steps + 1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch_fused",
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=SEQ_LEN,
        truncation_mode="keep_start",
        precompute_ref_log_probs=precompute,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    dataset: Any = trainer.train_dataset
    seen: list[TokenPair] = [
        (
            list(r["prompt_ids"]),
            list(r["chosen_ids"])[: SEQ_LEN - len(r["prompt_ids"])],
            list(r["rejected_ids"])[: SEQ_LEN - len(r["prompt_ids"])],
        )
        for r in dataset
    ]
    trainer.train()
    conductor.send({"tokens": _digest(seen), "rss": _peak_rss_mb()})


# ---------------------------------------------------------------------------------------------
# the parent


class Contender:
    """A contender's process, driven step by step (see :class:`Conductor`)."""

    def __init__(self, name: str, model_dir: str, opts: argparse.Namespace) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), TQDM_DISABLE="1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        cmd = [
            sys.executable, __file__, "--part", name, "--model-dir", model_dir,
            "--steps", str(opts.steps), "--warmup", str(opts.warmup),
            "--threads", str(opts.threads),
        ]  # fmt: skip # argv: a flag beside its value
        self.name = name
        self.times: list[float] = []
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return dict(json.loads(line[2:]))
        raise SystemExit(f"{self.name} exited with {self.proc.wait()}: rerun its --part to debug")

    def command(self, word: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        return self.receive()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="measured steps per contender")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured first steps")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--part", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.part:
        import torch

        torch.set_num_threads(opts.threads)
        torch.manual_seed(0)
        if opts.part in ("spin", "spin_lora"):
            part_spin(opts.model_dir, opts.warmup, lora=opts.part == "spin_lora")
        elif opts.part == "floor":
            part_floor(opts.model_dir, opts.warmup)
        else:
            part_trl(opts.model_dir, opts.steps, opts.warmup, opts.part == "trl_precompute")
        return

    from spin_runtime import tiny

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        rows = tiny.make_task_rows(400, seed=0)
        tokenizer = tiny.train_tokenizer(rows, model_max_length=tiny.DEMO.max_position_embeddings)
        model = tiny.make_model(tokenizer, tiny.DEMO, seed=0)
        params = tiny.num_parameters(model)
        model_dir = str(tiny.save_tiny(Path(tmp) / "model", tokenizer, model))
        contenders = [Contender(name, model_dir, opts) for name in CONTENDERS]
        for c in contenders:
            c.receive()  # set up and warmed up (the others wait meanwhile)
        for r in range(opts.steps):  # one step of each in turn, the order rotating
            k = r % len(contenders)
            for c in contenders[k:] + contenders[:k]:
                c.times.append(float(c.command("step")["t"]))
        results = {c.name: {**c.command("done"), "times": c.times} for c in contenders}
        for c in contenders:
            c.proc.wait()

    digests = {name: r["tokens"] for name, r in results.items()}
    if len(set(digests.values())) != 1:
        raise SystemExit(f"contenders saw different tokens: {digests}")
    med = {name: statistics.median(r["times"]) for name, r in results.items()}
    spin, floor = med["spin"], med["floor"]
    settings = {
        "params": params,
        "pairs": PAIRS,
        "sequences": 2 * PAIRS,
        "seq_len": SEQ_LEN,
        "beta": BETA,
        "lr": LR,
        "optimizer": "adamw",
        "max_grad_norm": MAX_GRAD_NORM,
        "dtype": "float32",
        "threads": opts.threads,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "tokens_sha256": digests["spin"],
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "target_modules": "all-linear"},
    }
    line = {
        "spin_step_s": round(spin, 4),
        "floor_step_s": round(floor, 4),
        "trl_step_s": round(med["trl"], 4),
        "trl_precompute_step_s": round(med["trl_precompute"], 4),
        "spin_peak_rss_mb": round(results["spin"]["rss"], 1),
        "lora_step_s": round(med["spin_lora"], 4),
        "lora_peak_rss_mb": round(results["spin_lora"]["rss"], 1),
        "lora_vs_full_step": round(med["spin_lora"] / spin, 3),
        "trl_peak_rss_mb": round(results["trl"]["rss"], 1),
        "trl_precompute_peak_rss_mb": round(results["trl_precompute"]["rss"], 1),
        "spin_vs_floor": round(spin / floor, 3),
        "trl_precompute_vs_spin": round(med["trl_precompute"] / spin, 3),
        "min_step_s": {name: round(min(r["times"]), 4) for name, r in results.items()},
        "spin_reference_pass_s": round(results["spin"]["reference_s"], 4),
        "spin_first_loss": round(results["spin"]["first_loss"], 7),
        "lora_first_loss": round(results["spin_lora"]["first_loss"], 7),
        "settings": settings,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
