"""formatting.py: one prompt format for generation, training and evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from spin_runtime import formatting


@pytest.fixture()
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_build_messages_drops_empty_system() -> None:
    assert formatting.build_messages(None, "hi") == [{"role": "user", "content": "hi"}]
    assert formatting.build_messages("", "hi") == [{"role": "user", "content": "hi"}]
    assert formatting.build_messages("S", "hi")[0] == {"role": "system", "content": "S"}


@pytest.mark.parametrize("system", [None, "You are a precise assistant."])
def test_prompt_plus_response_is_the_chat_formatted_conversation(tokenizer, system) -> None:
    """The tokens training sees (prompt + answer) are the template's own rendering of the
    conversation up to the answer's EOS: what generation produced is what training scores."""
    prompt, answer = "reverse: red cat dog", "dog cat red"
    messages = [
        *formatting.build_messages(system, prompt),
        {"role": "assistant", "content": answer},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    ids = formatting.prompt_ids(tokenizer, system, prompt) + formatting.response_ids(
        tokenizer, answer
    )
    assert full[: len(ids)] == ids
    assert ids[-1] == tokenizer.eos_token_id


def test_prompt_ids_match_prompt_text_and_end_with_generation_prompt(tokenizer) -> None:
    ids = formatting.prompt_ids(tokenizer, None, "sort: 3 1 2")
    text = formatting.prompt_text(tokenizer, None, "sort: 3 1 2")
    assert text.endswith("<|assistant|>\n")
    assert tokenizer.decode(ids) == text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert ids.count(tokenizer.bos_token_id) == 1


def test_response_ids_are_answer_then_eos(tokenizer) -> None:
    ids = formatting.response_ids(tokenizer, "1 2 3")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == "1 2 3"
    assert tokenizer.bos_token_id not in ids


def test_fallback_template_when_model_has_none(tokenizer, caplog) -> None:
    tokenizer.chat_template = None
    with caplog.at_level("WARNING"):
        text = formatting.prompt_text(tokenizer, "Be brief.", "add: 1 + 2")
    assert text == "### System:\nBe brief.\n\n### Instruction:\nadd: 1 + 2\n\n### Response:\n"
    assert "no chat template" in caplog.text
    ids = formatting.prompt_ids(tokenizer, "Be brief.", "add: 1 + 2")
    assert tokenizer.decode(ids) == text


def test_read_chat_template_from_file(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    tokenizer.chat_template = formatting.read_chat_template(str(path))
    assert formatting.prompt_text(tokenizer, "a", "b") == "[a][b]>"
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        formatting.read_chat_template(str(tmp_path / "empty.jinja"))


def test_formatting_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, spin_runtime.formatting, spin_common.data; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
