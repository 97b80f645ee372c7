"""LoRA through peft: only adapters train, the reference is the policy with adapters disabled, saved
adapters and merged exports reproduce the trained model, and PPO with LoRA improves on SFT."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")

from rlhf_core.config import LoraConfig, ModelConfig  # noqa: E402
from rlhf_core.models import (  # noqa: E402
    ScalarHeadModel, apply_lora, is_adapter_dir, load_causal_lm, load_tokenizer, save_causal_lm,
)

CFG = ModelConfig()


def lora_model(merge: bool = False, target="all-linear"):
    """The tiny model with LoRA adapters whose B is non-zero (peft starts it at 0, a no-op)."""
    model = apply_lora(load_causal_lm(CFG, seed=0), LoraConfig(r=4, alpha=8.0, target_modules=target, merge=merge),
                       "builtin:tiny")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (3, 9), generator=g)
    return ids, torch.ones_like(ids)


def test_wrapping_a_checkpointed_model_prints_no_third_party_deprecation():
    """peft reads transformers' deprecated ``is_gradient_checkpointing``: that FutureWarning, which a
    user cannot act on, is not shown on every LoRA command; other warnings still are."""
    import warnings

    model = load_causal_lm(CFG, seed=0)
    with warnings.catch_warnings():  # transformers renamed it; the test is about peft's read, below
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model, LoraConfig(r=4), "builtin:tiny")
        warnings.warn("still shown", FutureWarning)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["still shown"]


def test_only_adapters_train_and_base_weights_are_untouched():
    model = lora_model()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask).logits.float().pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and with_grad == trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # every linear layer of every block but the output head is adapted (all-linear)
    assert sum(".lora_A." in n for n in trainable) == 2 * 7
    assert not any("lm_head" in n or "embed" in n for n in trainable)


def test_reward_model_lora_trains_adapters_and_head_only():
    lm = load_causal_lm(CFG, seed=0)
    model = ScalarHeadModel.from_causal_lm(lm)
    model.backbone = apply_lora(model.backbone, LoraConfig(r=4), "builtin:tiny", causal_lm=False)
    ids, mask = batch()
    model(ids, mask, score=True).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {"head.weight", "head.bias"} <= with_grad
    assert all(n.startswith("head.") or ".lora_" in n for n in with_grad)


def test_adapters_disabled_is_exactly_the_base_model():
    base = load_causal_lm(CFG, seed=0)
    model = lora_model()
    ids, mask = batch()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            reference = model(input_ids=ids, attention_mask=mask).logits
        adapted = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(reference, expected)
    assert (adapted - expected).abs().max() > 1e-3  # the adapters do change the policy


def test_saved_adapter_and_merged_export_reproduce_the_model(tmp_path):
    model = lora_model(merge=True)
    tokenizer = load_tokenizer(CFG)
    out = save_causal_lm(model, tokenizer, tmp_path / "policy")
    assert is_adapter_dir(out) and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "rlhf_adapter.json").read_text()) == {"base": "builtin:tiny"}
    assert not (out / "model.safetensors").exists()  # the adapter only, not a second copy of the base
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        loaded = load_causal_lm(CFG, str(out))(input_ids=ids, attention_mask=mask).logits
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(out / "merged")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert (out / "merged" / "tokenizer_config.json").is_file()


def test_lora_reward_model_saves_whole_and_scores_the_same(tmp_path):
    lm = load_causal_lm(CFG, seed=0)
    model = ScalarHeadModel.from_causal_lm(lm)
    model.backbone = apply_lora(model.backbone, LoraConfig(r=4), "builtin:tiny", causal_lm=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "rm")
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, mask, score=True)
        got = ScalarHeadModel.from_pretrained(tmp_path / "rm")(ids, mask, score=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_lora_options_are_config_errors(registry):
    from rlhf_core.config import ConfigError, load_raw, resolve

    with pytest.raises(ConfigError) as err:
        resolve(load_raw(None, ["model.lora={r: 0, dropout: 1.0, target_modules: [], rank: 2}"]), registry)
    assert "model.lora.rank: unknown key; accepted: alpha, dropout, merge, r, target_modules" in str(err.value)
    with pytest.raises(ConfigError) as err:
        resolve(load_raw(None, ["model.lora={r: 0, dropout: 1.0, target_modules: []}"]), registry)
    text = str(err.value)
    assert "model.lora.r: must be at least 1, got 0" in text and "model.lora.dropout: must be in [0, 1)" in text
    assert "model.lora.target_modules: must name at least one module" in text


def rlhf(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "rlhf_core.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # a learning check (tens of seconds): .ci/run runs it with the slow tests
def test_ppo_with_lora_starts_at_zero_kl_and_beats_sft(tiny_pipeline_yaml, tmp_path):
    """Full SFT, then reward model and PPO with LoRA on the SFT model: the reference is the policy
    with adapters off (one copy of the weights), so the first iteration's KL is exactly 0, and the
    gold score rises."""
    sft = tmp_path / "sft_run"
    result = rlhf("run", "--out", str(sft), "--set", "stages=[{stage: sft, data: {train: 'builtin:letters', "
                  "builtin_size: 1200, max_length: 32}, train: {steps: 150, batch_size: 32, lr: 3.0e-3, warmup_steps: 10}}]")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    result = rlhf("run", tiny_pipeline_yaml(iterations=30), "--out", str(run), "--set", f"model.name_or_path={sft / 'sft'}",
                  "--set", "model.lora={r: 16, alpha: 32}", "--set", "stages.sft.train.steps=1",
                  "--set", "stages.ppo.optim.lr=3.0e-3", "--set", "stages.reward.train.lr=3.0e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ppo: reward = LoRA adapter + head on the policy's frozen base weights (no copy)" in result.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["stage"] == "ppo" and "kl" in r)
    assert first["step"] == 1 and first["kl"] == 0.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["gold_score_ppo"] > summary["gold_score_sft"] + 0.1, summary
    assert is_adapter_dir(run / "ppo") and json.loads((run / "ppo" / "rlhf_adapter.json").read_text())["base"] == str(run / "sft")
    # the trained policy is usable as is: rlhf generate loads base + adapters
    result = rlhf("generate", str(run / "ppo"), "--prompt", "a", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-2000:]


def test_lora_targets_that_match_nothing_and_adapters_without_a_base_are_clear_errors(tmp_path):
    from rlhf_core import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"model.lora: .*no_such_proj"):
        lora_model(target=["no_such_proj"])
    out = save_causal_lm(lora_model(), load_tokenizer(CFG), tmp_path / "policy")
    (out / "rlhf_adapter.json").unlink()
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"the adapter does not say which base model it belongs to \(no "
                                             r"rlhf_adapter.json, no base_model_name_or_path\)"):
        load_causal_lm(CFG, str(out))


def test_fused_linear_true_is_accepted_with_several_processes_but_not_with_another_loss(registry, monkeypatch):
    """fused_linear runs inside the sharded forward (with_last_hidden), so several processes are fine;
    a loss the fused path does not compute is still refused before anything loads."""
    from rlhf_core.config import ConfigError, load_raw, resolve

    monkeypatch.setenv("WORLD_SIZE", "2")
    for stage in ("sft", "ppo"):
        resolve(load_raw(None, [f"stages.{stage}.fused_linear=true"]), registry)
    with pytest.raises(ConfigError, match=r"stages\[\d\].fused_linear: the loss .cross_entropy. .* has no fused-linear form"):
        resolve(load_raw(None, ["stages.sft.fused_linear=true",
                                "stages.sft.loss={name: cross_entropy, aggregation: sequence_mean}"]), registry)


# ----------------------------------------------------------------------------- one frozen base for policy, reward, critic

def lora_reward_dir(tmp_path):
    """A LoRA reward model on the tiny base, adapters and head non-trivial, saved as the reward stage does."""
    model = ScalarHeadModel.from_causal_lm(load_causal_lm(CFG, seed=0))
    model.backbone = apply_lora(model.backbone, LoraConfig(r=4, alpha=8.0), "builtin:tiny", causal_lm=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        model.head.bias.fill_(0.3)
    return model.eval(), model.save_pretrained(tmp_path / "reward", load_tokenizer(CFG))


def shared_models(source):
    from rlhf_core.models import SharedBackbone

    policy = lora_model()
    shared = SharedBackbone(policy, LoraConfig(r=4, alpha=8.0))
    reward = shared.add("reward", str(source), trainable=False)
    critic = shared.add("critic", str(source), trainable=True)
    shared.seal()
    return policy, shared, reward, critic


def test_reward_and_critic_share_the_policys_frozen_base_and_score_like_their_own_copy(tmp_path):
    """Adapter + head on the policy's base == the reward model loaded whole (merged) and == the
    unmerged model it was saved from; the critic trains only its adapter and head, with the
    gradients a separate copy of that model gets; the policy's outputs are untouched."""
    from rlhf_core.models import AdapterScalarModel

    original, source = lora_reward_dir(tmp_path)
    assert (source / "adapter" / "adapter_config.json").is_file()
    policy, shared, reward, critic = shared_models(source)
    assert isinstance(reward, AdapterScalarModel) and reward.parameters() == []
    ids, mask = batch()
    mask[0, 6:] = 0
    whole = ScalarHeadModel.from_pretrained(source).eval()
    with torch.no_grad():
        mine = reward(ids, mask, score=True)
        assert torch.equal(mine, original(ids, mask, score=True))
        assert torch.allclose(mine, whole(ids, mask, score=True), atol=1e-5)
        before = policy(input_ids=ids, attention_mask=mask).logits
    # one copy of the base: everything beyond the policy's own weights is three adapters and two heads
    base = sum(p.numel() for n, p in policy.named_parameters() if ".lora_" not in n and "rlhf_heads." not in n)
    assert base == sum(p.numel() for p in load_causal_lm(CFG, seed=0).parameters())

    # no [B, T, V] tensor: the LM head sees no position (logits_to_keep selects none)
    vocab, shapes = policy.config.vocab_size, []
    hooks = [m.register_forward_hook(lambda mod, i, o: shapes.append(getattr(o, "shape", None))) for m in policy.modules()]
    with torch.no_grad():
        reward(ids, mask)
    for h in hooks:
        h.remove()
    assert shapes and not any(s is not None and len(s) and s[-1] == vocab and s.numel() > 0 for s in shapes)

    original.train()
    critic(ids, mask).sum().backward()
    original(ids, mask).sum().backward()
    with_grad = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A.critic." in n or ".lora_B.critic." in n or "rlhf_heads.critic." in n for n in with_grad)
    assert {id(p) for p in critic.parameters()} == {id(p) for n, p in policy.named_parameters() if n in with_grad}
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    for name, p in original.named_parameters():
        if p.grad is None:
            continue
        mine = (f"base_model.model.rlhf_heads.critic.{name[len('head.'):]}" if name.startswith("head.") else
                name.replace("backbone.base_model.model.", "base_model.model.model.").replace(".default.", ".critic."))
        assert torch.allclose(grads[mine], p.grad, atol=1e-6), name
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids, attention_mask=mask).logits, before)


