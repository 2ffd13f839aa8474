"""Base pieces of the API models (shared by types.py and pod.py): camelCase wire names, unknown
fields refused, and cross-field errors that name their field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class FieldError(ValueError):
    """A cross-field rule broken at `field` (a dotted wire path relative to the model)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class FieldErrors(ValueError):
    """Several cross-field rules broken at once: reported together, not one per fix."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(f"{e.field}: {e}" for e in errors))


def raise_all(errors: list[FieldError]) -> None:
    """Raise nothing, the one error, or all of them (validation.py lists each at its path)."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise FieldErrors(errors)


class Model(BaseModel):
    """Base for API types: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it (camelCase, unset optionals omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _desc(text: str, **kw: Any) -> Any:
    return Field(description=text, **kw)
