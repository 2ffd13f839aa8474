"""torchrun on CPU (gloo): 2 processes under FSDP2 and DDP give the 1-process loss curve and the
same θt+1; a checkpoint resumes on another world size; a SIGKILLed run resumes.

Tolerance: losses and gradient norms within 1e-5 absolute, weights within 1e-5 — the
difference is only the order of floating-point sums (measured ~1e-6).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spin_common import manifest
from spin_runtime.train import checkpoint, loop
from tests.spin_runtime.test_train_support import (
    metrics,
    one_thread,
    run_train,
    subprocess_env,
    task_records,
    torchrun,
    train_argv,
    write_generated,
)

FLAGS = {"global_batch_size": 8, "micro_batch_size": 2, "learning_rate": 2e-3, "epochs": 2}


@pytest.fixture(scope="module")
def data(tiny_rows, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("generated")
    return write_generated(root / "g", task_records(tiny_rows[:40], 8, shift=1))


@pytest.fixture(scope="module")
def single(tiny_model_dir, data, tmp_path_factory) -> Path:
    """The 1-process reference run."""
    root = tmp_path_factory.mktemp("single")
    with one_thread():
        assert (
            run_train(train_argv(tiny_model_dir, [data], root / "model", root / "train", **FLAGS))
            == 0
        )
    return root


def _same_run(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    ma, mb = metrics(a / "train"), metrics(b / "train")
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-5
        assert x["accuracy"] == y["accuracy"]
    wa = load_file(a / "model" / "model.safetensors")
    wb = load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-5)


def _torchrun_ok(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    done = torchrun(nproc, argv)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_two_processes_fsdp2_match_one_process(single, tiny_model_dir, data, tmp_path):
    argv = train_argv(
        tiny_model_dir, [data], tmp_path / "model", tmp_path / "train", strategy="fsdp", **FLAGS
    )
    done = _torchrun_ok(2, argv)
    assert "strategy fsdp on 2 process(es)" in done.stderr
    assert done.stderr.count('"event": "train"') == len(metrics(single / "train"))  # rank 0 only
    _same_run(single, tmp_path)
    evals = metrics(tmp_path / "train", "eval")
    assert evals[-1]["eval_loss"] == pytest.approx(
        metrics(single / "train", "eval")[-1]["eval_loss"], abs=1e-5
    )


@pytest.mark.slow
def test_two_processes_ddp_match_one_process(single, tiny_model_dir, data, tmp_path):
    argv = train_argv(
        tiny_model_dir, [data], tmp_path / "model", tmp_path / "train", strategy="ddp", **FLAGS
    )
    done = _torchrun_ok(2, argv)
    assert "strategy ddp on 2 process(es)" in done.stderr
    _same_run(single, tmp_path)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_fsdp_processes(
    single, tiny_model_dir, data, tmp_path, monkeypatch
):
    argv = train_argv(tiny_model_dir, [data], tmp_path / "model", tmp_path / "train", **FLAGS)
    real_step = loop.train_step
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2 of 4 steps each
            raise RuntimeError("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", crashing)
    with one_thread(), pytest.raises(RuntimeError, match="killed"):
        run_train(argv)
    assert checkpoint.latest_epoch(str(tmp_path / "train")) == 1
    done = _torchrun_ok(2, [*argv, "--strategy", "fsdp"])
    assert "resumed from" in done.stderr
    _same_run(single, tmp_path)


@pytest.mark.slow
def test_a_sigkilled_run_resumes_from_its_last_epoch_checkpoint(tiny_model_dir, data, tmp_path):
    argv = train_argv(
        tiny_model_dir,
        [data],
        tmp_path / "model",
        tmp_path / "train",
        **{**FLAGS, "epochs": 10, "global_batch_size": 2, "micro_batch_size": 1},
    )
    cmd = [sys.executable, "-m", "spin_runtime", *argv]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "train" / "epoch-001" / manifest.MANIFEST_NAME
    deadline = time.monotonic() + 120
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert first.exists(), "no epoch checkpoint within 120 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()  # type: ignore[union-attr]
    assert not manifest.is_complete(str(tmp_path / "model"))
    killed_at = checkpoint.latest_epoch(str(tmp_path / "train"))
    assert killed_at is not None and killed_at < 10

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from {tmp_path / 'train'}/epoch-{killed_at:03d}" in done.stderr
    assert manifest.is_complete(str(tmp_path / "model"), verify=True)
    steps = [m["step"] for m in metrics(tmp_path / "train")]
    assert steps == list(range(1, 10 * 16 + 1))
