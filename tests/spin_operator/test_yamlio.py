"""SPINRun files are read as `kubectl` reads them (YAML 1.2 numbers), with syntax errors located."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spin_operator.local.preflight import BadInput, load
from spin_operator.validation import validate_file
from spin_operator.yamlio import YamlSyntaxError, load_all
from spin_operator.yamlio import load as load_one
from tests.support.broken_spinruns import BASE

SPEC = """\
apiVersion: selfplay.dev/v1alpha1
kind: SPINRun
metadata:
  name: exp-floats
spec:
  model: {uri: s3://models/base}
  dataset: {uri: s3://data/train.jsonl}
  training:
    learningRate: 5e-7
    learningRatePerIteration: [5e-7, 5e-7, 1E-7]
    beta: 1e0
"""


@pytest.mark.parametrize(
    ("text", "value"),
    [("5e-7", 5e-7), ("1E3", 1000.0), ("-2.5e+2", -250.0), ("1.", 1.0), (".5", 0.5), ("1e0", 1.0)],
)
def test_exponent_floats_are_numbers(text: str, value: float) -> None:
    got = load_one(f"x: {text}")["x"]
    assert isinstance(got, float) and got == value
    # The cause: PyYAML alone (YAML 1.1) reads the dot-less forms as strings.
    if "." not in text:
        assert isinstance(yaml.safe_load(f"x: {text}")["x"], str)


def test_other_scalars_keep_their_kubernetes_meaning() -> None:
    doc = load_one('a: 5\nb: "5e-7"\nc: yes\nd: 2026-01-01\ne: .inf\nf: 1e\ng: 0x1F\nh: null\n')
    assert doc["a"] == 5 and isinstance(doc["a"], int)
    assert doc["b"] == "5e-7"  # quoted stays a string
    assert doc["c"] is True  # go-yaml keeps YAML 1.1 booleans
    assert doc["d"] == "2026-01-01"  # untyped dates stay strings, as the API server stores them
    assert math.isinf(doc["e"])
    assert doc["f"] == "1e"
    assert doc["g"] == 31
    assert doc["h"] is None


def test_validate_and_run_accept_exponent_floats(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(SPEC)
    assert validate_file(path) == []
    loaded = load(path, storage_uri=str(tmp_path / "store"), tracking_uri="")
    assert loaded.spec.training.learning_rate == 5e-7
    assert loaded.spec.training.learning_rate_for(2) == 1e-7
    cli = subprocess.run(
        [sys.executable, "-m", "spin_operator.cli", "validate", str(path)],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr


def test_syntax_errors_keep_line_and_column(tmp_path: Path) -> None:
    text = SPEC.replace("    beta: 1e0\n", "    beta: 1e0\n   epochs: 2\n")
    with pytest.raises(YamlSyntaxError) as info:
        load_all(text)
    assert (info.value.line, info.value.column) == (12, 4)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    (problem,) = validate_file(path)
    assert problem.path == "(file)"
    assert "line 12, column 4" in problem.message
    with pytest.raises(BadInput) as bad:
        load(path)
    assert "line 12, column 4" in str(bad.value)


def test_cross_field_errors_are_reported_together() -> None:
    from spin_operator.validation import problems_of

    obj = {**BASE, "spec": {**BASE["spec"]}}
    obj["spec"]["iterations"] = 1
    obj["spec"]["training"] = {
        **BASE["spec"].get("training", {}),
        "maxLength": 64,
        "maxPromptLength": 64,
        "globalBatchSize": 3,
        "microBatchSize": 2,
    }
    paths = {p.path for p in problems_of(obj)}
    assert {"spec.training.maxPromptLength", "spec.training.globalBatchSize"} <= paths
    obj["spec"]["training"] = {"learningRatePerIteration": [1e-6, 1e-7]}
    obj["spec"]["stopping"] = {"patience": 1}
    obj["spec"]["evaluation"] = {"enabled": False}
    paths = {p.path for p in problems_of(obj)}
    assert {"spec.training.learningRatePerIteration", "spec.stopping.patience"} <= paths
