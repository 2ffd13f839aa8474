"""Admin-owned pod templates: platform settings (pull secrets, tolerations, queue, affinity, a
model-cache PVC, NCCL env, ...) written once in the chart's values instead of in every SPINRun.

The chart renders `podTemplates` into a ConfigMap mounted into the operator and points
`SPIN_POD_TEMPLATES` at it. A SPINRun picks one with `spec.pod.template` (or gets the one marked
`default: true`). What the template sets wins unless the template lists the field in
`allowOverride`; a SPINRun that sets a field it may not override is refused, naming the field,
rather than silently dropping the user's value.

    podTemplates:
      gpu-a100:
        default: true
        allowOverride: [pod.env, pod.labels, pod.annotations, scheduling.tolerations]
        pod:
          imagePullSecrets: [{name: registry}]
          modelCache: {claimName: hf-cache}
          env: [{name: NCCL_IB_DISABLE, value: "1"}]
        scheduling:
          queueName: gpu-queue
          tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]

Merging an allowed override: lists are the template's then the SPINRun's (env vars, volumes and
mounts with the same name are replaced by the SPINRun's), maps are merged (the SPINRun's keys
win), anything else is the SPINRun's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from spin_operator.api import types as api

POD_FIELDS = (
    "env",
    "imagePullSecrets",
    "volumes",
    "volumeMounts",
    "modelCache",
    "affinity",
    "labels",
    "annotations",
)
SCHEDULING_FIELDS = (
    "queueName",
    "priorityClassName",
    "nodeSelector",
    "tolerations",
    "serviceAccountName",
)
OVERRIDABLE = tuple(f"pod.{f}" for f in POD_FIELDS) + tuple(
    f"scheduling.{f}" for f in SCHEDULING_FIELDS
)
_KEYED = {"env": "name", "volumes": "name", "volumeMounts": "name", "imagePullSecrets": "name"}


class TemplateError(ValueError):
    """The operator's template file is unusable (the operator refuses to start)."""


@dataclass(frozen=True)
class PodTemplate:
    name: str
    pod: dict[str, Any]  # wire form, only the fields the template sets
    scheduling: dict[str, Any]
    allow_override: frozenset[str]
    default: bool = False


def parse_templates(doc: Any) -> dict[str, PodTemplate]:
    """Templates from the chart's `podTemplates` mapping; TemplateError naming the bad entry."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise TemplateError("podTemplates: expected a mapping of template name -> template")
    out: dict[str, PodTemplate] = {}
    for name, body in doc.items():
        where = f"podTemplates.{name}"
        if not isinstance(body, dict):
            raise TemplateError(f"{where}: expected a mapping")
        unknown = set(body) - {"default", "allowOverride", "pod", "scheduling"}
        if unknown:
            raise TemplateError(f"{where}: unknown field(s) {sorted(unknown)}")
        allow = body.get("allowOverride") or []
        bad = [a for a in allow if a not in OVERRIDABLE]
        if bad:
            raise TemplateError(f"{where}.allowOverride: {bad} not among {list(OVERRIDABLE)}")
        pod, scheduling = body.get("pod") or {}, body.get("scheduling") or {}
        try:  # the same models a SPINRun's fields go through
            api.PodSpec.model_validate(pod)
            api.SchedulingSpec.model_validate(scheduling)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise TemplateError(
                f"{where}: {'.'.join(map(str, first['loc']))}: {first['msg']}"
            ) from None
        if "template" in pod:
            raise TemplateError(f"{where}.pod.template: a template cannot name another")
        out[str(name)] = PodTemplate(
            str(name), dict(pod), dict(scheduling), frozenset(allow), bool(body.get("default"))
        )
    defaults = [t.name for t in out.values() if t.default]
    if len(defaults) > 1:
        raise TemplateError(f"podTemplates: more than one default ({', '.join(defaults)})")
    return out


def load_templates(path: str | Path) -> dict[str, PodTemplate]:
    from spin_operator.yamlio import YamlSyntaxError, load

    try:
        return parse_templates(load(Path(path).read_text()))
    except (OSError, YamlSyntaxError) as exc:
        raise TemplateError(f"{path}: {exc}") from None


def _set(value: Any) -> bool:
    return value not in (None, [], {}, "")


def _merge(field: str, base: Any, mine: Any) -> Any:
    if isinstance(base, list) and isinstance(mine, list):
        key = _KEYED.get(field)
        mine_keys = {m.get(key) for m in mine if key and isinstance(m, dict)}
        return [
            b for b in base if not (key and isinstance(b, dict) and b.get(key) in mine_keys)
        ] + mine
    if (
        isinstance(base, dict)
        and isinstance(mine, dict)
        and field in ("labels", "annotations", "nodeSelector")
    ):
        return {**base, **mine}
    return mine


def apply_template(
    spec: api.SPINRunSpec, templates: dict[str, PodTemplate] | None
) -> api.SPINRunSpec:
    """`spec` with its pod template merged in; InvalidSpec for an unknown template or a field the
    template does not let the SPINRun override. `templates` None: not known here (local mode,
    `spinctl plan`): the spec is returned as written."""
    from spin_operator.validation import InvalidSpec, Problem

    if templates is None:
        return spec
    name = spec.pod.template or next((t.name for t in templates.values() if t.default), None)
    if name is None:
        return spec
    template = templates.get(name)
    if template is None:
        known = ", ".join(sorted(templates)) or "none"
        raise InvalidSpec(
            [Problem("spec.pod.template", f"no pod template {name!r} (the operator has: {known})")]
        )
    wire = spec.to_wire()
    problems = []
    for section, fields, given in (
        ("pod", POD_FIELDS, template.pod),
        ("scheduling", SCHEDULING_FIELDS, template.scheduling),
    ):
        mine = wire.setdefault(section, {})
        for field in fields:
            if field not in given or not _set(given[field]):
                continue
            if _set(mine.get(field)):
                if f"{section}.{field}" not in template.allow_override:
                    problems.append(
                        Problem(
                            f"spec.{section}.{field}",
                            f"set by pod template {name!r}, which does not allow overriding it "
                            f"(allowOverride: {sorted(template.allow_override) or 'nothing'})",
                        )
                    )
                    continue
                mine[field] = _merge(field, given[field], mine[field])
            else:
                mine[field] = given[field]
    if problems:
        raise InvalidSpec(problems)
    wire["pod"]["template"] = name  # the resolved spec says which template it got
    return api.SPINRunSpec.model_validate(wire)
