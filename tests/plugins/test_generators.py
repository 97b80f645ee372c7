"""The rollout-engine hook: the built-in ``hf`` engine gives the rollouts ``generate`` gives, a
third-party engine is selected by config alone and told about weight updates, a misbehaving one is
named; the vLLM engine (when installed) matches the policy after weight pushes and beats SFT."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rlhf_core import hookimpl
from rlhf_core.cli import cli
from rlhf_core.config import ModelConfig
from rlhf_core.data import encode_prompt
from rlhf_core.models import load_causal_lm, load_tokenizer
from rlhf_core.sampling import generate, make_rollout, pad_prompts
from rlhf_plugins.ppo.generators import HFGenerator

CFG = ModelConfig()
TINY_PPO = ("stages=[{stage: ppo, init: base, data: {train: 'builtin:letters', builtin_size: 40}, iterations: 3, "
            "prompts_per_batch: 4, minibatch_size: 4, generation: {max_new_tokens: 6}, eval_every: 0, eval_prompts: 0, "
            "reward: length}]")


def ctx_stub(tmp_path, seed=0):
    return types.SimpleNamespace(device=torch.device("cpu"), seed=seed, stage_dir=tmp_path, name="ppo")


def test_hf_engine_gives_the_same_rollouts_as_generate(tmp_path):
    policy, tokenizer = load_causal_lm(CFG, seed=0), load_tokenizer(CFG)
    prompts = [encode_prompt(tokenizer, p) for p in ("abc", "hello there", "x")]
    torch.manual_seed(7)
    want = generate(policy, tokenizer, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, device=torch.device("cpu"))
    torch.manual_seed(7)
    got = HFGenerator(ctx_stub(tmp_path), policy, tokenizer).generate(prompts, max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.mask, want.mask)
    assert got.responses == want.responses and got.logprobs is None


def test_the_hf_engine_with_loop_rlhf_is_the_decode_loop_of_sampling(tmp_path):
    """``loop: rlhf`` hands sampling to ``rlhf_core.sampling.generate(loop="rlhf")`` (tested against
    Hugging Face's greedy decoding in tests/core/test_sampling.py): the same seed, the same rollout;
    an unknown loop is an option error."""
    policy, tokenizer = load_causal_lm(CFG, seed=0).eval(), load_tokenizer(CFG)
    prompts = [encode_prompt(tokenizer, p) for p in ("abc", "hello there, how", "x")]
    torch.manual_seed(3)
    want = generate(policy, tokenizer, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9,
                    device=torch.device("cpu"), loop="rlhf")
    torch.manual_seed(3)
    got = HFGenerator(ctx_stub(tmp_path), policy, tokenizer, loop="rlhf").generate(
        prompts, max_new_tokens=10, temperature=1.0, top_p=0.9)
    assert torch.equal(got.sequences, want.sequences) and got.responses == want.responses
    torch.manual_seed(3)  # the default, loop: auto, is rlhf's loop for a Llama
    default = HFGenerator(ctx_stub(tmp_path), policy, tokenizer).generate(prompts, max_new_tokens=10, temperature=1.0,
                                                                         top_p=0.9)
    assert torch.equal(default.sequences, want.sequences)
    with pytest.raises(ValueError, match="hf: loop must be one of auto, generate, rlhf, got 'fast'"):
        HFGenerator.check_options(loop="fast")
    with pytest.raises(ValueError, match="hf: compile must be auto, true or false, got 'yes'"):
        HFGenerator.check_options(compile="yes")


def test_ppo_with_the_rlhf_loop_on_one_and_two_processes(tmp_path):
    """A PPO run with generator {name: hf, loop: rlhf} on 1 and on 2 FSDP processes (ranks keep
    stepping together until every rank's rows have ended)."""
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        done = subprocess.run([sys.executable, "-m", "rlhf_core.cli", "run", "--out", str(out), "--nproc", str(n),
                               "--set", TINY_PPO, "--set", "stages.ppo.generator={name: hf, loop: rlhf}"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["stage"] == "ppo" and "reward_mean" in r] == [1, 2, 3]


class Recording:
    """A third-party engine: samples with hf and records what the host asks of it."""

    calls: list = []

    def __init__(self, ctx, policy, tokenizer, *, tag: str = "x"):
        self.inner = HFGenerator(ctx, policy, tokenizer)
        Recording.calls.append(("init", tag))

    def generate(self, prompt_ids, *, max_new_tokens, temperature, top_p):
        Recording.calls.append(("generate", len(prompt_ids), max_new_tokens))
        roll = self.inner.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        roll.logprobs = torch.zeros_like(roll.mask, dtype=torch.float32)  # reports log-probs: gap and TIS apply
        return roll

    def update_weights(self, policy):
        Recording.calls.append(("update_weights",))

    def sleep(self):
        Recording.calls.append(("sleep",))

    def wake(self):
        Recording.calls.append(("wake",))


class Broken(Recording):
    def generate(self, prompt_ids, **settings):
        roll = super().generate(prompt_ids, **settings)
        roll.labels = roll.labels[:, :-1]
        return roll


@hookimpl
def rlhf_register_generators(register):
    register("recording", Recording)
    register("broken", Broken)


@pytest.fixture
def engine_plugin(monkeypatch):
    module = types.ModuleType("engine_plugin")
    module.rlhf_register_generators = rlhf_register_generators
    monkeypatch.setitem(sys.modules, "engine_plugin", module)
    Recording.calls = []


def run(tmp_path, *sets):
    args = ["run", "--out", str(tmp_path / "run"), "--set", "plugins=[engine_plugin]", "--set", TINY_PPO]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(cli, args, obj={})


def test_a_third_party_engine_is_selected_by_config_and_told_about_updates(tmp_path, engine_plugin):
    result = run(tmp_path, "stages.ppo.generator={name: recording, tag: y}",
                 "stages.ppo.rollout_correction={type: tis, cap: 1.5}")
    assert result.exit_code == 0, result.output
    calls = Recording.calls
    assert calls[0] == ("init", "y")
    assert [c[0] for c in calls[1:]] == ["wake", "generate", "sleep", "update_weights"] * 3
    assert all(c == ("generate", 4, 6) for c in calls if c[0] == "generate")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in rows if "reward_mean" in r]
    assert len(ppo) == 3 and all(r["engine_logprob_gap"] > 0 for r in ppo)
    assert all(0 < r["is_weight_mean"] <= 1.5 and 0 <= r["is_capped_frac"] <= 1 for r in ppo)


def test_a_misbehaving_engine_is_named(tmp_path, engine_plugin):
    result = run(tmp_path, "stages.ppo.generator=broken")
    assert result.exit_code == 1
    assert "generator 'broken' (plugin 'engine_plugin') returned labels of shape" in result.output


def test_unknown_engine_and_bad_options_are_config_errors(registry):
    from rlhf_core.config import ConfigError, load_raw, resolve

    with pytest.raises(ConfigError, match=r"stages\[2\].generator: unknown generator 'vlm'; available: hf"):
        resolve(load_raw(None, ["stages.ppo.generator=vlm"]), registry)
    with pytest.raises(ConfigError, match=r"rollout_correction.cap: must be a finite number >= 1, got 0.5"):
        resolve(load_raw(None, ["stages.ppo.rollout_correction={cap: 0.5}"]), registry)
    from rlhf_plugins.vllm_engine import vllm_unavailable

    if vllm_unavailable():
        with pytest.raises(ConfigError, match="the vllm generator needs vLLM: pip install"):
            resolve(load_raw(None, ["stages.ppo.generator=vllm"]), registry)


# ---------------------------------------------------------------------------- vLLM (when installed)

def _vllm_reason() -> str:
    from rlhf_plugins.vllm_engine import vllm_unavailable

    return vllm_unavailable()


needs_vllm = pytest.mark.skipif(bool(_vllm_reason()), reason=_vllm_reason() or "vLLM installed")


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    from rlhf_plugins.vllm_engine import cpu_model_dir

    return cpu_model_dir(tmp_path_factory.mktemp("vllm") / "model")


@needs_vllm
def test_vllm_follows_the_policy_after_weight_pushes(vllm_model, tmp_path):
    """After every push the engine's greedy outputs equal the policy's greedy hf outputs, and its
    sampled log-probs equal the trainer's (raw, temperature 1) within 1e-3."""
    from rlhf_plugins.ppo.rollout import score_tokens
    from rlhf_plugins.vllm_engine import VLLMGenerator

    cfg = ModelConfig(name_or_path=str(vllm_model))
    policy, tokenizer = load_causal_lm(cfg), load_tokenizer(cfg)
    engine = VLLMGenerator(ctx_stub(tmp_path), policy, tokenizer)
    prompts = [encode_prompt(tokenizer, p) for p in ("abc", "hello there", "x", "the letters")]
    for round_ in range(2):
        with torch.no_grad():  # a sharp, changed policy: greedy choices are unambiguous and new
            policy.lm_head.weight.mul_(8.0 if round_ == 0 else 1.0).add_(torch.randn_like(policy.lm_head.weight))
        engine.update_weights(policy)
        ids, attn = pad_prompts(tokenizer, prompts, torch.device("cpu"))
        with torch.no_grad():
            hf = policy.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=8,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        want = make_rollout(tokenizer, ids, attn, hf[:, ids.shape[1]:])
        got = engine.generate(prompts, max_new_tokens=8, temperature=0.0, top_p=1.0)
        assert got.responses == want.responses, round_
        sampled = engine.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=1.0)
        trainer, _ = score_tokens(policy, sampled, "reference")
        assert float((trainer - sampled.logprobs).abs().max()) < 1e-3


@needs_vllm
def test_vllm_multi_turn_episodes_are_scored_on_the_engines_own_tokens(vllm_model, tmp_path):
    """Token-in/token-out with vLLM: an episode's loss tokens are the engine's sampled ids, turn after
    turn, and the trainer's log-probs of them over the whole episode equal the engine's within 1e-3."""
    from rlhf_core import CheckedEnvironment, GenerationConfig
    from rlhf_core.plugin_system.registry import Entry
    from rlhf_plugins.ppo.config import EnvironmentSpec
    from rlhf_plugins.ppo.environments import GuessNumber
    from rlhf_plugins.ppo.episodes import EpisodeRendering, EpisodeRunner
    from rlhf_plugins.ppo.rollout import score_tokens
    from rlhf_plugins.vllm_engine import VLLMGenerator

    cfg = ModelConfig(name_or_path=str(vllm_model))
    policy, tokenizer = load_causal_lm(cfg), load_tokenizer(cfg)
    engine = VLLMGenerator(ctx_stub(tmp_path), policy, tokenizer)
    env = CheckedEnvironment(Entry("environment", "guess", GuessNumber, "ppo-environments"), GuessNumber())
    runner = EpisodeRunner(EnvironmentSpec("guess", max_turns=3), env, None,
                           EpisodeRendering(tokenizer, False, None, "test"), tokenizer, engine,
                           GenerationConfig(max_new_tokens=6), prompt_budget=64, max_length=160, context=None,
                           device=torch.device("cpu"))
    batch = runner.run([{"target": str(t)} for t in (1, 4, 8, 2)], [0, 1, 2, 3])
    roll = batch.rollout
    assert roll.logprobs is not None
    for b, e in enumerate(batch.episodes):
        assert roll.sequences[b, roll.prompt_len:][roll.mask[b].bool()].tolist() == [t for t, p in zip(e.body, e.policy) if p]
    trainer, _ = score_tokens(policy, roll, "reference")
    assert float(((trainer - roll.logprobs) * roll.mask).abs().max()) < 1e-3


@needs_vllm
def test_ppo_with_vllm_beats_sft_on_the_gold_judge(vllm_model, tiny_pipeline_yaml, tmp_path):
    result = CliRunner().invoke(cli, ["run", tiny_pipeline_yaml(iterations=30), "--out", str(tmp_path / "run"),
                                      "--set", f"model.name_or_path={vllm_model}", "--set", "stages.ppo.generator=vllm"],
                                obj={})
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["gold_score_ppo"] > summary["gold_score_sft"] + 0.1, summary
    rows = [json.loads(x) for x in Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["engine_logprob_gap"] for r in rows if "engine_logprob_gap" in r]
    assert len(gaps) == 30 and max(gaps) < 1e-3


@needs_vllm
def test_vllm_on_two_fsdp_processes_stays_in_sync(vllm_model, tmp_path):
    """One engine per rank; after every update each rank's engine gets the gathered (sharded)
    policy's weights: the engine's log-probs match the trainer's on every iteration."""
    import subprocess

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_core.cli", "run", "--out", str(out), "--nproc", "2",
         "--set", f"model.name_or_path={vllm_model}", "--set", "stages.sft.train.steps=10",
         "--set", "stages.reward.train.steps=10", "--set", "stages.ppo.iterations=3", "--set", "stages.ppo.generator=vllm",
         "--set", "stages.ppo.eval_every=0", "--set", "stages.ppo.prompts_per_batch=4",
         "--set", "stages.ppo.minibatch_size=4"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["engine_logprob_gap"] for r in rows if r["stage"] == "ppo" and "engine_logprob_gap" in r]
    assert len(gaps) == 3 and max(gaps) < 1e-4


