"""Children the API server refused for good, remembered per run until the run changes.

A permanent refusal (400, 422, 403 other than an exhausted quota; docs/operations.md "API
errors") or a step that cannot be rendered from the spec is recorded here by Job name; the
controller then decides again at once, and the reconciler fails the step (or, for the dry run of
iteration 0 at start, the run) with the recorded reason and message. A record holds for the spec
it was rendered from and the run's user annotations: a spec edit, or touching the run after
fixing RBAC (`kubectl annotate spin NAME selfplay.dev/recheck=...`), forgets it. The operator's
own writes (status, the applied-spec annotation) do not, so a refused call is not repeated.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from spin_operator.api import types as api
from spin_operator.naming import APPLIED_SPEC_ANNOTATION

Key = tuple[str, str]  # namespace, run name
Refusal = tuple[str, str]  # reason (CreateRejected, InvalidSpec), message


def attempt_digest(body: dict[str, Any] | None, spec: api.SPINRunSpec | None) -> str:
    """What a refusal holds for: the spec as the user wrote it and the annotations a user may
    touch. The written spec, not the effective one (merged with the started spec, defaults
    resolved): the pass that records a refusal and the pass that reads it must agree even when
    the two differ, or a refused create would be retried forever instead of failing the step."""
    annotations = ((body or {}).get("metadata") or {}).get("annotations") or {}
    written = (body or {}).get("spec")
    if written is None:
        written = spec.to_wire() if spec is not None else None
    touched = {
        k: v
        for k, v in annotations.items()
        if k != APPLIED_SPEC_ANNOTATION and not k.startswith("kopf.")
    }
    return hashlib.sha256(
        json.dumps([written, touched], sort_keys=True, default=str).encode()
    ).hexdigest()


class Refusals:
    def __init__(self) -> None:
        self._held: dict[Key, tuple[str, dict[str, Refusal]]] = {}

    def of(
        self, key: Key, body: dict[str, Any] | None, spec: api.SPINRunSpec | None
    ) -> dict[str, Refusal]:
        """Job name -> refusal, for this version of the run (empty when it changed since)."""
        held = self._held.get(key)
        if held is None or held[0] != attempt_digest(body, spec):
            return {}
        return dict(held[1])

    def record(
        self,
        key: Key,
        body: dict[str, Any] | None,
        spec: api.SPINRunSpec,
        name: str,
        refusal: Refusal,
    ) -> bool:
        """Remember a refusal; False when it was known already (the caller must not loop)."""
        known = self.of(key, body, spec)
        if name in known:
            return False
        self._held[key] = (attempt_digest(body, spec), {**known, name: refusal})
        return True

    def forget(self, key: Key) -> None:
        self._held.pop(key, None)
