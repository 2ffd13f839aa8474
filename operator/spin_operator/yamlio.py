"""Read SPINRun YAML the way `kubectl` does, so a file `kubectl apply` accepts means the same here.

PyYAML implements YAML 1.1, whose float rule needs a dot: `5e-7` and `1e-4` load as *strings*
there, while Kubernetes' YAML reader (sigs.k8s.io/yaml, on go-yaml) and YAML 1.2 load them as
numbers; so `learningRate: 5e-7` passed `kubectl apply` but failed `spinctl validate` with
"'5e-7' is not of type 'number'". Go-yaml also keeps dates (`2026-01-01`) as strings when the
target is untyped, which is how a CRD's JSON sees them. Booleans keep YAML 1.1's yes/no/on/off,
as go-yaml does.

Syntax errors come back as `YamlSyntaxError` with a 1-based line and column, so a person can
jump to the fault.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# go-yaml's (and YAML 1.2 core schema's) plain float: a dot is optional when there is an
# exponent; plus YAML's infinities and NaN, which PyYAML already spells this way.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class KubeLoader(yaml.SafeLoader):
    """SafeLoader with Kubernetes' scalar rules (see the module docstring)."""


# Rebuild the implicit resolvers without 1.1's float and timestamp rules, then add the 1.2 float
# (SafeLoader's float constructor already reads every spelling it matches, `.inf` included).
KubeLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
KubeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


class YamlSyntaxError(ValueError):
    """A YAML file that does not parse; `line`/`column` are 1-based (None when unknown)."""

    def __init__(self, problem: str, line: int | None, column: int | None):
        self.problem, self.line, self.column = problem, line, column
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__(f"{where}{problem}")


def _syntax_error(exc: yaml.YAMLError) -> YamlSyntaxError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context})"
        if mark is not None:
            return YamlSyntaxError(problem, mark.line + 1, mark.column + 1)
        return YamlSyntaxError(problem, None, None)
    return YamlSyntaxError(str(exc).splitlines()[0] if str(exc) else "invalid YAML", None, None)


def load_all(text: str) -> list[Any]:
    """Every non-empty document of `text`, or YamlSyntaxError."""
    try:
        return [d for d in yaml.load_all(text, Loader=KubeLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise _syntax_error(exc) from None


def load(text: str) -> Any:
    """One document (None when empty), or YamlSyntaxError."""
    try:
        return yaml.load(text, Loader=KubeLoader)
    except yaml.YAMLError as exc:
        raise _syntax_error(exc) from None


def load_file(path: str | Path) -> list[Any]:
    """Every non-empty document of a file (OSError/UnicodeDecodeError pass through)."""
    return load_all(Path(path).read_text())
