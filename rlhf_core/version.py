"""The installed version of rlhf (one source of truth: ``pyproject.toml``)."""
from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("rlhf-kit")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
