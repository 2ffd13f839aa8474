"""MLflow for local runs: the operator's own `Tracking` calls (awaited on the local run's event
loop), plus what a local run adds (datasets as run inputs, the control arm's held-out metrics on
the parent run).

Tracking never fails or stalls a run (the same contract as the operator's): every call returns
None/False on failure, and after one failure the URI is skipped for a cool-down.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from spin_operator.api import types as api
from spin_operator.decision import Action
from spin_operator.steps import RunRef
from spin_operator.track import Tracking

log = logging.getLogger(__name__)


class LocalTracking:
    def __init__(self, spec: api.SPINRunSpec, run: RunRef, timeout: float = 60.0) -> None:
        self.spec = spec
        self.run = run
        self.uri = spec.tracking.uri
        self.tracking = Tracking(timeout=timeout)
        self._tracker: Any = None
        self._logged: set[tuple[str, str]] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.uri)

    def tracker(self) -> Any:
        """A direct `spin_common.tracking.Tracker` for the calls `Tracking` does not wrap."""
        if self._tracker is None and self.uri:
            from spin_common.tracking import Tracker

            self._tracker = Tracker(self.uri)
            quiet_mlflow()
        return self._tracker

    def prepare(self) -> None:
        """With an sqlite store, create the experiment with its artifacts beside the database
        (MLflow's default would be ./mlruns in whatever directory the command ran from)."""
        if not self.uri or not self.uri.startswith("sqlite:///"):
            return
        import mlflow  # noqa: F401  # configures its loggers on import: quiet them afterwards

        quiet_mlflow()
        name = self.spec.tracking.experiment or self.run.namespace
        folder = os.path.join(
            os.path.dirname(os.path.abspath(self.uri.removeprefix("sqlite:///"))), "mlartifacts"
        )
        try:
            client = self.tracker().client
            if client.get_experiment_by_name(name) is None:
                client.create_experiment(name, artifact_location=folder)
        except Exception as exc:  # tracking never fails a run
            log.warning("MLflow experiment %s not prepared: %s", name, exc)

    async def ensure_parent(self) -> api.MlflowStatus | None:
        return await self.tracking.ensure_parent(self.spec, self.run)

    async def ensure_iteration(self, parent: str, t: int) -> str | None:
        return await self.tracking.ensure_iteration(self.spec, parent, t, self.run)

    async def register(
        self, run_id: str, t: int, model_uri: str, metrics: dict[str, float]
    ) -> str | None:
        return await self.tracking.register(self.spec, self.run, run_id, t, model_uri, metrics)

    async def log_heldout(self, parent: str, t: int, metrics: dict[str, float]) -> bool:
        return await self.tracking.log_heldout(self.spec, parent, t, metrics)

    async def settle(self, status: api.SPINRunStatus, actions: list[Action]) -> bool:
        """Spool replays and run ends the decision asks for, as the operator's `Tracking.settle`:
        confirmed ones go into `status.mlflow`; False while MLflow has not confirmed them all."""
        return await self.tracking.settle(self.spec, self.run, status, actions)

    def log_dataset(
        self,
        run_id: str,
        name: str,
        uri: str,
        digest: str,
        context: str,
        profile: Mapping[str, Any] | None = None,
    ) -> None:
        key = (run_id, name)
        if key in self._logged:
            return
        try:
            if self.tracker().log_dataset(
                run_id, name, uri, digest, context=context, profile=profile
            ):
                self._logged.add(key)
        except Exception as exc:
            log.warning("MLflow dataset %s not logged: %s", name, exc)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        try:
            self.tracker().log_metrics(run_id, dict(metrics), step=step)
        except Exception as exc:
            log.warning("MLflow metrics not logged: %s", exc)

    def close(self) -> None:
        self.tracking.close()


def quiet_mlflow() -> None:
    """MLflow logs database migrations and such at INFO on its own handler: not for a terminal
    (unless spinctl runs with --log-level INFO or lower)."""
    logging.getLogger("mlflow").setLevel(max(logging.WARNING, logging.getLogger().level))


def file_digest(uri: str) -> str:
    """sha256 of a dataset (local or s3://; one file, or every shard a directory, glob or name
    prefix names, in reading order, with their names), as its identity in MLflow."""
    from spin_common.data import data_files

    files = data_files(uri)
    if files == [uri]:
        return _one_file_digest(uri)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.rsplit('/', 1)[-1]}\0{_one_file_digest(file)}\n".encode())
    return digest.hexdigest()


def _one_file_digest(uri: str) -> str:
    from spin_common import storage

    if storage.is_s3(uri):
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    digest = hashlib.sha256()
    with open(storage.local_path(uri), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
