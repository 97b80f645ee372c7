"""Shared fixtures. Triton kernels run on CPU through the interpreter (set before triton loads)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # noqa: E402  (must precede any triton import)

import pytest

from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager


@pytest.fixture
def registry():
    """The registry of the built-in plugins (no entry points)."""
    return build_registry(get_plugin_manager(entry_points=False))


@pytest.fixture
def tiny_pipeline_yaml(tmp_path):
    """Write a CI-sized SFT -> reward -> PPO config and return its path."""

    def make(extra_ppo: str = "", iterations: int = 40) -> str:
        text = f"""
seed: 0
model: {{name_or_path: builtin:tiny}}
stages:
  - stage: sft
    data: {{train: "builtin:letters", builtin_size: 1200, max_length: 32}}
    train: {{steps: 120, batch_size: 32, lr: 3.0e-3, warmup_steps: 10, log_every: 10}}
  - stage: reward
    data: {{train: "builtin:letters", builtin_size: 2000, max_length: 32}}
    train: {{steps: 200, batch_size: 32, lr: 1.0e-3, warmup_steps: 10, log_every: 10}}
  - stage: ppo
    data: {{train: "builtin:letters", builtin_size: 300}}
    gold: letters_gold
    iterations: {iterations}
    prompts_per_batch: 32
    minibatch_size: 32
    optim: {{lr: 5.0e-4}}
    generation: {{max_new_tokens: 12}}
    kl: {{coef: 0.02}}
    eval_every: 10
    eval_prompts: 48
{extra_ppo}
"""
        path = tmp_path / "pipeline.yaml"
        path.write_text(text)
        return str(path)

    return make
