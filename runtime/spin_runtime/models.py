"""Loading tokenizers and models from a URI: a local directory, ``s3://`` (materialized through
the digest-keyed cache), or a hub id.

Failures here are usually configuration mistakes (a wrong path, a tokenizer from another model),
so they raise :class:`ModelError` (a usage error, exit 2) with the URI and the flag in the
message instead of a deep transformers traceback.

torch/transformers are imported inside functions: :func:`resolve` is also used by the vLLM
backend, which runs in an environment with another transformers version.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spin_common.errors import UsageError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")


class ModelError(UsageError):
    """A model or tokenizer cannot be loaded or used as given: bad input, exit 2."""


def _looks_local(uri: str) -> bool:
    return uri.startswith(("/", "./", "../", "~", "file://")) or Path(uri).exists()


def resolve(uri: str, flag: str = "--model") -> str:
    """A local directory for ``uri``: s3:// is materialized into the cache, a local path must
    exist, anything else is taken as a hub id (resolved by transformers/vLLM themselves)."""
    if uri.startswith("s3://"):
        from spin_runtime import cache

        try:
            return str(cache.materialize(uri))
        except FileNotFoundError as exc:  # includes an artifact without a complete manifest
            raise ModelError(f"{flag} {uri}: {exc}") from exc
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if _looks_local(uri):
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise ModelError(f"{flag} {uri}: no such directory")
        if not (path / "config.json").is_file() and flag == "--model":
            raise ModelError(f"{flag} {uri}: not a Hugging Face checkpoint (no config.json)")
        return str(path)
    if uri.count("/") > 1 or not uri.strip():
        raise ModelError(f"{flag} {uri}: neither an existing path, an s3:// URI nor a hub id")
    revision = os.environ.get("SPIN_HUB_REVISION")
    if revision and os.environ.get("SPIN_HUB_MODEL") == uri:
        return _pinned(uri, revision, flag)
    return uri


def _pinned(repo_id: str, revision: str, flag: str) -> str:
    """The local snapshot of `repo_id` at `revision` (spec.model.revision), downloaded once into
    the hub cache: every loader then reads the same files, whatever the branch moves to."""
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(repo_id=repo_id, revision=revision))
    except Exception as exc:  # unknown revision, gated repo without HF_TOKEN, offline
        raise ModelError(
            f"{flag} {repo_id}@{revision}: cannot fetch this revision: {type(exc).__name__}: {exc}"
        ) from exc


def load_tokenizer(
    uri: str, tokenizer_uri: str | None = None, chat_template_uri: str | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of ``uri`` (or of ``tokenizer_uri``), with the chat template optionally
    replaced by the jinja file at ``chat_template_uri``. A missing pad token becomes EOS (batched
    generation needs one; padded positions are masked anyway)."""
    from transformers import AutoTokenizer

    flag = "--tokenizer" if tokenizer_uri else "--model"
    source = resolve(tokenizer_uri or uri, flag=flag)
    if Path(source).is_dir():
        # name a missing piece before transformers does (it answers a folder without tokenizer
        # files with "You need to have sentencepiece or tiktoken installed", the wrong way)
        from spin_common import modelcheck

        problems = modelcheck.check_tokenizer(modelcheck.Folder.open(source), needs_template=False)
        if problems:
            raise ModelError(f"{flag} {tokenizer_uri or uri}: {problems[0]}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{flag} {tokenizer_uri or uri}: cannot load a tokenizer: {exc}") from exc
    if chat_template_uri:
        from spin_runtime.formatting import read_chat_template

        try:
            tokenizer.chat_template = read_chat_template(chat_template_uri)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"--chat-template {chat_template_uri}: {exc}") from exc
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{flag} {tokenizer_uri or uri}: the tokenizer has no eos_token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is fp32 on CPU (bf16 matmuls are slow there and lose precision) and bf16 on GPUs
    that support it."""
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return getattr(torch, dtype)  # type: ignore[no-any-return]
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_vocab(tokenizer: Any, model: Any, uri: str = "") -> None:
    """Every token id the tokenizer can emit must have an embedding row; larger embeddings
    (padded to a multiple) are fine."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelError(
            f"tokenizer has {len(tokenizer)} tokens but model {uri} has {rows} embedding rows: "
            "the tokenizer does not belong to this model (check --tokenizer)"
        )


def load_model(
    uri: str,
    dtype: str = "auto",
    device: str = "cpu",
    tokenizer: Any | None = None,
) -> PreTrainedModel:
    """An ``AutoModelForCausalLM`` in eval mode on ``device``; checked against ``tokenizer``."""
    from transformers import AutoModelForCausalLM

    source = resolve(uri)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(dtype, device))
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model {uri}: cannot load a causal LM: {exc}") from exc
    model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to confuses mypy
    if tokenizer is not None:
        check_vocab(tokenizer, model, uri)
    return model
