"""Is a model folder (or ``s3://`` prefix) a usable checkpoint? Checked without loading weights.

Loading a checkpoint that lacks a piece fails late and sends the user the wrong way (transformers
answers a missing tokenizer with "You need to have sentencepiece or tiktoken installed"). Here
each piece is looked for by name — config, weights, tokenizer, chat template — and a missing or
broken one is named as such. Weights are checked by their headers only: a safetensors file
declares its tensors' byte ranges, so a truncated file shows as a size mismatch without reading
the tensors.

Light module: no torch, no transformers. Hub ids are not checked (they resolve when loaded).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit for the JSON header
TOKENIZER_FILES = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
    ("tiktoken.model",),
)


@dataclass
class Folder:
    """File names under a local folder or an ``s3://`` prefix, and ways to read them."""

    uri: str
    names: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, uri: str) -> Folder:
        from spin_common import storage

        return cls(uri, set(storage.list_files(uri)))

    def read(self, name: str) -> bytes:
        from spin_common import storage

        return storage.read_bytes(storage.join(self.uri, name))

    def head(self, name: str, n: int) -> tuple[bytes, int]:
        """The first ``n`` bytes of a file and its size."""
        from spin_common import storage

        # storage's retries, as every other read here: a flapping S3 is not a broken model
        return storage.read_head(storage.join(self.uri, name), n)


def _json(folder: Folder, name: str) -> tuple[Any, str | None]:
    try:
        return json.loads(folder.read(name).decode("utf-8-sig")), None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{name} is not valid JSON ({exc})"


def check_safetensors(name: str, head: Callable[[str, int], tuple[bytes, int]]) -> str | None:
    """A problem with one safetensors file (header unreadable, or size not what it declares)."""
    start, size = head(name, 8)
    if size < 8:
        return f"{name} is truncated ({size} bytes: not even a header)"
    (length,) = struct.unpack("<Q", start)
    if length > MAX_HEADER_BYTES or 8 + length > size:
        return f"{name} is truncated or not safetensors (header of {length} bytes declared, file has {size})"
    raw, _ = head(name, 8 + length)
    try:
        header = json.loads(raw[8:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{name} is not safetensors (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{name} is not safetensors (its header is not an object)"
    ends = [
        t["data_offsets"][1]
        for k, t in header.items()
        if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t
    ]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{name} is truncated: its header declares {expected} bytes, the file has {size}"
    return None


def _check_config(folder: Folder) -> list[str]:
    if "config.json" not in folder.names:
        return ["no config.json: not a Hugging Face checkpoint folder"]
    config, problem = _json(folder, "config.json")
    if problem:
        return [problem]
    if not isinstance(config, dict):
        return ["config.json is not a JSON object"]
    problems = []
    if not config.get("model_type"):
        problems.append("config.json has no `model_type`")
    arch = config.get("architectures")
    if not (isinstance(arch, list) and arch and all(isinstance(a, str) and a for a in arch)):
        problems.append(
            'config.json has no `architectures` (e.g. ["LlamaForCausalLM"]): vLLM and '
            "transformers use it to pick the model class"
        )
    return problems


def _check_weights(folder: Folder) -> list[str]:
    names = folder.names
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if index in names:
            doc, problem = _json(folder, index)
            if problem:
                return [problem]
            shards = (
                sorted(set((doc or {}).get("weight_map", {}).values()))
                if isinstance(doc, dict)
                else []
            )
            if not shards:
                return [f"{index} has no weight_map"]
            missing = [s for s in shards if s not in names]
            if missing:
                return [f"weight shard(s) listed in {index} are missing: {', '.join(missing)}"]
            if single.endswith(".safetensors"):
                return [p for s in shards if (p := check_safetensors(s, folder.head))]
            return []
        if single in names:
            if single.endswith(".safetensors"):
                problem = check_safetensors(single, folder.head)
                return [problem] if problem else []
            return []
    loose = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    if loose:
        return [
            f"weights {', '.join(loose)} without model.safetensors.index.json naming them as shards"
        ]
    return ["no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"]


def check_tokenizer(folder: Folder, needs_template: bool = True) -> list[str]:
    """Tokenizer files present and readable, and a chat template unless one is given."""
    names = folder.names
    found = next((files for files in TOKENIZER_FILES if all(f in names for f in files)), None)
    if found is None:
        return [
            "no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt): "
            "copy the tokenizer into the folder or set the tokenizer field"
        ]
    problems = []
    if found == ("tokenizer.json",):
        doc, problem = _json(folder, "tokenizer.json")
        if problem:
            problems.append(problem)
        elif not isinstance(doc, dict) or "model" not in doc:
            problems.append("tokenizer.json has no `model` section: not a tokenizers file")
    config: Any = {}
    if "tokenizer_config.json" in names:
        config, problem = _json(folder, "tokenizer_config.json")
        if problem:
            problems.append(problem)
            config = {}
    if needs_template:
        has_template = (
            "chat_template.jinja" in names
            or "chat_template.json" in names
            or (isinstance(config, dict) and bool(config.get("chat_template")))
        )
        if not has_template:
            problems.append(
                "the tokenizer has no chat template (no chat_template.jinja, no chat_template in "
                "tokenizer_config.json): set the chatTemplate field (--chat-template) to a jinja file"
            )
    return problems


def check_model(
    uri: str, tokenizer_uri: str | None = None, chat_template_uri: str | None = None
) -> list[str]:
    """Problems of the checkpoint at ``uri`` (local folder or s3:// prefix), each naming the
    missing or broken piece; [] when it looks loadable. The caller prefixes the field or flag."""
    folder = Folder.open(uri)
    if not folder.names:
        return ["no such folder, or it is empty"]
    problems = _check_config(folder) + _check_weights(folder)
    if tokenizer_uri is None:
        problems += check_tokenizer(folder, needs_template=chat_template_uri is None)
    return problems


def is_hub_id(uri: str) -> bool:
    """True for `org/model` ids (not checked here: transformers/vLLM resolve them)."""
    from pathlib import Path

    return not (uri.startswith(("s3://", "/", "./", "../", "~", "file://")) or Path(uri).exists())
