"""rlhf: instruction tuning (SFT -> reward regression -> PPO) with pluggable components."""
from __future__ import annotations

from .hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec", "__version__"]
__version__ = "0.1.0"
