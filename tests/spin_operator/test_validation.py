"""spinctl validate and the CRD schema refuse broken SPINRuns, naming the field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spin_operator.api import types as api
from spin_operator.validation import InvalidSpec, parse, problems_of, validate_file
from tests.support.broken_spinruns import BASE, CASES
from tests.support.crd_schema import admission_errors

REPO = Path(__file__).resolve().parents[2]


def test_base_is_valid() -> None:
    assert problems_of(BASE) == []
    assert admission_errors(BASE) == []
    spec = parse(BASE)
    assert spec.training.world_size == 2


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_models_name_the_field(case) -> None:
    problems = problems_of(case.build())
    assert problems, f"{case.id} was accepted"
    paths = [p.path for p in problems]
    assert case.field in paths, f"{case.id}: expected {case.field}, got {problems}"
    with pytest.raises(InvalidSpec):
        parse(case.build())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_crd_schema_rejects(case) -> None:
    """The API server (CRD schema + unknown-field check + CEL rules) refuses the same objects."""
    errors = admission_errors(case.build())
    assert errors, f"{case.id} would be accepted by the API server"
    leaf = case.field.split(".")[-1]
    assert any(leaf in e for e in errors), f"{case.id}: {leaf} not named in {errors}"


def test_unknown_field_suggests_the_right_name() -> None:
    case = next(c for c in CASES if c.id == "unknown-nested")
    (problem,) = [p for p in problems_of(case.build()) if p.path == case.field]
    assert "did you mean 'learningRate'" in problem.message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    obj = CASES[0].build()
    obj["spec"]["iterations"] = 0
    obj["spec"]["generation"] = {"replicas": 0, "backend": "tgi"}
    paths = {p.path for p in problems_of(obj)}
    assert {
        "spec.iteratons",
        "spec.iterations",
        "spec.generation.replicas",
        "spec.generation.backend",
    } <= paths


def test_cli_exit_status_and_messages(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(BASE))
    bad.write_text(yaml.safe_dump_all([BASE, CASES[3].build()]))
    ok = subprocess.run(
        [sys.executable, "-m", "spin_operator.cli", "validate", str(good)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    fail = subprocess.run(
        [sys.executable, "-m", "spin_operator.cli", "validate", str(good), str(bad)],
        capture_output=True,
        text=True,
    )
    assert fail.returncode == 1
    assert f"{bad}: [1].spec.iterations:" in fail.stdout
    assert f"{good}: valid" in fail.stdout


def test_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("spec: [unclosed\n")
    assert validate_file(tmp_path / "broken.yaml")[0].path == "(file)"
    assert validate_file(tmp_path / "missing.yaml")[0].path == "(file)"


def test_wrong_kind_and_version() -> None:
    obj = {**BASE, "apiVersion": "selfplay.dev/v1", "kind": "SpinRun"}
    assert {"apiVersion", "kind"} <= {p.path for p in problems_of(obj)}


@pytest.mark.parametrize(
    "example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_examples_are_valid(example: Path) -> None:
    assert validate_file(example) == []
    for doc in yaml.safe_load_all(example.read_text()):
        if doc and doc.get("kind") == api.KIND:
            assert admission_errors(doc) == []


@pytest.mark.parametrize(
    ("uri", "valid"),
    [
        ("s3://hub-data/ultrachat_200k/data/train_sft-*", True),
        ("s3://hub-data/ultrachat_200k/data/train_sft-*.parquet", True),
        ("s3://hub-data/ultrachat_200k/data/train_sft-", True),
        ("s3://hub-data/ultrachat_200k/data/", True),
        ("./data/shards", True),
        ("/data/sft.parquet", True),
        ("s3://hub-data/sft.csv", False),
        ("s3://hub-data/sft.csv/", True),  # a folder may have any name when it ends in /
        ("/data/sft.txt", False),
    ],
)
def test_dataset_may_be_a_directory_glob_or_prefix_of_shards(uri: str, valid: bool) -> None:
    obj = {**BASE, "spec": {**BASE["spec"], "dataset": {**BASE["spec"]["dataset"], "uri": uri}}}
    assert (problems_of(obj) == []) is valid, problems_of(obj)
    assert (admission_errors(obj) == []) is valid


def test_auto_metric_needs_mode_max() -> None:
    obj = {**BASE, "spec": {**BASE["spec"], "evaluation": {"mode": "min"}}}
    assert [p.path for p in problems_of(obj)] == ["spec.evaluation.mode"]
    obj["spec"]["evaluation"] = {"mode": "min", "metric": "loss"}
    assert problems_of(obj) == []


def _spec_with(**sections: dict) -> dict:
    obj = copy.deepcopy(BASE)
    for name, values in sections.items():
        obj["spec"].setdefault(name, {}).update(values)
    return obj


def test_cross_field_problems_come_in_the_same_report_as_field_problems() -> None:
    """A typo in a section no longer hides that section's or the spec's cross-field rules
    until the next fix: one `spinctl validate` names all three."""
    obj = _spec_with(
        training={"beta": "x", "maxPromptLength": 4096, "maxLength": 1024},
        stopping={"patience": 2},
        evaluation={"enabled": False},
    )
    assert {p.path for p in problems_of(obj)} == {
        "spec.training.beta",
        "spec.training.maxPromptLength",
        "spec.stopping.patience",
    }


@pytest.mark.parametrize(
    ("broken", "would_be_spurious"),
    [
        # maxLength is unreadable: the rule cannot judge maxPromptLength against the default
        (
            {"training": {"maxLength": "big", "maxPromptLength": 4096}},
            "spec.training.maxPromptLength",
        ),
        # gpusPerNode is unreadable: globalBatchSize cannot be checked against the default
        (
            {"training": {"gpusPerNode": "two", "globalBatchSize": 5}},
            "spec.training.globalBatchSize",
        ),
        # evaluation.command is malformed: the built-in evaluation may not be what runs
        (
            {"evaluation": {"command": "not-a-list"}, "dataset": {"evalSamples": 0}},
            "spec.dataset.evalSamples",
        ),
        (
            {"iterations": "three", "training": {"betaPerIteration": [0.1] * 5}},
            "spec.training.betaPerIteration",
        ),
    ],
)
def test_no_cross_field_problem_is_made_up_from_a_default(
    broken: dict, would_be_spurious: str
) -> None:
    obj = copy.deepcopy(BASE)
    for key, value in broken.items():
        if isinstance(value, dict):
            obj["spec"].setdefault(key, {}).update(value)
        else:
            obj["spec"][key] = value
    paths = {p.path for p in problems_of(obj)}
    assert paths, obj
    assert would_be_spurious not in paths, problems_of(obj)
