"""benchmarks/gpu_check.py --tiny: the GPU check runs end to end on the CPU, so the script that
waits for a lent GPU cannot rot. Every contender runs the project's code and reports; the
numbers themselves are judged on a GPU (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.spin_runtime.test_train_support import REPO, subprocess_env

#: The GPU machine has torch, transformers and peft only: run the script as if boto3, MLflow,
#: pyarrow and TRL were not installed (an import of any of them fails).
WITHOUT_LIGHT_DEPS = """
import runpy, sys
for name in ("boto3", "botocore", "mlflow", "pyarrow", "trl", "datasets"):
    sys.modules[name] = None
script = sys.argv[1]
sys.argv = [script, "--tiny"]
runpy.run_path(script, run_name="__main__")
"""

CONTENDERS = ("spin", "spin_gc", "spin_ddp", "spin_fsdp", "lora", "floor", "trl_precompute")


def test_gpu_check_runs_tiny_on_the_cpu():
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_LIGHT_DEPS, str(REPO / "benchmarks" / "gpu_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert len(lines) == 1  # ONE JSON line; the trainer's metrics go to stderr
    result = json.loads(lines[0])
    assert result["device"] == "cpu" and result["settings"]["tiny"]
    for name in CONTENDERS:
        row = result[name]
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] > 0
        assert row["peak_mem_gb"] is None  # GPU memory only
    strategies = {name: result[name]["strategy"] for name in CONTENDERS[:5]}
    assert strategies == {
        "spin": "none",
        "spin_gc": "none",
        "spin_ddp": "ddp",
        "spin_fsdp": "fsdp",
        "lora": "none",
    }
    # bf16 autocast on the CPU: θt's reference pass and the first step batch alike
    for name in ("spin", "spin_gc", "spin_ddp", "spin_fsdp", "lora"):
        assert abs(result[name]["first_loss_minus_ln2"]) < 1e-3, name
    assert 0 < result["lora"]["trainable_params"] < result["params"]
    assert result["generation"]["new_tokens"] > 0 and result["generation"]["tokens_per_s"] > 0
    ratios = result["ratios"]
    assert all(ratios[k] > 0 for k in ratios if k != "lora_vs_full_mem")
    assert result["targets"]["first_loss_within_1e-3_of_ln2"]
