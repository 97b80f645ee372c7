"""YAML + ``--set`` overrides -> typed, validated config. Unknown keys are errors.

Every problem found (unknown key, wrong type, unknown component, bad value) is collected and
reported together, with its dotted path and what is accepted, before any model is loaded.

The package: ``schema``, ``coerce``, ``overrides``, ``resolve`` (one job each); everything is re-exported here,
so ``from rlhf_core.config import X`` is the way to import it."""
from __future__ import annotations

from ..errors import ConfigError  # noqa: F401
from .schema import AT_LEAST_0, AT_LEAST_1, CheckpointConfig, ComponentSpec, DataConfig, DistributedConfig, flatten, GenerationConfig, FRACTION, KernelConfig, LoraConfig, ModelConfig, NON_NEGATIVE, OptimConfig, POSITIVE, Rule, rule_problems, RunConfig, StageSpec, to_plain, TrainConfig, UNIT, WeightedComponent  # noqa: F401
from .coerce import coerce, coerce_dataclass  # noqa: F401
from .overrides import apply_override, default_config_text, load_raw, parse_override  # noqa: F401
from .resolve import check_options, resolve  # noqa: F401

#: The supported plugin API of this package (see docs/reference/api.md).
__all__ = ["ComponentSpec", "WeightedComponent", "ConfigError", "DataConfig", "GenerationConfig", "OptimConfig", "TrainConfig", "ModelConfig", "RunConfig",
           "rule_problems", "POSITIVE", "NON_NEGATIVE", "AT_LEAST_0", "AT_LEAST_1", "FRACTION", "UNIT",
           "flatten", "to_plain"]
