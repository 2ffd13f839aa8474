"""The API server's view of a SPINRun: CRD defaulting, structural schema, unknown fields, CEL.

Tests use it to check custom resources against the CRD's own schema (not against the pydantic
models), and the emulated API server uses it to refuse what a real one would refuse at apply.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import celpy
import jsonschema

from spin_operator.api.crd import crd


@functools.cache
def root_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural defaulting as the API server does it: absent fields get their default, recursively."""
    if not isinstance(obj, dict) or schema.get("type") != "object":
        if isinstance(obj, list) and "items" in schema:
            return [apply_defaults(schema["items"], v) for v in obj]
        return obj
    out = dict(obj)
    for name, prop in schema.get("properties", {}).items():
        if name not in out and "default" in prop:
            out[name] = copy.deepcopy(prop["default"])
        if name in out:
            out[name] = apply_defaults(prop, out[name])
    return out


def _unknown_fields(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    if isinstance(obj, list) and "items" in schema:
        return [
            e
            for i, v in enumerate(obj)
            for e in _unknown_fields(schema["items"], v, f"{path}[{i}]")
        ]
    if not isinstance(obj, dict) or "properties" not in schema or path == ".metadata":
        return []
    errors = []
    for key, value in obj.items():
        prop = schema["properties"].get(key)
        if prop is None:
            errors.append(f'unknown field "{path}.{key}"'.replace('"."', '"'))
        else:
            errors += _unknown_fields(prop, value, f"{path}.{key}" if path else key)
    return errors


def _cel_errors(schema: dict[str, Any], obj: Any, path: str) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        env = celpy.Environment()
        program = env.program(env.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(obj)})):
            errors.append(
                f"{path or '<root>'}{rule.get('fieldPath', '')}: Invalid value: {rule['message']}"
            )
    if isinstance(obj, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in obj:
                errors += _cel_errors(prop, obj[name], f"{path}.{name}" if path else name)
    return errors


def admission_errors(obj: dict[str, Any]) -> list[str]:
    """What a real API server answers to `kubectl apply` of this object (empty when accepted)."""
    schema = root_schema()
    errors = _unknown_fields(schema, obj, "")
    defaulted = apply_defaults(schema, obj)
    for err in jsonschema.Draft4Validator(schema).iter_errors(defaulted):
        path = ".".join(str(p) for p in err.absolute_path)
        missing = re.fullmatch(r"'(.+)' is a required property", err.message)
        if err.validator == "required" and missing:  # as Kubernetes: the missing field's own path
            errors.append(f"{path + '.' if path else ''}{missing.group(1)}: Required value")
        else:
            errors.append(f"{path}: Invalid value: {err.message}")
    if not errors:  # the API server evaluates CEL only on schema-valid objects
        errors += _cel_errors(schema, defaulted, "")
    return errors
