"""LoRA adapters (the ``peft`` library) on θt, and θt+1 published as a merged checkpoint.

SPIN stays exact with an adapter: θt is the reference, and a fresh LoRA adapter starts with
``B = 0``, so the policy at step 0 *is* θt and the first loss is ln 2, as in full fine-tuning.
Dropout of the base model is turned off before the adapter is added (see
:func:`spin_runtime.train.policy.disable_dropout`); the adapter's own dropout acts only on its
input, which contributes nothing while ``B = 0``.

The adapter is injected into the Hugging Face model in place (the ``PeftModel`` wrapper is
dropped): the trained :class:`~spin_runtime.train.policy.SequenceLogProbs`, DDP and FSDP2 see
the same module tree as in full fine-tuning, with the base weights frozen. Only adapter weights
have gradients and optimizer state. At the end, rank 0 rebuilds the adapted model on the meta
device from the gathered full state (no second copy of the weights), lets peft merge it, and
publishes the merged weights as θt+1 with the adapter itself in ``<output>/adapter`` (a
subfolder, so loaders of the merged checkpoint never mistake it for an adapter checkpoint).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spin_common.errors import UsageError
from spin_common.train_config import ALL_LINEAR, LoraSettings

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def peft_config(settings: LoraSettings) -> Any:
    from peft import LoraConfig

    targets: str | list[str] = (
        ALL_LINEAR if settings.target_modules == [ALL_LINEAR] else list(settings.target_modules)
    )
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _peft_model(model: nn.Module, settings: LoraSettings) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config(settings))  # type: ignore[arg-type]
    except ValueError as exc:  # e.g. target modules not found in the model
        raise UsageError(
            f"--lora-target-modules {','.join(settings.target_modules)}: {exc}"
        ) from exc


def apply(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """``model`` with fresh LoRA adapters injected in place (base weights frozen)."""
    settings.validate()
    inner: nn.Module = _peft_model(model, settings).get_base_model()
    trainable = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    if trainable == 0:
        raise UsageError("--lora-target-modules: no trainable adapter weights were created")
    return inner


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(
    config: Any, state: dict[str, torch.Tensor], settings: LoraSettings, adapter_dir: Path
) -> Any:
    """The merged plain model (CPU, fp32) from the full state of the adapted model
    (HF names with peft's ``base_layer``/``lora_A``/``lora_B`` parts); writes the adapter
    (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
    ``PeftModel.from_pretrained(θt, adapter_dir)``) to ``adapter_dir``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    peft_model = _peft_model(skeleton, settings)
    inner = peft_model.get_base_model()
    expected = set(inner.state_dict())
    missing = expected - state.keys()
    if missing:
        raise RuntimeError(f"gathered state lacks {len(missing)} keys, e.g. {sorted(missing)[:3]}")
    # assign=True: the gathered CPU tensors become the parameters (no copy of the weights)
    inner.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    inner.tie_weights()
    peft_model.save_pretrained(str(adapter_dir))
    return peft_model.merge_and_unload()
