"""The runtime side of tracking: a logger that never fails or stalls the job it runs in.

A training Job must not die, or wait minutes, because MLflow is restarting. So:

* calls are buffered and sent in batches (``log_batch``) at most every ``flush_interval`` s;
* a send retries transient errors with bounded backoff; if MLflow stays down, the logger stops
  trying for ``cooldown`` s and keeps buffering (so each step costs nothing);
* ``flush()`` (at the end of the job) tries once more and otherwise writes what is left to a
  JSONL *spool* file (local or ``s3://``, e.g. beside the job's artifacts) and logs a warning
  naming it; :func:`replay_spool` sends spooled calls later, keeping their original timestamps,
  and deletes the file once everything is delivered.

A permanent error (e.g. changing an immutable param) drops just that call, with a warning.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from spin_common import storage
from spin_common.redaction import redact, redact_text

log = logging.getLogger(__name__)
T = TypeVar("T")
Op = dict[str, Any]  # JSON-serialisable: {"op": metrics|params|tags|dataset, "run": id, ...}
_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}


@dataclass(frozen=True)
class TrackingPolicy:
    attempts: int = 3  # per send, transient errors only
    base_delay: float = 0.5
    max_delay: float = 5.0
    cooldown: float = 30.0  # after a failed send, only buffer for this long
    flush_interval: float = 5.0  # batch window for log_* calls
    max_buffered: int = 100_000  # metric values held before spilling to the spool early

    @classmethod
    def from_env(cls) -> TrackingPolicy:
        env = os.environ
        return cls(
            attempts=int(env.get("SPIN_TRACKING_RETRY_ATTEMPTS", cls.attempts)),
            base_delay=float(env.get("SPIN_TRACKING_RETRY_BASE_DELAY", cls.base_delay)),
            max_delay=float(env.get("SPIN_TRACKING_RETRY_MAX_DELAY", cls.max_delay)),
            cooldown=float(env.get("SPIN_TRACKING_COOLDOWN", cls.cooldown)),
            flush_interval=float(env.get("SPIN_TRACKING_FLUSH_INTERVAL", cls.flush_interval)),
        )

    @staticmethod
    def configure_mlflow_http(max_retries: int = 0, timeout: int = 15) -> None:
        """Short MLflow HTTP retries/timeouts (defaults: 7 retries, 120 s) unless the user set
        them: our own bounded retry sits above, and an outage must cost seconds."""
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))


def is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts, 5xx and 429 are worth retrying; other errors are not."""
    import requests

    if isinstance(exc, requests.exceptions.RequestException | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return False


def call_with_retry(policy: TrackingPolicy, what: str, fn: Callable[[], T]) -> T:
    for attempt in range(1, max(1, policy.attempts) + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= policy.attempts or not is_transient(exc):
                raise
            delay = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
            delay *= random.uniform(0.5, 1.0)
            log.info("MLflow %s failed (%s); retry in %.2fs", what, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def dataset_entity(
    name: str, uri: str, digest: str, profile: Mapping[str, Any] | None = None
) -> Dataset:
    """An MLflow dataset record (``mlflow.data`` MetaDataset with an s3/local source) for
    ``uri``. MLflow caps digests at 36 chars; the full sha256 goes into the profile."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    clean_uri = redact_text(uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(clean_uri)
    except Exception:  # e.g. a hub id: no registered source type
        source = HTTPDatasetSource(url=clean_uri)
    meta = MetaDataset(source=source, name=name, digest=digest[:36])  # type: ignore[abstract]
    entity = meta._to_mlflow_entity()
    full_profile = {"sha256": digest, "uri": clean_uri, **redact(dict(profile or {}))}
    return Dataset(
        name=entity.name,
        digest=entity.digest,
        source_type=entity.source_type,
        source=entity.source,
        schema=entity.schema,
        profile=json.dumps(full_profile, sort_keys=True),
    )


def _send_one_batch(client: MlflowClient, ops: list[Op]) -> None:
    kind, run_id = ops[0]["op"], ops[0]["run"]
    if kind == "dataset":
        inputs = [
            DatasetInput(
                dataset_entity(o["name"], o["uri"], o["digest"], o.get("profile")),
                tags=[InputTag("mlflow.data.context", o.get("context", "training"))],
            )
            for o in ops
        ]
        client.log_inputs(run_id, datasets=inputs)
        return
    items = [item for o in ops for item in o["items"]]
    if kind == "metrics":
        client.log_batch(
            run_id, metrics=[Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in items]
        )
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in items])
    else:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in items])


def _batches(ops: list[Op]) -> list[tuple[int, int]]:
    """Greedy [start, end) ranges of consecutive same-kind, same-run ops within MLflow limits."""
    ranges: list[tuple[int, int]] = []
    start = 0
    while start < len(ops):
        end, count = start, 0
        kind, run = ops[start]["op"], ops[start]["run"]
        limit = _LIMITS.get(kind, 50)
        while end < len(ops) and ops[end]["op"] == kind and ops[end]["run"] == run:
            size = len(ops[end].get("items", [None]))
            if end > start and count + size > limit:
                break
            count += size
            end += 1
        ranges.append((start, end))
        start = end
    return ranges


def send_ops(
    client: MlflowClient,
    policy: TrackingPolicy,
    ops: list[Op],
    stopped: list[BaseException] | None = None,
) -> int:
    """Deliver ``ops`` in order; returns how many leading ops are done (delivered, or dropped
    after a permanent error). Stops at the first batch that keeps failing transiently or whose
    credentials MLflow refused; what stopped it is appended to ``stopped``."""
    for start, end in _batches(ops):
        batch = ops[start:end]

        def send(batch: list[Op] = batch) -> None:
            _send_one_batch(client, batch)

        try:
            call_with_retry(policy, f"log {batch[0]['op']}", send)
        except Exception as exc:
            if is_transient(exc) or credentials_refused(exc):
                if stopped is not None:
                    stopped.append(exc)
                return start  # kept: sent again once MLflow (or the credentials) work
            for op in batch if len(batch) > 1 else []:  # isolate the bad call, keep the others
                try:
                    _send_one_batch(client, [op])
                except Exception as single:
                    if is_transient(single):
                        return start
                    log.warning("MLflow rejected a %s call, dropped: %s", op["op"], single)
            if len(batch) == 1:
                log.warning("MLflow rejected a %s call, dropped: %s", batch[0]["op"], exc)
    return len(ops)


def credentials_refused(exc: BaseException | None) -> str | None:
    """'HTTP 401: ...' / 'HTTP 403: ...' when MLflow refused the caller's credentials, else None.
    Not a rejection of the call: it would succeed with working credentials, so it is never dropped."""
    if exc is None:
        return None
    code = str(getattr(exc, "error_code", ""))
    text = str(exc)
    if code == "UNAUTHENTICATED" or re.search(r"error code 401\b", text):
        return "HTTP 401: not authenticated"
    if code == "PERMISSION_DENIED" or re.search(r"error code 403\b", text):
        return "HTTP 403: permission denied"
    return None


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or []


def _str_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]


def _default_spool_dir() -> str:
    root = os.environ.get("SPIN_CACHE_DIR") or str(Path.home() / ".cache" / "spin")
    return str(Path(root) / "tracking-spool")


METRIC_PREFIX_ENV = "SPIN_METRIC_PREFIX"


@dataclass
class RunLogger:
    """Logs to one MLflow run by id; a no-op when ``run_id`` or ``tracking_uri`` is missing."""

    run_id: str | None
    tracking_uri: str | None
    spool_dir: str | None = None
    policy: TrackingPolicy = field(default_factory=TrackingPolicy.from_env)
    spooled: list[str] = field(default_factory=list)  # spool files written by this logger
    # Prepended to every metric, param and tag key: the control arm's Jobs log to the same
    # iteration run as SPIN's under `control/` (SPIN_METRIC_PREFIX), so both arms share a chart.
    prefix: str = ""

    def __post_init__(self) -> None:
        self.enabled = bool(self.run_id and self.tracking_uri)
        self._ops: list[Op] = []
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._failures = 0
        self._last_send = 0.0
        self._client: MlflowClient | None = None
        if self.enabled:
            TrackingPolicy.configure_mlflow_http()
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            atexit.register(self.flush)  # a job that forgets flush() still delivers or spools

    @classmethod
    def from_env(
        cls, spool_dir: str | None = None, policy: TrackingPolicy | None = None
    ) -> RunLogger:
        """``MLFLOW_TRACKING_URI``/``MLFLOW_RUN_ID`` as set on the Job by the operator; spool
        to ``spool_dir``, else ``$SPIN_TRACKING_SPOOL_DIR``, else ``$SPIN_CACHE_DIR``."""
        return cls(
            os.environ.get("MLFLOW_RUN_ID") or None,
            os.environ.get("MLFLOW_TRACKING_URI") or None,
            spool_dir=spool_dir or os.environ.get("SPIN_TRACKING_SPOOL_DIR") or None,
            policy=policy or TrackingPolicy.from_env(),
            prefix=os.environ.get(METRIC_PREFIX_ENV, ""),
        )

    @property
    def pending(self) -> int:
        return len(self._ops)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [[self.prefix + k, float(v), now, int(step or 0)] for k, v in metrics.items()]
        self._add("metrics", items)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._add(
            "params", [[self.prefix + k, _str_value(v)] for k, v in redact(dict(params)).items()]
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._add("tags", [[self.prefix + k, _str_value(v)] for k, v in redact(dict(tags)).items()])

    def log_dataset(
        self,
        name: str,
        uri: str,
        digest: str,
        context: str = "training",
        profile: Mapping[str, Any] | None = None,
    ) -> None:
        op = {"name": name, "uri": uri, "digest": digest, "context": context}
        self._add("dataset", None, {**op, "profile": redact(dict(profile or {}))})

    def _add(self, kind: str, items: list[Any] | None, extra: Op | None = None) -> None:
        if not self.enabled:
            return
        try:
            with self._lock:
                if items is not None:
                    for chunk in _chunks(items, _LIMITS[kind]):
                        self._ops.append({"op": kind, "run": self.run_id, "items": chunk})
                else:
                    self._ops.append({"op": kind, "run": self.run_id, **(extra or {})})
                now = time.monotonic()
                if now >= self._retry_at and now - self._last_send >= self.policy.flush_interval:
                    self._deliver(attempts=1)  # in the training loop: one try, then cool down
                if self._buffered_values() > self.policy.max_buffered:
                    self._spill()
        except Exception as exc:  # tracking never fails the workload
            log.warning("tracking call dropped: %s", exc)

    def _buffered_values(self) -> int:
        return sum(len(op.get("items", [None])) for op in self._ops)

    def _deliver(self, attempts: int | None = None) -> bool:
        """Send the buffer. On failure wait ``cooldown`` (doubling per consecutive failure, up
        to 10 min) before the log path tries again, so even an MLflow that times out instead of
        refusing connections costs a job one timeout per cool-down, not one per step."""
        assert self._client is not None
        self._last_send = time.monotonic()
        policy = self.policy if attempts is None else replace(self.policy, attempts=attempts)
        stopped: list[BaseException] = []
        done = send_ops(self._client, policy, self._ops, stopped)
        del self._ops[:done]
        if self._ops:
            self._failures += 1
            wait = min(self.policy.cooldown * 2 ** (self._failures - 1), 600.0)
            self._retry_at = time.monotonic() + wait
            refused = credentials_refused(stopped[-1] if stopped else None)
            why = (  # the step's own credentials: the run's spec.tracking.credentialsSecret
                f"MLflow at {redact_text(str(self.tracking_uri))} refused this step's credentials "
                f"({refused}; MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN, from "
                "the SPINRun's spec.tracking.credentialsSecret)"
                if refused
                else f"MLflow unreachable at {redact_text(str(self.tracking_uri))}"
            )
            log.warning(
                "%s; %d tracking calls buffered (next try in %.0fs)", why, len(self._ops), wait
            )
            return False
        self._retry_at, self._failures = 0.0, 0
        return True

    def _spill(self) -> str | None:
        ops, self._ops = self._ops, []
        name = f"{self.run_id}-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}.jsonl"
        text = "".join(json.dumps(op) + "\n" for op in ops)
        for folder in [d for d in (self.spool_dir, _default_spool_dir()) if d]:
            target = storage.join(folder, name)
            try:
                storage.write_text(target, text)
            except Exception as exc:
                log.warning("could not write tracking spool %s: %s", target, exc)
                continue
            self.spooled.append(target)
            log.warning(
                "MLflow unreachable: %d tracking calls saved to %s; they are sent by "
                "replay_spool(%r) once MLflow is back",
                len(ops),
                target,
                target,
            )
            return target
        log.error("MLflow unreachable and no spool writable: %d tracking calls lost", len(ops))
        return None

    def flush(self) -> str | None:
        """Send everything now; what still cannot be sent goes to a spool file (returned)."""
        if not self.enabled:
            return None
        try:
            with self._lock:
                if not self._ops or self._deliver():
                    return None
                return self._spill()
        except Exception as exc:
            log.warning("tracking flush failed: %s", exc)
            return None

    def close(self) -> str | None:
        return self.flush()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


@dataclass(frozen=True)
class ReplayResult:
    delivered: int
    remaining: int
    files_left: list[str]


def read_spool(uri: str, run_ids: Collection[str] | None = None) -> list[tuple[str, list[Op]]]:
    """The spooled calls of a spool file (or of every ``*.jsonl`` in a spool folder), per file;
    with ``run_ids``, only the calls for those MLflow runs (see `replay_spool`). Storage only: a
    caller serving many stores reads here with its storage budget and sends with `send_ops`."""
    if uri.endswith(".jsonl"):
        files = [uri] if storage.exists(uri) else []
    else:
        files = [storage.join(uri, n) for n in storage.list_files(uri) if n.endswith(".jsonl")]
    out = []
    for path in files:
        ops = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
        if run_ids is not None:
            foreign = sorted({str(op.get("run")) for op in ops if op.get("run") not in run_ids})
            if foreign:
                log.warning(
                    "%s: dropped spooled calls for MLflow runs not of this run: %s",
                    path,
                    foreign[:5],
                )
                ops = [op for op in ops if op.get("run") in run_ids]
        out.append((path, ops))
    return out


def settle_spool_file(path: str, ops: list[Op], done: int) -> None:
    """After the first `done` of a file's `ops` were delivered: delete it, or keep the rest."""
    if done == len(ops):
        storage.delete_prefix(path)
    elif done:
        storage.write_text(path, "".join(json.dumps(op) + "\n" for op in ops[done:]))


def replay_spool(
    uri: str,
    tracking_uri: str | None = None,
    policy: TrackingPolicy | None = None,
    run_ids: Collection[str] | None = None,
) -> ReplayResult:
    """Send the calls in a spool file (or every ``*.jsonl`` in a spool folder) to MLflow.
    Delivered files are deleted; a partly delivered one is rewritten with what is left.
    Never raises for an unreachable MLflow: the result says what remains.

    ``run_ids``: the only MLflow runs the calls may touch. Spool files are written by a Job's
    pods, i.e. by code the replaying operator does not trust: a call naming any other run (of
    another namespace, say) is dropped, never sent with the operator's credentials."""
    TrackingPolicy.configure_mlflow_http()
    policy = policy or TrackingPolicy.from_env()
    client = MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    delivered, left = 0, list[str]()
    remaining = 0
    for path, ops in read_spool(uri, run_ids):
        done = send_ops(client, policy, ops) if not left else 0
        delivered += done
        settle_spool_file(path, ops, done)
        if done < len(ops):
            remaining += len(ops) - done
            left.append(path)
    if left:
        log.warning("MLflow still unreachable: %d spooled calls remain in %s", remaining, left)
    return ReplayResult(delivered, remaining, left)
