"""Shared fixtures. Each support module owns its fixtures; this file only re-exports them."""

import os

# Tests never reach a hub or the network beyond 127.0.0.1.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
from tests.support.k8s_emulator import *  # noqa: F403
from tests.support.servers import *  # noqa: F403
from tests.support.session_guard import (  # noqa: F401
    hermetic_cache,
    pytest_sessionfinish,
    pytest_sessionstart,
)
from tests.support.tiny import *  # noqa: F403
