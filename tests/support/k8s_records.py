"""The emulated API server's request log, in the vocabulary of RBAC rules.

Tests and benchmarks count requests by verb and resource (requests per SPIN iteration) and
compare the set actually used with the Helm chart's Role rules.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ApiRequest:
    """One served request. `resource` is None for discovery and other non-resource URLs."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str | None
    version: str | None
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None  # for creates: the created object's name (generateName resolved)
    code: int
    user_agent: str
    path: str
    time: float  # when the server began serving it (time.time())
    duration: float = 0.0  # seconds the server spent on it (0 for watches, which stream on)
    dry_run: bool = False  # `?dryRun=All`: validated and admitted, nothing stored

    @property
    def rbac_resource(self) -> str:
        """`jobs`, `spinruns/status`: the resource as a Role rule names it."""
        return f"{self.resource}/{self.subresource}" if self.subresource else f"{self.resource}"


class RequestLog:
    """Thread-safe: the server thread appends, tests read and reset from any thread."""

    def __init__(self) -> None:
        self._entries: list[ApiRequest] = []
        self._lock = threading.Lock()

    def append(self, entry: ApiRequest) -> None:
        with self._lock:
            self._entries.append(entry)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def entries(
        self, *, user_agent: str | None = None, resources_only: bool = True, dry_runs: bool = False
    ) -> list[ApiRequest]:
        """Resource requests (all requests with resources_only=False) whose User-Agent starts with
        `user_agent`; dry runs (which store nothing, e.g. the operator's check of iteration 0 when
        a run starts) only with dry_runs=True, so counts of creates are counts of objects."""
        with self._lock:
            entries = list(self._entries)
        return [
            e
            for e in entries
            if (not resources_only or e.resource is not None)
            and (dry_runs or not e.dry_run)
            and (user_agent is None or e.user_agent.startswith(user_agent))
        ]

    def __iter__(self) -> Iterator[ApiRequest]:
        return iter(self.entries(resources_only=False))

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def count(self, *, user_agent: str | None = None, **match: Any) -> int:
        """Resource requests whose fields equal `match`, e.g. count(verb="create", resource="jobs")."""
        return sum(
            all(getattr(e, k) == v for k, v in match.items())
            for e in self.entries(user_agent=user_agent)
        )

    def by_verb_resource(self, *, user_agent: str | None = None) -> collections.Counter[str]:
        """Counter of "verb resource[/subresource]", e.g. {"patch spinruns/status": 4}."""
        return collections.Counter(
            f"{e.verb} {e.rbac_resource}" for e in self.entries(user_agent=user_agent)
        )

    def rbac_rules(self, *, user_agent: str | None = None) -> set[tuple[str, str, str]]:
        """{(apiGroup, resource[/subresource], verb)} used: compare with a Role's rules."""
        return {
            (e.group or "", e.rbac_resource, e.verb) for e in self.entries(user_agent=user_agent)
        }
