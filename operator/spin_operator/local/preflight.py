"""Bad input caught before any work starts, each problem named by its field.

`spinctl run` fails fast (exit 2) on what would otherwise surface minutes later inside a step:
a missing or invalid file (every problem `spinctl validate` reports), an unreachable storage or
tracking URI, a model, tokenizer, chat template or dataset path that does not exist, a dataset
with too many unusable rows (or none), a model folder missing its config, weights, tokenizer or
chat template, or a backend this machine cannot run. Hub model ids are not checked (they resolve
when loaded). docs/datasets.md lists every check and its outcome.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spin_operator.api import types as api
from spin_operator.settings import Settings, resolve_spec
from spin_operator.steps import RunRef
from spin_operator.validation import InvalidSpec, parse
from spin_operator.yamlio import YamlSyntaxError, load_file

DEFAULT_NAMESPACE = "default"
DEFAULT_STORAGE = "spin-runs"


class BadInput(Exception):
    """Input that cannot run; `problems` are `field: why` lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Loaded:
    path: Path
    run: RunRef
    spec: api.SPINRunSpec  # storage and tracking resolved


def local_defaults(
    storage_uri: str | None, tracking_uri: str | None, spec_storage: str | None = None
) -> Settings:
    """Where a spec without storage/tracking writes locally: `./spin-runs`, and an sqlite MLflow
    store in the run's storage folder (absolute, so every child process agrees whatever its
    directory). `tracking_uri=""` means no tracking unless the spec names one."""
    storage = storage_uri or os.path.abspath(DEFAULT_STORAGE)
    folder = spec_storage or storage
    if tracking_uri is None and not folder.startswith("s3://"):
        tracking_uri = f"sqlite:///{os.path.abspath(folder.removeprefix('file://'))}/mlflow.db"
    return Settings(storage_uri=storage, mlflow_uri=tracking_uri or None)


