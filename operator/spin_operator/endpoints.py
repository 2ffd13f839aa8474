"""Storage calls on a tenant's behalf, each endpoint on its own: a small worker pool, a short
budget per call and a circuit breaker; and the conditions that tell a run its endpoint is down.

Why: every storage call the operator makes (a probe of a run's prefix, reading manifests, a spool
replay, deleting artifacts) goes to an endpoint the run names. One that hangs or refuses must cost
its own runs one short wait, not every run minutes of botocore's retries (docs/security.md,
threat 8); a store that answers 5xx or throttles is retried inside the budget. After `threshold` failures in a row the endpoint is skipped for `cooldown` seconds:
calls fail at once with `EndpointUnavailable` (an OSError, so callers treat it as any storage
error: the pass stays partial and is retried) and the runs using it get the condition
`StorageUnavailable` naming the endpoint. Runs on other endpoints have other pools and breakers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from spin_common import storage
from spin_operator import conditions as cond
from spin_operator.api import types as api

log = logging.getLogger(__name__)
T = TypeVar("T")

STORAGE_UNAVAILABLE = "StorageUnavailable"
TRACKING_UNAVAILABLE = "TrackingUnavailable"


# Retries of a busy store's answers (5xx, throttling) inside a call's budget: the first wait,
# doubled per try up to the cap, and only while the first RETRY_SHARE of the budget lasts, so
# the last try still has time to answer before the caller gives up.
RETRY_FIRST_DELAY = 0.1
RETRY_MAX_DELAY = 2.0
RETRY_SHARE = 0.5


class EndpointUnavailable(OSError):
    """A storage call was not made (breaker open) or did not finish within its budget."""


def endpoint_of(spec: api.SPINRunSpec) -> str | None:
    """The storage endpoint a run's calls go to (None: local storage or the default S3 one)."""
    return spec.storage.endpoint if (spec.storage.uri or "").startswith("s3://") else None


def storage_endpoint(spec: api.SPINRunSpec) -> storage.Endpoint:
    """The run's storage endpoint as a value: URL and region from the spec (the operator's
    defaults, SPIN_S3_ENDPOINT/SPIN_S3_REGION, are already in it: settings.resolve), and the
    operator's own credentials (boto3's default chain): RBAC lets it see that a run's Secret
    exists, never its value, and spin_operator.policy limits the endpoints it talks to."""
    return storage.Endpoint(url=spec.storage.endpoint, region=spec.storage.region)


def at_endpoint(spec: api.SPINRunSpec) -> AbstractContextManager[None]:
    """S3 calls in this block (this thread or task only) go to the run's endpoint: a value in a
    context variable, never os.environ, so calls for runs on different endpoints run at once."""
    return storage.using(storage_endpoint(spec))


def describe(endpoint: str | None) -> str:
    return f"storage endpoint {endpoint}" if endpoint else "the default storage"


@dataclass
class _Breaker:
    failures: int = 0
    open_until: float = 0.0
    last: str = ""


