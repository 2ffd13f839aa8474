"""A quick stand-in for ``python -m spin_runtime ...`` / ``torchrun ... -m spin_runtime train``.

Why: the load test runs 20 SPINRuns at once on two shared cores; real generation and training of
each would take many minutes. The node agent's launch hook (``quick_pods`` in
tests/cluster/conftest.py) runs this file instead of the container's command, with the original
argv after it. It writes what the real step leaves in storage (the same layout, manifests last, so the operator's checks are the real
ones) and exits 0; everything else (Jobs, pods, env and Secrets, S3 on moto, the operator) is real.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def main(argv: list[str]) -> int:
    from spin_common import layout, manifest, storage

    if argv[1:4] == ["-m", "spin_runtime", "check"]:
        # the check is light (no model loaded): the real one runs, on the real dataset and model
        os.execv(sys.executable, [sys.executable, *argv[1:]])
    output = _flag(argv, "--output")
    scratch = Path(tempfile.mkdtemp(dir="."))
    if "generate" in argv:
        index = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
        shards = int(os.environ.get("SPIN_NUM_SHARDS", "1"))
        record = {
            "id": index,
            "split": "train",
            "system": None,
            "prompt": "p",
            "real": "r",
            "generated": "g",
            "finish_reason": "stop",
            "num_generated_tokens": 1,
        }
        shard = scratch / "shard.jsonl"
        shard.write_text(json.dumps(record) + "\n")
        uri = storage.join(output, layout.shard_name(index, shards))
        manifest.write_file_artifact(shard, uri, "generated", {"records": 1, "standin": True})
    elif "train" in argv:
        if os.environ.get("PET_NODE_RANK", "0") != "0":
            return 0  # only rank 0 saves the model
        (scratch / "config.json").write_text("{}")
        manifest.write_dir_artifact(scratch, output, "model", {"standin": True})
    elif "evaluate" in argv:
        # A test may set the score (STANDIN_EXACT_MATCH) per pod, e.g. to tell two arms apart.
        score = float(os.environ.get("STANDIN_EXACT_MATCH", "0.5"))
        results = {"metrics": {"exact_match": score, "real_logp_per_token": -1.0}, "baseline": None}
        (scratch / "results.json").write_text(json.dumps(results))
        manifest.write_dir_artifact(scratch, output, "eval", {"metrics": results["metrics"]})
    else:
        print(f"standin: unknown step in {argv}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
