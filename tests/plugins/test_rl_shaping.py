"""The GRPO family's sampling and shaping around the policy loss: rollout corrections (TIS, sequence
TIS, masked IS), DAPO's overlong shaping and dynamic sampling, on-policy distillation, rollouts
joined across sampling rounds; each against hand-computed values, then through the PPO update
(tokens that leave the loss weigh nothing, on the fused and the logits path) and end to end."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from rlhf_core.cli import cli
from rlhf_core.config import ComponentSpec, ConfigError, ModelConfig, load_raw, resolve
from rlhf_core.data import encode_prompt
from rlhf_core import RewardSum, StageContext
from rlhf_core.models import load_causal_lm, load_tokenizer
from rlhf_core.sampling import concat_rollouts, generate
from rlhf_plugins.ppo.advantages import GroupMeanBaseline
from ppo_parts import ppo_run, prompts
from rlhf_core import GenerationConfig
from rlhf_plugins.ppo.config import DynamicSamplingConfig, KLConfig, OverlongConfig, PolicyOptimConfig, PPOConfig
from rlhf_plugins.ppo.loss import (distill_rewards, local_normaliser, overlong_penalty, rollout_correction,
                                   shape_rewards, truncated_responses)
from rlhf_plugins.ppo.rollout import score_tokens

CFG = ModelConfig()
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_rollout_corrections_by_hand():
    # rho = pi_old / pi_engine per token: row 0 (2.0, 0.5, 1.5), row 1 (3.0, 1.0 | pad)
    rho = torch.tensor([[2.0, 0.5, 1.5], [3.0, 1.0, 7.0]])
    engine = torch.full((2, 3), -1.0)
    old = engine + rho.log()
    weight, keep, m = rollout_correction(old, engine, MASK, "tis", cap=1.8, low=0.5, high=2.0)
    torch.testing.assert_close(weight, torch.tensor([[1.8, 0.5, 1.5], [1.8, 1.0, 0.0]]))
    torch.testing.assert_close(keep, MASK)
    assert float((m["is_capped_frac"] * MASK).sum()) == 2.0  # 2.0 and 3.0 hit the cap
    # Sequence TIS: prod rho = 1.5 (row 0) and 3.0 (row 1), capped at 2.0, on each token of the row.
    weight, _, m = rollout_correction(old, engine, MASK, "seq_tis", cap=2.0, low=0.5, high=2.0)
    torch.testing.assert_close(weight, torch.tensor([[1.5, 1.5, 1.5], [2.0, 2.0, 0.0]]))
    # Masked IS: tokens outside [0.6, 1.8] leave the loss (2.0, 0.5 and 3.0); weights stay 1.
    weight, keep, m = rollout_correction(old, engine, MASK, "mask", cap=2.0, low=0.6, high=1.8)
    torch.testing.assert_close(keep, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(weight, MASK)
    assert float((m["is_masked_frac"] * MASK).sum()) == 3.0
    # Sequence mask: geometric means 1.5^(1/3) = 1.145 (kept) and sqrt(3) = 1.732 (dropped at high 1.7).
    _, keep, _ = rollout_correction(old, engine, MASK, "seq_mask", cap=2.0, low=0.6, high=1.7)
    torch.testing.assert_close(keep, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))


def test_overlong_penalty_and_truncation_by_hand():
    # max_new_tokens 10, cache 4: no penalty up to 6 tokens, then -(L - 6) / 4 down to -1 at 10.
    lengths = torch.tensor([3, 6, 7, 9, 10])
    assert overlong_penalty(lengths, 10, 4, 1.0).tolist() == pytest.approx([0.0, 0.0, -0.25, -0.75, -1.0])
    assert overlong_penalty(lengths, 10, 4, 0.5).tolist() == pytest.approx([0.0, 0.0, -0.125, -0.375, -0.5])
    assert overlong_penalty(lengths, 10, 0, 1.0).abs().sum() == 0
    eos = 1
    labels = torch.tensor([[5, 6, eos], [5, 6, 7], [eos, -100, -100]])
    mask = (labels != -100).float()
    assert truncated_responses(labels, mask, eos).tolist() == [False, True, False]


def test_distillation_rewards_by_hand():
    # log pi - log pi_teacher = (0.5, -0.2, 0.1 | 1.0, 0.3): token rewards are minus that, times coef.
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.5, -1.0, -3.0]])
    teacher = torch.tensor([[-1.5, -1.8, -0.6], [-1.5, -1.3, -9.0]])
    dense = distill_rewards(logp, teacher, MASK, 2.0)
    torch.testing.assert_close(dense, torch.tensor([[-1.0, 0.4, -0.2], [-2.0, -0.6, 0.0]]))
    # Alone (reward 0) and with a sequence reward: the token rewards gain them, the sequence reward their sum.
    seq, tok = shape_rewards(torch.tensor([0.0, 1.0]), torch.zeros(2, 3), MASK, 0.0, "reward", dense)
    torch.testing.assert_close(seq, torch.tensor([-0.8, -1.6]))
    torch.testing.assert_close(tok, torch.tensor([[-1.0, 0.4, -0.2], [-2.0, 1.0 - 0.6, 0.0]]))


def test_the_seq_mean_normaliser_leaves_out_sequences_masked_whole():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert float(local_normaliser("seq_mean_token_mean", mask, 2)) == 2.0
    assert float(local_normaliser("token_sum_norm", mask, 2)) == 6.0  # Dr. GRPO's constant keeps every sequence


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_causal_lm(CFG, seed=0), load_tokenizer(CFG)


def test_joined_rollouts_score_like_their_parts(tiny):
    """Rollouts of different prompt and response widths, joined and reordered, give every row the
    log-probs it had alone: the padding added on both sides changes no position."""
    policy, tok = tiny
    torch.manual_seed(3)
    a = generate(policy, tok, [encode_prompt(tok, p) for p in ["a=", "hello there="]], max_new_tokens=5,
                 temperature=1.0, top_p=1.0, device=torch.device("cpu"))
    b = generate(policy, tok, [encode_prompt(tok, p) for p in ["bb=", "c=", "a long prompt here="]], max_new_tokens=9,
                 temperature=1.0, top_p=1.0, device=torch.device("cpu"))
    a.logprobs, b.logprobs = -a.mask.float(), -2 * b.mask.float()
    rows = torch.tensor([4, 0, 2])
    joined = concat_rollouts([a, b], tok.pad_token_id, rows)
    assert joined.responses == [b.responses[2], a.responses[0], b.responses[0]]
    alone = [score_tokens(policy, r, "reference")[0] for r in (a, b)]
    together = score_tokens(policy, joined, "reference")[0]
    for row, (part, i) in enumerate([(1, 2), (0, 0), (1, 0)]):
        n = int([a, b][part].mask[i].sum())
        torch.testing.assert_close(together[row, :n], alone[part][i, :n], rtol=1e-5, atol=1e-5)
        assert joined.mask[row].sum() == n and joined.logprobs[row, :n].tolist() == [-1.0 - part] * n


def test_dynamic_sampling_keeps_informative_groups_and_fills_when_rounds_run_out(tiny, registry):
    policy, tok = tiny
    # Prompts starting with "t" always get reward 1 (a tied group); the others a reward by length.
    def score(prompts, responses, rows):
        return torch.tensor([1.0 if p.startswith("t") else float(len(r)) for p, r in zip(prompts, responses)])

    reward = RewardSum([("reward", 1.0, score)])
    config = PPOConfig(prompts_per_batch=2, samples_per_prompt=3, generation=GenerationConfig(max_new_tokens=6),
                       dynamic_sampling=DynamicSamplingConfig(max_rounds=4), kl=KLConfig(coef=0.0))
    run = ppo_run(registry, config, policy, rewards=reward, tokenizer=tok)
    draws = iter([prompts(run, p) for p in (["t1", "a"], ["t2", "t3"], ["b", "t4"], ["t5", "t6"])])
    torch.manual_seed(1)
    got = run.sample_informative(lambda: next(draws))
    # Round 1 keeps "a" (t1 tied), round 2 none, round 3 keeps "b": done in 3 rounds, 4 tied groups dropped.
    assert got.stats == {"ds_rounds": 3.0, "ds_dropped_groups": 4.0, "ds_filled_groups": 0.0}
    assert got.group_ids.tolist() == [0, 0, 0, 1, 1, 1] and len(got.rollout.responses) == 6
    assert got.rewards.tolist() == [float(len(r)) for r in got.rollout.responses]
    assert [p.text for p in next(draws)] == ["t5", "t6"]  # the fourth round never ran
    # With one round allowed, a tied group fills the batch, and says so.
    draws = iter([prompts(run, ["t1", "a"])])
    run.config = dataclasses.replace(config, dynamic_sampling=DynamicSamplingConfig(max_rounds=1))
    torch.manual_seed(1)
    one = run.sample_informative(lambda: next(draws))
    assert one.stats == {"ds_rounds": 1.0, "ds_dropped_groups": 0.0, "ds_filled_groups": 1.0}
    assert one.rewards[3:].tolist() == [1.0, 1.0, 1.0]  # "a" first, then the tied "t1"


def gradient_of(policy, exp, config, registry, fused):
    policy = copy.deepcopy(policy)
    ppo_run(registry, config, policy, fused=fused).update(copy.deepcopy(exp))
    return torch.cat([p.grad.reshape(-1) for p in policy.parameters()])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("loss, agg", [(ComponentSpec("ppo_clip"), "token_mean"),
                                       (ComponentSpec("cispo"), "seq_mean_token_mean")])
def test_tokens_out_of_the_loss_weigh_nothing(tiny, registry, fused, loss, agg):
    """overlong.mask_truncated: the update's gradient equals the gradient of the batch without the
    truncated responses (whose advantages are set apart), whatever the loss's path (ppo_clip's
    one-sweep fused form takes the masked labels)."""
    policy, tok = tiny
    config = PPOConfig(prompts_per_batch=3, samples_per_prompt=2, ppo_epochs=1, minibatch_size=6,
                       optim=PolicyOptimConfig(max_grad_norm=0.0), loss=loss, loss_agg=agg, generation=GenerationConfig(max_new_tokens=4), kl=KLConfig(coef=0.0),
                       overlong=OverlongConfig(mask_truncated=True))
    torch.manual_seed(2)
    reward = RewardSum([("reward", 1.0, lambda prompts, responses, rows: torch.tensor(
        [float(r.count("a")) + 0.1 * i for i, r in enumerate(responses)]))])
    run = ppo_run(registry, config, policy, rewards=reward, estimator=GroupMeanBaseline(), tokenizer=tok)
    samples = run.sample(prompts(run, ["a=", "b=", "cc="]))
    # Make rows 1 and 4 end with EOS (the untrained policy rarely samples it): the others are truncated.
    roll = samples.rollout
    for row in (1, 4):
        roll.labels[row, 2] = roll.sequences[row, roll.prompt_len + 2] = tok.eos_token_id
        roll.mask[row, 3:] = 0
        roll.labels[row, 3:] = -100
        roll.attention_mask[row, roll.prompt_len + 3:] = 0
    samples.truncated = truncated_responses(roll.labels, roll.mask, tok.eos_token_id)
    assert samples.truncated.tolist() == [True, False, True, True, False, True]
    exp = run.score(samples)
    assert exp.stats["truncated_frac"] == pytest.approx(4 / 6)
    masked = gradient_of(policy, exp, config, registry, fused)
    # The same update on rows 1 and 4 alone (their advantages as computed on the whole batch).
    kept = torch.tensor([1, 4])
    alone = copy.deepcopy(exp)
    alone.rollout = concat_rollouts([exp.rollout], tok.pad_token_id, kept)
    for name in ("old_logprobs", "entropy", "kl_tokens", "advantages"):
        if getattr(exp, name) is not None:  # on-policy: the old log-probs come from the update's own forward
            setattr(alone, name, getattr(exp, name)[kept])
    alone.rewards, alone.loss_mask = exp.rewards[kept], None
    reference = gradient_of(policy, alone, dataclasses.replace(config, minibatch_size=2), registry, fused)
    assert reference.abs().sum() > 0
    torch.testing.assert_close(masked, reference, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("overrides, message", [
    (["stages.ppo.dynamic_sampling={max_rounds: 2}"],
     "stages[2].dynamic_sampling: drops groups whose samples all got the same reward, which needs samples_per_prompt >= 2, "
     "got 1"),
    (["stages.ppo.dynamic_sampling={max_rounds: 0}", "stages.ppo.samples_per_prompt=4"],
     "stages[2].dynamic_sampling.max_rounds: must be at least 1, got 0"),
    (["stages.ppo.reward=null"], "stages[2].reward: null leaves nothing to learn from; name a reward, set distill"),
    (["stages.ppo.distill={coef: 1.0}"], "stages[2].distill.teacher: required"),
    (["stages.ppo.rollout_correction={type: seq_mask}"],
     "stages[2].rollout_correction: seq_mask corrects for the gap between the engine's sampling log-probs and the "
     "trainer's, and generator 'hf' reports none"),
    (["stages.ppo.rollout_correction={type: mask, low: 1.5}"],
     "stages[2].rollout_correction.low: the kept range needs 0 <= low <= 1 <= high (finite), got low=1.5, high=2.0"),
    (["stages.ppo.overlong={cache: 12}"],
     "stages[2].overlong.cache: the penalty window must be shorter than generation.max_new_tokens (12), got 12"),
    (["stages.ppo.advantage={name: reinforce_pp, baseline: group}"],
     "stages[2].samples_per_prompt: advantage estimator 'reinforce_pp' compares samples of the same prompt and needs "
     "samples_per_prompt >= 2, got 1"),
    (["stages.ppo.advantage={name: group_mean, scale: mean}"],
     "stages[2].advantage.scale: expected one of 'std', 'none' or bool, got 'mean'"),
    (["stages.ppo.advantage={name: reinforce_pp, gamma: 1.5}"],
     "stages[2].advantage: reinforce_pp: gamma must be in [0, 1], got 1.5"),
    (["stages.ppo.overlong={cache: -1}"], "stages[2].overlong.cache: must be at least 0, got -1"),
    (["stages.ppo.overlong={penalty: -1.0}"], "stages[2].overlong.penalty: must be a finite number >= 0, got -1.0"),
    (["stages.ppo.distill={teacher: base, coef: 0}"], "stages[2].distill.coef: must be a finite number > 0, got 0.0"),
    (["stages.ppo.dynamic_sampling={max_rounds: 2}", "stages.ppo.samples_per_prompt=2", "stages.ppo.reward=null",
      "stages.ppo.distill={teacher: base}"],
     "stages[2].dynamic_sampling: keeps groups whose rewards differ, and reward: null gives every sample 0; remove "
     "dynamic_sampling or name a reward"),
])
def test_bad_sampling_and_shaping_options_are_config_errors(registry, overrides, message):
    with pytest.raises(ConfigError) as info:
        resolve(load_raw(None, overrides), registry)
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


@pytest.mark.slow
def test_distillation_alone_without_a_reference_pulls_the_student_to_its_teacher(tmp_path, monkeypatch):
    """reward: null + distill from a short SFT's model into the untrained base, kl.coef 0: only the
    teacher is loaded (no reference copy), and the student's reverse KL to the teacher falls."""
    loaded = []
    real = StageContext.load_model
    monkeypatch.setattr(StageContext, "load_model", lambda self, init, **kw: loaded.append(init) or real(self, init, **kw))
    stages = ("stages=[{stage: sft, data: {train: 'builtin:letters', builtin_size: 1200, max_length: 32}, "
              "train: {steps: 60, batch_size: 32, lr: 3.0e-3, warmup_steps: 10}}, "
              "{stage: ppo, init: base, data: {train: 'builtin:letters', builtin_size: 40}, iterations: 12, "
              "prompts_per_batch: 16, minibatch_size: 16, ppo_epochs: 1, optim: {lr: 1.0e-2}, generation: {max_new_tokens: 10}, "
              "eval_every: 0, eval_prompts: 0, reward: null, kl: {coef: 0}, distill: {teacher: '@sft'}, "
              "advantage: {name: reinforce_pp, gamma: 0.0}}]")
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "run"), "--set", stages], obj={})
    assert result.exit_code == 0, result.output
    assert loaded == ["base", "@sft"]  # SFT's policy, then PPO's teacher; with kl.coef 0 no reference
    assert f"distilling from the teacher {tmp_path / 'run' / 'sft'}" in result.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in rows if "distill_kl" in r]
    assert len(ppo) == 12 and all(r["reward_mean"] == 0 for r in ppo)  # no reward component
    kl = [r["distill_kl"] for r in ppo]
    assert sum(kl[-3:]) / 3 < 0.5 * sum(kl[:3]) / 3, kl