def test_a_policy_with_shared_adapters_exports_only_its_own(tmp_path):
    """Saving the policy writes its adapter alone (PEFT format) and a merged model without the
    critic's and reward model's adapters or heads; it loads back to the same outputs."""
    from rlhf_core.models import lora_scope

    _, source = lora_reward_dir(tmp_path)
    policy, *_ = shared_models(source)
    policy.rlhf_lora["merge"] = True
    out = save_causal_lm(policy, load_tokenizer(CFG), tmp_path / "policy")
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert saved and not any("critic" in k or "reward" in k or "rlhf_heads" in k for k in saved)
    assert not any(k.startswith(("critic", "reward")) for k in (p.name for p in out.iterdir()))
    merged = load_file(out / "merged" / "model.safetensors")
    assert merged.keys() == load_causal_lm(CFG, seed=0).state_dict().keys()
    ids, mask = batch()
    with torch.no_grad(), lora_scope(policy, "default"):
        expect = policy(input_ids=ids, attention_mask=mask).logits
        for path in (out, out / "merged"):
            assert torch.allclose(load_causal_lm(CFG, str(path)).eval()(input_ids=ids, attention_mask=mask).logits,
                                  expect, atol=1e-5), path


SHARED = """
seed: 0
model: {lora: {r: 4, alpha: 8}}
stages:
  - stage: sft
    data: {train: "builtin:letters", builtin_size: 200, max_length: 16}
    train: {steps: 3, batch_size: 8, lr: 1.0e-3}
  - stage: reward
    data: {train: "builtin:letters", builtin_size: 200, max_length: 16}
    train: {steps: 3, batch_size: 8, lr: 1.0e-3}
  - stage: ppo
    data: {train: "builtin:letters", builtin_size: 40}
    advantage: gae
    iterations: 2
    ppo_epochs: 1  # a second epoch's values differ: the two critics train different parametrisations
    prompts_per_batch: 4
    minibatch_size: 4
    generation: {max_new_tokens: 4}
    eval_every: 0
    eval_prompts: 4
"""


