"""Running from a source checkout: the repository's ``kernels/`` folder (imported as
``rlhf_kernels``) must not hide Hugging Face's ``kernels`` package.

From the repository root, ``python -m pytest`` or ``python -m rlhf_core.cli`` put the working
directory first on ``sys.path``, so a bare ``import kernels`` would load rlhf's kernel folder under
the wrong name. transformers (5.25 and later depends on ``kernels``) does exactly that import when
it loads a model, and fails with ``cannot import name 'CUDAProperties' from 'kernels'``.
:func:`keep_hub_kernels_importable` installs a finder that resolves ``kernels`` past the checkout
root. In an installed wheel the folder is ``rlhf_kernels`` and nothing is done.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

#: The repository's kernel folder when rlhf runs from a checkout (an editable install).
CHECKOUT_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class HubKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level module ``kernels`` on ``sys.path`` without the checkout root."""

    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        elsewhere = [p for p in sys.path if Path(p or os.curdir).resolve() / "kernels" != CHECKOUT_KERNELS]
        return importlib.machinery.PathFinder.find_spec(name, elsewhere)


def keep_hub_kernels_importable() -> None:
    """Install :class:`HubKernelsFinder` once, when rlhf runs from a checkout."""
    in_checkout = (CHECKOUT_KERNELS / "fused.py").is_file() and (CHECKOUT_KERNELS.parent / "pyproject.toml").is_file()
    if in_checkout and not any(isinstance(f, HubKernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, HubKernelsFinder())
