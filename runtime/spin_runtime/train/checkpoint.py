"""Writing θt+1 and the resumable epoch checkpoints, so that nothing partial looks finished.

Every artifact here is a folder published through :mod:`spin_common.manifest`: all files first,
``_MANIFEST.json`` last. A process killed while saving leaves a folder without a manifest, which
readers (the reconciler, :func:`latest_epoch`, the next iteration) ignore and a retry rewrites.

* ``--output`` (kind ``model``): an HF checkpoint (``model.safetensors``, ``config.json``,
  ``generation_config.json``, tokenizer files, ``chat_template.jinja``) that transformers and
  vLLM load, in the dtype of the input checkpoint.
* ``--work-dir/epoch-NNN`` (kind ``train-checkpoint``): ``model.pt`` (fp32 master weights),
  ``optimizer.pt``, ``reference.pt`` (θt's log-probs of every pair, so a resumed run does not
  need θt again), ``rng.pt`` and ``trainer.json`` (epoch, step, scheduler, the settings that
  must match to resume). States are full (unsharded) and keyed by parameter name, so a run may
  resume on a different number of processes or under another strategy.

Only rank 0 touches storage; gathering the states is collective and runs on every rank.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spin_common import manifest, storage
from spin_runtime.train import distributed, lora, mlmodel
from spin_runtime.train.distributed import Context
from spin_runtime.train.lora import LoraSettings

log = logging.getLogger(__name__)

MODEL_KIND = "model"
EPOCH_KIND = "train-checkpoint"
_EPOCH_RE = re.compile(r"^epoch-(\d{3,})$")
#: Prefix the trained wrapper (``SequenceLogProbs.model``) adds to the HF parameter names.
WRAPPER_PREFIX = "model."


def epoch_uri(work_dir: str, epoch: int) -> str:
    return storage.join(work_dir, f"epoch-{epoch:03d}")


@contextmanager
def staging(uri: str) -> Iterator[Path]:
    """A local folder to write an artifact into before publishing it at ``uri``: the final
    folder itself when local (emptied first, it holds no manifest yet), else a temp folder."""
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        storage.delete_prefix(uri)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="spin-train-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# θt+1


def tied_output_names(model: nn.Module) -> list[str]:
    """Names of parameters that are the input embedding under another name (tied output head):
    saved once, as transformers and vLLM expect."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None:
        return []
    embedding = get_in().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is embedding]
    out = get_out().weight
    if out is not embedding:
        return []
    return [n for n in names if n != names[0]]


def source_config(uri: str) -> Any:
    """θt's own config, as stored (local, s3:// through the cache, or a hub id): θt+1 is saved
    with it, so its dtype and settings (``use_cache``, dropout) are the model's, not the
    trainer's in-memory ones."""
    from transformers import AutoConfig

    from spin_runtime import models

    try:
        return AutoConfig.from_pretrained(models.resolve(uri))
    except (OSError, ValueError) as exc:
        raise models.ModelError(f"--model {uri}: cannot read its config: {exc}") from exc


