"""The MLflow side of applying a decision (track.py makes the calls, off the event loop).

Before the Jobs of a decision are created, the MLflow run ids they need (MLFLOW_RUN_ID) are
ensured and written into the status; model registration and dataset inputs go in the
background and never hold up a pass. Run ends and spool replays are `Tracking.settle`'s, after
the status is written (apply.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from spin_operator import observe
from spin_operator.api import types as api
from spin_operator.decision import (
    CreateStep,
    Decision,
    EnsureIterationRun,
    EnsureParentRun,
    RegisterModel,
)
from spin_operator.endpoints import StoragePools
from spin_operator.steps import RunRef, layout_of
from spin_operator.track import Tracking

log = logging.getLogger(__name__)


class TrackingActions:
    def __init__(self, tracking: Tracking, storage: StoragePools) -> None:
        self.tracking = tracking
        self.storage = storage
        self.background: set[asyncio.Task[Any]] = set()  # registrations and inputs in flight

    async def ensure_ids(self, spec: api.SPINRunSpec, run: RunRef, d: Decision) -> None:
        """MLflow ids the Jobs of this decision need (MLFLOW_RUN_ID), written into the status."""
        wanted = [a.iteration for a in d.of_type(EnsureIterationRun)]
        new = d.status
        if not (d.of_type(EnsureParentRun) or wanted) or not spec.tracking.uri:
            return
        if new.mlflow is None or new.mlflow.run_id is None:
            new.mlflow = await self.tracking.ensure_parent(spec, run) or new.mlflow
        parent = new.mlflow.run_id if new.mlflow else None
        for t in wanted:
            it = next((i for i in new.iterations if i.iteration == t), None)
            if parent and it is not None and it.mlflow_run_id is None:
                it.mlflow_run_id = await self.tracking.ensure_iteration(spec, parent, t, run)

    def in_background(
        self, spec: api.SPINRunSpec, run: RunRef, status: api.SPINRunStatus, d: Decision
    ) -> None:
        """Model registration and dataset inputs: in the background, never holding up the pass."""
        actions = d.of_type(RegisterModel)
        trains = [
            a.iteration for a in d.of_type(CreateStep) if a.stage == "train" and a.attempt == 0
        ]
        if not (actions or trains) or not spec.tracking.uri:
            return
        parent = status.mlflow.run_id if status.mlflow else None
        by_iter = {i.iteration: i.mlflow_run_id for i in status.iterations}

        async def send() -> None:
            for t in trains:
                rid = by_iter.get(t)
                if rid:
                    await self._log_inputs(spec, run, rid, t, status.dataset)
            for a in actions:
                rid = by_iter.get(a.iteration) or (
                    parent and await self.tracking.ensure_iteration(spec, parent, a.iteration, run)
                )
                if rid:
                    await self.tracking.register(
                        spec, run, rid, a.iteration, a.model_uri, dict(a.metrics)
                    )
                if parent:  # one chart per metric over θ0…θN on the parent (docs/mlflow.md)
                    await self.tracking.log_heldout(spec, parent, a.iteration, dict(a.metrics))

        task = asyncio.create_task(send())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _log_inputs(
        self,
        spec: api.SPINRunSpec,
        run: RunRef,
        run_id: str,
        t: int,
        rows: api.DatasetStatus | None = None,
    ) -> None:
        """What iteration t trains on, as dataset inputs of its MLflow run: the generated data
        (digest: the union of the shard manifests) and the SFT dataset (digest of its URI and
        selection; the operator never downloads the dataset to hash its content)."""
        d = spec.dataset
        selection = f"{d.uri}|seed={d.seed}|max={d.max_samples}|eval={d.eval_samples}"
        datasets = [("sft", d.uri, hashlib.sha256(selection.encode()).hexdigest(), "sft")]
        for uri in layout_of(spec, run).training_data_for_iteration(
            t, spec.training.mix_previous_iterations
        ):
            try:
                digest = await self.storage.run(observe.generated_digest, spec, uri)
            except OSError as exc:  # IncompleteArtifactError included: nothing to record
                log.debug("no digest for %s: %s", uri, exc)
                continue
            name = uri.rstrip("/").split("/")[-2] + "/generated"
            datasets.append((name, uri, digest, "training"))
        await self.tracking.log_inputs(spec, run_id, datasets, rows)
