"""rlhf_core.sampling directly: the sampler draws from the tempered nucleus (one level and two),
rlhf's decode loop follows the model like Hugging Face's greedy decoding, LeanDecoder's steps give
the model's own logits (eager and compiled), the loop samples the model's distribution, and a
rollout's labels and mask stop at EOS."""
from __future__ import annotations

import pytest
import torch

from rlhf_core.config import ModelConfig
from rlhf_core.data import encode_prompt
from rlhf_core.models import load_causal_lm, load_tokenizer
from rlhf_core.sampling import generate, make_rollout, pad_prompts

CFG = ModelConfig()


def test_sample_tokens_draws_from_the_tempered_nucleus():
    """Inverse-CDF sampling: frequencies match softmax(logits / T) (4 sigma), -inf and tokens
    outside the top-p nucleus are never drawn, renormalised inside it."""
    from rlhf_core.sampling import sample_tokens

    torch.manual_seed(0)
    n = 200_000
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5])
    for temperature in (1.0, 0.7):
        p = torch.softmax(logits / temperature, -1)
        counts = torch.bincount(sample_tokens(logits.repeat(n, 1), temperature), minlength=6).double() / n
        assert torch.all((counts - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-12), (counts, p)
        assert counts[4] == 0
    p = torch.softmax(logits, -1)  # 0.575, 0.212, 0.078, 0.029, 0, 0.128: top_p 0.85 keeps tokens 0, 1, 5
    counts = torch.bincount(sample_tokens(logits.repeat(n, 1), 1.0, 0.85), minlength=6).double() / n
    kept = (p[[0, 1, 5]] / p[[0, 1, 5]].sum()).double()
    assert counts[[2, 3, 4]].sum() == 0
    assert torch.allclose(counts[[0, 1, 5]], kept, atol=4 * (0.25 / n) ** 0.5)


def test_sample_tokens_over_a_large_vocabulary_is_the_same_inverse_cdf():
    """Two-level inverse CDF (block sums, then the cumulative sum inside the block) over 3000 tokens:
    frequencies match softmax(logits / T) within 4 sigma on tokens spread over many blocks (those at
    block edges included), a zero-probability token is never drawn (also at a block's edges and in
    a block of zeros), the nucleus is respected; and the same uniform gives the same token as the
    one-level cumulative sum."""
    from rlhf_core import sampling
    from rlhf_core.sampling import CDF_BLOCK, sample_tokens

    torch.manual_seed(0)
    vocab, n = 3000, 100_000
    logits = torch.full((vocab,), -30.0)
    heavy = [0, CDF_BLOCK - 1, CDF_BLOCK, 2 * CDF_BLOCK + 7, 1500, vocab - 1]
    logits[heavy] = torch.tensor([1.0, 0.5, 0.0, 1.5, -0.5, 0.2])
    zero = [1, CDF_BLOCK + 1, CDF_BLOCK - 2, vocab - 2] + list(range(4 * CDF_BLOCK, 5 * CDF_BLOCK))
    logits[zero] = float("-inf")
    for temperature in (1.0, 0.7):
        p = torch.softmax(logits / temperature, -1).double()
        counts = torch.bincount(sample_tokens(logits.repeat(n, 1), temperature), minlength=vocab).double() / n
        assert torch.all((counts[heavy] - p[heavy]).abs() <= 4 * (p[heavy] * (1 - p[heavy]) / n).sqrt())
        assert counts[zero].sum() == 0
        rest = torch.ones(vocab, dtype=torch.bool)
        rest[heavy] = False
        assert abs(float(counts[rest].sum() - p[rest].sum())) <= 4 * (float(p[rest].sum()) / n) ** 0.5
    kept = sample_tokens(logits.repeat(20_000, 1), 1.0, 0.5)  # the nucleus: the two most likely tokens
    assert set(kept.tolist()) <= {2 * CDF_BLOCK + 7, 0}
    # The same uniforms, one level and two: the same tokens.
    batch = torch.randn(64, vocab) * 3
    torch.manual_seed(5)
    two = sample_tokens(batch)
    torch.manual_seed(5)
    probs = torch.softmax(batch, -1)
    cdf = probs.double().cumsum(-1)
    u = torch.rand(64, 1, dtype=torch.float64) * cdf[:, -1:]
    one = torch.searchsorted(cdf, u, right=True).squeeze(1)
    assert (two == one).float().mean() >= 0.98  # equal but where u falls within rounding of a boundary
    assert sampling.CDF_BLOCK * 4 <= vocab


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2", "llama-lora",
                                    pytest.param("llama-gqa-compiled", marks=pytest.mark.slow)])  # a ~10 s compile
