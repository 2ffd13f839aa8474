"""Make a published checkpoint an MLflow ``transformers`` model *in place*.

Each iteration's θt+1 is a plain Hugging Face folder (what vLLM, transformers and the next
iteration read). The registry's versions point at that folder, so without an ``MLmodel`` file
``mlflow.transformers.load_model("models:/<name>@best")`` refuses it ("could not find an
MLmodel"). Writing the flavor's metadata beside the weights makes the same folder loadable by
MLflow without a second copy of the weights (a 7B model is 14 GB): the flavor's ``model_binary``
is the folder itself, and only the tokenizer (a few MB) is repeated under ``components/``,
which is where the flavor looks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The flavor's loader reads the tokenizer from components/<name> (mlflow.transformers.model_io).
COMPONENTS_DIR = "components"
TOKENIZER = "tokenizer"
TASK = "text-generation"


def write_transformers_flavor(folder: Path, model: Any, tokenizer: Any, dtype: torch.dtype) -> None:
    """Write ``folder/MLmodel`` (transformers + nothing else: pyfunc would need a pinned Python
    environment we cannot promise) and the tokenizer component; call after ``save_pretrained``
    has put the weights, config and tokenizer in ``folder``."""
    import transformers
    from mlflow.models import Model

    tokenizer.save_pretrained(folder / COMPONENTS_DIR / TOKENIZER)
    flavor = {
        "transformers_version": transformers.__version__,
        "task": TASK,
        "instance_type": "TextGenerationPipeline",
        # The class the loader instantiates: transformers' own (e.g. LlamaForCausalLM).
        "pipeline_model_type": type(model).__name__,
        # "." = the checkpoint folder itself holds config.json and the safetensors weights.
        "model_binary": ".",
        "torch_dtype": str(dtype),
        "framework": "pt",
        "components": [TOKENIZER],
        f"{TOKENIZER}_type": type(tokenizer).__name__,
    }
    mlmodel = Model()
    mlmodel.add_flavor("transformers", **flavor)
    mlmodel.save(str(folder / "MLmodel"))
