"""What one pass knows (facts.py): storage facts read while a Job ran never meet that Job's end.

The cluster tier saw each iteration's control step retried once (`<run>-i<t>-ctrain-r1`,
`-ceval-r1`) although its first Job had succeeded: the pass gathered SPIN's finished step's
artifacts (the control's, still running, were not read), the watch brought the control Job's
end during that read, and the next round decided on the finished Job with the facts from
before: "succeeded but the control checkpoint has no complete manifest" (ArtifactIncomplete).
Here the real `Facts` reads real storage (local files) through the real storage pools; the
watch's event lands during the read, as it does on a cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from spin_common import manifest
from spin_operator.api import types as api
from spin_operator.decision import Decision, ObservedJob
from spin_operator.driver import Gathered
from spin_operator.endpoints import StoragePools
from spin_operator.facts import Facts, JobCache
from spin_operator.kube import Kube
from spin_operator.metrics import Metrics
from spin_operator.naming import StepKind, job_name
from spin_operator.settings import Settings, resolve_spec
from spin_operator.steps import RunRef, layout_of
from spin_operator.validation import parse
from tests.spin_operator.reconciler_world import NAME, NAMESPACE, spin_object

T = TypeVar("T")
RUN = RunRef(NAMESPACE, NAME, "uid-1")


class WatchDuringReads(StoragePools):
    """The operator's storage pools; `during` runs once a storage call has been made and before
    its await returns: a Job watch event processed meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.during: Callable[[], None] | None = None

    async def run(self, fn: Callable[..., T], spec: api.SPINRunSpec, *args: Any) -> T:
        result = await super().run(fn, spec, *args)
        during, self.during = self.during, None
        if during is not None:
            during()
        return result


def no_api() -> Any:
    raise AssertionError("this pass must not call the API server")


def job(stage: StepKind, state: str) -> dict[str, tuple[str | None, ObservedJob]]:
    """The cache entry of the step's Job (by name: its owner's uid, the Job as last seen)."""
    name = job_name(NAME, 0, stage)
    return {name: (RUN.uid, ObservedJob(name, 0, stage, 0, state))}  # type: ignore[arg-type]


def test_facts_read_while_a_job_ran_are_not_decided_on_once_it_ended(tmp_path: Path) -> None:
    obj = spin_object(
        iterations=1, controlArm={"enabled": True}, storage={"uri": f"file://{tmp_path}"}
    )
    spec = resolve_spec(parse(obj), Settings(), None)
    it = layout_of(spec, RUN).iteration(0)
    for uri in (it.model, it.control_model):  # both arms' checkpoints are complete in storage
        files = tmp_path / "scratch" / uri.rsplit("/", 2)[-2]
        files.mkdir(parents=True)
        (files / "config.json").write_text("{}")
        manifest.write_dir_artifact(files, uri, "model", {})
    # SPIN's training Job has ended; the control's is still running as the pass starts
    cache: JobCache = {
        (NAMESPACE, NAME): job("train", "Succeeded") | job("control-train", "Running")
    }
    pools = WatchDuringReads()
    kube = Kube(no_api)  # storage facts only: nothing is asked of the API server
    facts = Facts(Settings(), kube, Metrics(), pools, cache, lambda *_: None, 10.0)
    facts.artifacts.started(RUN.uid, False)

    def control_ends() -> None:  # the watch's event for the control's Job, during the read
        cache[(NAMESPACE, NAME)] |= job("control-train", "Succeeded")

    pools.during = control_ends
    asks = Decision(status=api.SPINRunStatus(), spec=spec, needs_storage={0})
    gathered = Gathered()
    assert asyncio.run(facts.gather(asks, RUN, gathered))
    states = {j.stage: j.state for j in facts.observed(obj, RUN, None, gathered, {}).jobs}
    assert states["control-train"] == "Succeeded"  # what the next round decides on
    # ... so facts from before that end must not be there: they said "no control checkpoint"
    # (was: control_model False beside a succeeded control Job -> ArtifactIncomplete, a retry)
    assert 0 not in gathered.storage or gathered.storage[0].control_model, gathered.storage

    # The next round asks again and reads the control's checkpoint, now that its Job ended.
    assert asyncio.run(facts.gather(asks, RUN, gathered))
    assert gathered.storage[0].model and gathered.storage[0].control_model, gathered.storage
