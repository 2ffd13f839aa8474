"""The per-run artifact layout of docs/design.md, computed in one place.

The operator (deciding what exists and which argv to pass) and the runtime (writing there) must
agree on every name, so nobody formats ``iter-000`` or ``shard-00000-of-00004.jsonl`` by hand:

    R = {storage_uri}/{namespace}/{name}
    R/spinrun.yaml
    R/iter-000/check/report.json   (the check before iteration 0's generation, on a cluster)
    R/iter-000/generated/shard-00000-of-00004.jsonl (+ shard-00000-of-00004.manifest.json)
    R/iter-000/train/epoch-001/    R/iter-000/model/    R/iter-000/eval/results.json
    R/iter-000/tracking-spool/     (only after an MLflow outage)
    R/iter-000/control/model/  R/iter-000/control/train/  R/iter-000/control/eval/  (controlArm)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spin_common import storage

SPEC_NAME = "spinrun.yaml"
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._\-]*[A-Za-z0-9])?$")


def _check_index(what: str, value: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def shard_name(index: int, num_shards: int) -> str:
    """``shard-00000-of-00004.jsonl``; zero-padded so names sort in shard order."""
    _check_index("num_shards", num_shards, 1)
    _check_index("shard index", index)
    if index >= num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    return f"shard-{index:05d}-of-{num_shards:05d}.jsonl"


@dataclass(frozen=True)
class IterationLayout:
    """Artifacts of iteration ``index`` (θt -> θt+1) under ``prefix`` = ``R/iter-ttt``."""

    prefix: str
    index: int

    @property
    def check(self) -> str:
        """Iteration 0 only: where the check before any generation leaves its report."""
        return storage.join(self.prefix, "check")

    @property
    def check_report(self) -> str:
        """`check --output`: the dataset profile and the problems; complete when `ok` is true."""
        return storage.join(self.check, "report.json")

    @property
    def generated(self) -> str:
        return storage.join(self.prefix, "generated")

    def shard(self, index: int, num_shards: int) -> str:
        return storage.join(self.generated, shard_name(index, num_shards))

    def shard_manifest(self, index: int, num_shards: int) -> str:
        name = shard_name(index, num_shards).removesuffix(".jsonl") + ".manifest.json"
        return storage.join(self.generated, name)

    @property
    def model(self) -> str:
        """θt+1, the HF checkpoint this iteration produces."""
        return storage.join(self.prefix, "model")

    @property
    def train_work(self) -> str:
        return storage.join(self.prefix, "train")

    def epoch_checkpoint(self, epoch: int) -> str:
        """Checkpoint after ``epoch`` (1-based, as in ``epoch-001``)."""
        return storage.join(self.train_work, f"epoch-{_check_index('epoch', epoch, 1):03d}")

    @property
    def eval(self) -> str:
        return storage.join(self.prefix, "eval")

    @property
    def eval_results(self) -> str:
        return storage.join(self.eval, "results.json")

    @property
    def control(self) -> str:
        """The equal-compute SFT control arm's artifacts (spec.controlArm)."""
        return storage.join(self.prefix, "control")

    @property
    def control_model(self) -> str:
        return storage.join(self.control, "model")

    @property
    def control_train_work(self) -> str:
        return storage.join(self.control, "train")

    @property
    def control_eval(self) -> str:
        return storage.join(self.control, "eval")

    @property
    def control_eval_results(self) -> str:
        return storage.join(self.control_eval, "results.json")

    @property
    def tracking_spool(self) -> str:
        """Where this iteration's Jobs spool MLflow calls during an outage
        (``SPIN_TRACKING_SPOOL_DIR``); the operator replays it with ``tracking.replay_spool``."""
        return storage.join(self.prefix, "tracking-spool")


@dataclass(frozen=True)
class RunLayout:
    """Layout rooted at the run prefix ``R``."""

    prefix: str

    def __post_init__(self) -> None:
        storage.check_uri(self.prefix)

    @classmethod
    def for_run(cls, storage_uri: str, namespace: str, name: str) -> RunLayout:
        for field, value in (("namespace", namespace), ("name", name)):
            if not _NAME_RE.match(value or ""):
                raise ValueError(f"{field} {value!r} is not a valid object name for a run prefix")
        return cls(storage.join(storage.check_uri(storage_uri), namespace, name))

    @property
    def spec(self) -> str:
        return storage.join(self.prefix, SPEC_NAME)

    def iteration(self, t: int) -> IterationLayout:
        _check_index("iteration", t)
        return IterationLayout(storage.join(self.prefix, f"iter-{t:03d}"), t)

    def model_for_iteration(self, t: int, base_model_uri: str) -> str:
        """θt: the base model for t = 0, else the model iteration t-1 produced."""
        _check_index("iteration", t)
        return base_model_uri if t == 0 else self.iteration(t - 1).model

    def control_model_for_iteration(self, t: int, base_model_uri: str) -> str:
        """The control arm's start: θ0 for t = 0, else the control model of iteration t-1."""
        _check_index("iteration", t)
        return base_model_uri if t == 0 else self.iteration(t - 1).control_model

    def training_data_for_iteration(self, t: int, mix_previous: int = 1) -> list[str]:
        """Generated folders iteration t trains on: its own first, then up to ``mix_previous``
        earlier iterations, newest first (fewer exist in the first iterations)."""
        _check_index("iteration", t)
        _check_index("mix_previous", mix_previous)
        return [self.iteration(i).generated for i in range(t, max(-1, t - mix_previous - 1), -1)]
