"""The local stand-in for Kubernetes Jobs: one step attempt = one `LocalJob` of process groups.

A `StepPlan` says how many pods a Job has and what each runs. Here each pod is a process started
in its own session (so its whole tree — torchrun and its workers — is one process group that
can be stopped at once, and a Ctrl-C on the terminal reaches only the runner, which then stops
the groups itself). Pod i gets `JOB_COMPLETION_INDEX=i`, exactly as in an Indexed Job: the
generation shard, or the torchrun node rank. torchrun rendezvous on 127.0.0.1 with a free port.

The reconciler only needs each Job's state (`ObservedJob`); logs go to one file per pod, which
the display tails for progress.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from spin_operator.decision import ObservedJob
from spin_operator.steps import StepPlan

BAD_INPUT_EXIT = 2
TERMINATE_GRACE_S = 10.0


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def free_port() -> int:
    """A port free a moment ago on 127.0.0.1 (torchrun binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_command(plan: StepPlan, python: str = sys.executable) -> list[str]:
    """The plan's argv on this machine: `python` is this interpreter and `torchrun` is
    `python -m torch.distributed.run` (no reliance on PATH). The topology is in the env
    (`StepPlan.local_env`), never in argv."""
    argv = list(plan.argv)
    if argv and argv[0] == "python":
        return [python, *argv[1:]]
    if argv and argv[0] == "torchrun":
        return [python, "-m", "torch.distributed.run", *argv[1:]]
    return argv


@dataclass
class Pod:
    index: int
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    returncode: int | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None


@dataclass
class LocalJob:
    """One step attempt: `plan.pods` processes, run at most `parallel` at a time."""

    plan: StepPlan
    pods: list[Pod]
    env: dict[str, str]
    parallel: int
    master_port: int = 0  # torchrun's rendezvous on 127.0.0.1 (training Jobs)
    start_time: str = field(default_factory=now_iso)
    completion_time: str | None = None
    reason: str = ""
    message: str = ""
    stopped: bool = False  # terminated by the runner (not a failure of its own)

    @property
    def name(self) -> str:
        return self.plan.job_name

    @property
    def state(self) -> str:
        if any(p.returncode not in (None, 0) for p in self.pods) or self.stopped:
            return "Failed"
        if all(p.returncode == 0 for p in self.pods):
            return "Succeeded"
        return "Running" if any(p.running for p in self.pods) else "Pending"

    def observed(self) -> ObservedJob:
        return ObservedJob(
            name=self.name,
            iteration=self.plan.iteration,
            stage=self.plan.stage,
            attempt=self.plan.attempt,
            state=self.state,  # type: ignore[arg-type]
            reason=self.reason,
            message=self.message,
            start_time=self.start_time,
            completion_time=self.completion_time,
        )


def _tail(path: Path, lines: int = 3) -> str:
    """The last non-empty lines of a log: usually the error that ended the process."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # the "=== <time> <argv>" header the runner writes stays in the file, not in the message
    kept = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("=== ")
    ]
    return " | ".join(kept[-lines:])


def _cause(path: Path) -> str:
    """The runtime's own `error: ...` line (docs/runtime.md: bad input, exit 2), else the tail."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    errors = [
        line.strip()[len("error: ") :]
        for line in text.splitlines()
        if line.strip().startswith("error: ")
    ]
    return errors[-1] if errors else _tail(path)


