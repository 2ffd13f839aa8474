"""Child names are deterministic, parseable and always fit a DNS label."""

from __future__ import annotations

import re

import pytest

from spin_operator.api import types as api
from spin_operator.naming import (
    ALL_STEP_KINDS,
    DNS_LABEL_MAX,
    job_name,
    parse_job_name,
    pod_hostname,
    service_name,
    step_labels,
)

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def test_names() -> None:
    assert job_name("r", 0, "generate") == "r-i0-gen"
    assert job_name("r", 12, "train", 3) == "r-i12-train-r3"
    assert job_name("r", 1, "evaluate", 0) == "r-i1-eval"
    with pytest.raises(ValueError):
        job_name("r", -1, "train")


@pytest.mark.parametrize("stage", ALL_STEP_KINDS)
def test_longest_names_fit_a_dns_label(stage: str) -> None:
    run = "a" * api.MAX_NAME_LENGTH
    name = job_name(run, api.MAX_ITERATIONS - 1, stage, api.MAX_RETRIES)  # type: ignore[arg-type]
    max_index = (
        1023 if stage == "generate" else 511
    )  # generation.replicas <= 1024, training.nodes <= 512
    for text in (name, service_name(name), pod_hostname(name, max_index)):
        assert len(text) <= DNS_LABEL_MAX, text
        assert DNS_LABEL.match(text)


@pytest.mark.parametrize("stage", ALL_STEP_KINDS)
@pytest.mark.parametrize("attempt", [0, 1, 9])
def test_parse_round_trips(stage: str, attempt: int) -> None:
    parsed = parse_job_name(job_name("my-run-2", 7, stage, attempt))  # type: ignore[arg-type]
    assert parsed is not None
    assert (parsed.run, parsed.iteration, parsed.stage, parsed.attempt) == (
        "my-run-2",
        7,
        stage,
        attempt,
    )


def test_foreign_names_do_not_parse() -> None:
    assert parse_job_name("some-job") is None
    assert parse_job_name("r-i1-gen-x") is None


def test_labels_are_valid_label_values() -> None:
    labels = step_labels("a" * 40, 98, "evaluate", 9)
    assert labels["selfplay.dev/run"] == "a" * 40
    assert labels["selfplay.dev/iteration"] == "98"
    assert labels["selfplay.dev/stage"] == "evaluate"
    assert labels["selfplay.dev/attempt"] == "9"
    assert labels["app.kubernetes.io/managed-by"] == "spin-operator"
    assert labels["app.kubernetes.io/part-of"] == "spin-operator"
    assert all(len(v) <= 63 and LABEL_VALUE.match(v) for v in labels.values())
