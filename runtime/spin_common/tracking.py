"""MLflow lineage for SPIN runs; tracking never fails (or stalls) the workload.

Shape in MLflow (see docs/mlflow.md):

* one parent run per SPINRun, found again by its tags (``spin.namespace``, ``spin.name``,
  ``spin.uid``), with the redacted spec as the artifact ``spinrun.yaml``;
* one nested run per iteration (tag ``spin.iteration``) with its params, metric histories and
  dataset inputs (the SFT dataset and generated data, with S3 source URI and manifest digest);
* one model version per iteration, aliases ``iter-N``, ``latest-iter`` and ``best``. (MLflow
  reserves the alias ``latest``; ``models:/<name>/latest`` already means the newest version.)

Idempotence: every ``ensure_*``/``register_*`` looks up before it creates, inside the retried
call, so an operator restart or a lost response never creates a duplicate.

Availability: calls retry with bounded backoff (:class:`TrackingPolicy`), and MLflow's own
HTTP retries are made short (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT`` defaults) so an
outage costs seconds, not minutes. :class:`RunLogger` (used inside Jobs through
``MLFLOW_TRACKING_URI``/``MLFLOW_RUN_ID``) buffers what it could not send, and ``flush()`` writes
what is still undelivered to a JSONL spool file that :func:`replay_spool` sends later.
Everything is scrubbed by :func:`spin_common.redaction.redact` first. Only ``MlflowClient``
with explicit run ids is used (no fluent active-run state), so threads can share it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from spin_common.redaction import redact, redact_text
from spin_common.runlog import (
    ReplayResult,
    RunLogger,
    TrackingPolicy,
    call_with_retry,
    dataset_entity,
    replay_spool,
)

__all__ = [
    "BEST_ALIAS",
    "LATEST_ALIAS",
    "ReplayResult",
    "RunLogger",
    "Tracker",
    "TrackingPolicy",
    "dataset_entity",
    "from_env_logger",
    "replay_spool",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

LATEST_ALIAS = "latest-iter"
BEST_ALIAS = "best"
SPEC_ARTIFACT = "spinrun.yaml"
TAG_NS, TAG_NAME, TAG_UID = "spin.namespace", "spin.name", "spin.uid"
TAG_ROLE, TAG_ITER, TAG_PARENT = "spin.role", "spin.iteration", "mlflow.parentRunId"
METRIC_TAG_PREFIX = "spin.metric."
# The parent run's per-model series (log_heldout); the evaluation's results.json names θ0's
# numbers `baseline`, the operator's status `baseline/<k>`.
HELDOUT_PREFIX, BASELINE_PREFIX = "heldout/", "baseline/"
HELDOUT_METRICS = ("score", "exact_match", "real_logp_per_token")
TAG_MODEL, TAG_FROM = "spin.model", "spin.trained_from"
# MLflow 3's UI opens an experiment in GenAI mode unless told it holds model training.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# Spec sections whose scalar settings become the parent run's params (`training.beta`, ...).
PARAM_SECTIONS = ("model", "dataset", "generation", "training", "evaluation", "stopping")
PARAM_SKIP = ("resources", "image", "command")


def parent_run_params(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The SPINRun's settings as flat params (`iterations`, `training.learning_rate`, ...):
    scalars and short lists of the sections that decide what is trained, not where it runs."""
    out: dict[str, Any] = {"iterations": spec.get("iterations")}
    for section in PARAM_SECTIONS:
        for key, value in (spec.get(section) or {}).items():
            if key in PARAM_SKIP or isinstance(value, dict):
                continue
            out[f"{section}.{key}"] = value
    return {k: v for k, v in out.items() if v is not None}


def parent_run_tags(namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, str]:
    """The run's description (`mlflow.note.content`) and source, shown on the run page."""
    model, data = spec.get("model") or {}, spec.get("dataset") or {}
    note = (
        f"SPINRun {namespace}/{name}: {spec.get('iterations')} SPIN iteration(s) from "
        f"{model.get('uri')} (θ0) on {data.get('uri')}. Iteration t trains θt into θt+1; "
        "each nested run iter-00t holds one iteration, the registered model one version per θ."
    )
    return {
        "mlflow.note.content": note,
        "mlflow.source.name": f"spin-operator SPINRun {namespace}/{name}",
        "mlflow.source.type": "JOB",
    }


