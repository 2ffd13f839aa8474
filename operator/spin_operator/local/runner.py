"""`spinctl run FILE`: a SPINRun on this machine, decided by the operator's own reconciler.

The pass is the operator's own (driver.py), with local stand-ins for the cluster (`LocalCluster`,
local/actions.py): observe (local Jobs' exit states, storage manifests, the spec recorded at
`R/spinrun.yaml`) -> `reconcile` (pure, the very function the operator calls) -> act (start or
stop process groups with `plan_step`'s argv, MLflow calls); the status is saved to
`R/.local-status.json`. Running the same command again resumes: finished steps are known from
the saved status and from the manifests in storage.

Exit status: 0 Succeeded, 1 Failed, 2 bad input (before any work), 130 interrupted (Ctrl-C or
SIGTERM: running steps are stopped, completed work is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from spin_operator.conditions import dataset_status
from spin_operator.local.preflight import BadInput, Loaded, load, preflight

if TYPE_CHECKING:
    from spin_operator.local.actions import LocalCluster

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_IDLE_PASSES = 20  # reconcile passes in a row that start nothing while nothing runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="YAML file with one SPINRun")
    parser.add_argument(
        "--storage-uri", help="artifacts when the spec has no storage.uri (default ./spin-runs)"
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow when the spec has no tracking.uri (default: sqlite:///<storage>/mlflow.db)",
    )
    parser.add_argument(
        "--no-tracking", action="store_true", help="no MLflow unless the spec names a tracking.uri"
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="generation shards run at once (default: the CPU count; 1 runs them one by one)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="model download cache (default ~/.cache/spin)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        loaded = load(args.file, args.storage_uri, "" if args.no_tracking else args.tracking_uri)
        report = preflight(loaded)
    except BadInput as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return LocalRun(loaded, parallel=args.parallel, cache_dir=args.cache_dir, dataset=report).run()


class _Stop(Exception):
    """SIGTERM, handled like Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def log_dir_for(prefix: str, run_name: str, namespace: str) -> Path:
    """Pod logs: inside a local run prefix, else under ./.spin-local (S3 prefixes)."""
    if prefix.startswith("s3://"):
        return Path(".spin-local", namespace, run_name, "logs").resolve()
    return Path(prefix.removeprefix("file://"), ".local-logs")


