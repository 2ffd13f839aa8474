"""Pure API-server semantics used by the emulator: selectors, the three patch types, name rules.

Kept apart from the server so each rule can be tested on plain dicts and so the emulator reads
as the order of operations a real API server applies (decode, patch, admit, store, notify).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """A request the API server refuses, rendered as a `Status` body with `code` and `reason`."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        """The `Status` object a real API server answers with."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def invalid_patch(message: str) -> ApiError:
    return ApiError(422, "Invalid", message)


# --------------------------------------------------------------------------- label selectors

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SET_REQ = re.compile(r"^\s*(\S+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_CMP_REQ = re.compile(r"^\s*([^\s!=<>]+)\s*(==|=|!=|<|>)\s*(\S*)\s*$")
_EXISTS_REQ = re.compile(r"^\s*(!?)\s*([^\s!=<>()]+)\s*$")

Requirement = Callable[[dict[str, str]], bool]


def _split_top_level(selector: str) -> list[str]:
    """Split at commas outside parentheses: `a in (x,y),b` has two requirements."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(selector):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(selector[start:i])
            start = i + 1
    parts.append(selector[start:])
    return [p for p in parts if p.strip()]


def _requirement(text: str) -> Requirement:
    if m := _SET_REQ.match(text):
        key, op, values = (
            m.group(1),
            m.group(2),
            {v.strip() for v in m.group(3).split(",") if v.strip()},
        )
        _check_label_key(key)
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if m := _CMP_REQ.match(text):
        key, op, value = m.group(1), m.group(2), m.group(3)
        _check_label_key(key)
        if op in ("=", "=="):
            return lambda labels: labels.get(key) == value
        if op == "!=":
            return lambda labels: labels.get(key) != value
        try:
            bound = int(value)
        except ValueError:
            raise bad_request(
                f"unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer: {text!r}"
            ) from None
        if op == ">":
            return lambda labels: (
                _int_or_none(labels.get(key)) is not None and _int_or_none(labels.get(key)) > bound
            )  # type: ignore[operator]
        return lambda labels: (
            _int_or_none(labels.get(key)) is not None and _int_or_none(labels.get(key)) < bound
        )  # type: ignore[operator]
    if m := _EXISTS_REQ.match(text):
        negated, key = m.group(1) == "!", m.group(2)
        _check_label_key(key)
        return (lambda labels: key not in labels) if negated else (lambda labels: key in labels)
    raise bad_request(f"unable to parse requirement: {text!r}")


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _check_label_key(key: str) -> None:
    if not _LABEL_KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise bad_request(f"unable to parse requirement: invalid label key {key!r}")


def parse_label_selector(selector: str | None) -> Callable[[dict[str, Any]], bool]:
    """`labelSelector` query -> predicate on an object; raises ApiError (400) when malformed."""
    reqs = [_requirement(part) for part in _split_top_level(selector or "")]
    return lambda obj: all(req((obj.get("metadata") or {}).get("labels") or {}) for req in reqs)


# --------------------------------------------------------------------------- field selectors

# metadata.name/namespace work everywhere; a few resources index more fields (as the real server).
FIELD_LABELS: dict[str, set[str]] = {
    "events": {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    },
    "pods": {
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    },
    "jobs": {"status.successful"},
    "secrets": {"type"},
    "namespaces": {"status.phase"},
}


def _field_value(obj: dict[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if path == "source" and isinstance(node, dict):  # events: `source` selects source.component
        node = node.get("component")
    return "" if node is None else str(node)


def parse_field_selector(selector: str | None, plural: str) -> Callable[[dict[str, Any]], bool]:
    """`fieldSelector` query -> predicate; unsupported fields are a 400 as on a real server."""
    reqs: list[tuple[str, bool, str]] = []
    for part in _split_top_level(selector or ""):
        m = re.match(r"^\s*([^\s!=]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise bad_request(f"invalid selector: {part!r}; can't understand {part!r}")
        field, op, value = m.groups()
        if field not in {"metadata.name", "metadata.namespace"} | FIELD_LABELS.get(plural, set()):
            raise bad_request(f"field label not supported: {field}")
        reqs.append((field, op != "!=", value))
    return lambda obj: all((_field_value(obj, f) == v) == eq for f, eq, v in reqs)


# --------------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, null deletes, everything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists a strategic-merge patch merges by key in built-in types (patchMergeKey in the Go types).
_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
}
_MERGED_PRIMITIVE_LISTS = {"finalizers"}


def _merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports":  # container ports merge by containerPort, service ports by port
        return (
            "containerPort"
            if any(isinstance(i, dict) and "containerPort" in i for i in items)
            else "port"
        )
    return _MERGE_KEYS.get(field)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch for built-in types: keyed lists merge, `$patch` directives apply."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in _MERGED_PRIMITIVE_LISTS:
            current = list(result.get(key) or [])
            result[key] = current + [v for v in value if v not in current]
        elif isinstance(value, list) and (
            merge_key := _merge_key(key, value + list(result.get(key) or []))
        ):
            result[key] = _merge_keyed_list(list(result.get(key) or []), value, merge_key)
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    if retain is not None:
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_keyed_list(current: list[Any], patch: list[Any], key: str) -> list[Any]:
    out = list(current)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise bad_request(f"map: {item!r} does not contain declared merge key: {key}")
        index = next(
            (i for i, v in enumerate(out) if isinstance(v, dict) and v.get(key) == item[key]), None
        )
        if item.get("$patch") == "delete":
            if index is not None:
                out.pop(index)
        elif index is None:
            out.append({k: v for k, v in item.items() if k != "$patch"})
        else:
            out[index] = strategic_merge_patch(out[index], item)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise invalid_patch(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise invalid_patch(f"jsonpatch: path /{'/'.join(parts)} not found")
    return doc


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 (add/remove/replace/move/copy/test); a failed `test` is a 422 as kopf expects."""
    if not isinstance(ops, list):
        raise bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        kind, parts = op.get("op"), _pointer(op.get("path", ""))
        if kind == "test":
            if _walk(doc, parts) != op.get("value"):
                raise invalid_patch(
                    f"the server rejected our request due to an error in our request: "
                    f"testing value /{'/'.join(parts)} failed"
                )
            continue
        if kind in ("move", "copy"):
            source = _pointer(op.get("from", ""))
            value = copy.deepcopy(_walk(doc, source))
            if kind == "move":
                doc = _remove(doc, source)
            doc = _add(doc, parts, value)
        elif kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            doc = _remove(doc, parts)
        elif kind == "replace":
            doc = _add(_remove(doc, parts), parts, copy.deepcopy(op.get("value")), replace=True)
        else:
            raise bad_request(f"unexpected json patch op {kind!r}")
    return doc


def _add(doc: Any, parts: list[str], value: Any, replace: bool = False) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    leaf = parts[-1]
    if isinstance(parent, dict):
        parent[leaf] = value
    elif isinstance(parent, list):
        index = len(parent) if leaf == "-" else int(leaf) if leaf.isdigit() else -1
        if not 0 <= index <= len(parent):
            raise invalid_patch(f"jsonpatch: index {leaf} out of range")
        parent.insert(index, value)
    else:
        raise invalid_patch(f"jsonpatch: cannot add to /{'/'.join(parts)}")
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    _walk(doc, parts)  # must exist
    if not parts:
        return None
    parent = _walk(doc, parts[:-1])
    if isinstance(parent, dict):
        del parent[parts[-1]]
    else:
        parent.pop(int(parts[-1]))
    return doc


# --------------------------------------------------------------------------- names and labels

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class NameRule:
    """How a resource's names are validated (Jobs feed their name into a 63-char label value)."""

    pattern: re.Pattern[str]
    max_length: int
    description: str


SUBDOMAIN = NameRule(
    _DNS1123_SUBDOMAIN,
    253,
    "a lowercase RFC 1123 subdomain must consist of lower case "
    "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
)
LABEL_1123 = NameRule(
    _DNS1123_LABEL,
    63,
    "a lowercase RFC 1123 label must consist of lower case alphanumeric "
    "characters or '-', and must start and end with an alphanumeric character",
)
LABEL_1035 = NameRule(
    _DNS1035_LABEL,
    63,
    "a DNS-1035 label must consist of lower case alphanumeric characters "
    "or '-', start with an alphabetic character, and end with an alphanumeric character",
)
NAME_RULES: dict[str, NameRule] = {
    "services": LABEL_1035,
    "namespaces": LABEL_1123,
    "jobs": LABEL_1123,
}


def metadata_errors(plural: str, metadata: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, message) pairs for names, labels and annotations a real API server refuses."""
    errors: list[tuple[str, str]] = []
    name = metadata.get("name") or ""
    rule = NAME_RULES.get(plural, SUBDOMAIN)
    if plural == "jobs" and len(name) > 63:
        errors.append(
            ("metadata.name", f"Invalid value: {name!r}: must be no more than 63 characters")
        )
    elif len(name) > rule.max_length:
        errors.append(
            (
                "metadata.name",
                f"Invalid value: {name!r}: must be no more than {rule.max_length} characters",
            )
        )
    if name and not rule.pattern.match(name):
        errors.append(("metadata.name", f"Invalid value: {name!r}: {rule.description}"))
    for key, value in (metadata.get("labels") or {}).items():
        if not _LABEL_KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
            errors.append(
                (
                    "metadata.labels",
                    f"Invalid value: {key!r}: name part must consist of alphanumeric "
                    "characters, '-', '_' or '.' (at most 63)",
                )
            )
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            errors.append(
                (
                    "metadata.labels",
                    f"Invalid value: {value!r}: a valid label must be an empty string "
                    "or consist of alphanumeric characters, '-', '_' or '.' (at most 63)",
                )
            )
    size = sum(len(k) + len(str(v)) for k, v in (metadata.get("annotations") or {}).items())
    if size > 256 * 1024:
        errors.append(
            ("metadata.annotations", f"Too long: must have at most 262144 bytes, got {size}")
        )
    return errors