def theta(k: int) -> str:
    """Model k's name: θ0 is the base model, θt+1 the output of iteration t."""
    return f"θ{k}"


def model_alias(k: int) -> str:
    """The registry alias of θk (k >= 1): `theta-2` is θ2, the output of iteration 1."""
    return f"theta-{k}"


def _quote(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"value {value!r} cannot be used in an MLflow search filter")
    return f"'{value}'"


def _filter(**tags: str) -> str:
    return " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]


class Tracker:
    """Operator-side MLflow bookkeeping. Every method returns None/False instead of raising
    when MLflow stays unreachable, so the reconciler simply tries again on its next pass."""

    def __init__(self, tracking_uri: str, policy: TrackingPolicy | None = None) -> None:
        TrackingPolicy.configure_mlflow_http()
        self.tracking_uri = tracking_uri
        self.policy = policy or TrackingPolicy.from_env()
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        # the last call's failure, per thread (the operator calls from a small pool): lets the
        # caller tell refused credentials from an outage without parsing logs
        self._last = threading.local()

    @property
    def last_error(self) -> Exception | None:
        """What the last call of this thread failed with (None: it succeeded)."""
        return getattr(self._last, "error", None)

    def _safe(self, what: str, fn: Callable[[], T]) -> T | None:
        self._last.error = None
        try:
            return call_with_retry(self.policy, what, fn)
        except Exception as exc:
            self._last.error = exc
            log.warning("MLflow %s failed, will retry later: %s", what, redact_text(str(exc)))
            return None

    # ------------------------------------------------------------ runs

    def ensure_experiment(self, name: str) -> str | None:
        def find_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if EXPERIMENT_KIND_TAG not in exp.tags:  # leave a kind someone chose alone
                    self.client.set_experiment_tag(
                        exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING
                    )
                return str(exp.experiment_id)
            try:
                return str(
                    self.client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
                )
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)
                assert exp is not None
                return str(exp.experiment_id)

        return self._safe(f"ensure experiment {name}", find_or_create)

    def _find_run(self, experiment_id: str, **tags: str) -> str | None:
        runs = self.client.search_runs(
            [experiment_id], _filter(**tags), order_by=["attributes.start_time ASC"], max_results=5
        )
        return runs[0].info.run_id if runs else None

    def ensure_parent_run(
        self, experiment: str, namespace: str, name: str, uid: str, spec: Mapping[str, Any]
    ) -> str | None:
        """The SPINRun's parent run (created once, with the redacted spec as an artifact)."""
        exp_id = self.ensure_experiment(experiment)
        if exp_id is None:
            return None
        tags = {TAG_NS: namespace, TAG_NAME: name, TAG_UID: uid, TAG_ROLE: "spinrun"}

        def find_or_create() -> str:
            run_id = self._find_run(exp_id, **tags)
            if run_id is None:
                described = {**tags, **parent_run_tags(namespace, name, spec)}
                run = self.client.create_run(exp_id, tags=redact(described), run_name=name)
                run_id = run.info.run_id
            # Params make SPINRuns comparable in the runs table (logged once; immutable).
            self._log_new_params(run_id, parent_run_params(spec))
            names = {a.path for a in self.client.list_artifacts(run_id)}
            if SPEC_ARTIFACT not in names:  # also heals a crash between create and upload
                text = yaml.safe_dump(redact(dict(spec)), sort_keys=False)
                self.client.log_text(run_id, text, SPEC_ARTIFACT)
            return run_id

        return self._safe(f"ensure parent run {namespace}/{name}", find_or_create)

    def ensure_iteration_run(
        self, parent_run_id: str, iteration: int, params: Mapping[str, Any] | None = None
    ) -> str | None:
        """The nested run of ``iteration`` under ``parent_run_id`` (params logged once)."""

        def find_or_create() -> str:
            parent = self.client.get_run(parent_run_id)
            exp_id = parent.info.experiment_id
            tags = {TAG_PARENT: parent_run_id, TAG_ROLE: "iteration", TAG_ITER: str(iteration)}
            run_id = self._find_run(exp_id, **tags)
            if run_id is None:
                inherited = {k: v for k, v in parent.data.tags.items() if k.startswith("spin.")}
                all_tags = {**inherited, **tags, TAG_ROLE: "iteration"}
                run = self.client.create_run(
                    exp_id, tags=redact(all_tags), run_name=f"iter-{iteration:03d}"
                )
                run_id = run.info.run_id
            self._log_new_params(run_id, {"iteration": iteration, **dict(params or {})})
            return run_id

        return self._safe(f"ensure iteration run {iteration}", find_or_create)

    def _log_new_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        existing = self.client.get_run(run_id).data.params
        clean = {k: _param_value(v) for k, v in redact(dict(params)).items()}
        for key, value in clean.items():
            if key in existing and existing[key] != value:
                log.warning(
                    "MLflow param %s of run %s is immutable; keeping old value", key, run_id
                )
        new = [Param(k, v) for k, v in clean.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> bool:
        batch = [RunTag(k, _param_value(v)) for k, v in redact(dict(tags)).items()]
        return self._log_batch("set tags", run_id, tags=batch)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> bool:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        return self._log_batch("log metrics", run_id, metrics=batch)

    def log_heldout(self, parent_run_id: str, iteration: int, metrics: Mapping[str, float]) -> bool:
        """The parent run's ``heldout/*`` series: one point per model on the held-out prompts,
        step = the model's index (θ0 at step 0 from iteration 0's ``baseline/<k>``, θt+1 at
        step t+1), so one chart per metric shows the whole run and θ0 costs no panel of its own.
        Once per step: a repeat (operator restart, replayed decision) finds the point and stops."""
        points: dict[int, dict[str, float]] = {iteration + 1: {}, 0: {}}
        for key, value in metrics.items():
            name, base = key.removeprefix(BASELINE_PREFIX), key.startswith(BASELINE_PREFIX)
            if name in HELDOUT_METRICS and (not base or iteration == 0):
                points[0 if base else iteration + 1][f"{HELDOUT_PREFIX}{name}"] = float(value)

        def send() -> bool:
            now = int(time.time() * 1000)
            for step, values in points.items():
                if not values:
                    continue
                probe = next(iter(values))
                if any(
                    m.step == step for m in self.client.get_metric_history(parent_run_id, probe)
                ):
                    continue
                batch = [Metric(k, v, now, step) for k, v in values.items()]
                self.client.log_batch(parent_run_id, metrics=batch)
            return True

        return bool(self._safe(f"log held-out results of iteration {iteration}", send))

    def _log_batch(self, what: str, run_id: str, **batch: Any) -> bool:
        def send() -> bool:
            self.client.log_batch(run_id, **batch)
            return True

        return bool(self._safe(what, send))

    def log_dataset(
        self,
        run_id: str,
        name: str,
        uri: str,
        digest: str,
        context: str = "training",
        profile: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record a dataset (SFT data, generated shards) as an input of a run; re-logging the
        same name+digest is a no-op in MLflow."""
        entity = dataset_entity(name, uri, digest, profile)
        ds_input = DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])

        def log_input() -> bool:
            self.client.log_inputs(run_id, datasets=[ds_input])
            return True

        return bool(self._safe(f"log dataset {name}", log_input))

    def finish_run(self, run_id: str, status: str = "FINISHED") -> bool:
        def finish() -> bool:
            self.client.set_terminated(run_id, status=status)
            return True

        return bool(self._safe("finish run", finish))

    def logger(self, run_id: str, spool_dir: str | None = None) -> RunLogger:
        return RunLogger(run_id, self.tracking_uri, spool_dir=spool_dir, policy=self.policy)

    # ------------------------------------------------------------ model registry

    def register_iteration_model(
        self,
        model_name: str,
        run_id: str,
        iteration: int,
        source_uri: str,
        metrics: Mapping[str, float] | None = None,
        best_metric: str | None = None,
        higher_is_better: bool = True,
    ) -> str | None:
        """Register θt+1 of ``iteration`` once (found again by run id), tag it with its metrics,
        and move the ``iter-N``, ``latest-iter`` and ``best`` aliases. Returns the version."""

        def register() -> str:
            self._ensure_registered_model(model_name)
            found = self.client.search_model_versions(
                f"name = {_quote(model_name)} and run_id = {_quote(run_id)}"
            )
            run_tags = self.client.get_run(run_id).data.tags
            if found:
                version = min(found, key=lambda v: int(v.version))
            else:
                tags = {k: v for k, v in run_tags.items() if k.startswith("spin.")}
                tags[TAG_ITER] = str(iteration)
                # One numbering (docs/mlflow.md): iteration t trains θt into θt+1.
                tags[TAG_MODEL], tags[TAG_FROM] = theta(iteration + 1), theta(iteration)
                version = self.client.create_model_version(
                    model_name,
                    redact_text(source_uri),
                    run_id=run_id,
                    tags=redact(tags),
                    await_creation_for=0,
                    description=self._lineage(model_name, run_tags.get(TAG_UID), iteration),
                )
            for key, value in (metrics or {}).items():
                tag = f"{METRIC_TAG_PREFIX}{key}"
                self.client.set_model_version_tag(model_name, version.version, tag, str(value))
            self.client.set_registered_model_alias(
                model_name, model_alias(iteration + 1), version.version
            )
            self._move_aliases(model_name, run_tags.get(TAG_UID), best_metric, higher_is_better)
            return str(version.version)

        return self._safe(f"register {model_name} iteration {iteration}", register)

    def _lineage(self, name: str, uid: str | None, iteration: int) -> str:
        """θt+1's description: which iteration made it and from which version (θ0 is the base
        model, not a registered version)."""
        text = f"{theta(iteration + 1)}: trained in iteration {iteration} from {theta(iteration)}"
        if iteration == 0:
            return text + " (the base model)"
        for v in self.client.search_model_versions(f"name = {_quote(name)}"):
            if v.tags.get(TAG_ITER) == str(iteration - 1) and (
                uid is None or v.tags.get(TAG_UID) == uid
            ):
                return text + f" (version {v.version})"
        return text

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _move_aliases(
        self, name: str, uid: str | None, best_metric: str | None, higher_is_better: bool
    ) -> None:
        """``latest-iter``: highest iteration; ``best``: best ``best_metric`` (earliest on ties),
        both among this SPINRun's versions only."""
        versions = [
            v
            for v in self.client.search_model_versions(f"name = {_quote(name)}")
            if uid is None or v.tags.get(TAG_UID) == uid
        ]
        if not versions:
            return
        by_iter = sorted(versions, key=lambda v: int(v.tags.get(TAG_ITER, "-1")))
        self.client.set_registered_model_alias(name, LATEST_ALIAS, by_iter[-1].version)
        if not best_metric:
            return
        scored = [
            (float(v.tags[f"{METRIC_TAG_PREFIX}{best_metric}"]), v)
            for v in by_iter
            if f"{METRIC_TAG_PREFIX}{best_metric}" in v.tags
        ]
        if scored:
            sign = 1.0 if higher_is_better else -1.0
            best = max(scored, key=lambda sv: (sign * sv[0], -int(sv[1].tags[TAG_ITER])))[1]
            self.client.set_registered_model_alias(name, BEST_ALIAS, best.version)


def from_env_logger(spool_dir: str | None = None) -> RunLogger:
    """The logger a runtime process uses: ``MLFLOW_TRACKING_URI`` + ``MLFLOW_RUN_ID`` from the
    Job's environment; a disabled (no-op) logger when either is missing."""
    return RunLogger.from_env(spool_dir=spool_dir)
