"""rlhf: instruction tuning (SFT -> reward regression -> PPO and its successors) with pluggable
components.

Everything a plugin or stage author needs is importable from here (``from rlhf_core import
Stage, StageResult, hookimpl, ...``) and listed in ``__all__``: the hook markers, the
:class:`Stage` base class and the contracts of every component kind (:mod:`rlhf_core.contracts`),
the data passed between them (:mod:`rlhf_core.types`), the errors (:mod:`rlhf_core.errors`), the
config dataclasses, data loading, the training loop, model loading, sampling and the distributed
helpers. The submodules stay importable for what is not listed here.
"""
from __future__ import annotations

from .checkout import keep_hub_kernels_importable

keep_hub_kernels_importable()  # before anything imports transformers (see rlhf_core.checkout)

from . import distributed  # noqa: E402
from .checkpoint import Checkpointer  # noqa: E402
from .config import (  # noqa: E402
    AT_LEAST_0, AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, UNIT, ComponentSpec, DataConfig, GenerationConfig,
    ModelConfig, OptimConfig, RunConfig, TrainConfig, WeightedComponent, rule_problems,
)
from .contracts import (  # noqa: E402
    AdvantageEstimator, CheckedEnvironment, CheckedEstimator, CheckedGenerator, CheckedReward, Environment, FusedPolicyLoss, FusedTokenLoss, Generator, PairwiseLoss,
    PolicyLoss, Reward, RewardSum, ScoreLoss, Stage, TokenLoss, TrackerBackend, build_rewards, checked_advantages,
    checked_observation, checked_rewards, checked_rollout, describe, fields_read_by, reward_fields, reward_specs,
)
from .data import (  # noqa: E402
    IGNORE_INDEX, Record, Rendering, TokenStats, append_column, apply_template, collate_scored, collate_sft, collate_unpaired,
    encode_prompt, encode_response, fit_length, fit_prompt, load_records, role_lines, mismatched_pair, pad, render_prompt, shift_labels,
    tokenize_scored, tokenize_sft, tokenize_unpaired,
)
from .distributed import all_gather_objects, all_reduce_max, all_reduce_sum, is_main_process, masked_mean  # noqa: E402
from .errors import (  # noqa: E402
    ComponentError, ConfigError, DataError, Interrupted, ModelLoadError, RegistryError, StageError, TrainingError,
    UserError,
)
from .models import (  # noqa: E402
    ScalarHeadModel, SharedBackbone, fused_linear_problems, is_lora, is_reward_model_dir, load_causal_lm, load_scalar_model, load_tokenizer,
    lora_scope, save_causal_lm, use_fused_linear, with_last_hidden,
)
from .packing import PackingStats, packing_problems, padding_free  # noqa: E402
from .plugin_system.hookspecs import hookimpl, hookspec  # noqa: E402
from .runtime.context import StageContext  # noqa: E402
from .runtime.tracking import progress  # noqa: E402
from .sampling import concat_rollouts, evaluate_samples, generate, make_rollout, position_ids  # noqa: E402
from .training import (  # noqa: E402
    Batches, OptimizerStep, Trainer, autocast_context, budget_problems, evaluate_batches, make_loader, total_steps, train_plan,
)
from .types import AdvantageInputs, Observation, PolicyLossInputs, Rollout, StageInput, StageResult, Uses  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    # hooks and the stage API
    "hookimpl", "hookspec", "Stage", "StageContext", "StageInput", "StageResult", "Uses", "__version__",
    # errors
    "UserError", "ConfigError", "StageError", "ComponentError", "DataError", "ModelLoadError", "RegistryError",
    "TrainingError",
    "Interrupted",
    # component contracts and the host's checks
    "TokenLoss", "FusedTokenLoss", "ScoreLoss", "PairwiseLoss", "PolicyLoss", "PolicyLossInputs", "FusedPolicyLoss", "Reward",
    "RewardSum", "CheckedReward", "build_rewards", "reward_specs", "reward_fields", "fields_read_by",
    "checked_rewards", "AdvantageEstimator", "AdvantageInputs", "CheckedEstimator", "checked_advantages",
    "Generator", "CheckedGenerator", "checked_rollout", "Rollout", "TrackerBackend", "describe",
    "Environment", "CheckedEnvironment", "checked_observation", "Observation",
    # config
    "ComponentSpec", "WeightedComponent", "DataConfig", "OptimConfig", "TrainConfig", "GenerationConfig", "ModelConfig",
    "RunConfig", "rule_problems", "POSITIVE", "NON_NEGATIVE", "AT_LEAST_0", "AT_LEAST_1", "FRACTION", "UNIT",
    # data
    "Record", "Rendering", "TokenStats", "IGNORE_INDEX", "load_records", "render_prompt", "encode_prompt",
    "encode_response", "fit_length", "fit_prompt", "role_lines", "apply_template", "tokenize_sft", "tokenize_scored", "tokenize_unpaired", "collate_sft",
    "collate_scored", "collate_unpaired", "mismatched_pair", "shift_labels", "pad", "append_column",
    # training
    "Trainer", "OptimizerStep", "Batches", "make_loader", "evaluate_batches", "total_steps", "train_plan", "budget_problems", "autocast_context",
    "progress", "Checkpointer", "PackingStats", "padding_free", "packing_problems",
    # models
    "load_causal_lm", "load_tokenizer", "save_causal_lm", "load_scalar_model", "ScalarHeadModel", "SharedBackbone",
    "is_lora", "is_reward_model_dir", "lora_scope", "with_last_hidden", "use_fused_linear", "fused_linear_problems",
    # sampling
    "generate", "make_rollout", "concat_rollouts", "evaluate_samples", "position_ids",
    # processes
    "distributed", "is_main_process", "masked_mean", "all_reduce_sum", "all_reduce_max", "all_gather_objects",
]
