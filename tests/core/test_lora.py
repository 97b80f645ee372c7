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
                  "--set", "stages.ppo.lr=3.0e-3", "--set", "stages.reward.train.lr=3.0e-3")
    assert result.returncode == 0, result.stderr[-3000:]
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
    from rlhf_core.models import ModelLoadError

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


def test_fused_linear_true_with_several_processes_is_a_config_error(registry, monkeypatch):
    from rlhf_core.config import ConfigError, load_raw, resolve

    monkeypatch.setenv("WORLD_SIZE", "2")
    for stage in ("sft", "ppo"):
        with pytest.raises(ConfigError, match=rf"stages\[\d\].fused_linear: not yet available with several processes "
                                              r"\(the LM head is read outside the sharded forward\); set it to auto or false"):
            resolve(load_raw(None, [f"stages.{stage}.fused_linear=true"]), registry)
