"""Base pieces of the API models (shared by every section module): camelCase wire names, unknown
fields refused, cross-field errors that name their field, and the check of s3:// URIs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from spin_operator.api.kube import s3_uri_error


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


class UriModel(Model):
    """A section with a `uri` (s3:// or a path): an s3:// URI has no empty, `.` or `..` key
    segment (S3 keys are not paths: `s3://bkt/a/../b` would name another key)."""

    @field_validator("uri", check_fields=False)
    @classmethod
    def _s3_segments(cls, uri: str | None) -> str | None:
        if (why := s3_uri_error(uri)) is not None:
            raise ValueError(why)
        return uri


def desc(text: str, **kw: Any) -> Any:
    """A field's description (it becomes the CRD's and docs/api.md's text) and its constraints."""
    return Field(description=text, **kw)
