"""Check SPINRun objects against the models and the CRD schema, reporting every problem by path.

Used by `spinctl validate`, by local mode before any work starts, and by the operator, which
marks an invalid SPINRun Failed with these messages instead of acting on it.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from pydantic import BaseModel, ValidationError

from spin_operator.api import crd
from spin_operator.api import types as api
from spin_operator.yamlio import YamlSyntaxError, load_file


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a SPINRun, at a dotted field path such as `spec.training.beta`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidSpec(ValueError):
    """A SPINRun that cannot be run; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


@functools.cache
def _schema_validator() -> jsonschema.protocols.Validator:
    # The CRD schema is OpenAPI v3.0: boolean exclusiveMinimum, i.e. JSON Schema draft 4.
    return jsonschema.Draft4Validator(crd.openapi_schema())


def _dotted(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Wire names allowed at `loc` (relative to `model`), for did-you-mean hints."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        nested = crd._model_of(field.annotation) if field else None
        if nested is None:
            return []
        model = nested
    return [f.alias or n for n, f in model.model_fields.items()]


def _pydantic_problems(exc: ValidationError, prefix: str, model: type[BaseModel]) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
            close = difflib.get_close_matches(str(loc[-1]), _allowed_fields(model, loc), n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        elif err["type"] == "missing":
            message = "required field is missing"
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, api.FieldErrors):
            problems += [
                Problem(_dotted((prefix, *loc, *e.field.split("."))), str(e)) for e in cause.errors
            ]
            continue
        if isinstance(cause, api.FieldError):
            loc = (*loc, *cause.field.split("."))
        problems.append(Problem(_dotted((prefix, *loc)), message))
    return problems


def _schema_problems(obj: dict[str, Any]) -> list[Problem]:
    problems = []
    for err in _schema_validator().iter_errors(obj):
        path = _dotted(err.absolute_path) or "(root)"
        message = err.message
        if err.validator == "pattern":
            wanted = api.PATTERN_HELP.get(
                str(err.validator_value), f"a match of {err.validator_value}"
            )
            message = f"{err.instance!r} is not a valid value: expected {wanted}"
        problems.append(Problem(path, message))
    return problems


def _metadata_problems(obj: dict[str, Any]) -> list[Problem]:
    problems = []
    if obj.get("apiVersion") != api.API_VERSION:
        problems.append(
            Problem("apiVersion", f"must be {api.API_VERSION!r}, got {obj.get('apiVersion')!r}")
        )
    if obj.get("kind") != api.KIND:
        problems.append(Problem("kind", f"must be {api.KIND!r}, got {obj.get('kind')!r}"))
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        problems.append(Problem("metadata.name", "required field is missing"))
        return problems
    # The CRD's root CEL rules, checked here without a CEL engine.
    length_rule, pattern_rule = crd.CEL_RULES[""]
    if len(name) > api.MAX_NAME_LENGTH:
        problems.append(Problem("metadata.name", f"{length_rule['message']} (got {len(name)})"))
    if re.fullmatch(api.NAME_PATTERN, name) is None:
        problems.append(Problem("metadata.name", f"{pattern_rule['message']} (got {name!r})"))
    return problems


def problems_of(obj: Any) -> list[Problem]:
    """Every problem of one SPINRun object (as loaded from YAML), sorted by path."""
    if not isinstance(obj, dict):
        return [Problem("(root)", f"expected a mapping, got {type(obj).__name__}")]
    found = _metadata_problems(obj) + _schema_problems(obj)
    spec = obj.get("spec")
    if isinstance(spec, dict):
        found += _spec_problems(spec)
    elif "spec" in obj:
        found.append(Problem("spec", "must be a mapping"))
    # The schema and the models often see the same fault; report each path's first message once
    # unless the messages say different things.
    seen: dict[str, list[str]] = {}
    unique = []
    for p in found:
        if p.path in seen and (p.message in seen[p.path] or _same_fault(p, seen[p.path])):
            continue
        seen.setdefault(p.path, []).append(p.message)
        unique.append(p)
    return sorted(unique)


MAX_PASSES = 4


def _spec_problems(spec: dict[str, Any]) -> list[Problem]:
    """The models' problems with `spec`, cross-field ones included, in one report.

    A model's cross-field rule (e.g. maxPromptLength < maxLength) runs only once all of its
    fields parsed, so a typo elsewhere in the section would hide it until the next fix. Each
    further pass drops the fields already reported (their defaults apply) and validates again.
    A rule that reads a dropped field could only judge its default, not the user's value, so a
    new problem is kept only when its path and message name no dropped field: our messages name
    every field a rule reads (tests/spin_operator/test_validation.py holds them to it)."""
    found: list[Problem] = []
    dropped: set[tuple[Any, ...]] = set()
    current = spec
    for _ in range(MAX_PASSES):
        try:
            api.SPINRunSpec.model_validate(current)
            break
        except ValidationError as exc:
            problems = _pydantic_problems(exc, "spec", api.SPINRunSpec)
            locs = _error_locs(exc)
        fresh = [p for p in problems if p not in found and not _reads_dropped(p, dropped)]
        found += fresh
        removable = {loc for loc in locs if loc and loc not in dropped}
        if not fresh or not removable:
            break
        dropped |= removable
        current = _without(spec, dropped)
    return found


def _error_locs(exc: ValidationError) -> list[tuple[Any, ...]]:
    """Where each error is, down to the field a model rule named (not just its model)."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        named = cause.errors if isinstance(cause, api.FieldErrors) else [cause]
        for e in named:
            out.append((*loc, *e.field.split(".")) if isinstance(e, api.FieldError) else loc)
    return out


def _reads_dropped(problem: Problem, dropped: set[tuple[Any, ...]]) -> bool:
    for loc in dropped:
        names = [str(part) for part in loc if not isinstance(part, int)]
        if not names:
            continue
        if problem.path.startswith(_dotted(("spec", *loc))):
            return True
        if re.search(rf"\b{re.escape(names[-1])}\b", problem.message):
            return True
    return False


def _without(spec: dict[str, Any], locs: set[tuple[Any, ...]]) -> dict[str, Any]:
    """A copy of `spec` without the values at `locs` (mapping keys only; a list keeps its items
    so the paths of the others stay right)."""
    out = copy.deepcopy(spec)
    for loc in locs:
        node: Any = out
        for part in loc[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if isinstance(node, dict) and isinstance(loc[-1], str):
            node.pop(loc[-1], None)
    return out


def _same_fault(problem: Problem, earlier: list[str]) -> bool:
    """True when the models restate a schema error at the same path (bounds, types, patterns)."""
    restatements = ("Input should", "String should", "List should", "Dictionary should")
    return problem.message.startswith(restatements) and bool(earlier)


# What a tracking URI must look like when the operator runs the SPINRun: a server both the
# operator and the Job pods reach. A path, file:// or sqlite: store is a file on whichever
# machine opens it, and the operator and the pods share no file system.
REMOTE_TRACKING = ("http://", "https://", "databricks")


def cluster_problems(spec: api.SPINRunSpec, default_tracking: str | None = None) -> list[Problem]:
    """What cannot work when the operator (not `spinctl run`) runs this spec; `default_tracking`
    is the operator's SPIN_MLFLOW_URI, used where the spec sets none."""
    uri = spec.tracking.uri or default_tracking
    if not uri or uri.startswith(REMOTE_TRACKING):
        return []
    where = "" if spec.tracking.uri else " (the operator's default, SPIN_MLFLOW_URI)"
    return [
        Problem(
            "spec.tracking.uri",
            (
                f"{uri!r}{where} is a local MLflow store: on a cluster the operator and the Job pods share "
                "no file system, so each would write its own copy and the run's metrics would be lost; use "
                "the MLflow server's http(s):// URL, or leave tracking.uri unset for the operator's default "
                "(a local store works with `spinctl run`)"
            ),
        )
    ]


def validate_cluster_file(path: str | Path) -> list[Problem]:
    """`validate_file`, plus what only fails on a cluster (`spinctl validate --cluster`)."""
    problems = validate_file(path)
    if problems:
        return problems
    docs = load_documents(path)
    out = []
    for i, doc in enumerate(docs):
        prefix = f"[{i}]." if len(docs) > 1 else ""
        out += [Problem(prefix + p.path, p.message) for p in cluster_problems(parse(doc))]
    return out


def parse(obj: dict[str, Any]) -> api.SPINRunSpec:
    """The validated spec of a SPINRun object, or InvalidSpec listing every problem."""
    problems = problems_of(obj)
    if problems:
        raise InvalidSpec(problems)
    return api.SPINRunSpec.model_validate(obj["spec"])


def load_documents(path: str | Path) -> list[Any]:
    """YAML documents of a file (empty documents dropped), read as `kubectl` reads them."""
    return load_file(path)


def validate_file(path: str | Path) -> list[Problem]:
    """Problems of every SPINRun in a file; paths are prefixed by the document index when >1."""
    try:
        docs = load_documents(path)
    except YamlSyntaxError as exc:
        return [Problem("(file)", f"not valid YAML: {exc}")]
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem("(file)", str(exc).splitlines()[0])]
    if not docs:
        return [Problem("(file)", "no YAML documents found")]
    out = []
    for i, doc in enumerate(docs):
        prefix = f"[{i}]." if len(docs) > 1 else ""
        out += [Problem(prefix + p.path, p.message) for p in problems_of(doc)]
    return out
