"""Deprecated: the names this module held are importable from :mod:`rlhf_core` itself (``from
rlhf_core import StageResult, PolicyLossInputs, ...``). It forwards them for one release, each
access with a ``DeprecationWarning`` naming the new import; see the README's plugin section."""
from __future__ import annotations

import warnings
from typing import Any

import rlhf_core

#: The names this module held, all of them now in ``rlhf_core.__all__``.
MOVED = ("Stage", "StageContext", "StageResult", "StageInput", "StageError", "ComponentError", "TokenLoss",
         "ScoreLoss", "PairwiseLoss", "PolicyLoss", "PolicyLossInputs", "FusedPolicyLoss", "Reward", "CheckedReward",
         "RewardSum", "reward_fields", "reward_specs", "fields_read_by", "build_rewards", "AdvantageInputs",
         "AdvantageEstimator", "TrackerBackend", "Generator", "checked_rewards", "checked_advantages",
         "checked_rollout", "describe")


def __getattr__(name: str) -> Any:
    if name not in MOVED:
        raise AttributeError(f"module 'rlhf_core.interfaces' has no attribute {name!r}")
    warnings.warn(f"rlhf_core.interfaces is deprecated; use 'from rlhf_core import {name}'", DeprecationWarning,
                  stacklevel=2)
    return getattr(rlhf_core, name)
