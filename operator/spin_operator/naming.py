"""Deterministic names and labels of a SPINRun's children.

A child's name is a pure function of (run, iteration, stage, attempt), so the operator finds the
Job of a step again after a restart and a create that races another create gets 409 instead of a
duplicate. Run names are capped at 40 characters by the CRD, iterations at 99 and retries at 9, so
the longest Job name, the headless Service (same name) and Indexed-Job pod hostnames
`<job>-<index>` all fit the 63-character DNS label limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

StepKind = Literal["check", "generate", "train", "evaluate", "control-train", "control-evaluate"]
STEP_KINDS: tuple[StepKind, ...] = ("generate", "train", "evaluate")
# Iteration 0 only, before its generation: the light CPU Job that checks the dataset and θ0
# (`python -m spin_runtime check`), so bad input fails the run before any GPU Job exists.
CHECK: StepKind = "check"
# spec.controlArm's steps: each runs beside its SPIN counterpart (same stage of the iteration)
CONTROL_KINDS: tuple[StepKind, ...] = ("control-train", "control-evaluate")
ALL_STEP_KINDS: tuple[StepKind, ...] = (CHECK, *STEP_KINDS, *CONTROL_KINDS)

_SHORT: dict[StepKind, str] = {
    "check": "check", "generate": "gen", "train": "train", "evaluate": "eval",
    "control-train": "ctrain", "control-evaluate": "ceval",
}  # fmt: skip # a small table, packed
_FROM_SHORT = {v: k for k, v in _SHORT.items()}
_NAME_RE = re.compile(
    r"^(?P<run>[a-z][-a-z0-9]*)-i(?P<t>\d+)-(?P<stage>check|gen|train|eval|ctrain|ceval)(-r(?P<k>\d+))?$"
)


def step_field(kind: StepKind) -> str:
    """The IterationStatus field of a step (control-train -> control_train)."""
    return kind.replace("-", "_")


GROUP = "selfplay.dev"
RUN_LABEL = f"{GROUP}/run"
ITERATION_LABEL = f"{GROUP}/iteration"
STAGE_LABEL = f"{GROUP}/stage"
ATTEMPT_LABEL = f"{GROUP}/attempt"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
PART_OF_LABEL = "app.kubernetes.io/part-of"
MANAGED_BY = "spin-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The operator's own finalizer, present only on runs with retention.onDelete: Delete.
FINALIZER = f"{GROUP}/artifacts"
# The spec the run goes on with (JSON), kept on the SPINRun like kubectl's last-applied.
APPLIED_SPEC_ANNOTATION = f"{GROUP}/applied-spec"

DNS_LABEL_MAX = 63


def job_name(run: str, iteration: int, stage: StepKind, attempt: int = 0) -> str:
    """`<run>-i<t>-<check|gen|train|eval|ctrain|ceval>`, plus `-r<k>` for retry attempt k >= 1."""
    if iteration < 0 or attempt < 0:
        raise ValueError(f"iteration and attempt must be >= 0, got {iteration}, {attempt}")
    name = f"{run}-i{iteration}-{_SHORT[stage]}"
    return f"{name}-r{attempt}" if attempt else name


def service_name(job: str) -> str:
    """The headless Service of a training Job: same name, so `<job>-0.<job>` is the master."""
    return job


def pod_hostname(job: str, index: int) -> str:
    """The hostname Kubernetes gives pod `index` of an Indexed Job."""
    return f"{job}-{index}"


@dataclass(frozen=True)
class ChildName:
    run: str
    iteration: int
    stage: StepKind
    attempt: int


def parse_job_name(name: str) -> ChildName | None:
    """The step a child name stands for, or None for a name this module did not make."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    return ChildName(m["run"], int(m["t"]), _FROM_SHORT[m["stage"]], int(m["k"] or 0))  # type: ignore[index]


def run_labels(run: str) -> dict[str, str]:
    """Labels every child of `run` carries (the Job watch filters on managed-by)."""
    return {
        RUN_LABEL: run,
        MANAGED_BY_LABEL: MANAGED_BY,
        PART_OF_LABEL: MANAGED_BY,
    }


def step_labels(run: str, iteration: int, stage: StepKind, attempt: int) -> dict[str, str]:
    """Labels of one step attempt's Job, pods and Service (the Service selects on them)."""
    return {
        **run_labels(run),
        ITERATION_LABEL: str(iteration),
        STAGE_LABEL: stage,
        ATTEMPT_LABEL: str(attempt),
    }
