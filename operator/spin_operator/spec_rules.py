"""Spec changes after a run started: which spec the run goes on with (docs/operations.md).

Immutable fields keep the values the run started with (the applied-spec annotation, trusted
only while its digest matches status.specHash), an invalid new spec leaves the last accepted one
in force, and every refusal is a SpecChangeRefused condition with one Warning event per message.
"""

from __future__ import annotations

from pydantic import ValidationError

from spin_operator import conditions as cond
from spin_operator.api import types as api
from spin_operator.decision import RecordSpec
from spin_operator.pass_state import PassState
from spin_operator.steps import changed_fields, merge_mutable, spec_digest
from spin_operator.validation import InvalidSpec


class SpecRules(PassState):
    def _refuse(self, message: str | None) -> None:
        current = cond.get_condition(self.status.conditions, cond.SPEC_CHANGE_REFUSED)
        if message is None:
            if current is not None and current.status == "True":
                cond.set_condition(
                    self.status.conditions,
                    cond.SPEC_CHANGE_REFUSED,
                    False,
                    "SpecAccepted",
                    "",
                    self.now,
                    self.observed.generation,
                )
            return
        was = current is not None and current.status == "True" and current.message == message
        cond.set_condition(
            self.status.conditions,
            cond.SPEC_CHANGE_REFUSED,
            True,
            "ImmutableFieldChanged",
            message,
            self.now,
            self.observed.generation,
        )
        if not was:
            self._event("Warning", "SpecChangeRefused", message)

    def _effective_spec(self) -> api.SPINRunSpec | None:
        """The spec the run goes on with; fails the run or refuses changes as the rule says."""
        given, applied = self.given, self.observed.applied_spec
        if not self.started:
            if isinstance(given, InvalidSpec):
                self._fail("InvalidSpec", str(given))
                return None
            return given
        if applied is not None and spec_digest(applied) != self.status.spec_hash:
            applied = None  # the annotation is not what the run started with: do not trust it
        refusals: list[str] = []
        if isinstance(given, InvalidSpec):
            if applied is None:
                self._fail("InvalidSpec", f"{given} (and the spec the run started with is unknown)")
                return None
            spec = applied
            refusals.append(
                f"the new spec is invalid ({given}); the run goes on with its last accepted spec"
            )
        elif applied is None:
            if spec_digest(given) != self.status.spec_hash:
                self._fail(
                    "AppliedSpecLost",
                    "immutable fields changed and annotation of the started spec is missing "
                    f"or altered (specHash {self.status.spec_hash})",
                )
                return None
            spec = given
        else:
            changed = changed_fields(applied, given)
            spec = given
            if changed:
                try:
                    spec = merge_mutable(applied, given)
                    refusals.append(
                        f"{', '.join(changed)}: cannot change after the run started; "
                        "the run goes on with the values it started with"
                    )
                except ValidationError as exc:
                    spec = applied
                    refusals.append(
                        f"{', '.join(changed)}: cannot change after the run started, and the "
                        "other changes do not fit the started spec "
                        f"({exc.error_count()} error(s)); the run goes on with its last accepted spec"
                    )
        started_count = len(self.status.iterations)
        if spec.iterations < started_count:
            refusals.append(
                f"spec.iterations: {spec.iterations} is below the {started_count} "
                f"iteration(s) already started; using {started_count}"
            )
            spec = spec.model_copy(update={"iterations": started_count})
        self._refuse("; ".join(refusals) or None)
        if (
            self.observed.applied_spec is None
            or spec.to_wire() != self.observed.applied_spec.to_wire()
        ):
            self._act(RecordSpec(spec))
        return spec
