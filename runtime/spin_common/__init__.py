"""What the operator (`spin_operator`) and the runtime (`spin_runtime`) share, light by construction.

Storage, the artifact layout, manifests, generated records, redaction, MLflow tracking and its
spool, dataset reading and the check before a run, the training knobs and the errors both sides
raise. Nothing here imports torch, transformers, vllm, peft or accelerate, nor either of the two
packages that use it: import-linter's contracts in `.importlinter` check it (`make lint`).
"""
