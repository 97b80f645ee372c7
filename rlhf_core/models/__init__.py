"""Models: loading and saving (:mod:`.loading`), LoRA (:mod:`.lora`), fused-linear forwards
(:mod:`.fused_linear`), scalar-head reward models and critics (:mod:`.scalar_head`), and adapters
sharing one frozen base (:mod:`.shared_backbone`). Everything public is re-exported here."""
from __future__ import annotations

from .fused_linear import cannot_skip_logits, fused_linear_problems, linear_head, use_fused_linear, with_last_hidden
from .loading import (
    BUILTIN_TINY, check_model_source, load_causal_lm, load_tokenizer, loading, save_causal_lm, set_attention,
    tiny_config, torch_dtype,
)
from .lora import (
    ADAPTER_BASE, ADAPTER_CONFIG, POLICY_ADAPTER, SHARED_HEADS, adapter_base, adapter_weights, apply_lora,
    is_adapter_dir, is_lora, lora_scope, merge_lora_state, peft_wrapping, plain_model, plain_state_dict,
)
from .scalar_head import (
    HEAD_FILE, REWARD_ADAPTER, REWARD_MARKER, ScalarHeadModel, is_reward_model_dir, load_scalar_model, scalar_head,
    score_at_last_token,
)
from .shared_backbone import AdapterScalarModel, SharedBackbone

#: The supported plugin API of this package (see docs/reference/api.md).
__all__ = ["ScalarHeadModel", "load_causal_lm", "load_tokenizer", "save_causal_lm", "load_scalar_model",
           "is_reward_model_dir", "apply_lora", "is_lora", "is_adapter_dir", "merge_lora_state", "plain_state_dict", "linear_head",
           "use_fused_linear", "fused_linear_problems", "plain_model", "lora_scope", "SharedBackbone",
           "with_last_hidden", "AdapterScalarModel", "score_at_last_token", "loading"]
