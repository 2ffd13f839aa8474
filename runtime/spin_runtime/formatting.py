"""The one place where prompts and answers become token ids.

Generation, training and evaluation all go through this module. The official SPIN code
formatted prompts one way for generation (a plain "### Instruction" template) and another for
training (the chat template); the model was then trained on prompts it had never answered
(uclaml/SPIN #9, #33). Here the prompt is always the chat template with the generation prompt
appended, and the answer is always the answer's own tokens followed by EOS — exactly the tokens
a model should generate after the prompt — so ``prompt_ids + response_ids`` is the same sequence
whichever command builds it.

Models without a chat template get :data:`FALLBACK_CHAT_TEMPLATE`, a plain fixed template (and
a warning): base checkpoints are a legitimate SPIN starting point, and a fixed, documented
template is reproducible, unlike guessing. Override it with ``--chat-template URI``.

This module never imports torch or transformers: it works on the tokenizer object it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: Used when a tokenizer has no chat template. Plain text markers, the same for every model;
#: EOS is not part of the prompt (the answer ends with it, see :func:`response_ids`).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)

_warned_fallback: set[int] = set()


def build_messages(system: str | None, prompt: str) -> list[dict[str, str]]:
    """OpenAI-style messages for one prompt; an empty or missing system prompt is left out."""
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    return messages


def chat_template(tokenizer: Any) -> str:
    """The template in force: the tokenizer's own, else the documented fallback."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # several named templates: use the default one
        template = template.get("default")
    if template:
        return str(template)
    if id(tokenizer) not in _warned_fallback:
        _warned_fallback.add(id(tokenizer))
        log.warning(
            "tokenizer has no chat template; using the plain fallback template "
            "(pass --chat-template to override)"
        )
    return FALLBACK_CHAT_TEMPLATE


def _as_ids(encoded: Any) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5.x and a plain
    list in 4.x; accept both."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    ids = list(encoded)
    if ids and isinstance(ids[0], Sequence):  # a batch of one
        ids = list(ids[0])
    return [int(i) for i in ids]


def prompt_ids(tokenizer: Any, system: str | None, prompt: str) -> list[int]:
    """Token ids of the formatted prompt, ending with the assistant's generation prompt."""
    encoded = tokenizer.apply_chat_template(
        build_messages(system, prompt),
        chat_template=chat_template(tokenizer),
        add_generation_prompt=True,
        tokenize=True,
    )
    return _as_ids(encoded)


def prompt_text(tokenizer: Any, system: str | None, prompt: str) -> str:
    """The formatted prompt as text (for engines that take strings). Prefer :func:`prompt_ids`:
    re-tokenizing text can add a second BOS."""
    text = tokenizer.apply_chat_template(
        build_messages(system, prompt),
        chat_template=chat_template(tokenizer),
        add_generation_prompt=True,
        tokenize=False,
    )
    return str(text)


def eos_token_id(tokenizer: Any) -> int:
    """The id that ends an answer; a tokenizer without one cannot be used for SPIN."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: answers could not end")
    return int(eos)


def response_ids(tokenizer: Any, response: str) -> list[int]:
    """The answer's tokens followed by EOS: exactly what the model should generate after
    :func:`prompt_ids` (no BOS, no template markers)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids] + [eos_token_id(tokenizer)]


def read_chat_template(uri: str) -> str:
    """A jinja chat template from a local path or s3:// URI (``--chat-template``)."""
    from spin_common import storage

    text = storage.read_text(uri)
    if not text.strip():
        raise ValueError(f"chat template {uri} is empty")
    return text
