"""What a step's pods leave in storage when they succeed, written without running the step.

Shared by everything that plays Jobs instead of running them (the in-process operator tests'
``Cluster``, ``benchmarks/operator_scale.py`` on the emulated and on the real control plane): the
same layout and manifests as the runtime (files first, manifests last, via spin_common.manifest),
so the operator's checks of a finished step are the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from spin_common import manifest, storage
from spin_common.layout import RunLayout

RUN_LABEL = "selfplay.dev/run"
ITERATION_LABEL = "selfplay.dev/iteration"
STAGE_LABEL = "selfplay.dev/stage"
DEFAULT_METRICS = {"exact_match": 0.5}


def write_step(
    storage_uri: str,
    namespace: str,
    run: str,
    iteration: int,
    stage: str,
    scratch: Path,
    *,
    shards: int = 1,
    indices: Iterable[int] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """The artifacts of `stage` of `iteration`: the check's report, generation shards `indices` (all by default) of
    `shards`, the trained model, or the evaluation's results with `metrics`."""
    it = RunLayout.for_run(storage_uri, namespace, run).iteration(iteration)
    scratch.mkdir(parents=True, exist_ok=True)
    if stage == "check":  # `spin_runtime check --output`: the report, ok (iteration 0 only)
        report = {"ok": True, "problems": [], "dataset": {"rows": 10, "usable": 10, "skipped": 0}}
        (scratch / "report.json").write_text(json.dumps(report))
        storage.upload_file(scratch / "report.json", it.check_report)
    elif stage == "generate":
        for index in range(shards) if indices is None else indices:
            shard = scratch / f"shard-{index}.jsonl"
            record = {"id": index, "split": "train", "prompt": "p", "real": "r", "generated": "g"}
            shard.write_text(json.dumps(record) + "\n")
            manifest.write_file_artifact(
                shard, it.shard(index, shards), "generated", {"records": 1}
            )
    elif stage == "train":
        (scratch / "config.json").write_text("{}")
        manifest.write_dir_artifact(scratch, it.model, "model")
    elif stage == "evaluate":
        values = dict(metrics or DEFAULT_METRICS)
        (scratch / "results.json").write_text(json.dumps({"metrics": values, "baseline": None}))
        manifest.write_dir_artifact(scratch, it.eval, "eval", {"metrics": values})
    else:
        raise ValueError(f"no stand-in artifacts for stage {stage!r}")


def write_job(
    storage_uri: str,
    scratch_root: Path,
    job: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Everything a whole Job (every index of an Indexed Job) leaves behind, from its labels."""
    meta = job["metadata"]
    labels = meta["labels"]
    write_step(
        storage_uri,
        meta["namespace"],
        labels[RUN_LABEL],
        int(labels[ITERATION_LABEL]),
        labels[STAGE_LABEL],
        scratch_root / meta["name"],
        shards=int(job["spec"].get("completions") or 1),
        metrics=metrics,
    )
