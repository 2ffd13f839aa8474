"""How the controller meets API errors on creates (issue 14 item 1), against an in-memory API.

`FakeApi` answers the controller's calls like an API server (merge patches, resourceVersion
checks, 409 on a taken name) and refuses what a test tells it to, with the status code, reason
and message a real API server sends. A permanent refusal must fail the step with that message
(a Failed condition and a Warning event) instead of a silent retry; 429 and 5xx back off,
honouring Retry-After; at start iteration 0's objects go out with dryRun=All first.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from spin_common.layout import RunLayout
from spin_operator.controller import Controller
from spin_operator.kube import ApiError
from spin_operator.metrics import Metrics
from spin_operator.naming import job_name
from spin_operator.policy import Allowed, Policy
from spin_operator.settings import Settings
from spin_operator.track import Tracking

JSON = dict[str, Any]
NS, NAME = "team-a", "run"
KEY = (NS, NAME)
Refuse = Callable[[str, JSON, bool], ApiError | None]


def _merge(target: JSON, patch: JSON) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


class FakeApi:
    """The few calls Controller makes, with an API server's answers; `refuse(path, body,
    dry_run)` returns the ApiError to answer a create with (None: accept)."""

    def __init__(self, run: JSON, refuse: Refuse | None = None) -> None:
        self.run = run
        self.refuse = refuse or (lambda path, body, dry: None)
        self.objects: dict[str, JSON] = {}
        self.creates: list[tuple[str, bool, float]] = []  # (name, dry run, monotonic time)
        self.status_patches = 0
        self.rv = 1
        self.warning: str | None = None  # a Warning header to send with every create
        self.on_warning: Callable[[str, str, str], None] | None = None

    async def create(self, path: str, body: JSON, *, dry_run: bool = False) -> JSON:
        name = body["metadata"]["name"]
        self.creates.append((name, dry_run, time.monotonic()))
        if self.warning and self.on_warning is not None:
            self.on_warning("POST", path, self.warning)
        error = self.refuse(path, body, dry_run)
        if error is not None:
            raise error
        full = f"{path}/{name}"
        if full in self.objects:
            raise ApiError(409, "AlreadyExists", f'"{name}" already exists')
        obj = copy.deepcopy(body)
        obj["metadata"]["uid"] = f"uid-{name}"
        if not dry_run:
            self.objects[full] = obj
        return obj

    async def get(self, path: str) -> JSON | None:
        return copy.deepcopy(self.objects.get(path))

    async def list(self, path: str, params: dict[str, str] | None = None) -> list[JSON]:
        return []

    async def patch(self, path: str, body: JSON) -> JSON:
        if path.endswith(f"/spinruns/{NAME}") or path.endswith(f"/spinruns/{NAME}/status"):
            sent = body.get("metadata", {}).get("resourceVersion")
            if sent is not None and sent != self.run["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "the object has been modified")
            patch = copy.deepcopy(body)
            patch.get("metadata", {}).pop("resourceVersion", None)
            if path.endswith("/status"):
                self.status_patches += 1
                patch = {"status": patch["status"]}
            _merge(self.run, patch)
            self.rv += 1
            self.run["metadata"]["resourceVersion"] = str(self.rv)
            return copy.deepcopy(self.run)
        obj = self.objects.get(path)
        if obj is None:
            raise ApiError(404, "NotFound", path)
        _merge(obj, body)
        return copy.deepcopy(obj)

    async def delete(self, path: str, propagation: str = "Background") -> bool:
        return self.objects.pop(path, None) is not None

    async def close(self) -> None:
        pass


def spinrun(storage: Path, **spec: Any) -> JSON:
    body: JSON = {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"uri": "s3://data/sft.jsonl", "evalSamples": 8},
        "iterations": 1,
        "storage": {"uri": str(storage)},
    }
    body.update(spec)
    return {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SPINRun",
        "metadata": {
            "name": NAME,
            "namespace": NS,
            "uid": "run-uid",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": body,
    }


def pass_the_check(storage: Path) -> None:
    """What a passed check Job leaves in the run's storage (its report, ok): the check step is
    then found complete and iteration 0's generation is the first Job created."""
    report = RunLayout.for_run(str(storage), NS, NAME).iteration(0).check_report
    Path(report).parent.mkdir(parents=True)
    Path(report).write_text(json.dumps({"ok": True, "problems": [], "dataset": {"rows": 9}}))


class Setup:
    def __init__(
        self, tmp_path: Path, refuse: Refuse | None = None, checked: bool = False, **spec: Any
    ) -> None:
        if checked:
            pass_the_check(tmp_path / "artifacts")
        self.api = FakeApi(spinrun(tmp_path / "artifacts", **spec), refuse)
        self.events: list[tuple[str, str, str]] = []
        # the admin allows this run's local storage (issue 15's allow-lists refuse it otherwise)
        allowed = Policy(Allowed(storage_prefixes=(str(tmp_path / "artifacts"),)))
        self.controller = Controller(
            Settings(security=allowed),
            self.api,  # type: ignore[arg-type]
            tracking=Tracking(),
            metrics=Metrics(),
            retry_base=0.2,
            retry_max=2.0,
            post_event=lambda body, type_, reason, message: self.events.append(
                (type_, reason, message)
            ),
        )

    def start(self) -> None:
        self.controller.on_run("ADDED", copy.deepcopy(self.api.run))

    def feed(self) -> None:
        """What the watch would bring: the stored SPINRun again."""
        self.controller.on_run("MODIFIED", copy.deepcopy(self.api.run))

    async def wait(self, probe: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"status {self.api.run.get('status')}, creates {self.api.creates}"
                )
            await asyncio.sleep(0.02)

    def failed(self) -> JSON | None:
        conditions = (self.api.run.get("status") or {}).get("conditions") or []
        return next(
            (c for c in conditions if c["type"] == "Failed" and c["status"] == "True"), None
        )

    async def close(self) -> None:
        await self.controller.close(grace=0)


INVALID = (
    'Job.batch "run-i0-generate" is invalid: spec.template.spec.tolerations[0].operator: '
    "Invalid value: \"Equal\": must be 'Exists' when `key` is empty"
)
FORBIDDEN = (
    'jobs.batch is forbidden: User "system:serviceaccount:spin:spin-operator" cannot create '
    'resource "jobs" in API group "batch" in the namespace "team-a"'
)


@pytest.mark.parametrize(
    ("status", "reason", "message"),
    [
        (422, "Invalid", INVALID),
        (403, "Forbidden", FORBIDDEN),
        (400, "BadRequest", "json: cannot unmarshal"),
    ],
)
async def test_permanent_refusal_fails_with_the_api_message(
    tmp_path: Path, status: int, reason: str, message: str
) -> None:
    """A create the API server refuses for good (here the dry run at start, as a real server
    refuses it the same way) fails the run with its message as the Failed condition and one
    Warning event; nothing is written to storage and no Job exists."""
    s = Setup(
        tmp_path,
        lambda path, body, dry: ApiError(status, reason, message) if "/jobs" in path else None,
    )
    s.start()
    try:
        await s.wait(lambda: s.failed() is not None)
        await asyncio.sleep(0.5)  # no retry loop afterwards
        failed = s.failed()
        assert failed is not None and failed["reason"] == "CreateRejected"
        # the check Job leads iteration 0's objects: the first one refused
        assert message in failed["message"] and "check of iteration 0" in failed["message"]
        assert s.api.run["status"]["phase"] == "Failed"
        assert [e for e in s.events if e[0] == "Warning"] == [
            ("Warning", "CreateRejected", failed["message"])
        ]
        assert all(dry for _, dry, _ in s.api.creates), s.api.creates  # no real create was sent
        assert len(s.api.creates) == 1, s.api.creates  # refused once, not retried
        assert not (tmp_path / "artifacts").exists()  # R/spinrun.yaml is written only after it
        assert s.api.status_patches == 1
    finally:
        await s.close()


async def test_dry_run_covers_every_object_of_iteration_0(tmp_path: Path) -> None:
    """Generation, training (Job and its Service) and evaluation go out with dryRun=All before
    the generation Job is created; a refused training Job fails the run before anything starts."""
    train = job_name(NAME, 0, "train")

    def refuse(path: str, body: JSON, dry: bool) -> ApiError | None:
        if body["metadata"]["name"] == train and body["kind"] == "Job":
            return ApiError(
                422,
                "Invalid",
                f'Job.batch "{train}" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: "9": must be less than or equal to cpu limit of 8',
            )
        return None

    s = Setup(tmp_path, refuse)
    s.start()
    try:
        await s.wait(lambda: s.failed() is not None)
        failed = s.failed()
        assert failed is not None and "must be less than or equal to cpu limit" in failed["message"]
        assert "train of iteration 0" in failed["message"]
        names = {(n, dry) for n, dry, _ in s.api.creates}
        assert (job_name(NAME, 0, "generate"), True) in names and (train, True) in names
        assert not any(not dry for _, dry, _ in s.api.creates)
    finally:
        await s.close()


async def test_dry_run_passes_then_jobs_are_created(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.start()
    try:
        check, gen = job_name(NAME, 0, "check"), job_name(NAME, 0, "generate")
        await s.wait(lambda: any(n == check and not dry for n, dry, _ in s.api.creates))
        dry = [n for n, d, _ in s.api.creates if d]
        assert dry[0] == check and gen in dry and job_name(NAME, 0, "evaluate") in dry
        assert [n for n, d, _ in s.api.creates if not d] == [check]  # the check Job comes first
        first_real = next(i for i, (_, d, _) in enumerate(s.api.creates) if not d)
        assert first_real == len(dry)  # every dry run before the first real create
        await s.wait(lambda: (s.api.run.get("status") or {}).get("phase") == "Running")
        assert s.failed() is None
    finally:
        await s.close()


@pytest.mark.parametrize("storage", ["in the spec", "the operator's default"])
async def test_refusal_mid_run_fails_the_step(tmp_path: Path, storage: str) -> None:
    """A real create refused for good after the run started (RBAC taken away meanwhile, here for
    the retry of a failed generation Job): the step is Failed with the API's message instead of
    `Retry` forever. Also when the effective spec differs from the written one (storage from the
    operator's default): the refusal is keyed by what the user wrote, so both passes agree."""
    gen, retry = job_name(NAME, 0, "generate"), job_name(NAME, 0, "generate", 1)
    s = Setup(
        tmp_path,
        lambda path, body, dry: (
            ApiError(403, "Forbidden", FORBIDDEN) if body["metadata"]["name"] == retry else None
        ),
        checked=True,
    )
    if storage != "in the spec":
        uri = s.api.run["spec"].pop("storage")["uri"]
        s.controller.settings = replace(s.controller.settings, storage_uri=uri)
    s.start()
    try:
        await s.wait(lambda: any(n == gen and not d for n, d, _ in s.api.creates))
        await s.wait(lambda: (s.api.run.get("status") or {}).get("phase") == "Running")
        job = await s.api.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{gen}")
        assert job is not None
        job["metadata"]["ownerReferences"] = [
            {"uid": "run-uid", "kind": "SPINRun", "name": NAME, "controller": True}
        ]
        job["status"] = {
            "failed": 1,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "boom",
                }
            ],
        }
        s.controller.on_job("MODIFIED", job)
        await s.wait(lambda: s.failed() is not None)
        status = s.api.run["status"]
        assert FORBIDDEN in s.failed()["message"]  # type: ignore[index]
        step = status["iterations"][0]["generate"]
        assert step["phase"] == "Failed" and FORBIDDEN in step["message"]
        assert [n for n, d, _ in s.api.creates if not d] == [gen, retry]
        assert ("Warning", "CreateRejected", s.failed()["message"]) in s.events  # type: ignore[index]
    finally:
        await s.close()


@pytest.mark.parametrize(
    ("status", "message", "retry_after"),
    [
        (429, "too many requests", 1.0),
        (503, "etcdserver: leader changed", None),
        (403, "exceeded quota: compute, requested: pods=1, used: pods=4, limited: pods=4", None),
    ],
)
async def test_retryable_errors_back_off_then_create(
    tmp_path: Path, status: int, message: str, retry_after: float | None
) -> None:
    """429 (at least Retry-After apart), 5xx and an exhausted quota: backed off, not failed;
    the Job is created once the API server accepts it."""
    refusals = [0]

    def refuse(path: str, body: JSON, dry: bool) -> ApiError | None:
        if dry or "/jobs" not in path or refusals[0] >= 2:
            return None
        refusals[0] += 1
        return ApiError(
            status,
            "TooManyRequests" if status == 429 else "ServiceUnavailable",
            message,
            retry_after,
        )

    s = Setup(tmp_path, refuse, checked=True)
    s.start()
    gen = job_name(NAME, 0, "generate")
    try:
        await s.wait(lambda: sum(n == gen and not d for n, d, _ in s.api.creates) == 3)
        await s.wait(lambda: (s.api.run.get("status") or {}).get("phase") == "Running")
        times = [t for n, d, t in s.api.creates if n == gen and not d]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= (retry_after or 0.2) * 0.9, gaps
        assert s.failed() is None
        assert not [e for e in s.events if e[1] == "CreateRejected"]
    finally:
        await s.close()


async def test_unusable_storage_uri_is_invalid_spec(tmp_path: Path) -> None:
    """An operator default the models never saw (SPIN_STORAGE_URI with '..') fails the run as
    InvalidSpec naming spec.storage.uri, instead of a ValueError on every pass."""
    s = Setup(tmp_path)
    s.api.run["spec"].pop("storage")
    s.controller.settings = replace(s.controller.settings, storage_uri="s3://bkt/a/../b")
    s.start()
    try:
        await s.wait(lambda: s.failed() is not None)
        failed = s.failed()
        assert failed is not None and failed["reason"] == "InvalidSpec"
        assert "spec.storage.uri" in failed["message"] and ".." in failed["message"]
        assert s.api.creates == []
    finally:
        await s.close()


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "file:///tmp/mlruns", "/var/mlruns"])
async def test_local_tracking_store_is_refused_in_cluster_mode(tmp_path: Path, uri: str) -> None:
    """Issue 14 item 5: a local MLflow store cannot be shared by the operator and the pods; the
    run fails as InvalidSpec naming spec.tracking.uri before anything is created."""
    s = Setup(tmp_path, tracking={"uri": uri})
    s.start()
    try:
        await s.wait(lambda: s.failed() is not None)
        failed = s.failed()
        assert failed is not None and failed["reason"] == "InvalidSpec"
        assert (
            failed["message"].startswith("spec.tracking.uri: ")
            and "share no file system" in failed["message"]
        )
        assert s.api.creates == []
        assert ("Warning", "InvalidSpec", failed["message"]) in s.events
    finally:
        await s.close()


async def test_local_operator_default_tracking_store_is_refused(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.controller.settings = replace(s.controller.settings, mlflow_uri="sqlite:////data/mlflow.db")
    s.start()
    try:
        await s.wait(lambda: s.failed() is not None)
        assert "SPIN_MLFLOW_URI" in s.failed()["message"]  # type: ignore[index]
    finally:
        await s.close()


async def test_api_warnings_become_events_on_the_run(tmp_path: Path) -> None:
    """A `Warning` header on the calls of a run's pass: one Warning event per distinct text."""
    s = Setup(tmp_path)
    s.api.warning = "spec.template.metadata.annotations[x]: deprecated"
    s.start()
    try:
        await s.wait(lambda: (s.api.run.get("status") or {}).get("phase") == "Running")
        warned = [e for e in s.events if e[1] == "ApiWarning"]
        assert len(warned) == 1 and warned[0][2].endswith(s.api.warning), s.events
    finally:
        await s.close()


async def test_touching_the_run_retries_a_refused_start(tmp_path: Path) -> None:
    """After the cause is fixed (RBAC granted again), an annotation on the run re-checks it; the
    operator's own writes (status, applied-spec annotation) do not send the refused call again."""
    granted = [False]
    s = Setup(
        tmp_path,
        lambda path, body, dry: None if granted[0] else ApiError(403, "Forbidden", FORBIDDEN),
    )
    s.start()
    try:
        await s.wait(lambda: s.failed() is not None)
        s.feed()  # the watch event of the operator's own status patch
        await asyncio.sleep(0.5)
        assert len(s.api.creates) == 1, s.api.creates
        granted[0] = True
        s.api.run["metadata"].setdefault("annotations", {})["selfplay.dev/recheck"] = "1"
        s.feed()
        await s.wait(lambda: (s.api.run.get("status") or {}).get("phase") == "Running")
        assert any(n == job_name(NAME, 0, "check") and not d for n, d, _ in s.api.creates)
    finally:
        await s.close()


async def test_a_step_that_cannot_be_rendered_fails_as_invalid_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ValueError from laying out or rendering a step (a URI the layout refuses) fails the run
    as InvalidSpec with the cause, instead of an exception and a retry on every pass."""
    import spin_operator.apply as apply

    real = apply.plan_step

    def plan_step(spec: Any, settings: Any, run: Any, t: int, kind: str, *rest: Any) -> Any:
        if kind == "evaluate":
            raise ValueError("malformed S3 URI 's3://bkt//x': empty, '.' or '..' path segment")
        return real(spec, settings, run, t, kind, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(apply, "plan_step", plan_step)
    s = Setup(tmp_path)
    s.start()
    try:
        await s.wait(lambda: s.failed() is not None)
        failed = s.failed()
        assert failed is not None and failed["reason"] == "InvalidSpec"
        assert failed["message"].startswith("evaluate of iteration 0: malformed S3 URI"), failed
        assert not any(not d for _, d, _ in s.api.creates)
    finally:
        await s.close()
