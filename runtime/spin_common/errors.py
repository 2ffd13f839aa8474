"""Errors and file names that are a contract between the runtime and the operator.

They live here rather than in the runtime's CLI entry point so that library modules (storage
readers, dataset parsing, the training knobs) and the operator can use them without importing
the CLI.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: the message names the flag or field; the CLI exits with status 2."""


# In a step's --output: the cause of a bad-input exit, written by the runtime's CLI and shown by
# the operator as the step's failure cause without reading pod logs.
BAD_INPUT_FILE = "_BAD_INPUT.txt"
