"""Process groups, DDP / FSDP2 wrapping and full state dicts, for 1..N processes and nodes.

The trainer runs under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) or as a plain
process (world of one, no process group). Backend: nccl on GPUs, gloo on CPU.

Strategy (``--strategy auto``): one process trains the plain module; several processes use DDP
when a full replica fits, else FSDP2 full sharding. "Fits" is the rule
``params x (4 weight + 4 grad + optimizer-state bytes) <= 0.5 x one device's memory``
(optimizer state: 4 bytes/param for RMSprop, 8 for AdamW; the other half is left for
activations), evaluated on rank 0 and broadcast so all ranks agree.
An explicit ``--strategy ddp|fsdp`` is honoured whenever a process group exists, even of one
process (``torchrun --nproc_per_node 1``: the wrapper's own cost, measured by
benchmarks/gpu_check.py).

Parameters are fp32 master weights. With bf16 precision, DDP and the plain module compute under
``torch.autocast``; FSDP2 gathers bf16 parameters and reduces gradients in fp32
(``MixedPrecisionPolicy``). SPIN's learning rates (5e-7) are below bf16's resolution of typical
weights: pure-bf16 weights would not move.

State dicts go through ``torch.distributed.checkpoint.state_dict`` for every strategy, so keys
are the same whatever wrapped the module and a checkpoint written under one strategy resumes
under another.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spin_common.train_config import STRATEGIES

log = logging.getLogger(__name__)

OPTIMIZER_STATE_BYTES = {"rmsprop": 4, "adamw": 8}


@dataclass(frozen=True)
class Context:
    """Where this process sits: rank, world size, device, and whether a process group exists."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    initialized: bool

    @property
    def main(self) -> bool:
        """Rank 0 is the only one that logs metrics and writes artifacts."""
        return self.rank == 0


def init(timeout_minutes: int = 60) -> Context:
    """Join the torchrun process group (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    initialized = False
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
            if device.type == "cuda":
                kwargs["device_id"] = device
            dist.init_process_group(backend=backend, **kwargs)
        initialized = True
    return Context(rank, world, local_rank, device, initialized)


def shutdown(ctx: Context) -> None:
    if ctx.initialized and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.initialized:
        dist.barrier()


def all_reduce_sum(ctx: Context, tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op for one process)."""
    if ctx.initialized and ctx.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(ctx: Context, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not (ctx.initialized and ctx.world > 1):
        return value
    box = [value if ctx.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_rows(ctx: Context, rows: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``rows`` (same shape on all ranks), in rank order."""
    if not (ctx.initialized and ctx.world > 1):
        return [rows]
    out = [torch.empty_like(rows) for _ in range(ctx.world)]
    dist.all_gather(out, rows.contiguous())
    return out


def device_memory_bytes(ctx: Context) -> int:
    """One device's memory: the GPU's, or this host's RAM shared by its local processes."""
    if ctx.device.type == "cuda":
        return int(torch.cuda.get_device_properties(ctx.device).total_memory)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages // max(1, local))


def choose_strategy(ctx: Context, requested: str, num_params: int, optimizer: str) -> str:
    """``none`` (one process), ``ddp`` or ``fsdp``; see the module docstring for the auto rule."""
    if requested not in STRATEGIES:
        raise ValueError(f"--strategy {requested}: expected one of {', '.join(STRATEGIES)}")
    if requested != "auto" and ctx.initialized:
        return requested  # honoured even for one process (torchrun --nproc_per_node 1)
    if ctx.world == 1:
        return "none"
    need = num_params * (8 + OPTIMIZER_STATE_BYTES.get(optimizer, 8))
    choice = "ddp" if need <= 0.5 * device_memory_bytes(ctx) else "fsdp"
    return str(broadcast_object(ctx, choice))


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (each becomes one FSDP2 unit): modules whose class the model
    declares unsplittable, e.g. ``LlamaDecoderLayer``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} declares no _no_split_modules: cannot choose FSDP units"
        )
    return layers


def wrap(ctx: Context, module: nn.Module, strategy: str, bf16: bool) -> nn.Module:
    """``module`` (a :class:`~spin_runtime.train.policy.SequenceLogProbs` on ``ctx.device``)
    wrapped for ``strategy``."""
    if strategy == "none":
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        inner: nn.Module = getattr(module, "model", module)
        for layer in _decoder_layers(inner):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(module, mesh=mesh, mp_policy=mp)  # root: embeddings, norm, head
        return module
    raise ValueError(f"unknown strategy {strategy!r}")


def _options(ctx: Context, broadcast: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=True,
        cpu_offload=ctx.initialized,
        broadcast_from_rank0=broadcast and ctx.initialized,
    )


def full_model_state(ctx: Context, module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU state dict on rank 0 ({} elsewhere); collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_options(ctx))
    if not ctx.main:
        return {}
    return {k: v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}


def full_optimizer_state(
    ctx: Context, module: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The full optimizer state keyed by parameter names, on rank 0 ({} elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(module, optimizer, options=_options(ctx))
    return dict(state) if ctx.main else {}


def load_full_state(
    ctx: Context,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
) -> None:
    """Load full states read by rank 0 (others pass {}): rank 0 broadcasts, each rank keeps its
    shard."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = _options(ctx, broadcast=True)
    set_model_state_dict(module, model_state, options=options)
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)
