"""models.py: the real loading code, with clear errors for the usual mistakes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from spin_common.errors import UsageError
from spin_runtime import formatting, models


def test_load_tokenizer_and_model(tiny_model_dir: Path) -> None:
    tok = models.load_tokenizer(str(tiny_model_dir))
    model = models.load_model(str(tiny_model_dir), tokenizer=tok)
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    ids = formatting.prompt_ids(tok, None, "add: 1 + 1")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)


def test_missing_paths_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--model .*no such directory"):
        models.load_model(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match=r"no config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(UsageError, match="--tokenizer"):
        models.load_tokenizer(str(tmp_path), tokenizer_uri=str(tmp_path / "nope"))


def test_hub_ids_pass_through_unresolved() -> None:
    assert models.resolve("org/model") == "org/model"
    with pytest.raises(UsageError):
        models.resolve("a/b/c")


def test_vocab_mismatch_is_reported(tiny_model_dir: Path, tiny_rows, tmp_path: Path) -> None:
    from spin_runtime import tiny

    big = tiny.train_tokenizer(tiny_rows, vocab_size=1024)
    big.save_pretrained(tmp_path / "tok")
    tok = models.load_tokenizer(str(tiny_model_dir), tokenizer_uri=str(tmp_path / "tok"))
    with pytest.raises(models.ModelError, match="embedding rows"):
        models.load_model(str(tiny_model_dir), tokenizer=tok)


def test_chat_template_override_and_pad_default(tiny_model_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }};{% endfor %}")
    tok = models.load_tokenizer(str(tiny_model_dir), chat_template_uri=str(template))
    assert formatting.prompt_text(tok, None, "x") == "x;"
    with pytest.raises(UsageError, match="--chat-template"):
        models.load_tokenizer(
            str(tiny_model_dir), chat_template_uri=str(tmp_path / "missing.jinja")
        )

    copy = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, copy)
    cfg = (
        (copy / "tokenizer_config.json")
        .read_text()
        .replace('"pad_token": "<|pad|>"', '"pad_token": null')
    )
    (copy / "tokenizer_config.json").write_text(cfg)
    tok = models.load_tokenizer(str(copy))
    assert tok.pad_token_id == tok.eos_token_id


def test_dtype_choice() -> None:
    assert models.torch_dtype("auto", "cpu") == torch.float32
    assert models.torch_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(UsageError, match="--dtype"):
        models.torch_dtype("fp8", "cpu")


def test_a_pinned_hub_revision_is_fetched_as_that_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    """spec.model.revision reaches resolve() as SPIN_HUB_MODEL/SPIN_HUB_REVISION; offline and
    without a cached snapshot the error names the model and the revision (exit 2, not a crash)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SPIN_HUB_MODEL", "example-org/never-downloaded")
    monkeypatch.setenv("SPIN_HUB_REVISION", "0123abc")
    with pytest.raises(
        models.ModelError, match=r"example-org/never-downloaded@0123abc: cannot fetch this revision"
    ):
        models.resolve("example-org/never-downloaded")
    # Other hub ids (a tokenizer override, say) are left to transformers as before.
    assert models.resolve("example-org/other") == "example-org/other"
