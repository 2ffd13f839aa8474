"""Which artifacts of an iteration a pass must read from storage again (pure bookkeeping, no I/O).

Why: every pass that decides a step without a running Job asks for its iteration's storage facts
(decision.py), and at scale most passes are caused by the operator's own writes, not by anything
a Job did. Reading every manifest of the iteration each time cost ~50 S3 requests per iteration,
half of them 404s for artifacts whose Job had not even been created, and at 250 runs the reads
queued behind the endpoint's storage threads for minutes (docs/benchmarks.md, "Operator").

What may change an artifact under `R/iter-t/` is the Jobs of its step (the runtime writes
manifests last, and the operator itself writes only `R/spinrun.yaml`). So per (run, iteration)
and per step this keeps what was last read and the step's Jobs at that time (name, state), and a
step's artifact is read again only when:

* it was never read in this process, or
* its step's Jobs changed since (one appeared, finished, went away) and none still runs,

and never once it was found complete (a complete artifact never changes while its run lives: a
manifest is written after every file it lists, and only the run's deletion removes it). A step
that never had a Job is not read at all when this process saw the run start on an empty prefix
(no `R/spinrun.yaml`): nothing but its own Jobs could have written that artifact since. After an
operator restart that knowledge is gone and each iteration is read once in full, as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from spin_operator.api import types as api
from spin_operator.decision import ACTIVE_STATES, ObservedJob, StorageFacts
from spin_operator.naming import step_field
from spin_operator.observe import COMPLETE_FIELD

Key = tuple[str, int]  # run uid, iteration
Jobs = tuple[tuple[str, str], ...]  # (Job name, state) of one step, sorted


def steps_of(spec: api.SPINRunSpec, iteration: int) -> tuple[str, ...]:
    """The steps whose artifacts `observe.read_facts` reads for this spec and iteration."""
    steps = ["check"] if iteration == 0 else []
    steps += ["generate", "train"]
    if spec.evaluation.enabled:
        steps.append("evaluate")
    if spec.control_arm.enabled:
        steps += ["control-train", "control-evaluate"]
    return tuple(steps)


def _shape(spec: api.SPINRunSpec) -> tuple[object, ...]:
    """What of the spec the facts depend on besides storage (a spec change re-reads them)."""
    ev = spec.evaluation
    return (
        spec.storage.uri,
        spec.generation.replicas,
        ev.enabled,
        ev.command is None,
        ev.metric,
        spec.control_arm.enabled,
    )


@dataclass
class _Seen:
    shape: tuple[object, ...]
    facts: StorageFacts
    jobs: dict[str, Jobs] = field(default_factory=dict)  # step -> its Jobs when last read


class ArtifactReads:
    """Last storage facts per (run, iteration), and what to read again for a pass."""

    def __init__(self) -> None:
        self._seen: dict[Key, _Seen] = {}
        self._fresh: dict[str, bool] = {}  # run uid -> its prefix was empty when it started
        self._had_jobs: dict[Key, set[str]] = {}  # steps that have had a Job (this process)

    def knows(self, uid: str) -> bool:
        return uid in self._fresh

    def started(self, uid: str, empty: bool) -> None:
        """Before the run started here, its prefix held nothing (`empty`) or something. Only
        the first look counts (a later one finds what this run wrote itself)."""
        self._fresh.setdefault(uid, empty)

    def plan(
        self,
        spec: api.SPINRunSpec,
        uid: str,
        t: int,
        jobs: Iterable[ObservedJob],
        status: api.SPINRunStatus,
    ) -> tuple[StorageFacts, set[str]]:
        """(the facts known now, the steps whose artifacts must be read to complete them).
        `status`: the pass's; a step it records an attempt of has had a Job (maybe gone now)."""
        now = _jobs_by_step(jobs, t)
        had = self._had_jobs.setdefault((uid, t), set())
        had.update(now)
        entry = next((i for i in status.iterations if i.iteration == t), None)
        for step in steps_of(spec, t) if entry is not None else ():
            recorded = getattr(entry, step_field(step), None)  # type: ignore[arg-type]
            if recorded is not None and recorded.attempts:
                had.add(step)
        seen = self._seen.get((uid, t))
        if seen is not None and seen.shape != _shape(spec):
            seen = None
        facts = seen.facts if seen is not None else StorageFacts()
        read: set[str] = set()
        for step in steps_of(spec, t):
            if seen is not None and getattr(seen.facts, COMPLETE_FIELD[step]):
                continue  # complete: never changes again
            if seen is not None and step in seen.jobs and seen.jobs[step] == now.get(step, ()):
                continue  # nothing of this step ran since it was read
            if self._fresh.get(uid) and step not in had:
                continue  # an empty prefix at start, and no Job of this step ever: absent
            if step in now and all(state in ACTIVE_STATES for _, state in now[step]):
                # Its Job still runs: what it writes counts once it finished (the reconciler
                # decides a step from storage only then), and that change brings a read.
                continue
            read.add(step)
        return facts, read

    def update(
        self,
        spec: api.SPINRunSpec,
        uid: str,
        t: int,
        jobs: Iterable[ObservedJob],
        facts: StorageFacts,
        read: set[str],
    ) -> None:
        """Record `facts` after reading `read` (the steps not read keep their last entry)."""
        now = _jobs_by_step(jobs, t)
        seen = self._seen.get((uid, t))
        if seen is None or seen.shape != _shape(spec):
            seen = self._seen[(uid, t)] = _Seen(_shape(spec), facts)
        seen.facts = facts
        for step in read:
            seen.jobs[step] = now.get(step, ())

    def forget(self, uid: str | None) -> None:
        """The run is gone."""
        self._seen = {k: v for k, v in self._seen.items() if k[0] != uid}
        self._had_jobs = {k: v for k, v in self._had_jobs.items() if k[0] != uid}
        self._fresh.pop(uid or "", None)


def _jobs_by_step(jobs: Iterable[ObservedJob], t: int) -> dict[str, Jobs]:
    by_step: dict[str, list[tuple[str, str]]] = {}
    for j in jobs:
        if j.iteration == t:
            by_step.setdefault(j.stage, []).append((j.name, j.state))
    return {step: tuple(sorted(found)) for step, found in by_step.items()}
