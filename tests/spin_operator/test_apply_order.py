"""The order of a pass's writes (apply.py): the next Job is created before what the pass deletes,
and the deletes still go out when a create is refused."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from spin_operator.api import types as api
from spin_operator.apply import Applier, Retry
from spin_operator.decision import CreateStep, Decision, DeleteJob, DeleteService
from spin_operator.endpoints import StoragePools
from spin_operator.kube import ApiError
from spin_operator.metrics import Metrics
from spin_operator.refusals import Refusals
from spin_operator.settings import Settings
from spin_operator.steps import RunRef
from spin_operator.track import Tracking
from spin_operator.tracking_actions import TrackingActions
from tests.spin_operator.reconciler_world import NAME, NAMESPACE
from tests.spin_operator.test_driver import spec_of

JSON = dict[str, Any]
KEY = (NAMESPACE, NAME)


class Calls:
    """The API calls of one pass, in order; creates refused with `refuse` when set."""

    def __init__(self, refuse: ApiError | None = None) -> None:
        self.calls: list[str] = []
        self.refuse = refuse

    async def create(self, path: str, body: JSON, *, dry_run: bool = False) -> JSON:
        self.calls.append(f"create {body['kind']} {body['metadata']['name']}")
        if self.refuse is not None:
            raise self.refuse
        return {**body, "metadata": {**body["metadata"], "uid": "u"}}

    async def delete(self, path: str, propagation: str = "Background") -> bool:
        self.calls.append(f"delete {path.rsplit('/', 2)[-2]} {path.rsplit('/', 1)[-1]}")
        return True

    async def patch(self, path: str, body: JSON) -> JSON:
        self.calls.append("patch status")
        return {"metadata": {"resourceVersion": "2"}, "status": body.get("status")}


def apply(kube: Calls) -> None:
    storage = StoragePools()
    applier = Applier(
        Settings(),
        kube,  # type: ignore[arg-type]
        Metrics(),
        storage,
        TrackingActions(Tracking(), storage),
        Refusals(),
        {KEY: {}},
        lambda event_type, obj: None,
        post_event=lambda *_: None,
    )
    spec = spec_of()
    old = api.SPINRunStatus(phase="Running", spec_hash="h")
    new = old.model_copy(update={"message": "evaluating"})
    d = Decision(
        status=new,
        spec=spec,
        actions=[
            DeleteService(f"{NAME}-i0-train"),
            DeleteJob(f"{NAME}-i0-gen"),
            CreateStep(0, "evaluate", 0, f"{NAME}-i0-eval"),
        ],
    )
    body = {"metadata": {"name": NAME, "namespace": NAMESPACE, "resourceVersion": "1"}}
    try:
        asyncio.run(applier.execute(KEY, body, RunRef(NAMESPACE, NAME, "uid"), old, d))
    finally:
        storage.close()


def test_the_next_job_is_created_before_the_pass_deletes_anything() -> None:
    kube = Calls()
    apply(kube)
    assert kube.calls[:3] == [
        f"create Job {NAME}-i0-eval",
        f"delete services {NAME}-i0-train",
        f"delete jobs {NAME}-i0-gen",
    ]


def test_the_deletes_go_out_when_the_create_is_refused() -> None:
    """A count quota (`count/jobs.batch`) full of finished Jobs refuses the create until the
    sweep deletes them: the deletes must not wait for the create to succeed."""
    kube = Calls(ApiError(403, "Forbidden", "exceeded quota: jobs, used: count/jobs.batch=10"))
    with pytest.raises(Retry):
        apply(kube)
    assert kube.calls == [
        f"create Job {NAME}-i0-eval",
        f"delete services {NAME}-i0-train",
        f"delete jobs {NAME}-i0-gen",
    ]
