"""The operator's MLflow bookkeeping, off the event loop and never in the way of reconciling.

`spin_common.tracking.Tracker` does the idempotent MLflow calls (found again by tags after a
restart). Here they run in a worker thread with a deadline; after a failure, calls to that
tracking URI are skipped for a cool-down, so an MLflow outage costs one timeout, not one per
reconcile. Every method returns None/False instead of raising.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from spin_operator.api import types as api
from spin_operator.conditions import resolve_metric
from spin_operator.decision import Action, FinishTracking, ReplaySpool
from spin_operator.policy import registered_model
from spin_operator.steps import RunRef, layout_of

log = logging.getLogger(__name__)
T = TypeVar("T")
# `endpoints.StoragePools.run`: `fn(spec, *args)` in the run's storage pool, within its budget
InStorage = Callable[..., Awaitable[Any]]


class Tracking:
    def __init__(self, timeout: float = 20.0, cooldown: float = 60.0) -> None:
        self.timeout = timeout
        self.cooldown = cooldown
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="spin-mlflow"
        )
        self._trackers: dict[str, Any] = {}
        self._down_until: dict[str, float] = {}
        self._refused: dict[str, str] = {}  # URI -> why MLflow refused the operator's credentials
        # called with the URI when MLflow answers again after a failure (the controller then
        # retries at once what waits for MLflow, instead of at each run's backoff)
        self.on_recovered: Callable[[str], None] | None = None

    def _tracker(self, uri: str) -> Any:
        if uri not in self._trackers:
            from spin_common.tracking import Tracker, TrackingPolicy  # mlflow: only when used

            # one try per call: the next reconcile pass (after the cool-down) is the retry
            self._trackers[uri] = Tracker(uri, TrackingPolicy(attempts=1))
        return self._trackers[uri]

    async def _call(self, uri: str, what: str, fn: Callable[[Any], T]) -> T | None:
        if time.monotonic() < self._down_until.get(uri, 0.0):
            return None
        loop = asyncio.get_running_loop()

        def call() -> tuple[T, str | None]:
            from spin_common.runlog import credentials_refused

            tracker = self._tracker(uri)
            out = fn(tracker)
            return out, credentials_refused(tracker.last_error)

        refused = None
        try:
            result, refused = await asyncio.wait_for(
                loop.run_in_executor(self._pool, call), self.timeout
            )
        except Exception as exc:  # ImportError, timeouts, anything MLflow throws
            log.warning(
                "MLflow %s failed (%s); tracking skipped for %.0fs", what, exc, self.cooldown
            )
            result = None
        if refused is not None:
            if self._refused.get(uri) != refused:
                log.warning("MLflow at %s refused the operator's credentials (%s)", uri, refused)
            self._refused[uri] = refused
        elif result is not None and result is not False:
            self._refused.pop(uri, None)
        if result is None or result is False:
            self._down_until[uri] = time.monotonic() + self.cooldown
        elif self._down_until.pop(uri, None) is not None and self.on_recovered is not None:
            self.on_recovered(uri)
        return result

    def refused(self, uri: str | None) -> str | None:
        """Why MLflow at `uri` refused the operator's credentials on the last try (None: it did not)."""
        return self._refused.get(uri or "")

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
        self,
        spec: api.SPINRunSpec,
        spools: dict[int, str],
        run_ids: frozenset[str] | None = None,
        in_storage: InStorage | None = None,
    ) -> dict[int, int] | None:
        """Send what Jobs spooled during an MLflow outage; returns the calls still undelivered
        per key of `spools`, None when the replay could not run (MLflow or storage unreachable).

        Storage (reading the spool files, then deleting or trimming them) goes through
        `in_storage`, the controller's per-endpoint pool and budget (endpoints.py); only the
        MLflow calls run in the MLflow pool, so a hanging store never holds an MLflow worker."""
        uri = spec.tracking.uri
        if not uri or not spools:
            return {}
        if time.monotonic() < self._down_until.get(uri, 0.0):
            return None  # MLflow cools down: do not read storage for nothing
        store = in_storage or _in_thread
        try:
            files = {
                k: await store(_read_spool, spec, spool, run_ids) for k, spool in spools.items()
            }
        except OSError as exc:
            log.warning("spooled MLflow calls not read: %s", exc)
            return None

        def send(t: Any) -> dict[int, list[int]]:
            from spin_common.runlog import send_ops

            sent: dict[int, list[int]] = {}
            for key, entries in files.items():
                sent[key], stop = [], False
                for _path, ops in entries:  # in order: after a file MLflow did not take, none
                    done = 0 if stop else send_ops(t.client, t.policy, ops)
                    stop = stop or done < len(ops)
                    sent[key].append(done)
            return sent

        sent = await self._call(uri, "replay spooled calls", send)
        if sent is None:
            return None
        remaining: dict[int, int] = {}
        for key, entries in files.items():
            remaining[key] = 0
            for (path, ops), done in zip(entries, sent[key], strict=True):
                remaining[key] += len(ops) - done
                if done or not ops:
                    try:
                        await store(_settle_spool, spec, path, ops, done)
                    except OSError as exc:  # delivered calls stay spooled: sent again later
                        log.warning("spool %s not trimmed after replay: %s", path, exc)
        if any(remaining.values()):  # MLflow did not take the backlog: cool down
            self._down_until[uri] = time.monotonic() + self.cooldown
        return remaining

    async def settle(
        self,
        spec: api.SPINRunSpec,
        run: RunRef,
        status: api.SPINRunStatus,
        actions: list[Action],
        in_storage: InStorage | None = None,
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
            spec, {t: layout.iteration(t).tracking_spool for t in sorted(wanted)}, own, in_storage
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


def _read_spool(
    spec: api.SPINRunSpec, spool: str, run_ids: frozenset[str] | None
) -> list[tuple[str, list[dict[str, Any]]]]:
    from spin_common.runlog import read_spool
    from spin_operator.endpoints import at_endpoint

    with at_endpoint(spec):
        return read_spool(spool, run_ids)


def _settle_spool(spec: api.SPINRunSpec, path: str, ops: list[dict[str, Any]], done: int) -> None:
    from spin_common.runlog import settle_spool_file
    from spin_operator.endpoints import at_endpoint

    with at_endpoint(spec):
        settle_spool_file(path, ops, done)


async def _in_thread(fn: Callable[..., T], spec: api.SPINRunSpec, *args: Any) -> T:
    """Storage without a controller (local mode, tests): a plain worker thread."""
    return await asyncio.to_thread(fn, spec, *args)
