"""Every registered built-in satisfies the contract written on its Protocol or base class in
rlhf_core.contracts; the Stage base class's defaults; options declared once (the signature's
defaults reach check_options, a reserved option name is refused at registration)."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from rlhf_core import (
    AdvantageEstimator, AdvantageInputs, FusedPolicyLoss, FusedTokenLoss, Stage, StageInput, Uses,
)
from rlhf_core.config import ComponentSpec, RunConfig, check_options
from rlhf_core.errors import RegistryError
from rlhf_core.plugin_system.registry import RESERVED_OPTIONS, Registry

FIRST_PARAMETER = {"token": "logits", "score": "pred", "pairwise": "chosen", "policy": "inputs", "preference": "inputs",
                   "kto": "inputs"}


def test_every_stage_is_a_stage_with_a_dataclass_config_and_named_components(registry):
    run = RunConfig()
    for entry in registry.entries("stage"):
        stage = entry.obj()
        assert isinstance(stage, Stage) and dataclasses.is_dataclass(entry.obj.config_class), entry.name
        config = entry.obj.config_class()
        uses = stage.components(config)
        assert uses and all(isinstance(u, Uses) and u.kind in ("loss", "reward", "advantage", "generator", "dataset", "environment", "tool")
                            for u in uses), entry.name
        assert stage.produces in ("policy", "reward"), entry.name
        assert stage.record_kind(config, registry) in ("sft", "reward", "pairwise", "unpaired", "prompts"), entry.name
        assert isinstance(stage.validate(config, registry, run), list), entry.name
        assert all(isinstance(i, StageInput) for i in stage.data_inputs(config, registry) + stage.inputs(config, registry))
        assert isinstance(stage.plan(config, registry, {"data.train": 100}), dict), entry.name
        assert type(stage).run is not Stage.run, entry.name


def test_every_loss_has_a_family_the_signature_of_its_family_and_a_fused_form_of_the_right_kind(registry):
    for entry in registry.entries("loss"):
        family = entry.meta["family"]
        first = next(iter(inspect.signature(entry.obj).parameters))
        assert first == FIRST_PARAMETER[family], (entry.name, first)
        fused = entry.meta.get("fused")
        if fused is not None:
            assert isinstance(fused, FusedPolicyLoss if family == "policy" else FusedTokenLoss), entry.name
    assert registry.get("loss", "cross_entropy").meta["fused"].options({"aggregation": "token_mean"}) == {}
    assert registry.get("loss", "cross_entropy").meta["fused"].options({"aggregation": "sequence_mean"}) is None


def test_every_reward_generator_and_tracker_has_the_methods_of_its_contract(registry):
    for entry in registry.entries("reward"):
        assert inspect.isclass(entry.obj) and callable(entry.obj), entry.name
        params = list(inspect.signature(entry.obj.__init__).parameters)
        assert params[:2] == ["self", "ctx"], (entry.name, params)  # built as cls(ctx, **options)
        fields = getattr(entry.obj, "fields", ())
        assert callable(fields) or all(isinstance(f, str) for f in fields), entry.name
    for entry in registry.entries("generator"):
        assert all(callable(getattr(entry.obj, m, None)) for m in ("generate", "update_weights")), entry.name
        assert list(inspect.signature(entry.obj.__init__).parameters)[:4] == ["self", "ctx", "policy", "tokenizer"]
    for entry in registry.entries("tracker"):
        assert all(callable(getattr(entry.obj, m, None)) for m in ("log", "finish")), entry.name
        assert list(inspect.signature(entry.obj.__init__).parameters)[:3] == ["self", "run_dir", "config"]


def test_every_advantage_estimator_returns_advantages_of_the_masks_shape(registry):
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    values = torch.zeros_like(mask)
    inputs = AdvantageInputs(torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.zeros_like(mask), mask,
                             torch.tensor([0, 0, 1, 1]), values)
    for entry in registry.entries("advantage"):
        estimator = entry.obj()
        assert isinstance(estimator, AdvantageEstimator), entry.name
        assert isinstance(entry.obj.needs_values, bool) and entry.obj.min_group_size >= 1, entry.name
        out = estimator(inputs)
        assert out.shape == mask.shape and torch.isfinite(out[mask.bool()]).all(), entry.name


@pytest.mark.parametrize("kind, name", [("reward", "config"), ("reward", "backend"), ("loss", "ctx"), ("loss", "weight"),
                                        ("advantage", "name"), ("tracker", "plugin"), ("generator", "run_dir")])
def test_an_option_named_like_what_the_host_reserves_is_refused_at_registration(kind, name):
    def component(inputs=None, **_):
        return None

    params = [inspect.Parameter("inputs", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=1)]
    component.__signature__ = inspect.Signature(params)
    meta = {"family": "token"} if kind == "loss" else {}
    with pytest.raises(RegistryError, match=rf"plugin 'careless' registered .* with an option named '{name}', a name "
                                            "the host reserves"):
        Registry().add(kind, "odd", component, "careless", **meta)
    assert name in RESERVED_OPTIONS


def test_what_the_host_passes_is_not_an_option():
    """``backend`` of a token loss and ``ctx`` of a reward are the host's own parameters."""
    registry = Registry()

    def loss(logits, labels, *, backend=None, smoothing: float = 0.1):
        return logits.sum(), {}

    class Reward:
        def __init__(self, ctx=None, *, scale: float = 1.0):
            pass

    registry.add("loss", "smooth", loss, "p", family="token")
    registry.add("reward", "scaled", Reward, "p")
    assert list(registry.get("loss", "smooth").options()) == ["smoothing"]
    assert list(registry.get("reward", "scaled").options()) == ["scale"]


