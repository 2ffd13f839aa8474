"""What a local run remembers between invocations: `R/.local-status.json`.

On Kubernetes the SPINRun object keeps the status, the applied-spec annotation and the uid, and
the Jobs keep their own states. Locally this file keeps all of them, in the run prefix (so it
travels with the artifacts, on a local folder or S3), and a rerun of `spinctl run` resumes from
it. Storage manifests stay the authority on what is done: without this file the reconciler
still finds every finished step in storage and does not redo it.

An attempt that was running when the runner stopped (Ctrl-C, or the runner killed) was
interrupted, not failed: on load its step is set back so the same attempt starts again (the
trainer resumes from its epoch checkpoints) without using up a retry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from spin_operator.api import types as api
from spin_operator.decision import ObservedJob
from spin_operator.naming import ALL_STEP_KINDS, job_name, step_field

log = logging.getLogger(__name__)

STATE_NAME = ".local-status.json"
VERSION = 1


@dataclass
class LocalState:
    uid: str = field(default_factory=lambda: f"local-{uuid.uuid4()}")
    status: api.SPINRunStatus = field(default_factory=api.SPINRunStatus)
    applied_spec: api.SPINRunSpec | None = None
    jobs: list[ObservedJob] = field(default_factory=list)  # finished Jobs (not interrupted)
    groups: list[int] = field(default_factory=list)  # process groups alive at the last save
    host: str = field(default_factory=socket.gethostname)

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "version": VERSION,
            "uid": self.uid,
            "host": self.host,
            "status": self.status.to_wire(),
            "appliedSpec": self.applied_spec.to_wire() if self.applied_spec else None,
            "jobs": [j.__dict__ for j in self.jobs],
            "groups": self.groups,
        }
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LocalState:
        """Parse a saved state; an unreadable one yields a fresh state (storage still counts)."""
        try:
            doc = json.loads(text)
            applied = doc.get("appliedSpec")
            return cls(
                uid=str(doc["uid"]),
                status=api.SPINRunStatus.model_validate(doc.get("status") or {}),
                applied_spec=api.SPINRunSpec.model_validate(applied) if applied else None,
                jobs=[ObservedJob(**j) for j in doc.get("jobs") or []],
                groups=[int(g) for g in doc.get("groups") or []],
                host=str(doc.get("host") or ""),
            )
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            log.warning("ignoring unreadable local status (%s); resuming from storage", exc)
            return cls()

    def forget_interrupted(self, run: str) -> list[str]:
        """Set back every step of run `run` whose latest attempt neither finished nor is
        remembered as finished; returns the Job names that were interrupted."""
        finished = {j.name for j in self.jobs}
        interrupted = []
        for it in self.status.iterations:
            for kind in ALL_STEP_KINDS:
                step: api.StepStatus | None = getattr(it, step_field(kind))
                if step is None or step.phase not in ("Pending", "Running") or step.attempts == 0:
                    continue
                name = step.job_name or job_name(run, it.iteration, kind, step.attempts - 1)
                if name in finished:
                    continue
                interrupted.append(name)
                step.attempts -= 1
                step.phase = "Pending"
                step.job_name = (
                    job_name(run, it.iteration, kind, step.attempts - 1) if step.attempts else None
                )
        return interrupted


def process_alive_here(pgid: int) -> bool:
    """A group leader from an earlier invocation that is still a spin process on this host."""
    try:
        cmdline = open(f"/proc/{pgid}/cmdline", "rb").read().replace(b"\0", b" ")  # noqa: SIM115
    except OSError:
        return False
    return b"spin_runtime" in cmdline or b"torch.distributed.run" in cmdline


def stale_groups(state: LocalState) -> list[int]:
    """Process groups a killed runner left behind on this host (to stop before resuming)."""
    if state.host != socket.gethostname():
        return []
    return [g for g in state.groups if g != os.getpgrp() and process_alive_here(g)]
