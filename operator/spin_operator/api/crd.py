"""Generate the SPINRun CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema (2020-12) with `$ref`s and `anyOf`-null optionals; Kubernetes wants a
*structural* OpenAPI v3 schema: everything inlined, every node typed, no `additionalProperties:
false`, boolean `exclusiveMinimum`. This module converts one into the other and adds what only a
CRD has: defaults for nested objects (so the API server fills a whole section), CEL rules that
mirror the models' cross-field validators, printer columns and the status subresource.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from spin_operator.api import types as api

# Kept keywords, in the order they are written (type and description first for readable diffs).
_ORDER = [
    "type",
    "description",
    "format",
    "default",
    "enum",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "nullable",
    "required",
    "items",
    "additionalProperties",
    "properties",
    "x-kubernetes-preserve-unknown-fields",
]
_KEEP = set(_ORDER)

# CEL rules attached to schema nodes; each mirrors a pydantic validator of the API models
# (api/types.py and its section modules) so the API server refuses at apply time what
# `spinctl validate` refuses locally.
_PROCS = "(has(self.processesPerNode) ? self.processesPerNode : (self.gpusPerNode > 0 ? self.gpusPerNode : 1))"
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "": [
        {
            "rule": f"self.metadata.name.size() <= {api.MAX_NAME_LENGTH}",
            "message": (
                f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters: child Job, "
                "Service and pod names extend it and must stay within 63"
            ),
        },
        {
            "rule": f"self.metadata.name.matches('{api.NAME_PATTERN}')",
            "message": "metadata.name must be a DNS-1035 label (lowercase letters, digits, '-'; starts with a letter)",
        },
    ],
    "spec": [
        {
            "rule": "!has(self.training.betaPerIteration) || size(self.training.betaPerIteration) <= self.iterations",
            "message": "training.betaPerIteration has more values than iterations",
            "fieldPath": ".training.betaPerIteration",
        },
        {
            "rule": "!has(self.training.learningRatePerIteration) || size(self.training.learningRatePerIteration) <= self.iterations",
            "message": "training.learningRatePerIteration has more values than iterations",
            "fieldPath": ".training.learningRatePerIteration",
        },
        {
            "rule": "!has(self.stopping.patience) || self.evaluation.enabled",
            "message": "stopping.patience needs evaluation.enabled: the rule ranks evaluation results",
            "fieldPath": ".stopping.patience",
        },
        {
            "rule": "!self.evaluation.enabled || has(self.evaluation.command) || self.dataset.evalSamples > 0",
            "message": "dataset.evalSamples is 0 but the built-in evaluation needs held-out prompts",
            "fieldPath": ".dataset.evalSamples",
        },
    ],
    # has() guards: a real API server also checks these rules against the section's `default: {}`
    # when the CRD is created (nested defaults not applied there) and refused the CRD with "no
    # such key". Stored objects always have the keys (the API server fills nested defaults first).
    "spec.training": [
        {
            "rule": "!has(self.maxPromptLength) || !has(self.maxLength) || self.maxPromptLength < self.maxLength",
            "message": "maxPromptLength must be less than maxLength",
            "fieldPath": ".maxPromptLength",
        },
        {
            "rule": (
                "!has(self.globalBatchSize) || !has(self.microBatchSize) || !has(self.nodes) || "
                f"self.globalBatchSize % (self.microBatchSize * self.nodes * {_PROCS}) == 0"
            ),
            "message": "globalBatchSize must be a multiple of microBatchSize × nodes × processes per node",
            "fieldPath": ".globalBatchSize",
        },
    ],
    "spec.training.peft": [
        {
            "rule": "!self.targetModules.exists(m, m == 'all-linear') || size(self.targetModules) == 1",
            "message": "targetModules: all-linear cannot be combined with module names",
            "fieldPath": ".targetModules",
        },
    ],
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Run phase"},
    {
        "name": "Iteration",
        "type": "integer",
        "jsonPath": ".status.iteration",
        "description": "Current iteration t (0-based): θt -> θt+1",
    },
    {
        "name": "Stage",
        "type": "string",
        "jsonPath": ".status.stage",
        "description": "Stage of the current iteration",
    },
    {
        "name": "Done",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "Iterations done / total",
    },
    {
        "name": "Best",
        "type": "string",
        "jsonPath": ".status.bestModel",
        "description": "Best model so far (θt+1 of iteration t)",
    },
    {
        "name": "Model",
        "type": "string",
        "jsonPath": ".spec.model.uri",
        "priority": 1,
        "description": "Base model",
    },
    {
        "name": "Message",
        "type": "string",
        "jsonPath": ".status.message",
        "priority": 1,
        "description": "Status message",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return _inline({**target, **extra}, defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one inlined JSON-Schema node as a structural OpenAPI v3 node."""
    node = dict(node)
    variants = node.pop("anyOf", None)
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express union {variants} in a structural schema")
        merged = {
            **non_null[0],
            **{k: v for k, v in node.items() if k != "default" or v is not None},
        }
        node = merged
        if node.get("default", 0) is None:
            node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[flag] = node.pop(bound)
            node[bound] = True
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEEP}
    if "properties" in out:
        out["properties"] = {k: _structural(v) for k, v in out["properties"].items()}
        out.setdefault("type", "object")
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(out["additionalProperties"])
    else:
        out.pop("additionalProperties", None)
    if "items" in out:
        out["items"] = _structural(out["items"])
    if out.get("default") is None:
        out.pop("default", None)
    return {k: out[k] for k in sorted(out, key=_ORDER.index)}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `X | None` or `Annotated[X, ...]`, if any."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _model_of(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        found = [m for a in typing.get_args(annotation) if (m := _model_of(a))]
        return found[0] if found else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _factory_defaults(model: type[BaseModel], schema: dict[str, Any]) -> None:
    """Give object/list/map fields built by a default_factory an empty default.

    The API server then creates the section and fills in its own defaults, so a stored SPINRun
    shows every effective value.
    """
    for name, field in model.model_fields.items():
        prop = schema.get("properties", {}).get(field.alias or name)
        if prop is None:
            continue
        if field.default_factory is not None:
            prop["default"] = {"array": []}.get(prop.get("type", ""), {})
        nested = _model_of(field.annotation)
        if nested is not None:
            _factory_defaults(nested, prop)


def _strip_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one API model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _structural(_inline(raw, defs))
    _factory_defaults(model, schema)
    return schema


def _attach_cel(root: dict[str, Any]) -> None:
    for path, rules in CEL_RULES.items():
        node = root
        for part in filter(None, path.split(".")):
            node = node["properties"][part]
        node["x-kubernetes-validations"] = rules


def openapi_schema() -> dict[str, Any]:
    """The whole SPINRun object schema, as it goes into the CRD."""
    spec = model_schema(api.SPINRunSpec)
    status = _strip_defaults(model_schema(api.SPINRunStatus))
    root: dict[str, Any] = {
        "type": "object",
        "description": "SPINRun runs Self-Play Fine-Tuning (SPIN) iterations: generate, train, evaluate.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "selfplay.dev/v1alpha1"},
            "kind": {"type": "string", "description": "SPINRun"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    _attach_cel(root)
    return root


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "spin-operator",
                "app.kubernetes.io/part-of": "spin-operator",
            },
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["all", "ml"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as committed under crds/ (stable key order, so diffs show real changes)."""
    header = "# Generated by `spinctl crd` from operator/spin_operator/api/types.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)
