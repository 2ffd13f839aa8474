"""Proving, on the run's own pairs, that the trainer's fast scoring paths are exact.

SPIN's loss is a difference of summed log-probs, so an error of a fraction of a nat is a wrong
gradient — and it stays invisible: the reference is scored the same wrong way, so the first
loss is still ln 2. Two shortcuts of :mod:`spin_runtime.train.policy` are therefore used only
when they are shown to give the model's own numbers:

* **The fused output head** (``hidden @ W.T`` on answer positions only) skips whatever the
  model's forward does after its ``lm_head`` (Falcon-H1's ``lm_head_multiplier``, soft-capping,
  scaling). It is compared once with the model's own logits; on any mismatch the model's own
  forward is used.
* **Prompt sharing** (one row per pair: prompt, real answer, generated answer, behind a 4-D
  mask) relies on every layer honouring that mask. transformers passes a caller's 4-D mask
  through unchanged, so sliding-window layers lose their window, and convolution, SSM and
  linear-attention layers ignore the mask (the generated answer then sees the real one). It is
  used only when (a) every layer type is full attention, or windowed attention whose window is
  longer than the longest packed row of the run, and (b) shared and separate layouts agree to
  :data:`TOLERANCE` nats on a few of the run's own pairs, in fp32.

Both checks run once per start, before any wrapping, on the unwrapped module in fp32 (on the
host under FSDP2, where the module is not on the device yet).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spin_common.errors import UsageError
from spin_common.train_config import SHARING_MODES
from spin_runtime.train import batches
from spin_runtime.train.batches import Pair
from spin_runtime.train.policy import SequenceLogProbs, supports_shared_prompt
from spin_runtime.train.policy import score as policy_score

log = logging.getLogger(__name__)

#: Largest |difference| of a summed answer log-prob (nats, fp32) two layouts may show.
TOLERANCE = 1e-4
#: Layer types that honour a 4-D mask; windowed ones only when the window covers every row.
_ATTENTION = "full_attention"
_WINDOWED = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}
#: Pairs compared per check: the longest rows (where windows would bite) and the first ones.
PROBE_PAIRS = 4


@dataclass(frozen=True)
class Layout:
    """How the run scores pairs, and the measurements behind the choice."""

    prompt_sharing: bool
    prompt_sharing_max_abs_diff: float | None  # None: not measured (off, or no SDPA)
    prompt_sharing_reason: str
    fused_head: bool
    fused_head_max_abs_diff: float | None  # None: the head is not a plain projection

    def stats(self) -> dict[str, Any]:
        """The fields of the ``data`` event of metrics.jsonl (and MLflow)."""
        return {
            "prompt_sharing": self.prompt_sharing,
            "prompt_sharing_max_abs_diff": self.prompt_sharing_max_abs_diff,
            "prompt_sharing_reason": self.prompt_sharing_reason,
            "fused_head": self.fused_head,
            "fused_head_max_abs_diff": self.fused_head_max_abs_diff,
        }


def packed_width(pair: Pair) -> int:
    """Tokens of the pair's shared-prompt row: prompt, real answer, generated answer."""
    return len(pair.prompt) + len(pair.real) + len(pair.gen)


def sharing_obstacles(config: Any, max_row: int) -> list[str]:
    """Why the config alone rules prompt sharing out (empty: nothing known against it)."""
    obstacles: list[str] = []
    types = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None)
    if types is None:
        # no per-layer types: a config-wide window (Mistral) applies to every layer
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is not False and isinstance(window, int):
            types = ["sliding_attention"]
        else:
            types = [_ATTENTION]
    other = sorted({str(t) for t in types if t not in (_ATTENTION, "attention", *_WINDOWED)})
    if other:
        obstacles.append(
            f"layer types {other} do not honour a 4-D attention mask (only full attention does)"
        )
    for kind, attr in _WINDOWED.items():
        if kind not in types:
            continue
        window = getattr(config, attr, None)
        if not isinstance(window, int) or window <= max_row:
            obstacles.append(
                f"{kind} layers with {attr}={window} would lose their window in a packed row "
                f"of up to {max_row} tokens"
            )
    return obstacles