@pytest.mark.slow  # two whole pipelines, ~30 s
def test_shared_and_separate_reward_model_and_critic_give_the_same_first_iteration(tmp_path):
    """shared_backbone auto (reward model and critic = adapters + heads on the policy's base) and
    false (each loads its own copy) start from the same functions: the same rewards, values, losses
    and gradients on the first iteration. true is refused without LoRA before anything trains."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SHARED)
    runs = {}
    for setting, gc in (("auto", "false"), ("false", "false"), ("auto", "true")):
        out = tmp_path / f"{setting}-{gc}"
        result = rlhf("run", str(cfg), "--out", str(out), "--set", f"stages.ppo.shared_backbone={setting}",
                      "--set", f"model.gradient_checkpointing={gc}")
        assert result.returncode == 0, result.stderr[-3000:]
        shared = "critic = LoRA adapter + head on the policy's frozen base weights (no copy)" in result.stdout
        assert shared == (setting == "auto"), result.stdout[-2000:]
        runs[setting, gc] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                             if json.loads(x)["stage"] == "ppo"]
    keys = ("eval_reward", "reward_mean", "value_loss", "policy_loss", "grad_norm", "advantage_mean")
    for a, b in zip(runs["auto", "false"][:2], runs["false", "false"][:2]):  # evaluation at step 0, iteration 1
        for key in keys:
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert "value_loss" in runs["auto", "false"][1]
    # Checkpointed activations are recomputed in the backward with the critic's adapter switched on
    # (not the policy's): every iteration equals the run without checkpointing.
    assert len(runs["auto", "true"]) == len(runs["auto", "false"]) == 4
    for a, b in zip(runs["auto", "true"], runs["auto", "false"]):
        for key in keys:
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key
    result = rlhf("run", str(cfg), "--out", str(tmp_path / "bad"), "--set", "model.lora=null",
                  "--set", "stages.ppo.shared_backbone=true")
    assert result.returncode == 1 and not (tmp_path / "bad" / "sft").exists()
    assert "stages[2].shared_backbone: true needs LoRA (model.lora)" in result.stderr


def test_a_reward_model_that_cannot_share_is_named_with_why(tmp_path, registry, monkeypatch):
    """A reward model trained without LoRA has a backbone of its own: shared_backbone auto keeps
    its copy and says why; true refuses with the same reason; true with DDP on several processes
    is a config error. A second adapter of a taken name gets a suffix."""
    from rlhf_core.config import ConfigError, load_raw, resolve

    whole = ScalarHeadModel.from_causal_lm(load_causal_lm(CFG, seed=0)).save_pretrained(tmp_path / "rm", load_tokenizer(CFG))
    stage = (f"stages=[{{stage: ppo, init: base, reward: {{name: reward_model, path: '{whole}'}}, iterations: 1, "
             "prompts_per_batch: 2, minibatch_size: 2, generation: {max_new_tokens: 2}, eval_every: 0, eval_prompts: 0, "
             "data: {train: 'builtin:letters', builtin_size: 20}}]")
    why = f"{whole} was not trained with LoRA (no adapter/), so its whole backbone differs"
    result = rlhf("run", "--out", str(tmp_path / "auto"), "--set", "model.lora={r: 4, alpha: 8}", "--set", stage)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ppo: reward keeps its own copy of the weights ({why})" in result.stdout
    result = rlhf("run", "--out", str(tmp_path / "true"), "--set", "model.lora={r: 4, alpha: 8}", "--set", stage,
                  "--set", "stages.ppo.shared_backbone=true")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"stage 'ppo': shared_backbone is true, but the reward cannot share the policy's base weights: {why}; "
            "set shared_backbone: auto to give it its own copy") in result.stderr

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"stages\[0\].shared_backbone: true does not work with "
                                          r"distributed.strategy: ddp \(DDP replicates whole modules\); use fsdp"):
        resolve(load_raw(None, ["model.lora={r: 4}", "distributed.strategy=ddp",
                                "stages=[{stage: ppo, shared_backbone: true}]"]), registry)
    monkeypatch.delenv("WORLD_SIZE")

    _, source = lora_reward_dir(tmp_path)
    from rlhf_core.models import SharedBackbone

    shared = SharedBackbone(lora_model(), LoraConfig(r=4, alpha=8.0))
    assert [shared.add("reward", str(source), trainable=False).name for _ in range(2)] == ["reward", "reward_2"]
