"""Models: the real from_pretrained path on a tiny model saved to a temp dir; reward model as a unit."""
from __future__ import annotations

import pytest
import torch

from rlhf_core.config import ModelConfig
from rlhf_core.models import ModelLoadError, ScalarHeadModel, load_causal_lm, load_tokenizer, resolve_device, save_causal_lm


def test_tiny_model_roundtrip_through_from_pretrained(tmp_path):
    cfg = ModelConfig()
    model, tok = load_causal_lm(cfg, seed=0), load_tokenizer(cfg)
    save_causal_lm(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded_cfg = ModelConfig(name_or_path=str(tmp_path / "m"))
    loaded, loaded_tok = load_causal_lm(loaded_cfg), load_tokenizer(loaded_cfg)
    ids = torch.tensor([[100, 101, 102, 1]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tok("abc", add_special_tokens=False)["input_ids"] == tok("abc", add_special_tokens=False)["input_ids"]


def test_reward_model_saves_and_loads_as_a_unit(tmp_path):
    lm = load_causal_lm(ModelConfig(), seed=1)
    rm = ScalarHeadModel.from_causal_lm(lm)
    ids = torch.tensor([[100, 101, 1, 0], [100, 101, 102, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    scores = rm.score(ids, mask)
    # The score is the head's value at the last non-pad token.
    per_token = rm(ids, mask)
    assert torch.equal(scores, torch.stack([per_token[0, 2], per_token[1, 3]]))
    rm.save_pretrained(tmp_path / "rm")
    again = ScalarHeadModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(again.score(ids, mask), scores)


def test_clear_errors_for_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a saved reward model"):
        ScalarHeadModel.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="could not load a causal LM from"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "nope")))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")