class LocalRun:
    """One invocation of `spinctl run`: loads the saved state, loops until a terminal phase."""

    def __init__(
        self,
        loaded: Loaded,
        *,
        parallel: int | None = None,
        cache_dir: str | None = None,
        poll_interval: float = 0.2,
        out: Any = None,
        python: str = sys.executable,
        dataset: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        from spin_operator.local.display import Display
        from spin_operator.local.tracking import LocalTracking
        from spin_operator.settings import Settings
        from spin_operator.steps import layout_of

        self.spec, self.run_ref = loaded.spec, loaded.run
        self.layout = layout_of(self.spec, self.run_ref)
        self.settings = Settings(
            storage_uri=self.spec.storage.uri,
            mlflow_uri=self.spec.tracking.uri,
            cache_dir=cache_dir
            or os.environ.get("SPIN_CACHE_DIR")
            or os.path.expanduser("~/.cache/spin"),
        )
        self.parallel = parallel
        self.python = python
        self.poll_interval = poll_interval
        self.display = Display(self.spec, out=out)
        self.tracking = LocalTracking(self.spec, self.run_ref)
        self.state_uri = self.layout.prefix.rstrip("/") + "/.local-status.json"
        self.log_dir = log_dir_for(self.layout.prefix, self.run_ref.name, self.run_ref.namespace)
        self.results: list[tuple[str, dict[str, float]]] = []  # the summary table (LocalCluster's)
        self.dataset = dataset  # the preflight's dataset profile (rows, usable, skipped by reason)
        self.environ = os.environ if env is None else env  # what the steps' environment starts from

    # ------------------------------------------------------------------ state

    def _load_state(self) -> Any:
        from spin_common import storage
        from spin_operator.endpoints import at_endpoint
        from spin_operator.local.state import LocalState

        with at_endpoint(self.spec):
            try:
                return LocalState.from_json(storage.read_text(self.state_uri))
            except FileNotFoundError:
                return LocalState()

    def _save(self) -> None:
        from spin_common import storage
        from spin_operator.endpoints import at_endpoint

        self.state.status = self.status
        self.state.jobs = self.backend.finished()
        self.state.groups = self.backend.running_groups()
        try:
            with at_endpoint(self.spec):
                storage.write_text(self.state_uri, self.state.to_json())
        except OSError as exc:  # the manifests in storage still say what is done
            log.warning("local status not saved to %s: %s", self.state_uri, exc)

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        from spin_operator.local.backend import LocalBackend, stop_group
        from spin_operator.local.podenv import local_pod_env
        from spin_operator.local.state import stale_groups

        self.state = self._load_state()
        for group in stale_groups(self.state):
            self.display.say(
                f"stopping process group {group} left by an earlier, killed spinctl run"
            )
            stop_group(group)
        interrupted = self.state.forget_interrupted(self.run_ref.name)
        self.status = self.state.status
        self.run_ref = dataclasses.replace(
            self.run_ref, uid=self.state.uid
        )  # MLflow finds it by uid
        self.tracking.run = self.run_ref
        pod = local_pod_env(self.spec.pod, self.environ)
        self.backend = LocalBackend(
            self.log_dir,
            env={**self.environ, **pod.env},
            max_parallel=self.parallel,
            remembered=self.state.jobs,
            python=self.python,
        )
        resumed = self.status.spec_hash is not None
        self.display.header(self.run_ref.name, self.layout.prefix, self.spec.tracking.uri, resumed)
        for note in pod.notes:
            self.display.say(f"  {note}")
        if interrupted:
            self.display.say(f"  restarting interrupted step(s): {', '.join(interrupted)}")
        if self.dataset:
            self.display.dataset(self.dataset)
            self.status.dataset = dataset_status(self.dataset)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            self.tracking.prepare()
            # one event loop for the whole run: the driver's pass and MLflow calls are async
            return asyncio.run(self._loop())
        except (KeyboardInterrupt, _Stop):
            stopped = self.backend.terminate_all()
            self._save()
            what = f" (stopped {', '.join(stopped)})" if stopped else ""
            self.display.say(
                f"interrupted{what}; completed work is kept: run the same command to resume"
            )
            return EXIT_INTERRUPTED
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.tracking.close()

    async def _loop(self) -> int:
        from spin_operator.driver import drive
        from spin_operator.local.actions import LocalCluster

        cluster = LocalCluster(
            self.spec,
            self.run_ref,
            self.settings,
            self.backend,
            self.state,
            self.tracking,
            self.display,
        )
        self.results = cluster.results
        backoff, idle = 1.0, 0
        while True:
            before = self.status.to_wire()
            outcome = await drive(self.spec, self.status, cluster, self.run_ref.name)
            decision = outcome.decision
            self.status = decision.status
            if self.status.to_wire() != before or decision.actions:
                self._save()
            phase = self.status.phase
            if phase in ("Succeeded", "Failed"):
                return self._finish(phase, outcome.applied)
            if phase == "Suspended" and not self.backend.active():
                self.display.say("spec.suspend is true: nothing runs; set it to false and rerun")
                return EXIT_OK
            if not decision.complete:  # storage unreachable for now: try again later
                self.display.say(f"  waiting {backoff:.0f}s: storage could not be read")
                await asyncio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                continue
            backoff = 1.0
            if not self.backend.active():  # nothing runs and nothing started: cannot progress
                idle += 1
                if idle > MAX_IDLE_PASSES:
                    self.display.say(
                        f"no step can start: {self.status.message or self.status.phase}"
                    )
                    return EXIT_FAILED
                await asyncio.sleep(self.poll_interval)
                continue
            idle = 0
            await self._wait(cluster)

    async def _wait(self, cluster: LocalCluster) -> None:
        """Until some local Job changes state, refreshing progress meanwhile."""
        while True:
            if self.backend.poll():
                cluster.report_finished()
                return
            if not self.backend.active():
                return
            self.display.tick()
            await asyncio.sleep(self.poll_interval)

    def _finish(self, phase: str, tracked: bool = True) -> int:
        self.display.summary(self.results)
        if self.dataset and self.dataset.get("skipped"):
            self.display.dataset(self.dataset)
        message = self.status.message or ""
        if not tracked:
            self.display.say(
                f"  MLflow ({self.spec.tracking.uri}) has not confirmed the end of this run's MLflow runs "
                f"(spooled calls pending: {self.status.mlflow.spooled_calls if self.status.mlflow else '?'}); "
                "run the same command again to deliver them"
            )
        if phase == "Succeeded":
            self.display.say(f"Succeeded: {message}")
            return EXIT_OK
        self.display.say(f"Failed: {message}")
        logs = sorted(self.log_dir.glob("*.log")) if self.log_dir.is_dir() else []
        if logs:
            self.display.say(f"  process logs: {self.log_dir}")
        return EXIT_FAILED