def probe_pairs(pairs: Sequence[Pair], count: int = PROBE_PAIRS) -> list[Pair]:
    """A few of the run's pairs: the longest packed rows, then the first pairs."""
    longest = sorted(pairs, key=lambda p: (-packed_width(p), p.index))[: count // 2]
    chosen = {p.index: p for p in longest}
    for p in pairs:
        if len(chosen) >= count:
            break
        chosen.setdefault(p.index, p)
    return list(chosen.values())


@torch.no_grad()
def _logps(module: SequenceLogProbs, pairs: Sequence[Pair], pad_id: int, shared: bool) -> Any:
    """Summed answer log-probs, one pair (two padded rows, or one packed row) per forward: the
    model's own head materialises full logits, so one pair at a time bounds that memory."""
    device = next(module.parameters()).device
    out = []
    for pair in pairs:
        batch = batches.collate([pair], pair, pad_id, shared).to(device)
        out.append(policy_score(module, batch).double().cpu())
    return torch.cat(out)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def choose(
    module: SequenceLogProbs, pairs: Sequence[Pair], pad_id: int, mode: str = "auto"
) -> Layout:
    """Check the fused head and prompt sharing on ``pairs`` (all the run's pairs: the longest
    row sets the window rule, a few are scored) and set ``module.fused`` accordingly.

    ``mode``: ``off`` never shares; ``auto`` shares when both checks pass; ``on`` is ``auto``
    that raises :class:`UsageError` when they do not.
    """
    if mode not in SHARING_MODES:
        raise UsageError(f"--prompt-sharing {mode}: one of {', '.join(SHARING_MODES)}")
    model: Any = module.model
    was_training = module.training
    module.eval()
    probe = probe_pairs(pairs)
    try:
        head_diff: float | None = None
        if module.fused:
            fused = _logps(module, probe, pad_id, shared=False)
            module.fused = False
            own = _logps(module, probe, pad_id, shared=False)
            head_diff = _max_diff(fused, own)
            module.fused = head_diff <= TOLERANCE
            if not module.fused:
                log.warning(
                    "the fused output head differs from the model's own logits by %.3g nats "
                    "(> %g): scoring with the model's own forward instead",
                    head_diff,
                    TOLERANCE,
                )
        sharing, diff, reason = _sharing(module, model, pairs, probe, pad_id, mode)
    finally:
        module.train(was_training)
    layout = Layout(sharing, diff, reason, module.fused, head_diff)
    log.info(
        "prompt sharing %s (%s; max |shared - separate| = %s nats); fused output head %s "
        "(max |fused - model| = %s nats)",
        "on" if sharing else "off",
        reason,
        _fmt(diff),
        "on" if module.fused else "off",
        _fmt(head_diff),
    )
    return layout


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _sharing(
    module: SequenceLogProbs,
    model: Any,
    pairs: Sequence[Pair],
    probe: list[Pair],
    pad_id: int,
    mode: str,
) -> tuple[bool, float | None, str]:
    """(use sharing, measured max difference, why)."""
    if mode == "off":
        return False, None, "--prompt-sharing off"
    if not supports_shared_prompt(model):
        reason = "the attention kernel is not SDPA (it cannot take a 4-D mask)"
        return _refuse(mode, reason, None)
    diff = _max_diff(
        _logps(module, probe, pad_id, shared=True), _logps(module, probe, pad_id, shared=False)
    )
    max_row = max(packed_width(p) for p in pairs)
    obstacles = sharing_obstacles(getattr(model, "config", None), max_row)
    if obstacles:
        return _refuse(mode, "; ".join(obstacles), diff)
    if diff > TOLERANCE:
        reason = f"shared and separate layouts differ by {diff:.3g} nats (> {TOLERANCE:g})"
        return _refuse(mode, reason, diff)
    return True, diff, f"layouts agree on {len(probe)} pairs"


def _refuse(mode: str, reason: str, diff: float | None) -> tuple[bool, float | None, str]:
    if mode == "on":
        raise UsageError(
            f"--prompt-sharing on (training.promptSharing: on): not exact for this model: "
            f"{reason}; use auto or off"
        )
    return False, diff, reason
