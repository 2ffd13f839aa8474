"""demo-build: each knob declared once (the dataclass builds the CLI)."""

from __future__ import annotations

from dataclasses import fields

from spin_runtime.cli import build_parser
from spin_runtime.demo_build import DemoConfig


def test_the_cli_defaults_are_the_dataclass_defaults() -> None:
    args = build_parser().parse_args(["demo-build", "--workdir", "w"])
    assert DemoConfig.from_args(args) == DemoConfig()


def test_every_knob_has_a_flag_and_a_meaning() -> None:
    argv = [
        "demo-build",
        "--workdir",
        "w",
        "--tasks",
        "reverse",
        "--sft-learning-rate",
        "0.5",
        "--rows",
        "7",
    ]
    cfg = DemoConfig.from_args(build_parser().parse_args(argv))
    assert cfg.tasks == ("reverse",) and cfg.sft_learning_rate == 0.5 and cfg.rows == 7
    assert all(f.metadata["help"] for f in fields(DemoConfig))