class StoragePools:
    """One pool, budget and breaker per storage endpoint."""

    def __init__(
        self,
        budget: float = 10.0,
        threshold: int = 3,
        cooldown: float = 30.0,
        workers: int = 2,
        bulk_budget: float = 300.0,
    ) -> None:
        self.budget, self.threshold, self.cooldown, self.workers = (
            budget,
            threshold,
            cooldown,
            workers,
        )
        # a whole-prefix deletion is many requests: each still has `budget` (socket timeouts, one
        # attempt), so a silent endpoint fails it as fast as any call, but the whole may take
        # longer without counting against a healthy endpoint
        self.bulk_budget = bulk_budget
        self._pools: dict[str | None, concurrent.futures.ThreadPoolExecutor] = {}
        self._breakers: dict[str | None, _Breaker] = {}
        # botocore's own timeouts and retries inside the budget: one attempt, each socket wait
        # bounded by the budget, so a worker thread stuck on a silent endpoint is freed soon after
        # the caller gave up on it (the next pass is the retry)
        self.config = storage.StorageConfig(
            attempts=1, botocore_attempts=1, connect_timeout=budget, read_timeout=budget
        )

    async def call(
        self,
        endpoint: str | None,
        fn: Callable[..., T],
        spec: api.SPINRunSpec,
        *args: Any,
        budget: float | None = None,
    ) -> T:
        """`fn(spec, *args)` in `endpoint`'s pool within the budget (`budget`: a longer one for
        the whole call, e.g. `bulk_budget`); raises EndpointUnavailable when the breaker is open
        or the budget ran out, and whatever `fn` raises."""
        deadline = budget or self.budget
        breaker = self._breakers.setdefault(endpoint, _Breaker())
        if time.monotonic() < breaker.open_until:
            raise EndpointUnavailable(self.problem(endpoint) or describe(endpoint))
        pool = self._pools.get(endpoint)
        if pool is None:
            pool = self._pools[endpoint] = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix="spin-storage"
            )

        loop = asyncio.get_running_loop()
        began: asyncio.Future[T] = loop.create_future()

        def start() -> None:
            if not began.done():
                began.set_result(cast(T, None))

        gave_up = threading.Event()  # the caller's budget ran out: stop retrying

        def bounded() -> T:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
                loop.call_soon_threadsafe(start)
            if time.monotonic() < breaker.open_until:  # opened while this call waited its turn
                raise EndpointUnavailable(self.problem(endpoint) or describe(endpoint))
            retry_until = time.monotonic() + deadline * RETRY_SHARE
            delay = RETRY_FIRST_DELAY
            while True:
                try:
                    with storage.budget(self.config):
                        return fn(spec, *args)
                except Exception as exc:
                    # A store that answers 5xx or throttles is up and busy, and S3's own advice
                    # is to retry with backoff: a few quick tries inside the budget, not one
                    # failed call that costs the run a whole pass (an operator pass needs two
                    # reads in a row). Silence and refusals are not retried: one attempt each,
                    # as botocore's own are above.
                    wait = random.uniform(delay / 2, delay)
                    if not _busy(exc) or gave_up.is_set() or time.monotonic() + wait > retry_until:
                        raise
                time.sleep(wait)
                delay = min(delay * 2, RETRY_MAX_DELAY)

        # The budget runs from when a worker takes the call, not from when it was queued: with
        # hundreds of runs finishing steps at once, calls wait their turn behind the pool's
        # threads, and counting that wait made a healthy endpoint look silent (the breaker
        # opened for 30 s at a time at 250 runs, docs/benchmarks.md). A silent endpoint still
        # costs each caller at most one budget once its call runs, and opens the breaker, which
        # calls still queued see when their turn comes.
        work = loop.run_in_executor(pool, bounded)
        try:
            await asyncio.wait([began, work], return_when=asyncio.FIRST_COMPLETED)
            result = await asyncio.wait_for(work, deadline)
        except TimeoutError:
            gave_up.set()
            self._failed(endpoint, f"no answer within {deadline:g}s")
            raise EndpointUnavailable(
                f"{describe(endpoint)}: no answer within {deadline:g}s"
            ) from None
        except EndpointUnavailable:
            raise  # skipped when its turn came (the breaker opened meanwhile): no new failure
        except Exception as exc:
            if _answered(exc):  # a real answer (404, 403): the endpoint is up
                self._succeeded(endpoint)
                raise
            why = _silence(exc, self.config) or _short(exc)
            self._failed(endpoint, why)
            raise EndpointUnavailable(f"{describe(endpoint)}: {why}") from exc
        self._succeeded(endpoint)
        return result

    async def run(self, fn: Callable[..., T], spec: api.SPINRunSpec, *args: Any) -> T:
        """`call` on the run's own endpoint."""
        return await self.call(endpoint_of(spec), fn, spec, *args)

    async def bulk(self, fn: Callable[..., T], spec: api.SPINRunSpec, *args: Any) -> T:
        """`run` with `bulk_budget` for the whole call (artifact deletion)."""
        return await self.call(endpoint_of(spec), fn, spec, *args, budget=self.bulk_budget)

    def _failed(self, endpoint: str | None, why: str) -> None:
        b = self._breakers.setdefault(endpoint, _Breaker())
        b.failures += 1
        b.last = why
        if b.failures >= self.threshold:
            b.open_until = time.monotonic() + self.cooldown
            log.warning(
                "%s failed %d calls in a row (%s); skipped for %.0fs",
                describe(endpoint),
                b.failures,
                why,
                self.cooldown,
            )

    def _succeeded(self, endpoint: str | None) -> None:
        b = self._breakers.get(endpoint)
        if b is not None and b.failures:
            log.info("%s answers again", describe(endpoint))
            self._breakers[endpoint] = _Breaker()

    def problem(self, endpoint: str | None) -> str | None:
        """Why `endpoint` is skipped (for the run's condition); None while it is not."""
        b = self._breakers.get(endpoint)
        if b is None or b.failures < self.threshold:
            return None
        wait = max(0.0, b.open_until - time.monotonic())
        return (
            f"{describe(endpoint)} failed {b.failures} calls in a row (last: {b.last}); "
            f"storage calls for runs using it are skipped, next try in {wait:.0f}s"
        )

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools.clear()


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it, and so on (each once)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _client_error(exc: BaseException) -> BaseException | None:
    """The HTTP error response behind `exc` (botocore's ClientError), if the store sent one."""
    from botocore.exceptions import ClientError

    return next((e for e in _chain(exc) if isinstance(e, ClientError)), None)


