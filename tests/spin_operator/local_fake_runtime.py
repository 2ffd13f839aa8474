"""A stand-in for `python -m spin_runtime` (and torchrun) in local-mode unit tests.

It takes the exact argv `spinctl run` builds from `plan_step` and writes what the real commands
write — shards, a model folder, results.json, each with its manifest last — in milliseconds,
without torch. Environment knobs make steps fail or hang, so the runner's loop, retries,
interruption and resume can be tested quickly; the real runtime is exercised by
test_local_e2e.py.

    FAKE_CALLS=path        append one JSON line per invocation (stage, iteration, shard, pid)
    FAKE_FAIL=stage:t[:n]  that step exits 1 (its first n invocations only, when n is given)
    FAKE_HANG=stage:t      that step writes its pid (and a child's) to FAKE_CALLS and sleeps
    FAKE_BAD_INPUT=stage:t that step logs its argv, then `error: <cause>` and exits 2 (bad input)
    FAKE_RECORD_ENV=A,B    also record these env vars in each FAKE_CALLS line
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _flag(argv: list[str], name: str, default: str = "") -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def _calls(path: str, **record: object) -> int:
    """Append a record; return how many earlier records had the same stage and iteration."""
    earlier = 0
    p = Path(path)
    if p.exists():
        for line in p.read_text().splitlines():
            old = json.loads(line)
            earlier += old["stage"] == record["stage"] and old["iteration"] == record["iteration"]
    with p.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return earlier


def _matches(knob: str, stage: str, iteration: int, count: int) -> bool:
    parts = os.environ.get(knob, "").split(":")
    if len(parts) < 2 or parts[0] != stage or int(parts[1]) != iteration:
        return False
    return len(parts) < 3 or count < int(parts[2])


def main(argv: list[str]) -> int:
    from spin_common import manifest, storage

    if argv[:2] == ["-m", "torch.distributed.run"]:
        argv = argv[argv.index("spin_runtime") - 1 :]
    assert argv[:2] == ["-m", "spin_runtime"], argv
    stage, rest = argv[2], argv[3:]
    iteration = int(re.search(r"iter-(\d+)", _flag(rest, "--output"))[1])  # type: ignore[index]
    control = "/control/" in _flag(rest, "--output")  # spec.controlArm's steps
    stage = f"control-{stage}" if control else stage
    shard = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    calls = os.environ.get("FAKE_CALLS", os.devnull)
    count = _calls(
        calls,
        stage=stage,
        iteration=iteration,
        shard=shard,
        pid=os.getpid(),
        argv=rest,
        env={
            k: os.environ.get(k)
            for k in (
                "MLFLOW_RUN_ID",
                "SPIN_NUM_SHARDS",
                "JOB_COMPLETION_INDEX",
                *os.environ.get("FAKE_RECORD_ENV", "").split(","),
            )
        },
    )
    print(f"fake {stage} of iteration {iteration}, shard {shard}", flush=True)
    if _matches("FAKE_HANG", stage, iteration, 0):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        _calls(calls, stage="hang", iteration=iteration, pid=os.getpid(), child=child.pid)
        time.sleep(600)
    if _matches("FAKE_BAD_INPUT", stage, iteration, count):
        print(f"2026-12-02 12:00:00 INFO argv: {' '.join(argv)}", flush=True)
        print("error: dataset line 23: not UTF-8", flush=True)
        return 2
    if _matches("FAKE_FAIL", stage, iteration, count):
        print("error: injected failure", flush=True)
        return 1
    out = _flag(rest, "--output")
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "generate":
            shards = int(os.environ.get("SPIN_NUM_SHARDS", "1"))
            name = f"shard-{shard:05d}-of-{shards:05d}.jsonl"
            Path(tmp, name).write_text(json.dumps({"id": shard, "generated": "x"}) + "\n")
            manifest.write_file_artifact(Path(tmp, name), storage.join(out, name), "generated")
        elif stage in ("train", "control-train"):
            for step in (1, 2):
                print(
                    json.dumps({"event": "train", "step": step, "loss": 0.6, "margin": 0.1}),
                    flush=True,
                )
            Path(tmp, "config.json").write_text("{}")
            metrics = {"eval_margin": 0.5 + iteration, "eval_accuracy": 0.75}
            manifest.write_dir_artifact(tmp, out, "model", {"metrics": metrics})
        else:
            # the SFT control scores 0.375 at every iteration: SPIN behind at t=0, ahead from t=1
            score = 0.375 if control else 0.25 * (iteration + 1)
            results = {"metrics": {"exact_match": score, "real_logp_per_token": -1.0}}
            if "--baseline-model" in rest:
                results["baseline"] = {"exact_match": 0.125, "real_logp_per_token": -2.0}
            Path(tmp, "results.json").write_text(json.dumps(results))
            manifest.write_dir_artifact(tmp, out, "eval", {})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
