"""The architecture matrix: for each model family a user may bring, the trainer's log-probs are
exact — or the shortcut that would not be is refused with a reason.

Tiny random models built from each architecture's real config class (transformers 5.24, no
hub), a few pairs of random token ids, fp32. Each is scored three ways by runtime code — the
policy forward the trainer differentiates (with the layout and head
:func:`spin_runtime.train.exactness.choose` picked), the reference table
(:meth:`Runner.score`), evaluation's real-answer log-likelihood
(:func:`spin_runtime.evaluate.reference_logprobs`) — and compared with an independent
computation written here: every sequence alone, unpadded, through the model's own forward and
a plain log-softmax. Summed log-probs must agree to 1e-4 nats and gradients to 1e-5.

Where a layer cannot honour the packed row's 4-D mask (sliding windows shorter than the row,
convolution, SSM, linear attention), ``auto`` must fall back to separate rows and ``on`` must
refuse naming the reason; the measured error of the refused layout is checked to be real, so
the refusal is not a guess. Measured numbers: docs/benchmarks.md ("Exactness by architecture").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from spin_common.errors import UsageError
from spin_runtime.evaluate import reference_logprobs
from spin_runtime.train import batches, exactness
from spin_runtime.train.batches import Pair
from spin_runtime.train.distributed import Context
from spin_runtime.train.loss import spin_loss
from spin_runtime.train.policy import SequenceLogProbs, disable_dropout
from spin_runtime.train.policy import score as policy_score
from spin_runtime.train.step import Runner

VOCAB, PAD = 128, 0
LOGP_TOL, GRAD_TOL = 1e-4, 1e-5
BETA = 0.1  # the paper's β: gradients at the scale training sees
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": PAD,
    # large weights: a near-uniform random model would hide a wrong layout in tiny numbers
    "initializer_range": 0.2,
}


def _cfg(name: str, **extra: Any) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        return getattr(transformers, name)(**{**SMALL, **extra})

    return build


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2
    )


def _falcon_h1() -> Any:
    from transformers import FalconH1Config

    mamba = {"mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8}
    # lm_head_multiplier != 1: the model's forward scales the logits after its lm_head
    return FalconH1Config(
        **SMALL, **mamba, mamba_n_groups=1, mamba_chunk_size=8, lm_head_multiplier=2.5
    )


def _qwen3_next() -> Any:
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        **SMALL,
        head_dim=8,
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"],
    )


def _jamba() -> Any:
    from transformers import JambaConfig

    # layer 0 Mamba (the slow PyTorch scan: no mamba_ssm here), layer 1 attention + MoE
    return JambaConfig(
        **SMALL,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=2,
        num_experts_per_tok=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    )


# name -> (config factory, prompt sharing expected, why it is refused: text in the reason)
MATRIX: dict[str, tuple[Callable[[], Any], bool, str]] = {
    "llama": (_cfg("LlamaConfig"), True, ""),
    "mistral-window4": (_cfg("MistralConfig", sliding_window=4), False, "sliding_window=4"),
    "mistral-nowindow": (_cfg("MistralConfig", sliding_window=None), True, ""),
    "qwen2-sliding": (
        _cfg("Qwen2Config", use_sliding_window=True, sliding_window=4, max_window_layers=1),
        False,
        "sliding_window=4",
    ),
    "qwen3": (_cfg("Qwen3Config", head_dim=8), True, ""),
    # eager attention (its logit soft-capping): no SDPA, so no packed rows at all
    "gemma2": (_cfg("Gemma2Config", head_dim=8, sliding_window=4), False, "not SDPA"),
    "gemma3-window4": (
        _cfg("Gemma3TextConfig", head_dim=8, sliding_window=4),
        False,
        "sliding_window=4",
    ),
    "gemma3-window256": (_cfg("Gemma3TextConfig", head_dim=8, sliding_window=256), True, ""),
    "phi3": (_cfg("Phi3Config"), True, ""),
    "gpt2": (_gpt2, True, ""),
    "falcon-h1": (_falcon_h1, False, "'hybrid'"),
    "lfm2": (_cfg("Lfm2Config", layer_types=["conv", "full_attention"]), False, "['conv']"),
    "qwen3-next": (_qwen3_next, False, "'linear_attention'"),
    "jamba": (_jamba, False, "'linear_attention'"),  # Mamba layers are typed so
}
#: Layouts that would be wrong here: refusing them must be backed by a real, measured error.
WRONG_WHEN_SHARED = {"mistral-window4", "qwen2-sliding", "gemma3-window4", "falcon-h1", "lfm2",
                     "qwen3-next", "jamba"}  # fmt: skip # a word list, packed


def make_model(name: str) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MATRIX[name][0]()).float()
    disable_dropout(model)
    return model.train()


def make_pairs() -> list[Pair]:
    """Three pairs of varied lengths; the generated answers share a prefix with the real ones
    (as θt's answers do), and the last ends without EOS like a truncated generation."""
    rng = np.random.default_rng(0)
    shapes = [(7, 9, 6), (5, 4, 11), (9, 12, 3)]
    pairs = []
    for i, (n_p, n_r, n_g) in enumerate(shapes):
        prompt = rng.integers(1, VOCAB, n_p)
        real = rng.integers(1, VOCAB, n_r)
        gen = np.concatenate([real[:2], rng.integers(1, VOCAB, n_g - 2)])
        pairs.append(Pair(i, str(i), 0, prompt, real, gen))
    return pairs


def independent_logps(model: Any, pairs: list[Pair]) -> torch.Tensor:
    """(2P,) sums of answer log-probs, each sequence alone through the model's own forward:
    real answers first, then generated — the trainer's order."""
    out = []
    for answer_of in (lambda p: p.real, lambda p: p.gen):
        for p in pairs:
            answer = answer_of(p)
            ids = torch.from_numpy(np.concatenate([p.prompt, answer])).long()[None]
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            token = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            out.append(token[len(p.prompt) - 1 :].sum())
    return torch.stack(out)


def gradients(model: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MATRIX))
def test_policy_logps_and_gradients_exact_or_sharing_refused(name: str) -> None:
    model = make_model(name)
    pairs = make_pairs()
    module = SequenceLogProbs(model)
    layout = exactness.choose(module, pairs, PAD, "auto")
    _, shared_expected, reason = MATRIX[name]
    assert layout.prompt_sharing is shared_expected, layout
    if not shared_expected:
        assert reason in layout.prompt_sharing_reason, layout
    if name in WRONG_WHEN_SHARED:  # the refused layout is measurably wrong here
        assert layout.prompt_sharing_max_abs_diff is not None
        assert layout.prompt_sharing_max_abs_diff > 10 * LOGP_TOL, layout

    batch = batches.collate(pairs, pairs[0], PAD, layout.prompt_sharing)
    ours = policy_score(module, batch)
    theirs = independent_logps(model, pairs)
    # the trainer's loss, with a reference off the policy so margins are not all 0
    n = len(pairs)
    ref = theirs.detach() + torch.linspace(-2.0, 2.0, 2 * n)

    def loss(logps: torch.Tensor) -> torch.Tensor:
        return spin_loss(logps[:n], logps[n:], ref[:n], ref[n:], BETA).losses.mean()

    grads = gradients(model, loss(ours))
    expected = gradients(model, loss(theirs))

    logp_diff = float((ours.detach() - theirs.detach()).abs().max())
    grad_diff = max(float((grads[k] - expected[k]).abs().max()) for k in expected)
    assert grads.keys() == expected.keys()
    assert logp_diff <= LOGP_TOL, (name, logp_diff, layout)
    assert grad_diff <= GRAD_TOL, (name, grad_diff, layout)
    print(f"\nMATRIX {name}: {layout} logp {logp_diff:.2e} grad {grad_diff:.2e}")