def test_the_lean_decode_steps_give_the_models_own_logits(family):
    """LeanDecoder's one-token steps (the model's modules without its forward, K/V written into
    preallocated buffers) give the logits of the model's own forward over the whole sequence, on
    left-padded prompts of different lengths: grouped K/V heads, attention biases (Qwen2), LoRA
    adapters (peft), and the step through ``torch.compile`` (a length-bucketed buffer)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlhf_core.sampling import LeanDecoder, position_ids

    torch.manual_seed(0)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=90, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=90, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
    if family == "llama-lora":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        model = model.base_model.model  # the causal LM with LoRA layers in place (what the loop steps)
    model.eval()
    assert LeanDecoder.supports(model)
    lengths, width, new = [5, 2, 7], 7, 6
    attn = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    ids = torch.randint(3, 90, (3, width)) * attn
    tokens = torch.randint(3, 90, (3, new))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), past_key_values=cache, use_cache=True)
        lean = LeanDecoder(model, torch.cat([attn, torch.ones_like(tokens)], 1), compiled=family.endswith("compiled"))
        lean.prefill(cache)
        positions = position_ids(attn)[:, -1:]
        stepped = []
        for t in range(new):
            positions = positions + 1
            stepped.append(lean.step(tokens[:, t], positions, width + t))
        full_ids, full_mask = torch.cat([ids, tokens], 1), torch.cat([attn, torch.ones_like(tokens)], 1)
        want = model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits
    got = torch.stack(stepped, 1)
    assert torch.allclose(got, want[:, width:], atol=1e-5, rtol=1e-4), (got - want[:, width:]).abs().max()
    if family.endswith("compiled"):
        from rlhf_core.sampling import LENGTH_BUCKET, _lean_step

        assert lean.keys[0].shape[2] == LENGTH_BUCKET and lean.step_fn is not _lean_step
    assert not LeanDecoder.supports(torch.nn.Linear(2, 2))


def test_the_rlhf_decode_loop_gives_hugging_faces_greedy_tokens():
    """``generate(loop="rlhf")`` near-greedy (temperature 1e-4) on left-padded prompts of different
    lengths: the tokens of Hugging Face's greedy decoding, so its cache, positions and mask are right."""
    policy, tokenizer = load_causal_lm(CFG, seed=0).eval(), load_tokenizer(CFG)
    prompts = [encode_prompt(tokenizer, p) for p in ("abc", "hello there, how", "x")]
    ids, attn = pad_prompts(tokenizer, prompts, torch.device("cpu"))
    greedy = policy.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=12,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    want = make_rollout(tokenizer, ids, attn, greedy[:, ids.shape[1]:])
    got = generate(policy, tokenizer, prompts, max_new_tokens=12, temperature=1e-4, top_p=1.0,
                   device=torch.device("cpu"), loop="rlhf")
    assert got.prompt_len == ids.shape[1] and torch.equal(got.sequences[:, :got.prompt_len], ids)
    width = min(got.labels.shape[1], want.labels.shape[1])
    assert torch.equal(got.labels[:, :width], want.labels[:, :width]) and got.responses == want.responses


