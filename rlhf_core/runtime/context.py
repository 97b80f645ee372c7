"""What a stage may ask the host for: where to write, what earlier stages left, how to log and
checkpoint, and its models loaded, adapted (LoRA) and sharded as the run's config says."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed as dist_utils
from ..errors import StageError
from ..models import ScalarHeadModel, apply_lora, load_causal_lm, load_scalar_model, load_tokenizer
from ..types import StageResult

__all__ = ["StageContext"]

if TYPE_CHECKING:  # annotations only
    from ..checkpoint import Checkpointer
    from ..config import RunConfig
    from ..plugin_system.registry import Registry
    from .tracking import Tracker


@dataclass
class StageContext:
    """Everything the engine gives a stage: where to write, what came before, how to log.

    ``results`` maps earlier stage names to their :class:`StageResult` in pipeline order.
    ``tracker`` logs metrics (``tracker.log(step, {...})``) tagged with this stage's name.
    ``checkpointer`` (:class:`rlhf_core.checkpoint.Checkpointer`) saves and restores mid-stage
    checkpoints; a stage that uses it resumes exactly after a kill (the built-in ones do).
    """

    name: str
    stage_dir: Path
    run_config: RunConfig
    registry: Registry
    tracker: Tracker | None
    device: torch.device
    seed: int
    results: dict[str, StageResult]
    checkpointer: Checkpointer | None = None
    shared: Any = None
    """A :class:`~rlhf_core.models.SharedBackbone` offering the LoRA policy's frozen base to the models
    built with this context (:meth:`load_scalar_model`); a stage passes it explicitly with
    :meth:`sharing`, never by setting it."""

    def sharing(self, shared: Any) -> "StageContext":
        """A copy of this context whose scalar models are built on ``shared`` (see :attr:`shared`)."""
        return dataclasses.replace(self, shared=shared)

    def wrap(self, model: torch.nn.Module, *, trainable: bool = True) -> torch.nn.Module:
        """Prepare a model for this run's processes: gradient checkpointing for trainable models
        when ``model.gradient_checkpointing`` is on, then sharding as ``distributed:`` says (a no-op
        in a single process). Create optimizers after this, from the returned module's parameters."""
        if trainable and self.run_config.model.gradient_checkpointing:
            target = getattr(model, "backbone", model)
            if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.2x
                target.activation_checkpointing_enable({"use_reentrant": False})
            else:
                target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return dist_utils.wrap(model, self.run_config.distributed, self.device, trainable=trainable)

    @property
    def kernel_backend(self) -> str | None:
        """The ``backend=`` argument for ``rlhf_kernels`` ops (None = auto) from ``kernels.backend``."""
        backend = self.run_config.kernels.backend
        return None if backend == "auto" else backend

    def init_source(self, init: str, kind: str) -> str:
        """Where a stage's starting weights come from, as a ``from_pretrained`` source.

        ``auto``: the latest earlier result of ``kind`` (``"policy"``/``"reward"``), else the base
        model; ``base``: the run's ``model.name_or_path``; ``@NAME``: the output of stage NAME;
        anything else: a path or hub id as given.
        """
        if init == "auto":
            found = self.find_result(kind)
            return str(found[1].model_dir) if found else self.run_config.model.name_or_path
        if init == "base":
            return self.run_config.model.name_or_path
        if init.startswith("@"):
            result = self.results.get(init[1:])
            if result is None or result.model_dir is None:
                raise StageError(f"stage {self.name!r}: init {init!r} names no earlier stage with a saved model; "
                                 f"earlier stages: {', '.join(self.results) or '(none)'}")
            return str(result.model_dir)
        return init

    def load_policy(self, init: str) -> tuple[Any, torch.nn.Module]:
        """``(tokenizer, trainable causal LM)`` for an ``init`` source (see :meth:`init_source`)."""
        return self.tokenizer_for(self.init_source(init, "policy")), self.load_model(init)

    def load_model(self, init: str, *, trainable: bool = True) -> torch.nn.Module:
        """The causal LM of an ``init`` source on this run's device, with LoRA adapters when
        ``model.lora`` is set (see :meth:`adapt`), prepared with :meth:`wrap`; ``trainable=False``
        gives a frozen copy in eval mode (a reference model; with LoRA prefer the trainable model
        with its adapters disabled, see :func:`rlhf_core.models.is_lora`)."""
        source = self.init_source(init, "policy")
        model = load_causal_lm(self.run_config.model, source, seed=self.seed).to(self.device)
        if not trainable:
            model = model.eval().requires_grad_(False)
        else:
            model = self.adapt(model, source)
        return self.wrap(model, trainable=trainable)

    def adapt(self, model: torch.nn.Module, source: str) -> torch.nn.Module:
        """A trainable model with LoRA adapters (``peft``) when ``model.lora`` is set, else as is.
        ``source`` is where its base weights came from (an adapter records it). A
        :class:`rlhf_core.models.ScalarHeadModel` gets adapters on its backbone and keeps its head
        fully trainable. Call it before :meth:`wrap`."""
        lora = self.run_config.model.lora
        if lora is None:
            return model
        if isinstance(model, ScalarHeadModel):
            model.backbone = apply_lora(model.backbone, lora, source, causal_lm=False)
            return model
        return apply_lora(model, lora, source)

    def load_scalar_model(self, source: str, *, name: str, trainable: bool) -> Any:
        """A scalar-head model (reward model, critic) from ``source`` (a saved reward model, or a
        causal LM whose decoder gets a fresh head) on this run's device, prepared with :meth:`wrap`
        (trainable ones with LoRA when ``model.lora`` is set). While the stage shares its LoRA
        policy's frozen base (:attr:`shared`, a :class:`rlhf_core.models.SharedBackbone`) and the
        source fits it, the model is instead adapter ``name`` and a head on that base
        (:class:`rlhf_core.models.AdapterScalarModel`): no copy of the weights. Either is called as
        ``model(ids, mask, position_ids=None, score=False)``."""
        if self.shared is not None:
            why = self.shared.why_not(source)
            if why and self.shared.required:
                raise StageError(f"stage {self.name!r}: shared_backbone is true, but the {name} cannot share the "
                                 f"policy's base weights: {why}; set shared_backbone: auto to give it its own copy")
            if not why:
                view = self.shared.add(name, source, trainable=trainable)
                if dist_utils.is_main_process():
                    print(f"{self.name}: {view.name} = LoRA adapter + head on the policy's frozen base weights (no copy)")
                return view
            if dist_utils.is_main_process():
                print(f"{self.name}: {name} keeps its own copy of the weights ({why})")
        model = load_scalar_model(self.run_config.model, source, seed=self.seed)
        if not trainable:
            return self.wrap(model.to(self.device).eval().requires_grad_(False), trainable=False)
        return self.wrap(self.adapt(model, source).to(self.device))

    def tokenizer_for(self, source: str):
        """The tokenizer of a model source: the config's ``model.tokenizer`` for the base model,
        else the one saved with the model."""
        model_cfg = self.run_config.model
        return load_tokenizer(model_cfg, None if source == model_cfg.name_or_path else source)

    def find_result(self, kind: str) -> tuple[str, StageResult] | None:
        """The most recent earlier stage result of ``kind`` (``"policy"``/``"reward"``), if any."""
        for name, result in reversed(list(self.results.items())):
            if result.kind == kind:
                return name, result
        return None
