"""rlhf: instruction tuning (SFT -> reward regression -> PPO) with pluggable components."""
from __future__ import annotations

import importlib.metadata

from .checkout import keep_hub_kernels_importable
from .errors import UserError
from .hookspecs import hookimpl, hookspec

keep_hub_kernels_importable()  # before anything imports transformers (see rlhf_core.checkout)

__all__ = ["UserError", "hookimpl", "hookspec", "__version__"]
try:
    __version__ = importlib.metadata.version("rlhf-kit")  # one source of truth: pyproject.toml
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
