"""Pure helpers for SPINRun status: conditions, ranking iterations and the stopping rule.

Conditions follow metav1.Condition: `lastTransitionTime` moves only when `status` flips, so
`kubectl wait --for=condition=Complete` (or `Ready`) and alerting see real transitions, not every reconcile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from spin_operator.api import types as api

READY = "Ready"
COMPLETE = "Complete"
PROGRESSING = "Progressing"
SUSPENDED = "Suspended"
FAILED = "Failed"
SPEC_CHANGE_REFUSED = "SpecChangeRefused"
# True when the ranking metric has the same value for every evaluated model, so `best` and the
# stopping rule cannot tell them apart (exact match on chat data is ~0 everywhere).
METRIC_UNINFORMATIVE = "MetricUninformative"
# spec.controlArm: True when SPIN's model beat the equal-compute SFT control in the latest
# compared iteration, False (reason ControlAhead) when the control did at least as well.
CONTROL_ARM = "ControlArm"
# True while a step's pods cannot start (reason: the cause, e.g. Unschedulable, ImagePullBackOff,
# CreateContainerConfigError, FailedCreate); False (PodsStarted) once they all run again.
PODS_BLOCKED = "PodsBlocked"
AUTO_METRIC = "auto"
SCORE = "score"


def get_condition(conditions: Sequence[api.Condition], type_: str) -> api.Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def set_condition(
    conditions: list[api.Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> bool:
    """Set one condition in place; True when its status flipped (a transition)."""
    value: Literal["True", "False"] = "True" if status else "False"
    current = get_condition(conditions, type_)
    if current is None:
        conditions.append(
            api.Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now,
                observed_generation=generation,
            )
        )
        return True
    flipped = current.status != value
    current.status = value
    current.reason = reason
    current.message = message
    current.observed_generation = generation
    if flipped:
        current.last_transition_time = now
    return flipped


def resolve_metric(metric: str, metrics: Sequence[Mapping[str, float]]) -> str:
    """The metric that ranks: `metric`, or for `auto` the built-in evaluation's data-chosen
    `score` (exact_match when no result carries one: a custom command or an older runtime)."""
    if metric != AUTO_METRIC:
        return metric
    return SCORE if any(SCORE in m for m in metrics) else "exact_match"


def ranking_metric(iterations: Sequence[api.IterationStatus], spec: api.SPINRunSpec) -> str:
    return resolve_metric(spec.evaluation.metric, [it.metrics for it in iterations])


def uninformative(iterations: Sequence[api.IterationStatus], metric: str) -> str | None:
    """Why `metric` cannot rank the evaluated models (θ0's baseline included), or None.

    Two or more models scored and all equal: `best` then stays on the first and the stopping
    rule sees no improvement, which looked like a result while it was the metric's blindness."""
    values: list[tuple[str, float]] = []
    for it in iterations:
        base = it.metrics.get(f"baseline/{metric}")
        if it.iteration == 0 and isinstance(base, int | float):
            values.append(("θ0", float(base)))
        value = score(it, metric)
        if it.stage == "Done" and value is not None:
            values.append((f"θ{it.iteration + 1}", value))
    if len(values) < 2 or max(v for _, v in values) - min(v for _, v in values) > 1e-12:
        return None
    return (
        f"{metric} is {values[0][1]:g} for every evaluated model ({', '.join(n for n, _ in values)}): "
        "it cannot rank them, so the best iteration and early stopping stay on the first; "
        "set evaluation.metric to auto or real_logp_per_token for free-text data"
    )


def score(iteration: api.IterationStatus, metric: str) -> float | None:
    value = iteration.metrics.get(metric)
    return float(value) if isinstance(value, int | float) else None


def best_iteration(iterations: Sequence[api.IterationStatus], metric: str, mode: str) -> int | None:
    """The finished iteration with the best `metric` (earliest on ties), as MLflow's `best`
    alias picks it; None when no finished iteration has the metric."""
    best: tuple[float, int] | None = None
    sign = 1.0 if mode == "max" else -1.0
    for it in iterations:
        value = score(it, metric)
        if it.stage != "Done" or value is None:
            continue
        if best is None or sign * value > sign * best[0]:
            best = (value, it.iteration)
    return None if best is None else best[1]


def last_improvement(
    iterations: Sequence[api.IterationStatus], metric: str, mode: str, min_delta: float
) -> int | None:
    """The last finished iteration that beat the best earlier score by more than `min_delta`
    (the first scored iteration counts as an improvement). Keras' EarlyStopping rule."""
    reference: float | None = None
    improved: int | None = None
    for it in iterations:
        value = score(it, metric)
        if it.stage != "Done" or value is None:
            continue
        better = reference is None or (
            value - min_delta > reference if mode == "max" else value + min_delta < reference
        )
        if better:
            reference, improved = value, it.iteration
    return improved


def should_stop(
    iterations: Sequence[api.IterationStatus], spec: api.SPINRunSpec
) -> tuple[bool, str]:
    """(stop?, why) after the last finished iteration, per spec.stopping."""
    patience = spec.stopping.patience
    done = [it for it in iterations if it.stage == "Done"]
    if patience is None or not spec.evaluation.enabled or not done:
        return False, ""
    metric, mode = ranking_metric(iterations, spec), spec.evaluation.mode
    last = done[-1].iteration
    improved = last_improvement(done, metric, mode, spec.stopping.min_delta)
    since = last + 1 if improved is None else last - improved
    if since >= patience:
        return True, (
            f"{metric} has not improved by more than {spec.stopping.min_delta} for {since} "
            f"iteration(s) (patience {patience})"
        )
    return False, ""


def control_comparison(
    iteration: api.IterationStatus, metric: str, mode: str
) -> tuple[float, float, float] | None:
    """(SPIN's score, the control's, SPIN's advantage) of one iteration by `metric`; the
    advantage is positive when SPIN's model is better (mode min flips the sign). None when
    either arm has no value for the metric."""
    spin = score(iteration, metric)
    value = (iteration.control.metrics if iteration.control else {}).get(metric)
    if spin is None or not isinstance(value, int | float):
        return None
    control = float(value)
    return spin, control, (spin - control) if mode == "max" else (control - spin)


def control_verdict(
    iteration: api.IterationStatus, metric: str, mode: str
) -> tuple[bool, str, str]:
    """Fill `iteration.control`'s comparison and say (SPIN ahead?, reason, message) for the
    ControlArm condition: SPINAhead, ControlAhead (also when level) or NotCompared."""
    t, control = iteration.iteration, iteration.control or api.ControlArmStatus()
    iteration.control = control
    control.metric = metric
    compared = control_comparison(iteration, metric, mode)
    if compared is None:
        return (
            False,
            "NotCompared",
            f"iteration {t}: {metric} missing from SPIN's or the control's evaluation results",
        )
    spin, other, advantage = compared
    control.spin_score, control.control_score, control.spin_advantage = spin, other, advantage
    versus = f"θ{t + 1} {metric}={spin:g} vs SFT control {other:g}"
    if advantage > 0:
        return True, "SPINAhead", f"iteration {t}: SPIN ahead by {advantage:g} ({versus})"
    lead = f"ahead by {-advantage:g}" if advantage < 0 else "level"
    return (
        False,
        "ControlAhead",
        (
            f"iteration {t}: the SFT control is {lead} ({versus}): SPIN has not paid off over plain "
            "SFT for the same steps; the model may be under-trained (continue SFT first) — the best "
            "alias stays on SPIN's models"
        ),
    )


def _count(value: object) -> int:
    """A count from a report read back from storage (anything else counts as 0)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def dataset_status(report: Mapping[str, object]) -> api.DatasetStatus:
    """status.dataset from a dataset profile (`spin_common.data.Loaded.report`: the preflight's,
    or the check Job's report read back from storage)."""
    by_reason = report.get("skippedByReason")
    counts = {
        str(reason): _count(v.get("count") if isinstance(v, Mapping) else None)
        for reason, v in (by_reason.items() if isinstance(by_reason, Mapping) else ())
    }
    return api.DatasetStatus(
        rows=_count(report.get("rows")),
        usable=_count(report.get("usable")),
        skipped=_count(report.get("skipped")),
        skipped_by_reason=counts,
    )