def test_a_missing_teacher_fails_before_anything_trains(tmp_path):
    missing = tmp_path / "no-teacher"
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "run"), "--set",
                                      f"stages.ppo.distill={{teacher: '{missing}'}}"], obj={})
    assert result.exit_code != 0
    assert f"stages[2].distill.teacher: {missing}: no such directory" in result.output
    assert not (tmp_path / "run" / "sft").exists()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_no_reference_with_kl_coef_0_and_a_lora_teacher_that_is_the_base_costs_no_copy(tmp_path, monkeypatch, lora):
    """kl.coef 0 loads no reference; with LoRA, a distillation teacher that is the policy's own base
    is that base with the adapters off: no model is loaded besides the policy, and at the first
    iteration the student (zero-initialised adapters) equals its teacher exactly."""
    if lora:
        pytest.importorskip("peft")
    loaded = []
    real = StageContext.load_model
    monkeypatch.setattr(StageContext, "load_model", lambda self, init, **kw: loaded.append(init) or real(self, init, **kw))
    distill = ", distill: {teacher: base}" if lora else ""
    stage = ("stages=[{stage: ppo, init: base, data: {train: 'builtin:letters', builtin_size: 40}, iterations: 2, "
             "prompts_per_batch: 4, minibatch_size: 4, generation: {max_new_tokens: 6}, eval_every: 0, eval_prompts: 0, "
             f"reward: length, kl: {{coef: 0}}{distill}}}]")
    args = ["run", "--out", str(tmp_path / "run"), "--set", stage] + (["--set", "model.lora={r: 4}"] if lora else [])
    result = CliRunner().invoke(cli, args, obj={})
    assert result.exit_code == 0, result.output
    assert loaded == []
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in rows if "reward_mean" in r]
    assert len(ppo) == 2 and all(r["kl"] == 0 for r in ppo)
    if lora:
        assert ppo[0]["distill_kl"] == 0.0 and ppo[1]["distill_kl"] != 0.0


def test_a_teacher_with_another_tokenizer_is_refused_before_training(tmp_path):
    """Distillation scores the student's own token ids, so a teacher whose vocabulary differs is a
    one-line error naming both, before any update."""
    from transformers import ByT5Tokenizer

    from rlhf_core.models import save_causal_lm

    teacher = save_causal_lm(load_causal_lm(CFG, seed=7), ByT5Tokenizer(extra_ids=0), tmp_path / "teacher")
    stage = (f"stages=[{{stage: ppo, init: base, data: {{train: 'builtin:letters', builtin_size: 40}}, iterations: 2, "
             f"prompts_per_batch: 4, minibatch_size: 4, eval_every: 0, eval_prompts: 0, reward: length, "
             f"distill: {{teacher: '{teacher}'}}}}]")
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "run"), "--set", stage], obj={})
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (f"stage 'ppo': distill.teacher '{teacher}' ({teacher}) has another tokenizer than the policy "
            "(builtin:tiny); on-policy distillation scores the policy's own tokens, so the teacher must share its "
            "vocabulary") in result.output
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or "reward_mean" not in metrics.read_text()  # no PPO iteration ran