class FailsToSync(Recording):
    def update_weights(self, policy):
        raise RuntimeError("engine went away")


def test_an_engine_failing_to_take_new_weights_is_named(tmp_path, engine_plugin, monkeypatch):
    module = sys.modules["engine_plugin"]

    @hookimpl
    def rlhf_register_generators(register):
        register("flaky", FailsToSync)

    module.rlhf_register_generators = rlhf_register_generators
    result = run(tmp_path, "stages.ppo.generator=flaky")
    assert result.exit_code == 1
    assert ("generator 'flaky' (plugin 'engine_plugin') raised RuntimeError in update_weights: engine went away"
            in result.output)


def test_vllm_engine_refuses_a_head_size_its_cpu_attention_lacks(tmp_path, monkeypatch):
    """Checked before vLLM is even imported: the builtin tiny model's heads are 16 wide."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # what the engine sets; restored afterwards
    from rlhf_core import StageError
    from rlhf_plugins.vllm_engine import VLLMGenerator

    with pytest.raises(StageError, match=r"ppo.generator: vLLM's CPU attention supports head sizes \[32, 64, .*\]; "
                                         r"this model's is 16 \(hidden 64 / 4 heads\); use generator: hf"):
        VLLMGenerator(ctx_stub(tmp_path), load_causal_lm(CFG, seed=0), load_tokenizer(CFG))


