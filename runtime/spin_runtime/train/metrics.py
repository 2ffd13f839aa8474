"""Where the trainer's numbers go: stderr, ``metrics.jsonl`` in the work dir, MLflow.

Only rank 0 writes. Records are flat JSON objects with an ``event`` (``data`` once, ``train``
per optimizer step, ``eval`` per epoch) and a ``step``; every other number is also sent to
MLflow as a metric at that step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from spin_common import storage
from spin_runtime.train.distributed import Context
from spin_runtime.train.loss import spin_loss

log = logging.getLogger(__name__)


class MetricsLog:
    """Rank 0's step and epoch metrics: JSON lines on stderr, ``metrics.jsonl`` in the work dir
    (kept locally and uploaded at checkpoints when the work dir is on S3), and MLflow through
    :mod:`spin_common.tracking` when ``MLFLOW_RUN_ID`` is set (never failing the job)."""

    def __init__(self, ctx: Context, work_dir: str, keep_until_step: int) -> None:
        self.enabled = ctx.main
        self.uri = storage.join(work_dir, "metrics.jsonl")
        self.remote = storage.is_s3(work_dir)
        self.tracker: Any = None
        if not self.enabled:
            return
        if self.remote:
            import tempfile

            self.path = Path(tempfile.mkdtemp(prefix="spin-metrics-")) / "metrics.jsonl"
            with contextlib.suppress(FileNotFoundError):
                storage.download_file(self.uri, self.path)
        else:
            self.path = storage.local_path(self.uri)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # a resumed run redoes the steps after its checkpoint: drop their old lines
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if int(json.loads(line).get("step", 0)) <= keep_until_step:
                        kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        self.tracker = _tracker()

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, sort_keys=False)
        print(line, file=sys.stderr, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
        if self.tracker is not None:
            numbers = {
                k: float(v)
                for k, v in record.items()
                if isinstance(v, int | float) and k not in ("step", "event")
            }
            with contextlib.suppress(Exception):
                self.tracker.log_metrics(numbers, step=int(record.get("step", 0)))

    def publish(self) -> None:
        """Copy the metrics file to an S3 work dir (local ones are written in place) and flush
        what MLflow has not acknowledged yet."""
        if not self.enabled:
            return
        if self.remote:
            storage.upload_file(self.path, self.uri)
        if self.tracker is not None:
            with contextlib.suppress(Exception):
                self.tracker.flush()


def _tracker() -> Any:
    """The MLflow run logger of ``MLFLOW_RUN_ID``, or None (tracking never fails training)."""
    import os

    if not os.environ.get("MLFLOW_RUN_ID"):
        return None
    try:
        from spin_common import tracking

        return tracking.from_env_logger()
    except Exception as exc:  # tracking is optional by contract
        log.warning("MLflow tracking unavailable: %s", exc)
        return None


def summarize(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, prefix: str = ""
) -> dict[str, float]:
    """SPIN metrics of whole tables (policy and reference rows of the same pairs)."""
    stats = spin_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta)
    return {
        f"{prefix}loss": stats.losses.mean().item(),
        f"{prefix}rewards_real": stats.rewards_real.mean().item(),
        f"{prefix}rewards_generated": stats.rewards_gen.mean().item(),
        f"{prefix}margin": stats.margins.mean().item(),
        f"{prefix}accuracy": stats.correct.mean().item(),
        f"{prefix}logp_real": policy[:, 0].mean().item(),
        f"{prefix}logp_generated": policy[:, 1].mean().item(),
    }