def test_check_options_sees_every_option_with_the_signatures_defaults():
    """A component's default is written once, in its signature: the host fills in the unset
    options before calling check_options, so the check repeats no default."""
    seen = []

    def loss(logits, labels, *, backend=None, delta: float = 1.0, mode: str = "a"):
        return logits.sum(), {}

    loss.check_options = lambda *, delta, mode: seen.append((delta, mode))
    registry = Registry()
    registry.add("loss", "l", loss, "p", family="token")
    problems: list[str] = []
    check_options(registry.get("loss", "l"), ComponentSpec("l", {"mode": "b"}), "loss", problems)
    assert problems == [] and seen == [(1.0, "b")]


def test_a_stage_that_is_not_a_stage_is_refused_at_registration():
    class Loose:
        config_class = dict

    with pytest.raises(RegistryError, match="registered stage 'loose' as .* a stage is a subclass of rlhf_core.Stage"):
        Registry().add("stage", "loose", Loose, "old-plugin")


def test_the_stage_base_class_derives_its_data_checks_from_records_and_uses(registry):
    """A stage declares the kind of its data and its rewards once; the host's data inputs (with
    the fields the rewards read) and the builtin dataset lookups follow."""
    from rlhf_plugins.ppo.stage import PPOStage
    from rlhf_plugins.ppo.config import PPOConfig
    from rlhf_core.config import DataConfig

    config = PPOConfig(data=DataConfig(train="builtin:arith"), reward=ComponentSpec("math"),
                       gold=ComponentSpec("exact_match"))
    stage = PPOStage()
    (data,) = stage.data_inputs(config, registry)
    assert (data.path, data.kind, data.data_kind, data.value) == ("data.train", "data", "prompts", "builtin:arith")
    assert set(data.extra) == {"answer"} and data.extra["answer"].startswith("reward 'math'")
    builtin = [u for u in stage.components(config) if u.kind == "dataset"]
    assert [(u.spec.name, u.path) for u in builtin] == [("arith", "data.train")]

    class Bare(Stage):
        config_class = dict

    assert Bare().uses({}) == [] and Bare().data_inputs({}, registry) == [] and Bare().inputs({}, registry) == []
    with pytest.raises(NotImplementedError, match="defines no run"):
        Bare().run(None, {})