def test_the_decode_loop_samples_the_models_distribution():
    """The loop's draws over many copies of one prompt (temperature 0.8, then top-p 0.9): the first
    token's frequencies match softmax(prefill logits / T) within 4 sigma, and the second token's,
    among the rows whose first token was the most frequent, match softmax of the model's own
    forward over that prefix (the lean step's logits, sampled); nothing outside the nucleus."""
    policy, tokenizer = load_causal_lm(CFG, seed=0).eval(), load_tokenizer(CFG)
    with torch.no_grad():
        policy.lm_head.weight.mul_(25)  # a peaked distribution (a random model's is near uniform)
    prompt = encode_prompt(tokenizer, "abc")
    n = 6000
    for temperature, top_p in ((0.8, 1.0), (1.0, 0.9)):
        torch.manual_seed(1)
        roll = generate(policy, tokenizer, [prompt] * n, max_new_tokens=2, temperature=temperature, top_p=top_p,
                        device=torch.device("cpu"), loop="rlhf")
        first, second = roll.sequences[:, roll.prompt_len], roll.sequences[:, roll.prompt_len + 1]
        with torch.no_grad():
            p1 = _nucleus(policy(torch.tensor([prompt])).logits[0, -1], temperature, top_p)
            top = int(torch.bincount(first, minlength=p1.numel()).argmax())
            p2 = _nucleus(policy(torch.tensor([prompt + [top]])).logits[0, -1], temperature, top_p)
        rows = first == top
        assert top != tokenizer.eos_token_id and int(rows.sum()) > 500
        for p, drawn in ((p1, first), (p2, second[rows])):
            counts = torch.bincount(drawn, minlength=p.numel()).double()
            total = counts.sum()
            freq = counts / total
            common = p * total >= 5  # each such token alone; the rare ones (normal approximation poor) together
            sigma = (p * (1 - p) / total).sqrt()
            assert torch.all((freq - p).abs()[common] <= 4 * sigma[common]), (freq - p).abs()[common].max()
            rare = float(p[~common].sum())
            assert abs(float(freq[~common].sum()) - rare) <= 4 * (rare * (1 - rare) / float(total)) ** 0.5 + 1e-9
            assert counts[p == 0].sum() == 0


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / T) restricted to the top-p nucleus and renormalised (float64)."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    sorted_p = p[order]
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order] = (sorted_p.cumsum(0) - sorted_p) < top_p
    p = p * keep
    return p / p.sum()


def test_compiled_and_eager_decoding_give_the_same_samples():
    """``generate(loop="rlhf")`` with the step compiled and eager, from the same seed, on
    left-padded prompts of different lengths: the same tokens (the sampler draws from the same
    RNG stream; the logits differ only by fp32 rounding); ``loop: auto`` picks rlhf's loop for a
    Llama; a bad loop or compile value is refused."""
    policy, tokenizer = load_causal_lm(CFG, seed=0).eval(), load_tokenizer(CFG)
    prompts = [encode_prompt(tokenizer, p) for p in ("abc", "hello there, how", "x", "four")]
    runs = {}
    for name, loop, compile in (("eager", "rlhf", False), ("compiled", "rlhf", True), ("auto", "auto", "auto")):
        torch.manual_seed(3)
        runs[name] = generate(policy, tokenizer, prompts, max_new_tokens=20, temperature=1.0, top_p=1.0,
                              device=torch.device("cpu"), loop=loop, compile=compile)
    assert torch.equal(runs["compiled"].sequences, runs["eager"].sequences)
    assert torch.equal(runs["auto"].sequences, runs["eager"].sequences)  # auto on CPU: the eager lean loop
    for bad, message in (({"loop": "fast"}, "generate: loop must be one of auto, generate, rlhf, got 'fast'"),
                         ({"compile": "yes"}, "generate: compile must be auto, true or false, got 'yes'")):
        with pytest.raises(ValueError, match=message):
            generate(policy, tokenizer, prompts, max_new_tokens=2, temperature=1.0, top_p=1.0,
                     device=torch.device("cpu"), **bad)


def test_a_rollout_stops_at_eos():
    """make_rollout: the mask covers the response up to and including EOS, labels are -100 after
    it, the attention mask follows, and the text leaves EOS and padding out."""
    tokenizer = load_tokenizer(CFG)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, attn = pad_prompts(tokenizer, [encode_prompt(tokenizer, "ab"), encode_prompt(tokenizer, "c")], torch.device("cpu"))
    a, b = encode_prompt(tokenizer, "xy")[-2:], encode_prompt(tokenizer, "z")[-1:]
    response = torch.tensor([a + [eos, pad], b + [b[0], b[0], b[0]]])  # row 0 ends at EOS, row 1 runs to the budget
    roll = make_rollout(tokenizer, ids, attn, response)
    assert roll.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert roll.labels.tolist() == [a + [eos, -100], b * 4]
    assert roll.attention_mask[:, roll.prompt_len:].tolist() == roll.mask.tolist()
    assert roll.responses == ["xy", "zzzz"]
