"""Helpers shared by the local-mode tests: spec files and the fake runtime interpreter."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import yaml

FAKE = Path(__file__).with_name("local_fake_runtime.py")


def fake_python(directory: Path) -> str:
    """An executable that stands where `python` would in the steps' argv and runs the fake
    runtime instead of spin_runtime."""
    path = directory / "fake-python"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def write_model_folder(model: Path) -> Path:
    """A folder the preflight's model check accepts without loading it: a config naming its
    architecture, a (tensor-less) safetensors file, a tokenizer.json and a chat template."""
    import struct

    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    header = b'{"__metadata__":{"format":"pt"}}'
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    return model


def write_spec(directory: Path, name: str = "local-test", **spec: Any) -> Path:
    """A SPINRun file whose model and dataset exist (`write_model_folder`, two JSONL rows);
    `spec` overrides nested fields, e.g. `training={"beta": 2.0}`."""
    model = write_model_folder(directory / "model")
    data = directory / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(2))
    )
    base = {
        "model": {"uri": str(model)},
        "dataset": {"uri": str(data), "evalSamples": 1},
        "iterations": 2,
        "generation": {"backend": "transformers", "gpusPerReplica": 0},
        "training": {"gpusPerNode": 0, "globalBatchSize": 2, "microBatchSize": 1},
        "evaluation": {"gpus": 0},
        "storage": {"uri": str(directory / "artifacts")},
        "failurePolicy": {"maxRetries": 1},
    }
    doc = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SPINRun",
        "metadata": {"name": name},
        "spec": merge(base, spec),
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def calls(path: Path) -> list[dict[str, Any]]:
    """The fake runtime's invocation records."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def steps(path: Path) -> list[tuple[str, int]]:
    return [(c["stage"], c["iteration"]) for c in calls(path) if c["stage"] != "hang"]


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def with_default_sigint(argv: list[str]) -> list[str]:
    """`argv` started with SIGINT at its default disposition, as from an interactive terminal.

    A shell without job control (a CI script, `make test &`) starts background commands with
    SIGINT ignored, and every child inherits that: a Python started so never raises
    KeyboardInterrupt, so a test's "Ctrl-C" would do nothing and its wait time out (seen in a
    fresh-clone `.ci/run` started in the background). The launcher resets the disposition, then
    execs `argv`, which starts as under a terminal."""
    launcher = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"
    return [sys.executable, "-c", launcher, *argv]