def load(
    path: str | Path, storage_uri: str | None = None, tracking_uri: str | None = None
) -> Loaded:
    """The SPINRun of a YAML file, validated like `spinctl validate`, defaults resolved."""
    path = Path(path)
    try:
        docs = load_file(path)
    except FileNotFoundError:
        raise BadInput([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput([f"{path}: cannot read it: {exc}"]) from None
    except YamlSyntaxError as exc:
        raise BadInput([f"{path}: not valid YAML: {exc}"]) from None
    if len(docs) != 1:
        raise BadInput([f"{path}: expected one SPINRun document, found {len(docs)}"])
    obj: Any = docs[0]
    try:
        spec = parse(obj)
        spec = resolve_spec(spec, local_defaults(storage_uri, tracking_uri, spec.storage.uri))
    except InvalidSpec as exc:
        raise BadInput([str(p) for p in exc.problems]) from None
    meta = obj.get("metadata") or {}
    namespace = str(meta.get("namespace") or DEFAULT_NAMESPACE)
    return Loaded(path, RunRef(namespace, str(meta["name"])), spec)


# --------------------------------------------------------------------------- checks


def _is_local(uri: str) -> bool:
    return uri.startswith(("/", "./", "../", "~", "file://")) or Path(uri).exists()


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def _s3_exists(uri: str) -> bool:
    from spin_common import storage

    return storage.exists(uri)


def check_path(field: str, uri: str | None, kind: str) -> str | None:
    """`kind`: "model" (a checkpoint directory), "dir", "file" or "data" (a dataset: a file, or
    a directory, glob or name prefix of shards). None when fine."""
    if not uri:
        return None
    if kind == "data":
        return _check_data(field, uri)
    if uri.startswith("s3://"):
        probe = uri.rstrip("/") + "/config.json" if kind == "model" else uri
        try:
            found = _s3_exists(probe)
        except Exception as exc:
            return f"{field}: cannot reach {uri}: {type(exc).__name__}: {exc}"
        return None if found else f"{field}: {probe} does not exist"
    if not _is_local(uri):
        return None  # a hub id: resolved (and downloaded) when loaded
    path = _local(uri)
    if kind == "file":
        return None if path.is_file() or path.is_dir() else f"{field}: {uri}: no such file"
    if not path.is_dir():
        return f"{field}: {uri}: no such directory"
    if kind == "model" and not (path / "config.json").is_file():
        return f"{field}: {uri}: not a Hugging Face checkpoint (no config.json)"
    return None


def _check_data(field: str, uri: str) -> str | None:
    """The dataset names at least one data file, resolved as the runtime resolves it."""
    from spin_common.data import data_files
    from spin_common.errors import UsageError

    try:
        files = data_files(uri)
    except UsageError as exc:
        return f"{field}: {str(exc).removeprefix(f'--dataset {uri}: ')} ({uri})"
    except Exception as exc:  # S3 unreachable, denied, ...
        return f"{field}: cannot reach {uri}: {type(exc).__name__}: {exc}"
    if not files:
        return f"{field}: {uri}: no .jsonl/.json/.parquet files in it"
    if files == [uri]:
        from spin_common import storage

        try:
            found = storage.exists(uri)
        except Exception as exc:
            return f"{field}: cannot reach {uri}: {type(exc).__name__}: {exc}"
        return None if found else f"{field}: {uri}: no such file"
    return None


def check_storage(spec: api.SPINRunSpec) -> str | None:
    uri = spec.storage.uri or ""
    if uri.startswith("s3://"):
        from spin_common import storage
        from spin_operator.endpoints import at_endpoint

        bucket, _ = storage.split_s3(uri)
        # one quick try, for this call only (a value in context, not the process' settings)
        quick = replace(
            storage.config(), attempts=1, botocore_attempts=1, connect_timeout=5, read_timeout=10
        )
        try:
            with storage.budget(quick), at_endpoint(spec):
                storage.s3_client().head_bucket(Bucket=bucket)
        except Exception as exc:
            return f"spec.storage.uri: cannot reach bucket {bucket!r}: {type(exc).__name__}: {exc}"
        return None
    path = _local(uri)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"spec.storage.uri: cannot create {uri}: {exc.strerror or exc}"
    if not os.access(path, os.W_OK):
        return f"spec.storage.uri: {uri} is not writable"
    return None


def check_tracking(uri: str | None, timeout: float = 5.0) -> str | None:
    if not uri or uri.startswith("databricks"):
        return None
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return None
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return None  # something answers (a proxy may guard /health)
            return f"spec.tracking.uri: {uri} answers {exc.code}"
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"spec.tracking.uri: cannot reach {uri}: {reason}"
    path = Path(uri.removeprefix("sqlite:///").removeprefix("file://"))
    folder = path.parent if uri.startswith("sqlite:") else path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"spec.tracking.uri: cannot create {folder}: {exc.strerror or exc}"
    if not os.access(folder, os.W_OK):
        return f"spec.tracking.uri: {folder} is not writable"
    return None


def check_runnable(spec: api.SPINRunSpec) -> list[str]:
    """What this machine must have to run the steps at all."""
    problems = []
    if importlib.util.find_spec("torch") is None:
        problems.append("spin_runtime needs torch here: install spin-operator[runtime]")
    if spec.generation.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        problems.append(
            "spec.generation.backend: vllm is not installed in this environment "
            "(use transformers on a CPU-only machine)"
        )
    command = spec.evaluation.command
    if (
        spec.evaluation.enabled
        and command
        and command[0] != "python"
        and shutil.which(command[0]) is None
    ):
        problems.append(f"spec.evaluation.command[0]: {command[0]!r} is not an executable on PATH")
    return problems


def check_inputs(spec: api.SPINRunSpec, skip: set[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """The dataset parsed row by row and the model folder checked piece by piece, with the
    runtime's own `check` functions (the reader every step uses; no weights loaded). Fields in
    `skip` already failed a simpler check. Returns (the dataset profile, problems)."""
    from spin_common.check import check_dataset, check_model_uris
    from spin_operator.endpoints import at_endpoint

    report: dict[str, Any] | None = None
    problems: list[str] = []
    m, d = spec.model, spec.dataset
    with at_endpoint(spec):
        if "spec.dataset.uri" not in skip:
            report, problems = check_dataset(d.uri, d.max_skipped_fraction, d.eval_samples)
        if not skip & {"spec.model.uri", "spec.model.tokenizer", "spec.model.chatTemplate"}:
            names = {
                "model": "spec.model.uri:",
                "tokenizer": "spec.model.tokenizer:",
                "chat_template": "spec.model.chatTemplate:",
            }
            problems += check_model_uris(m.uri, m.tokenizer, m.chat_template, names)
    return report, problems


def preflight(loaded: Loaded) -> dict[str, Any] | None:
    """Raise BadInput listing every problem; return the dataset profile when the run can start
    (rows, usable, skipped by reason with their first line numbers)."""
    spec = loaded.spec
    problems = check_runnable(spec)
    failed: set[str] = set()
    for field, uri, kind in (
        ("spec.model.uri", spec.model.uri, "model"),
        ("spec.model.tokenizer", spec.model.tokenizer, "dir"),
        ("spec.model.chatTemplate", spec.model.chat_template, "file"),
        ("spec.dataset.uri", spec.dataset.uri, "data"),
    ):
        if uri and uri.startswith("s3://"):
            from spin_operator.endpoints import at_endpoint

            with at_endpoint(spec):
                problem = check_path(field, uri, kind)
        else:
            problem = check_path(field, uri, kind)
        if problem:
            problems.append(problem)
            failed.add(field)
    report, found = check_inputs(spec, failed)
    problems += found
    for problem in (check_storage(spec), check_tracking(spec.tracking.uri)):
        if problem:
            problems.append(problem)
    if problems:
        raise BadInput(problems)
    return report
