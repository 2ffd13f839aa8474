"""Step 1 of each iteration, generation (`spec.generation`): the backend, its pods and sampling."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from spin_operator.api.base import Model, desc
from spin_operator.api.scheduling import Resources


class GenerationSpec(Model):
    """Step 1 of each iteration: θt answers every prompt (an Indexed Job, one shard per pod)."""

    image: Annotated[
        str | None, desc("Runtime image; defaults to the operator's runtime image.", min_length=1)
    ] = None
    backend: Annotated[
        Literal["vllm", "transformers"],
        desc("vllm for GPUs; transformers for CPU or small models."),
    ] = "vllm"
    replicas: Annotated[int, desc("Pods (shards) generating in parallel.", ge=1, le=1024)] = 1
    gpus_per_replica: Annotated[
        int, desc("GPUs per pod; vLLM uses them for tensor parallelism.", ge=0, le=64)
    ] = 1
    temperature: Annotated[
        float, desc("Sampling temperature (the paper's vLLM path: 1.0; 0 is greedy).", ge=0, le=10)
    ] = 1.0
    top_p: Annotated[float, desc("Nucleus sampling mass.", gt=0, le=1)] = 1.0
    top_k: Annotated[int, desc("Top-k sampling; -1 disables.", ge=-1)] = -1
    max_new_tokens: Annotated[
        int, desc("Token limit of each generated answer.", ge=1, le=65536)
    ] = 256
    seed: Annotated[int, desc("Sampling seed (offset by iteration).", ge=0)] = 0
    batch_size: Annotated[int, desc("Prompts per batch (transformers backend).", ge=1)] = 64
    dtype: Annotated[
        Literal["auto", "bfloat16", "float16", "float32"], desc("Weights dtype for generation.")
    ] = "auto"
    resources: Annotated[Resources, desc("Extra requests/limits for generation pods.")] = Field(
        default_factory=Resources
    )
