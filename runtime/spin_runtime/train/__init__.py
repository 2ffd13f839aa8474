"""The SPIN trainer: ``python -m spin_runtime train`` (see docs/runtime.md)."""
