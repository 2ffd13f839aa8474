"""A corpus of broken SPINRuns, each with the field its error must name.

Shared by the validation tests (spinctl validate, the CRD schema) and the end-to-end tests
(the operator must refuse or fail each one while serving valid runs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

DELETE = object()

BASE: dict[str, Any] = {
    "apiVersion": "selfplay.dev/v1alpha1",
    "kind": "SPINRun",
    "metadata": {"name": "ok-run", "namespace": "default"},
    "spec": {
        "model": {"uri": "s3://models/base"},
        "dataset": {"uri": "s3://data/sft.jsonl", "maxSamples": 100, "evalSamples": 10},
        "iterations": 2,
        "training": {"gpusPerNode": 2, "globalBatchSize": 8, "microBatchSize": 2},
    },
}


@dataclass(frozen=True)
class Broken:
    id: str
    patch: dict[str, Any]  # dotted path -> new value (DELETE removes it)
    field: str  # dotted path the error must name
    schema_rejects: bool = True  # False: only the models / operator can tell (cross-object rules)

    def build(self) -> dict[str, Any]:
        obj = copy.deepcopy(BASE)
        for path, value in self.patch.items():
            *parents, leaf = path.split(".")
            node = obj
            for part in parents:
                node = node.setdefault(part, {})
            if value is DELETE:
                node.pop(leaf, None)
            else:
                node[leaf] = value
        return obj


CASES = [
    # unknown fields
    Broken("unknown-top", {"spec.iteratons": 3}, "spec.iteratons"),
    Broken("unknown-nested", {"spec.training.learningrate": 1e-6}, "spec.training.learningrate"),
    Broken("unknown-generation", {"spec.generation.temp": 0.7}, "spec.generation.temp"),
    # wrong types
    Broken("iterations-string", {"spec.iterations": "three"}, "spec.iterations"),
    Broken("replicas-float", {"spec.generation.replicas": 1.5}, "spec.generation.replicas"),
    Broken("suspend-string", {"spec.suspend": "yes"}, "spec.suspend"),
    Broken("model-not-object", {"spec.model": "s3://models/base"}, "spec.model"),
    Broken(
        "tolerations-not-list",
        {"spec.scheduling.tolerations": {"key": "gpu"}},
        "spec.scheduling.tolerations",
    ),
    Broken(
        "node-selector-int",
        {"spec.scheduling.nodeSelector": {"gpu": 1}},
        "spec.scheduling.nodeSelector.gpu",
    ),
    # missing required
    Broken("no-model", {"spec.model": DELETE}, "spec.model"),
    Broken("no-dataset-uri", {"spec.dataset.uri": DELETE}, "spec.dataset.uri"),
    # zero / negative / impossible values
    Broken("zero-iterations", {"spec.iterations": 0}, "spec.iterations"),
    Broken("too-many-iterations", {"spec.iterations": 1000}, "spec.iterations"),
    Broken("zero-replicas", {"spec.generation.replicas": 0}, "spec.generation.replicas"),
    Broken("negative-gpus", {"spec.training.gpusPerNode": -1}, "spec.training.gpusPerNode"),
    Broken("zero-nodes", {"spec.training.nodes": 0}, "spec.training.nodes"),
    Broken("negative-beta", {"spec.training.beta": -0.1}, "spec.training.beta"),
    Broken("zero-lr", {"spec.training.learningRate": 0}, "spec.training.learningRate"),
    Broken("lora-rank-zero", {"spec.training.peft.rank": 0}, "spec.training.peft.rank"),
    Broken("lora-bad-method", {"spec.training.peft.method": "qlora"}, "spec.training.peft.method"),
    Broken(
        "lora-all-linear-and-names",
        {"spec.training.peft.targetModules": ["all-linear", "q_proj"]},
        "spec.training.peft.targetModules",
    ),
    Broken("top-p-zero", {"spec.generation.topP": 0}, "spec.generation.topP"),
    Broken("warmup-one", {"spec.training.warmupRatio": 1.0}, "spec.training.warmupRatio"),
    Broken("bad-optimizer", {"spec.training.optimizer": "sgd"}, "spec.training.optimizer"),
    Broken("bad-backend", {"spec.generation.backend": "tgi"}, "spec.generation.backend"),
    Broken(
        "too-many-retries", {"spec.failurePolicy.maxRetries": 50}, "spec.failurePolicy.maxRetries"
    ),
    Broken(
        "prompt-longer-than-max",
        {"spec.training.maxPromptLength": 2048},
        "spec.training.maxPromptLength",
    ),
    Broken(
        "batch-not-divisible", {"spec.training.globalBatchSize": 9}, "spec.training.globalBatchSize"
    ),
    Broken(
        "beta-list-too-long",
        {"spec.training.betaPerIteration": [0.1, 0.1, 5.0]},
        "spec.training.betaPerIteration",
    ),
    Broken("eval-without-prompts", {"spec.dataset.evalSamples": 0}, "spec.dataset.evalSamples"),
    Broken(
        "patience-without-eval",
        {"spec.evaluation.enabled": False, "spec.stopping.patience": 2},
        "spec.stopping.patience",
    ),
    # malformed URIs and references
    Broken("model-uri-one-slash", {"spec.model.uri": "s3:/models/base"}, "spec.model.uri"),
    Broken("model-uri-http", {"spec.model.uri": "http://example.com/model"}, "spec.model.uri"),
    Broken("dataset-csv", {"spec.dataset.uri": "s3://data/sft.csv"}, "spec.dataset.uri"),
    Broken(
        "storage-bucket-uppercase", {"spec.storage.uri": "s3://My_Bucket/x"}, "spec.storage.uri"
    ),
    Broken(
        "secret-bad-name",
        {"spec.storage.credentialsSecret": {"name": "S3 Creds"}},
        "spec.storage.credentialsSecret.name",
    ),
    Broken(
        "bad-quantity",
        {"spec.training.resources": {"limits": {"memory": "lots"}}},
        "spec.training.resources.limits.memory",
    ),
    # names that would push child object names past Kubernetes limits
    Broken("name-too-long", {"metadata.name": "a" * 41}, "metadata.name"),
    Broken("name-with-dot", {"metadata.name": "run.v2"}, "metadata.name"),
    Broken("name-starts-with-digit", {"metadata.name": "7b-run"}, "metadata.name"),
]
