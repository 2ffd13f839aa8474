"""train's settings are declared once: the dataclass builds the CLI, reads it and writes it."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

import pytest

from spin_common.errors import UsageError
from spin_common.train_config import LoraSettings, TrainConfig
from spin_runtime.cli import build_parser

BASE = TrainConfig(model="m", data=["s3://b/r/iter-001/generated", "/g0"], output="o", work_dir="w")


def parse(argv: list[str]) -> TrainConfig:
    return TrainConfig.from_args(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize(
    "cfg",
    [
        BASE,
        replace(BASE, tokenizer="tok", chat_template="t.jinja", beta=0.25, learning_rate=1e-6),
        replace(BASE, drop_identical_pairs=False, gradient_checkpointing=True, objective="sft"),
        replace(BASE, optimizer="adamw", lr_scheduler="cosine", precision="bf16", strategy="fsdp"),
        replace(BASE, prompt_sharing="off", truncated_answers="drop", max_grad_norm=0.0),
        replace(BASE, lora=LoraSettings()),
        replace(
            BASE,
            lora=LoraSettings(rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]),
        ),
    ],
    ids=["defaults", "strings-floats", "bools", "choices", "more-choices", "lora", "lora-modules"],
)
def test_to_argv_then_parse_gives_the_same_config(cfg: TrainConfig) -> None:
    assert parse(cfg.to_argv()) == cfg


def test_the_cli_defaults_are_the_dataclass_defaults() -> None:
    assert parse(
        ["--model", "m", "--data", "a", "--data", "b", "--output", "o", "--work-dir", "w"]
    ) == replace(BASE, data=["a", "b"])


def test_every_setting_has_a_meaning_and_the_old_spelling_still_parses() -> None:
    assert all(
        f.metadata.get("help")
        for c in (TrainConfig, LoraSettings)
        for f in fields(c)
        if f.name != "lora"
    )
    assert parse([*BASE.to_argv(), "--no-prompt-sharing"]).prompt_sharing == "off"
    assert parse([*BASE.to_argv(), "--no-drop-identical-pairs"]).drop_identical_pairs is False


def test_a_choice_outside_its_list_is_refused_by_the_cli_and_by_validate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse([*BASE.to_argv(), "--optimizer", "sgd"])
    assert "--optimizer" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--optimizer sgd"):
        replace(BASE, optimizer="sgd").validate()
    with pytest.raises(UsageError, match="--lora-rank 0"):
        replace(BASE, lora=LoraSettings(rank=0)).validate()


def test_required_flags_are_required() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model", "m", "--output", "o", "--work-dir", "w"])
    assert isinstance(build_parser(), argparse.ArgumentParser)