def stop_group(
    pgid: int, grace: float = TERMINATE_GRACE_S, leader: subprocess.Popen[bytes] | None = None
) -> None:
    """SIGTERM a process group, then SIGKILL whatever is left after `grace` seconds. `leader`,
    our own child, is reaped meanwhile (a zombie would keep the group "alive")."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()
        if not group_alive(pgid):
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (zombies of our own children included)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class LocalBackend:
    """Starts, polls and stops local Jobs; remembers finished ones from earlier invocations."""

    def __init__(
        self,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        max_parallel: int | None = None,
        remembered: Iterable[ObservedJob] = (),
        python: str = sys.executable,
    ) -> None:
        self.log_dir = log_dir
        self.base_env = dict(os.environ if env is None else env)
        self.max_parallel = max(1, max_parallel or os.cpu_count() or 1)
        self.python = python
        self.jobs: dict[str, LocalJob] = {}
        self.remembered: dict[str, ObservedJob] = {j.name: j for j in remembered}

    # ------------------------------------------------------------------ lifecycle

    def start(self, plan: StepPlan, extra_env: Mapping[str, str] | None = None) -> LocalJob:
        """Start (the first `parallel` pods of) a Job; a name already running is left alone."""
        current = self.jobs.get(plan.job_name)
        if current is not None and current.state in ("Pending", "Running"):
            return current
        self.remembered.pop(plan.job_name, None)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port() if plan.rendezvous else 0
        pods = [
            Pod(i, local_command(plan, self.python), self.log_dir / f"{plan.job_name}-{i}.log")
            for i in range(plan.pods)
        ]
        # Shards may run side by side; a multi-node torchrun must (its ranks wait for each other).
        parallel = plan.pods if plan.rendezvous else min(plan.pods, self.max_parallel)
        env = {**self.base_env, **plan.env, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
        if "OMP_NUM_THREADS" not in env and plan.stage not in ("train", "control-train"):
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
        job = LocalJob(plan, pods, env, parallel, master_port=port)
        self.jobs[plan.job_name] = job
        self._launch_ready(job)
        return job

    def _launch_ready(self, job: LocalJob) -> None:
        for pod in job.pods:
            if sum(p.running for p in job.pods) >= job.parallel:
                break
            if pod.proc is None and job.state in ("Pending", "Running"):
                self._spawn(job, pod)

    def _spawn(self, job: LocalJob, pod: Pod) -> None:
        env = {
            **job.env,
            "JOB_COMPLETION_INDEX": str(pod.index),
            **job.plan.local_env(pod.index, job.master_port),
        }
        with pod.log_path.open("ab") as log:
            log.write(f"=== {now_iso()} {' '.join(pod.argv)}\n".encode())
            log.flush()
            try:
                pod.proc = subprocess.Popen(
                    pod.argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:  # e.g. a custom evaluation command that does not exist
                pod.returncode = 127
                job.reason, job.message = "CannotExecute", f"{pod.argv[0]}: {exc}"
                self._finish(job)

    def poll(self) -> bool:
        """Reap exited pods and start waiting ones; True when some Job changed state."""
        changed = False
        for job in self.jobs.values():
            if job.completion_time is not None:
                continue
            for pod in job.pods:
                if pod.running and pod.proc is not None and pod.proc.poll() is not None:
                    pod.returncode = pod.proc.returncode
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pod.proc.pid, signal.SIGKILL)  # stragglers of its group
                    changed = True
                    if pod.returncode == BAD_INPUT_EXIT and not job.reason:  # cause first, once
                        job.reason = "BadInput"
                        job.message = (
                            _cause(pod.log_path) or f"pod {pod.index} exited with {pod.returncode}"
                        )
                    elif pod.returncode != 0 and not job.reason:
                        job.reason = "ProcessFailed"
                        job.message = (
                            f"pod {pod.index} exited with {pod.returncode}: {_tail(pod.log_path)}"
                        )
            if job.state == "Failed":
                self._stop_pods(job, grace=TERMINATE_GRACE_S)
                self._finish(job)
            elif job.state == "Succeeded":
                self._finish(job)
            else:
                self._launch_ready(job)
        return changed

    def _finish(self, job: LocalJob) -> None:
        if job.completion_time is None:
            job.completion_time = now_iso()

    def _stop_pods(self, job: LocalJob, grace: float) -> None:
        for pod in job.pods:
            if pod.running and pod.proc is not None:
                stop_group(pod.proc.pid, grace, pod.proc)
                pod.returncode = pod.proc.wait()

    def terminate(
        self, name: str, grace: float = TERMINATE_GRACE_S, reason: str = "Stopped"
    ) -> None:
        """Stop a Job's process groups (SIGTERM, then SIGKILL after `grace`)."""
        job = self.jobs.get(name)
        if job is None or job.completion_time is not None:
            return
        job.stopped = True
        job.reason = job.reason or reason
        job.message = job.message or "stopped by spinctl"
        self._stop_pods(job, grace)
        self._finish(job)

    def terminate_all(self, grace: float = TERMINATE_GRACE_S) -> list[str]:
        """Stop every active Job; returns their names (the interrupted steps)."""
        active = [n for n, j in self.jobs.items() if j.completion_time is None]
        for name in active:
            self.terminate(name, grace, reason="Interrupted")
        return active

    # ------------------------------------------------------------------ views

    def observed(self) -> tuple[ObservedJob, ...]:
        """What the reconciler sees: this invocation's Jobs, then finished ones remembered from
        earlier invocations (a rerun must not redo or re-fail them)."""
        mine = {n: j.observed() for n, j in self.jobs.items()}
        return (*mine.values(), *(j for n, j in self.remembered.items() if n not in mine))

    def finished(self) -> list[ObservedJob]:
        """Terminal Jobs worth remembering across invocations (interrupted ones are not)."""
        out = [j for n, j in self.remembered.items() if n not in self.jobs]
        out += [j.observed() for j in self.jobs.values() if j.completion_time and not j.stopped]
        return out

    def running_groups(self) -> list[int]:
        return [p.proc.pid for j in self.jobs.values() for p in j.pods if p.running and p.proc]

    def active(self) -> list[LocalJob]:
        return [j for j in self.jobs.values() if j.completion_time is None]