@pytest.mark.parametrize("name", list(MATRIX))
def test_reference_table_and_eval_loglik_exact(name: str) -> None:
    model = make_model(name)
    pairs = make_pairs()
    module = SequenceLogProbs(model)
    layout = exactness.choose(module, pairs, PAD, "auto")
    ctx = Context(0, 1, 0, torch.device("cpu"), False)
    runner = Runner(ctx, module, "none", False, PAD, pairs[0], layout.prompt_sharing)
    table = runner.score(pairs, batch_size=2)  # the trainer's reference log-probs
    with torch.no_grad():
        theirs = independent_logps(model.eval(), pairs)
    n = len(pairs)
    ref_diff = float((table - torch.stack([theirs[:n], theirs[n:]], 1)).abs().max())
    assert ref_diff <= LOGP_TOL, (name, ref_diff)

    sequences = [(p.prompt.tolist(), p.real.tolist()) for p in pairs]
    total, count = reference_logprobs(model, sequences, PAD, batch_size=2)
    eval_diff = abs(total - float(theirs[:n].sum()))
    assert count == sum(len(p.real) for p in pairs)
    assert eval_diff <= LOGP_TOL, (name, eval_diff)
    print(f"\nMATRIX-REF {name}: reference {ref_diff:.2e} eval {eval_diff:.2e}")


@pytest.mark.parametrize("name", sorted(WRONG_WHEN_SHARED))
def test_prompt_sharing_on_refuses_with_the_reason(name: str) -> None:
    module = SequenceLogProbs(make_model(name))
    with pytest.raises(UsageError, match=r"--prompt-sharing on .*not exact for this model"):
        exactness.choose(module, make_pairs(), PAD, "on")


def test_fused_head_checked_against_the_models_own_logits() -> None:
    """Falcon-H1 scales its logits after lm_head: the fused head is measured wrong and the
    model's own forward is used; a plain Llama head passes and stays fused."""
    falcon = exactness.choose(SequenceLogProbs(make_model("falcon-h1")), make_pairs(), PAD)
    assert not falcon.fused_head
    assert falcon.fused_head_max_abs_diff is not None and falcon.fused_head_max_abs_diff > 0.1
    llama = exactness.choose(SequenceLogProbs(make_model("llama")), make_pairs(), PAD)
    assert llama.fused_head
    assert llama.fused_head_max_abs_diff is not None
    assert llama.fused_head_max_abs_diff <= LOGP_TOL


def test_sharing_obstacles_read_the_config() -> None:
    from transformers import MistralConfig

    wide = MistralConfig(sliding_window=64)
    assert exactness.sharing_obstacles(wide, max_row=63) == []
    assert "sliding_window=64" in exactness.sharing_obstacles(wide, max_row=64)[0]
    assert exactness.sharing_obstacles(MistralConfig(sliding_window=None), max_row=10**6) == []