def saved_dtype(config: Any) -> torch.dtype:
    """The dtype θt is stored in (θt+1 is saved in the same one); fp32 only when the config
    records none."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    log.info("the model's config records no dtype: saving θt+1 in float32")
    return torch.float32


def save_model(
    ctx: Context,
    module: nn.Module,
    hf_model: Any,
    tokenizer: Any,
    output: str,
    config: Any,
    drop: list[str],
    meta: Mapping[str, Any],
    adapter: LoraSettings | None = None,
) -> None:
    """Gather the trained weights (collective) and publish them at ``output`` from rank 0, in
    the dtype and with the config of θt (``config``: :func:`source_config`); with an
    ``adapter``, the merged weights, and the adapter in ``output/adapter``."""
    dtype = saved_dtype(config)
    state = distributed.full_model_state(ctx, module)
    if ctx.main:
        state = {
            k[len(WRAPPER_PREFIX) :]: v for k, v in state.items() if k.startswith(WRAPPER_PREFIX)
        }
        with staging(output) as folder:
            target = hf_model
            if adapter is not None:
                target = lora.merge(hf_model.config, state, adapter, folder / lora.ADAPTER_DIR)
                target.generation_config = hf_model.generation_config
                state = target.state_dict()
            weights = {k: v.to(dtype).contiguous() for k, v in state.items() if k not in drop}
            del state
            target.save_pretrained(folder, state_dict=weights)
            config.save_pretrained(folder)  # θt's own config over the training-time one
            _set_config_dtype(folder / "config.json", dtype)
            tokenizer.save_pretrained(folder)
            # models:/<name>@best must load with mlflow.transformers.load_model: the folder is
            # the MLflow model (docs/mlflow.md), not a copy of it.
            mlmodel.write_transformers_flavor(folder, target, tokenizer, dtype)
            manifest.write_dir_artifact(folder, output, MODEL_KIND, meta)
        log.info("saved θt+1 to %s", output)
    distributed.barrier(ctx)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """save_pretrained records the in-memory (fp32 master) dtype; record the saved one."""
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# epoch checkpoints


@dataclass
class Resumed:
    """What a complete epoch checkpoint restores (model and optimizer are loaded in place)."""

    epoch: int
    step: int
    scheduler: dict[str, Any]
    reference: torch.Tensor
    trainer: dict[str, Any]


def _rng_state() -> dict[str, Any]:
    """Every generator a later epoch could draw from (dropout is off and the data order is a
    function of the seed, so this is belt and braces)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy_keys = torch.from_numpy(np.asarray(keys).astype(np.int64))
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), numpy_keys, pos, has_gauss, gauss],
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(ast.literal_eval(state["python"]))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_epoch(
    ctx: Context,
    work_dir: str,
    epoch: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    reference: torch.Tensor,
    trainer: Mapping[str, Any],
) -> None:
    """Publish ``work_dir/epoch-NNN`` (collective gather; rank 0 writes)."""
    model_state = distributed.full_model_state(ctx, module)
    optimizer_state = distributed.full_optimizer_state(ctx, module, optimizer)
    if ctx.main:
        uri = epoch_uri(work_dir, epoch)
        info = {**trainer, "epoch": epoch, "step": step, "scheduler": scheduler.state_dict()}
        with staging(uri) as folder:
            torch.save(model_state, folder / "model.pt")
            torch.save(optimizer_state, folder / "optimizer.pt")
            torch.save(reference.detach().cpu(), folder / "reference.pt")
            torch.save(_rng_state(), folder / "rng.pt")
            (folder / "trainer.json").write_text(json.dumps(info, indent=2, sort_keys=True))
            manifest.write_dir_artifact(folder, uri, EPOCH_KIND, {"epoch": epoch, "step": step})
        log.info("epoch checkpoint %s complete", uri)
    distributed.barrier(ctx)


def latest_epoch(work_dir: str) -> int | None:
    """The highest epoch whose checkpoint has a complete manifest (incomplete ones are skipped:
    a run killed while saving them)."""
    epochs = set()
    for name in storage.list_files(work_dir):
        match = _EPOCH_RE.match(name.split("/", 1)[0])
        if match and name.endswith("/" + manifest.MANIFEST_NAME):
            epochs.add(int(match.group(1)))
    for epoch in sorted(epochs, reverse=True):
        if manifest.is_complete(epoch_uri(work_dir, epoch)):
            return epoch
        log.warning("ignoring incomplete epoch checkpoint %s", epoch_uri(work_dir, epoch))
    return None


def _read_local(uri: str) -> tuple[Path, Path | None]:
    """A local folder holding the files of ``uri`` (and the temp folder to delete, if any)."""
    if not storage.is_s3(uri):
        return storage.local_path(uri), None
    tmp = Path(tempfile.mkdtemp(prefix="spin-resume-"))
    storage.download_dir(uri, tmp, files=manifest.require_complete(uri).files)
    return tmp, tmp


def load_epoch(
    ctx: Context,
    work_dir: str,
    epoch: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Resumed:
    """Load ``work_dir/epoch-NNN`` into ``module`` and ``optimizer`` (rank 0 reads and
    broadcasts) and return the rest of the state on every rank. ``check(trainer)`` runs on every
    rank before any state is loaded: a checkpoint of other settings (e.g. full weights vs a
    LoRA adapter, whose parameter names differ) is refused there, not as a load error."""
    model_state: dict[str, Any] = {}
    optimizer_state: dict[str, Any] = {}
    payload: Any = None
    if ctx.main:
        folder, tmp = _read_local(epoch_uri(work_dir, epoch))
        try:
            model_state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
            optimizer_state = torch.load(
                folder / "optimizer.pt", map_location="cpu", weights_only=True
            )
            reference = torch.load(folder / "reference.pt", map_location="cpu", weights_only=True)
            rng = torch.load(folder / "rng.pt", map_location="cpu", weights_only=True)
            trainer = json.loads((folder / "trainer.json").read_text())
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        payload = (trainer, reference, rng)
    trainer, reference, rng = distributed.broadcast_object(ctx, payload)
    if check is not None:
        check(trainer)
    distributed.load_full_state(ctx, module, optimizer, model_state, optimizer_state)
    _set_rng_state(rng)
    return Resumed(
        epoch=int(trainer["epoch"]),
        step=int(trainer["step"]),
        scheduler=trainer["scheduler"],
        reference=reference,
        trainer=trainer,
    )
