"""Threat 6 of docs/security.md: `$(VAR)` in what an author writes never reaches a kubelet
expansion. The expansion below follows Kubernetes' own rules (third_party/forked/golang/expansion:
`$$` -> `$`, `$(NAME)` -> the value of NAME when defined, anything else kept), so the test fails if
rendering passes a user's `$(` on unescaped."""

from __future__ import annotations

from typing import Any

import pytest

from spin_operator.api import types as api
from spin_operator.render import literal, render
from spin_operator.settings import Settings, resolve_spec
from spin_operator.steps import RunRef, plan_step

RUN = RunRef("team", "paper", "3f1c-uid")
SETTINGS = Settings(runtime_image="runtime:1", storage_uri="s3://bkt/runs")
SECRET = "wJalrXUtnFEMI/K7MDENG"  # what the kubelet would put in for $(AWS_SECRET_ACCESS_KEY)
POD_ENV = {"AWS_SECRET_ACCESS_KEY": SECRET, "JOB_COMPLETION_INDEX": "3"}


def kubelet_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of a container's command/args/env value."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2 : end]
                    out.append(env[name] if name in env else value[i : end + 1])
                    i = end + 1
                    continue
        out.append(value[i])
        i += 1
    return "".join(out)


def test_kubelet_expansion_model() -> None:
    """The model above does expand, so the tests below can fail."""
    assert kubelet_expand("s3://b/$(AWS_SECRET_ACCESS_KEY)", POD_ENV) == f"s3://b/{SECRET}"
    assert kubelet_expand("$$(AWS_SECRET_ACCESS_KEY)", POD_ENV) == "$(AWS_SECRET_ACCESS_KEY)"
    assert kubelet_expand("$(UNSET) $x $", POD_ENV) == "$(UNSET) $x $"


@pytest.mark.parametrize(
    "text", ["$(AWS_SECRET_ACCESS_KEY)", "$$(AWS_SECRET_ACCESS_KEY)", "a$b$$c$", "$", "$$$("]
)
def test_literal_survives_expansion(text: str) -> None:
    assert kubelet_expand(literal(text), POD_ENV) == text


HOSTILE = "$(AWS_SECRET_ACCESS_KEY)"
SPEC: dict[str, Any] = {
    "model": {"uri": f"s3://models/sft-{HOSTILE}"},
    "dataset": {"uri": f"s3://data/{HOSTILE}/sft.jsonl"},
    "storage": {"uri": "s3://bkt/runs"},
    "evaluation": {
        "command": ["python", "eval.py", f"--token={HOSTILE}", "$$(AWS_SECRET_ACCESS_KEY)"],
        "image": "eval:1",
    },
}


@pytest.mark.parametrize("stage", ["generate", "train", "evaluate"])
def test_user_values_reach_the_runtime_literally(stage: str) -> None:
    spec = resolve_spec(api.SPINRunSpec.model_validate(SPEC), SETTINGS)
    plan = plan_step(spec, SETTINGS, RUN, 0, stage, 0)  # type: ignore[arg-type]
    job = render(plan, spec, RUN)[-1]
    container = job["spec"]["template"]["spec"]["containers"][0]
    argv = [kubelet_expand(a, POD_ENV) for a in container["command"]]
    env = {e["name"]: kubelet_expand(e["value"], POD_ENV) for e in container["env"] if "value" in e}
    seen = " ".join(argv + list(env.values()))
    assert SECRET not in seen
    # what the process gets is exactly what the plan says (local mode runs the plan unexpanded);
    # the node rank comes through the downward API, never a $(...) reference
    assert argv == list(plan.argv)
    assert env == {k: v for k, v in plan.env.items()}
    assert HOSTILE in seen  # the user's text arrived, unexpanded
