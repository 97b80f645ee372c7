"""One frozen base, several adapters: reward models and critics as LoRA adapters with their own
scalar heads on a LoRA policy's frozen base weights (``ppo.shared_backbone``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelLoadError
from .fused_linear import cannot_skip_logits, with_last_hidden
from .loading import loading
from .lora import POLICY_ADAPTER, SHARED_HEADS, adapter_base, adapter_weights, is_adapter_dir, lora_scope
from .scalar_head import HEAD_FILE, REWARD_ADAPTER, is_reward_model_dir, scalar_head, score_at_last_token


class SharedBackbone:
    """Reward models and critics as LoRA adapters with their own linear heads on a LoRA policy's
    frozen base weights: one copy of the base in memory instead of one per model.

    ``policy`` is a model from :func:`apply_lora` (its adapter is peft's ``default``), not yet
    sharded; ``required``: a model that cannot share is an error (``shared_backbone: true``).
    :meth:`add` puts a named adapter and head on it and returns an
    :class:`AdapterScalarModel` that scores like a :class:`ScalarHeadModel`; :meth:`seal` (before
    :func:`rlhf_core.distributed.wrap`) attaches the heads to the policy's model, so that they are
    sharded, checkpointed and (for a trainable critic) optimised like its other weights, and are
    left out of every policy export (:func:`save_causal_lm`, :func:`merge_lora_state`).

    A scalar forward is the policy's own forward with the adapter switched (:func:`lora_scope`) and
    the head applied to the decoder's last hidden state inside it, without logits (:func:`with_last_hidden`).
    """

    def __init__(self, policy: nn.Module, lora_cfg: Any, *, required: bool = False):
        self.policy, self.lora_cfg, self.required = policy, lora_cfg, required
        self.model = policy.get_base_model()  # the Hugging Face causal LM the adapters are injected into
        self.heads = nn.ModuleDict()
        self.trainable: dict[str, bool] = {}
        self.sealed = False
        self.problem = cannot_skip_logits(self.model)

    def why_not(self, source: str) -> str:
        """Why the scalar model saved in ``source`` cannot be an adapter on this base ("" when it can):
        it must be a LoRA reward model (with its ``adapter/``) trained on exactly the policy's start
        weights, or (a fresh critic) the policy's own source."""
        if self.problem or self.sealed:
            return self.problem or "the policy is already prepared for training"
        mine = _same_source(self.policy.rlhf_lora["base"])
        if not is_reward_model_dir(source):
            return "" if _same_source(source) == mine else f"{source} is not the policy's start weights ({mine})"
        adapter_dir = Path(source) / REWARD_ADAPTER
        if not is_adapter_dir(adapter_dir):
            return f"{source} was not trained with LoRA (no {REWARD_ADAPTER}/), so its whole backbone differs"
        base = _same_source(adapter_base(adapter_dir))
        return "" if base == mine else f"its adapter was trained on {base}, the policy starts from {mine}"

    def add(self, name: str, source: str, *, trainable: bool) -> "AdapterScalarModel":
        """Adapter ``name`` and its head from ``source`` (a LoRA reward model: its adapter and head;
        the policy's own source: a fresh adapter as ``model.lora`` says and a fresh head), frozen
        unless ``trainable``; a name already taken gets a suffix (a second reward-model judge, e.g.
        gold, is ``reward_2``). Check :meth:`why_not` first."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import set_peft_model_state_dict

        why = self.why_not(source)
        if why:
            raise ModelLoadError(f"{name}: cannot share the policy's base weights: {why}")
        base_name, n = name, 1
        while name in self.trainable or name == POLICY_ADAPTER:
            n += 1
            name = f"{base_name}_{n}"
        head = scalar_head(self.model.config.get_text_config().hidden_size)
        if is_reward_model_dir(source):
            adapter_dir = Path(source) / REWARD_ADAPTER
            with loading(f"the {base_name}'s LoRA adapter", adapter_dir):
                self.policy.add_adapter(name, PeftLoraConfig.from_pretrained(str(adapter_dir)))
                # saved from the decoder alone (a ScalarHeadModel's backbone): re-root the names under the causal LM
                prefix = f"base_model.model.{self.model.base_model_prefix}."
                weights = {prefix + k[len("base_model.model."):]: v for k, v in adapter_weights(adapter_dir).items()}
                result = set_peft_model_state_dict(self.policy, weights, adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k]
            if result.unexpected_keys or missing:
                raise ModelLoadError(f"{adapter_dir}: the adapter does not fit the policy's model "
                                     f"({len(missing)} weights missing, {len(result.unexpected_keys)} unexpected)")
            with loading(f"the {base_name}'s head", Path(source) / HEAD_FILE):
                head.load_state_dict(load_file(str(Path(source) / HEAD_FILE)))
        else:
            cfg = self.lora_cfg
            self.policy.add_adapter(name, PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                         target_modules=cfg.target_modules, bias="none"))
        self.trainable[name] = trainable
        self.heads[name] = head.to(device=self.model.device, dtype=self.model.dtype)
        self._set_requires_grad()
        return AdapterScalarModel(self, name)

    def seal(self) -> None:
        """Attach the heads to the policy's model (call before sharding); nothing is added after."""
        if self.trainable and not self.sealed:
            self.model.add_module(SHARED_HEADS, self.heads)  # their requires_grad was set by add
        self.sealed = True

    def _set_requires_grad(self) -> None:
        # peft's add_adapter leaves only the active adapter trainable: say once what trains, before sharding.
        for pname, p in self.policy.named_parameters():
            owner = self.owner(pname)
            if owner == POLICY_ADAPTER:
                p.requires_grad_(".lora_" in pname)
            elif owner is not None:
                p.requires_grad_(self.trainable[owner])
        for name, head in self.heads.items():
            head.requires_grad_(self.trainable[name])

    def owner(self, param_name: str) -> str | None:
        """Which model a policy parameter belongs to: an added adapter's or head's name,
        ``default`` for the policy's own adapter and base weights, None for nothing else."""
        if f"{SHARED_HEADS}." in param_name:
            return param_name.split(f"{SHARED_HEADS}.", 1)[1].split(".", 1)[0]
        for name in self.trainable:
            if f".lora_A.{name}." in param_name or f".lora_B.{name}." in param_name:
                return name
        return POLICY_ADAPTER

    def parameters_of(self, name: str, model: nn.Module | None = None) -> list[nn.Parameter]:
        """The trainable parameters of ``name`` (``default``: the policy) as the (possibly sharded)
        ``model`` holds them now: what an optimizer takes and gradient clipping reads."""
        model = self.policy if model is None else model
        return [p for n, p in model.named_parameters() if p.requires_grad and self.owner(n) == name]


class AdapterScalarModel:
    """A reward model or critic that is an adapter and a head on a :class:`SharedBackbone`: called
    like :class:`ScalarHeadModel` (per-token values ``[B, T]`` in fp32, or with ``score`` the value
    at each row's last non-pad token). Frozen ones always score in eval mode."""

    def __init__(self, shared: SharedBackbone, name: str):
        self.shared, self.name = shared, name

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None, *, score: bool = False) -> torch.Tensor:
        shared, model = self.shared, self.shared.policy
        training = model.training
        if not shared.trainable[self.name]:
            model.eval()
        head = shared.heads[self.name]
        try:
            with self.scope():
                # [B, T, 1] -> [B, T] by a sum over the size-1 axis: a new tensor (FSDP warns about returning views)
                values = with_last_hidden(model, lambda hidden, _: head(hidden).float().sum(-1), input_ids, attention_mask,
                                   position_ids)
        finally:
            model.train(training)
        return score_at_last_token(values, attention_mask) if score else values

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``R_phi(x, y)`` ``[B]``."""
        return self(input_ids, attention_mask, score=True)

    def scope(self):
        """Run this model's backward inside it when activations are checkpointed (see :func:`lora_scope`)."""
        return lora_scope(self.shared.policy, self.name)

    def parameters(self) -> list[nn.Parameter]:
        """The adapter's and head's trainable parameters (none when frozen)."""
        return self.shared.parameters_of(self.name)


def _same_source(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