def _answered(exc: BaseException) -> bool:
    """Whether the endpoint answered (an HTTP error response), as opposed to a timeout, a refused
    connection or repeated 5xx. Local storage errors count as answers: the file system is up."""
    if isinstance(exc, storage.StorageUnavailableError) or storage.is_transient(exc):
        return False
    return _client_error(exc) is not None or not isinstance(exc, TimeoutError | ConnectionError)


def _busy(exc: BaseException) -> bool:
    """The store answered, with a 5xx or a throttling code: up, and worth another try."""
    answer = _client_error(exc)
    return answer is not None and storage.is_transient(answer)


def _silence(exc: BaseException, config: storage.StorageConfig) -> str | None:
    """The budget's words for a socket timeout inside it: botocore's timeouts are as long as the
    budget and measure the same silence, so whichever timer fires first (under load it is
    either), the condition reads the same. None for any other failure."""
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    for seen in _chain(exc):
        if isinstance(seen, ConnectTimeoutError):
            return f"no answer within {config.connect_timeout:g}s"
        if isinstance(seen, ReadTimeoutError | TimeoutError):
            return f"no answer within {config.read_timeout:g}s"
    return None


def _short(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", f"{type(exc).__name__}: {exc}")[:300]


# ------------------------------------------------------------------ conditions


def report(
    status: api.SPINRunStatus,
    type_: str,
    problem: tuple[str, str] | None,
    now: str,
    gen: int | None,
) -> None:
    """Condition `type_` True (reason, message) while `problem` holds; False once it is gone."""
    if problem is not None:
        cond.set_condition(status.conditions, type_, True, problem[0], problem[1], now, gen)
        return
    previous = cond.get_condition(status.conditions, type_)
    if previous is not None and previous.status == "True":
        cond.set_condition(status.conditions, type_, False, "Available", "", now, gen)


def credentials_problem(uri: str | None, refused: str, secret: str | None) -> str:
    """The TrackingUnavailable message: MLflow refused the operator's own credentials. It names
    where they come from (never their value): the run's author cannot fix this, the admin can."""
    source = (
        f"of Secret {secret!r} (chart value tracking.credentialsSecret, the operator's namespace)"
        if secret
        else "of the operator's environment"
    )
    return (
        f"MLflow at {uri} refused the operator's credentials ({refused}); they are "
        f"MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN {source}. "
        "MLflow bookkeeping waits; the run goes on"
    )


def report_outages(
    status: api.SPINRunStatus,
    spec: api.SPINRunSpec,
    storage: StoragePools,
    refused: str | None,
    operator_secret: str | None,
    gen: int | None,
) -> None:
    """StorageUnavailable while the run's storage endpoint is skipped; TrackingUnavailable while
    its MLflow refuses the operator's credentials (`refused`: Tracking.refused)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    down = storage.problem(endpoint_of(spec))
    report(status, STORAGE_UNAVAILABLE, ("EndpointUnavailable", down) if down else None, now, gen)
    why = refused and credentials_problem(spec.tracking.uri, refused, operator_secret)
    report(status, TRACKING_UNAVAILABLE, ("CredentialsRefused", why) if why else None, now, gen)
