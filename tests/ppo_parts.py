"""A :class:`~rlhf_plugins.ppo.run.PPORun` on the parts a test chooses (a policy and a reference of
its own seeds, a reward function, an estimator instance), through :meth:`PPORun.from_parts`, with
the learning rates set to ``lr``: 0 (the default here) keeps the weights and leaves the last
minibatch's gradient readable."""
from __future__ import annotations

import dataclasses

from rlhf_plugins.ppo.config import PPOConfig
from rlhf_plugins.ppo.run import PPORun, Prompt


def ppo_run(registry, config: PPOConfig, policy, *, lr: float = 0.0, backend: str | None = "cpp", **parts) -> PPORun:
    """``PPORun.from_parts`` with ``optim.lr`` and ``critic_optim.lr`` set to ``lr``."""
    config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=lr),
                                 critic_optim=dataclasses.replace(config.critic_optim, lr=lr))
    return PPORun.from_parts(registry, config, policy, backend=backend, **parts)


def prompts(run: PPORun, texts: list[str]) -> list[Prompt]:
    """``texts`` as the run samples them (within its prompt budget), without data records."""
    return [run.prompt(text)[0] for text in texts]
