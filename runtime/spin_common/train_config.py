"""The ``train`` command's settings, each declared once with its default and meaning.

The dataclasses below build the CLI (:meth:`TrainConfig.add_flags`), read it back
(:meth:`TrainConfig.from_args`) and write it (:meth:`TrainConfig.to_argv`, which the operator's
step plans use), so a knob cannot drift between the three. Light by construction (argparse and
dataclasses only): the operator imports it, and ``python -m spin_runtime train --help`` needs
no torch. Flag reference: docs/runtime.md.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

from spin_common.errors import UsageError

OPTIMIZERS = ("rmsprop", "adamw")
SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
STRATEGIES = ("auto", "ddp", "fsdp")
SHARING_MODES = ("auto", "on", "off")
TRUNCATED_ANSWERS = ("keep", "drop")
OBJECTIVES = ("spin", "sft")
PEFT_METHODS = ("none", "lora")
ALL_LINEAR = "all-linear"


def knob(default: Any, meaning: str, *, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    """A setting: its default (``MISSING``: a required flag), its meaning (the flag's help)."""
    meta = {"help": meaning, "choices": choices}
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoraSettings:
    """``--peft lora`` and its ``--lora-*`` flags."""

    rank: int = knob(16, "adapter rank")
    alpha: int = knob(32, "scaling is alpha / rank")
    dropout: float = knob(0.0, "on the adapter's input")
    target_modules: list[str] = knob(
        None,
        "comma-separated module names (e.g. q_proj,v_proj), or all-linear (every linear layer "
        "but the output head)",
        default_factory=lambda: [ALL_LINEAR],
    )

    def validate(self) -> None:
        checks = [
            (self.rank >= 1, f"--lora-rank {self.rank}: must be >= 1"),
            (self.alpha > 0, f"--lora-alpha {self.alpha}: must be > 0"),
            (0 <= self.dropout < 1, f"--lora-dropout {self.dropout}: must be in [0, 1)"),
            (
                bool(self.target_modules) and all(m.strip() for m in self.target_modules),
                "--lora-target-modules: give module names (e.g. q_proj,v_proj) or all-linear",
            ),
            (
                ALL_LINEAR not in self.target_modules or len(self.target_modules) == 1,
                "--lora-target-modules: all-linear cannot be combined with module names",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def as_dict(self) -> dict[str, Any]:
        return {"method": "lora", **asdict(self)}


@dataclass
class TrainConfig:
    """One SPIN iteration's settings (``python -m spin_runtime train``)."""

    model: str = knob(MISSING, "θt: policy init and reference (HF checkpoint URI)")
    data: list[str] = knob(
        MISSING, "generated dir URI, repeatable: current iteration first, then previous ones"
    )
    output: str = knob(MISSING, "θt+1 checkpoint URI (R/iter-t/model)")
    work_dir: str = knob(MISSING, "epoch checkpoints and metrics (R/iter-t/train)")
    tokenizer: str | None = knob(None, "tokenizer URI (default: the model's)")
    chat_template: str | None = knob(None, "jinja chat template URI override")
    iteration: int = knob(0, "the SPIN iteration t (names runs and metrics)")
    seed: int = knob(0, "data order")
    beta: float = knob(0.1, "SPIN's β: the logistic loss's scale on the log-ratio margin")
    learning_rate: float = knob(5e-7, "peak learning rate")
    epochs: int = knob(2, "passes over the pairs")
    global_batch_size: int = knob(64, "pairs per optimizer step")
    micro_batch_size: int = knob(1, "pairs per forward pass")
    max_length: int = knob(1024, "prompt + answer tokens")
    max_prompt_length: int = knob(512, "longer prompts are skipped, counted")
    optimizer: str = knob("rmsprop", "rmsprop (the paper's) or adamw", choices=OPTIMIZERS)
    weight_decay: float = knob(0.0, "decoupled weight decay (never on biases and norms)")
    lr_scheduler: str = knob("linear", "decay after warmup", choices=SCHEDULERS)
    warmup_ratio: float = knob(0.1, "fraction of the optimizer steps warming up from 0")
    max_grad_norm: float = knob(1.0, "0 disables clipping")
    precision: str = knob(
        "auto",
        "auto: bf16 on GPU, fp32 on CPU (fp32 master weights either way)",
        choices=PRECISIONS,
    )
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass")
    strategy: str = knob(
        "auto", "auto: DDP when a replica fits in half a device, else FSDP2", choices=STRATEGIES
    )
    prompt_sharing: str = knob(
        "auto",
        "score each pair as one row (prompt computed once) instead of two: auto uses it only "
        "when checked exact for this model on the run's own pairs; on refuses (exit 2) when "
        "that check fails",
        choices=SHARING_MODES,
    )
    truncated_answers: str = knob(
        "keep",
        "generated answers cut by their token budget (finish_reason length): train on them as "
        "sampled, without an EOS, or drop their pairs",
        choices=TRUNCATED_ANSWERS,
    )
    drop_identical_pairs: bool = knob(
        True,
        "drop pairs whose generated answer is token for token the real one (they carry no "
        "gradient); counted either way",
    )
    objective: str = knob(
        "spin",
        "sft: the control arm, plain cross-entropy on the real answers of the same pairs for "
        "the same optimizer steps (no reference pass; --beta is ignored)",
        choices=OBJECTIVES,
    )
    # None: full fine-tuning. On the command line: --peft lora and the --lora-* flags.
    lora: LoraSettings | None = None

    # -- the command line ------------------------------------------------------------------

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            if f.name != "lora":
                _add_flag(parser, f, "--" + f.name.replace("_", "-"))
        parser.add_argument(
            "--no-prompt-sharing",
            dest="prompt_sharing",
            action="store_const",
            const="off",
            help="same as --prompt-sharing off (kept for older callers)",
        )
        parser.add_argument(
            "--peft",
            choices=PEFT_METHODS,
            default="none",
            help="lora: train a LoRA adapter on θt (peft) and publish θt+1 merged, with the "
            "adapter in OUTPUT/adapter; none: full fine-tuning",
        )
        for f in fields(LoraSettings):
            _add_flag(parser, f, "--lora-" + f.name.replace("_", "-"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "lora"}
        values["data"] = list(values["data"])
        lora = None
        if args.peft == "lora":
            lora = LoraSettings(
                **{f.name: getattr(args, "lora_" + f.name) for f in fields(LoraSettings)}
            )
        return cls(**values, lora=lora)

    def to_argv(self) -> list[str]:
        """The flags that make ``from_args`` rebuild this config (defaults included, so the
        argv says everything a Job was asked to do)."""
        argv: list[str] = []
        for f in fields(self):
            if f.name != "lora":
                argv += _flag_argv("--" + f.name.replace("_", "-"), getattr(self, f.name), f)
        if self.lora is not None:
            argv += ["--peft", "lora"]
            for f in fields(self.lora):
                argv += _flag_argv(
                    "--lora-" + f.name.replace("_", "-"), getattr(self.lora, f.name), f
                )
        return argv

    # -- checks ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Bad values are usage errors naming the flag (exit 2)."""
        checks = [
            (bool(self.data), "--data: at least one generated directory is required"),
            (self.beta > 0, f"--beta {self.beta}: must be > 0"),
            (self.learning_rate > 0, f"--learning-rate {self.learning_rate}: must be > 0"),
            (self.epochs >= 1, f"--epochs {self.epochs}: must be >= 1"),
            (self.global_batch_size >= 1, "--global-batch-size: must be >= 1"),
            (self.micro_batch_size >= 1, "--micro-batch-size: must be >= 1"),
            (self.max_length >= 2, "--max-length: must be >= 2"),
            (
                0 < self.max_prompt_length < self.max_length,
                f"--max-prompt-length {self.max_prompt_length}: must be in "
                f"[1, --max-length {self.max_length})",
            ),
            (self.weight_decay >= 0, "--weight-decay: must be >= 0"),
            (0 <= self.warmup_ratio < 1, f"--warmup-ratio {self.warmup_ratio}: must be in [0, 1)"),
            (self.max_grad_norm >= 0, "--max-grad-norm: must be >= 0 (0 disables clipping)"),
        ]
        # Programmatic callers bypass argparse's choices: check them here too.
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            checks.append(
                (choices is None or value in choices, f"{flag} {value}: one of {choices}")
            )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.lora is not None:
            self.lora.validate()

    def resume_key(self) -> dict[str, Any]:
        """Settings an epoch checkpoint must share with this run to be resumed (micro-batch
        size, world size and strategy may change: they do not change the update)."""
        keys = (
            "model", "data", "iteration", "seed", "beta", "learning_rate", "epochs",
            "global_batch_size", "max_length", "max_prompt_length", "optimizer", "weight_decay",
            "lr_scheduler", "warmup_ratio", "max_grad_norm", "truncated_answers",
            "drop_identical_pairs",
        )  # fmt: skip # a word list, packed
        key = {k: getattr(self, k) for k in keys}
        if self.lora is not None:  # absent for full fine-tuning: older checkpoints still resume
            key["lora"] = self.lora.as_dict()
        if self.objective != "spin":  # likewise absent for SPIN
            key["objective"] = self.objective
        return key


def _add_flag(parser: argparse.ArgumentParser, f: Field[Any], flag: str) -> None:
    help_ = f.metadata.get("help", "")
    required = f.default is MISSING and f.default_factory is MISSING
    default = None
    if not required:
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc,operator]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if kind == "bool":
        action = argparse.BooleanOptionalAction if default else "store_true"
        parser.add_argument(flag, action=action, default=default, help=help_)
    elif kind == "list[str]" and required:  # repeatable
        parser.add_argument(flag, action="append", required=True, help=help_)
    elif kind == "list[str]":  # comma-separated
        parser.add_argument(flag, type=_comma_list, default=default, help=help_)
    else:
        convert = {"int": int, "float": float}.get(kind.split(" ")[0], str)
        parser.add_argument(
            flag,
            type=convert,
            default=default,
            required=required,
            choices=f.metadata.get("choices"),
            help=help_,
        )


def _comma_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",")]


def _flag_argv(flag: str, value: Any, f: Field[Any]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):  # as _add_flag declares it: --x / --no-x when on by default
        if f.default is True:
            return [flag] if value else ["--no-" + flag[2:]]
        return [flag] if value else []
    if isinstance(value, list) and flag == "--data":
        return [a for uri in value for a in (flag, uri)]
    if isinstance(value, list):
        return [flag, ",".join(value)]
    if isinstance(value, float):
        return [flag, repr(value)]
    return [flag, str(value)]
