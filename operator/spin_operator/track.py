"""The operator's MLflow bookkeeping, off the event loop and never in the way of reconciling.

`spin_runtime.tracking.Tracker` does the idempotent MLflow calls (found again by tags after a
restart). Here they run in a worker thread with a deadline; after a failure, calls to that
tracking URI are skipped for a cool-down, so an MLflow outage costs one timeout, not one per
reconcile. Every method returns None/False instead of raising.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from spin_operator.api import types as api
from spin_operator.conditions import resolve_metric
from spin_operator.decision import Action, FinishTracking, ReplaySpool
from spin_operator.policy import registered_model
from spin_operator.steps import RunRef, layout_of

log = logging.getLogger(__name__)
T = TypeVar("T")


class Tracking:
    def __init__(self, timeout: float = 20.0, cooldown: float = 60.0) -> None:
        self.timeout = timeout
        self.cooldown = cooldown
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="spin-mlflow"
        )
        self._trackers: dict[str, Any] = {}
        self._down_until: dict[str, float] = {}
        # called with the URI when MLflow answers again after a failure (the controller then
        # retries at once what waits for MLflow, instead of at each run's backoff)
        self.on_recovered: Callable[[str], None] | None = None

    def _tracker(self, uri: str) -> Any:
        if uri not in self._trackers:
            from spin_runtime.tracking import Tracker, TrackingPolicy  # mlflow: only when used

            # one try per call: the next reconcile pass (after the cool-down) is the retry
            self._trackers[uri] = Tracker(uri, TrackingPolicy(attempts=1))
        return self._trackers[uri]

    async def _call(self, uri: str, what: str, fn: Callable[[Any], T]) -> T | None:
        if time.monotonic() < self._down_until.get(uri, 0.0):
            return None
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(self._pool, lambda: fn(self._tracker(uri))), self.timeout
            )
        except Exception as exc:  # ImportError, timeouts, anything MLflow throws
            log.warning(
                "MLflow %s failed (%s); tracking skipped for %.0fs", what, exc, self.cooldown
            )
            result = None
        if result is None or result is False:
            self._down_until[uri] = time.monotonic() + self.cooldown
        elif self._down_until.pop(uri, None) is not None and self.on_recovered is not None:
            self.on_recovered(uri)
        return result

    def down_for(self, uri: str | None) -> float:
        """Seconds until calls to `uri` are tried again (0: now)."""
        return max(0.0, self._down_until.get(uri or "", 0.0) - time.monotonic())

    async def ensure_parent(self, spec: api.SPINRunSpec, run: RunRef) -> api.MlflowStatus | None:
        uri = spec.tracking.uri
        if not uri:
            return None
        experiment = spec.tracking.experiment or run.namespace

        def call(t: Any) -> api.MlflowStatus | None:
            exp_id = t.ensure_experiment(experiment)
            if exp_id is None:
                return None
            run_id = t.ensure_parent_run(
                experiment, run.namespace, run.name, run.uid, spec.to_wire()
            )
            if run_id is None:
                return None
            # MLflow 3's UI opens in GenAI mode unless the link (or the browser's last choice) says
            # model training; the experiment kind tag alone does not switch it (measured, 3.17).
            url = (
                f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"
                if uri.startswith("http")
                else None
            )
            return api.MlflowStatus(run_id=run_id, experiment_id=exp_id, url=url)

        return await self._call(uri, "ensure parent run", call)

    async def ensure_iteration(
        self, spec: api.SPINRunSpec, parent_run_id: str, iteration: int, run: RunRef | None = None
    ) -> str | None:
        uri = spec.tracking.uri
        if not uri:
            return None
        tr, g = spec.training, spec.generation
        params: dict[str, Any] = {
            "beta": tr.beta_for(iteration),
            "learning_rate": tr.learning_rate_for(iteration),
            "epochs": tr.epochs,
            "global_batch_size": tr.global_batch_size,
            "nodes": tr.nodes,
            "generation.replicas": g.replicas,
            "generation.temperature": g.temperature,
            "generation.top_p": g.top_p,
            "generation.top_k": g.top_k,
            "generation.max_new_tokens": g.max_new_tokens,
            "input_model": f"θ{iteration}",
            "output_model": f"θ{iteration + 1}",
        }
        if run is not None:  # where θt comes from, what it trains on, where θt+1 goes
            layout = layout_of(spec, run)
            params["model_uri"] = (
                spec.model.uri if iteration == 0 else layout.iteration(iteration - 1).model
            )
            params["data_uris"] = layout.training_data_for_iteration(
                iteration, tr.mix_previous_iterations
            )
            params["checkpoint_uri"] = layout.iteration(iteration).model
        return await self._call(
            uri,
            f"ensure iteration run {iteration}",
            lambda t: t.ensure_iteration_run(parent_run_id, iteration, params),
        )

    async def register(
        self,
        spec: api.SPINRunSpec,
        run: RunRef,
        run_id: str,
        iteration: int,
        model_uri: str,
        metrics: dict[str, float],
    ) -> str | None:
        uri = spec.tracking.uri
        if not uri:
            return None
        ev = spec.evaluation
        name = registered_model(
            spec, run.namespace, run.name
        )  # confined to the namespace (policy.py)
        return await self._call(
            uri,
            f"register iteration {iteration}",
            lambda t: t.register_iteration_model(
                name,
                run_id,
                iteration,
                model_uri,
                metrics=metrics,
                best_metric=resolve_metric(ev.metric, [metrics]) if ev.enabled else None,
                higher_is_better=ev.mode == "max",
            ),
        )

    async def log_heldout(
        self, spec: api.SPINRunSpec, parent_run_id: str, iteration: int, metrics: dict[str, float]
    ) -> bool:
        """θt+1's (and at iteration 0 θ0's) held-out results as the parent run's `heldout/*`."""
        uri = spec.tracking.uri
        if not uri or not metrics:
            return False
        return bool(
            await self._call(
                uri,
                f"log held-out results of iteration {iteration}",
                lambda t: t.log_heldout(parent_run_id, iteration, metrics),
            )
        )

    async def finish(self, spec: api.SPINRunSpec, run_id: str, status: str) -> bool:
        uri = spec.tracking.uri
        if not uri:
            return False
        return bool(await self._call(uri, "finish run", lambda t: t.finish_run(run_id, status)))

    async def log_inputs(
        self,
        spec: api.SPINRunSpec,
        run_id: str,
        datasets: list[tuple[str, str, str, str]],
        rows: api.DatasetStatus | None = None,
    ) -> bool:
        """Record (name, uri, digest, context) datasets as inputs of an MLflow run (idempotent).
        The SFT dataset's profile has the selection and, once known, its rows: read, usable,
        skipped (per reason as `skipped/<reason>`)."""
        uri = spec.tracking.uri
        if not uri or not datasets:
            return False
        d = spec.dataset
        profile: dict[str, Any] = {
            "maxSamples": d.max_samples,
            "evalSamples": d.eval_samples,
            "seed": d.seed,
        }
        if rows is not None:
            profile |= dataset_profile(rows)

        def call(t: Any) -> bool:
            return all(
                t.log_dataset(
                    run_id,
                    name,
                    src,
                    digest,
                    context=ctx,
                    profile=profile if ctx == "sft" else None,
                )
                for name, src, digest, ctx in datasets
            )

        return bool(await self._call(uri, "log dataset inputs", call))

    async def replay(
        self, spec: api.SPINRunSpec, spools: dict[int, str], run_ids: frozenset[str] | None = None
    ) -> dict[int, int] | None:
        """Send what Jobs spooled during an MLflow outage (`tracking.replay_spool`); returns the
        calls still undelivered per key of `spools`, None when the replay could not run (MLflow
        or storage unreachable). Storage is read with the run's endpoint (observe.storage_env)."""
        uri = spec.tracking.uri
        if not uri or not spools:
            return {}

        def call(_: Any) -> dict[int, int]:
            from spin_operator.observe import storage_env
            from spin_runtime.tracking import replay_spool

            with storage_env(spec):
                return {
                    key: replay_spool(spool, uri, run_ids=run_ids).remaining
                    for key, spool in spools.items()
                }

        remaining = await self._call(uri, "replay spooled calls", call)
        if remaining and any(remaining.values()):  # MLflow did not take the backlog: cool down
            self._down_until[uri] = time.monotonic() + self.cooldown
        return remaining

    async def settle(
        self, spec: api.SPINRunSpec, run: RunRef, status: api.SPINRunStatus, actions: list[Action]
    ) -> bool:
        """Carry out the decision's ReplaySpool/FinishTracking actions and record in `status.mlflow`
        what MLflow confirmed: ended run ids (`finished`) and the undelivered backlog
        (`spooledCalls`). True when nothing is left to ask MLflow for."""
        ml = status.mlflow
        ends = [a for a in actions if isinstance(a, FinishTracking)]
        wanted = {t for a in actions if isinstance(a, ReplaySpool) for t in a.iterations}
        wanted |= {a.iteration for a in ends if a.iteration is not None}
        if ml is None or not (wanted or ends) or not spec.tracking.uri:
            return True
        layout = layout_of(spec, run)
        # spools are written by the run's pods: replay only touches the MLflow runs of this status
        own = frozenset(r for r in (ml.run_id, *(i.mlflow_run_id for i in status.iterations)) if r)
        remaining = await self.replay(
            spec, {t: layout.iteration(t).tracking_spool for t in sorted(wanted)}, own
        )
        if remaining is None:  # not replayed (cool-down, storage): a known backlog stays as it was
            ml.spooled_calls = ml.spooled_calls or None
            return False
        ml.spooled_calls = sum(remaining.values())
        by_iter = {i.iteration: i.mlflow_run_id for i in status.iterations}
        settled = True
        # iterations first: the parent ends last, as the Jobs' runs nest under it
        for a in sorted(ends, key=lambda e: e.iteration is None):
            rid = ml.run_id if a.iteration is None else by_iter.get(a.iteration)
            if not rid or rid in ml.finished:
                continue
            if a.iteration is not None and remaining.get(a.iteration):
                settled = False  # never end a run before its spooled calls are in
                continue
            if await self.finish(spec, rid, a.status):
                ml.finished.append(rid)
            else:
                settled = False
        return settled and not ml.spooled_calls

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def dataset_profile(rows: api.DatasetStatus) -> dict[str, Any]:
    """status.dataset as MLflow dataset profile entries (flat: the UI shows them as a table)."""
    out: dict[str, Any] = {"rows": rows.rows, "usable": rows.usable, "skipped": rows.skipped}
    return out | {f"skipped/{reason}": n for reason, n in rows.skipped_by_reason.items()}
