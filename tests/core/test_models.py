"""Models: the real from_pretrained path on a tiny model saved to a temp dir; reward model as a unit."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rlhf_core.config import ModelConfig
from rlhf_core import ModelLoadError
from rlhf_core.distributed import resolve_device
from rlhf_core.models import ScalarHeadModel, load_causal_lm, load_tokenizer, save_causal_lm


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


class _Payload:
    """Unpickling this creates ``marker``: the proof that a model file's pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A causal-LM directory and a reward-model directory whose weights file is a pickle that runs
    code, each beside a real config and tokenizer (so every check before loading passes)."""
    import json

    from rlhf_core.models import HEAD_FILE, REWARD_MARKER, scalar_head
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hostile")
    cfg = ModelConfig()
    model, tok = load_causal_lm(cfg, seed=0), load_tokenizer(cfg)
    dirs = {}
    for kind in ("policy", "reward_model"):
        where = root / kind
        save_causal_lm(model, tok, where)
        (where / "model.safetensors").unlink()
        torch.save({"model.embed_tokens.weight": _Payload(root / "pwned")}, where / "pytorch_model.bin")
        if kind == "reward_model":
            (where / REWARD_MARKER).write_text(json.dumps({"format": 1, "head": HEAD_FILE}))
            save_file(scalar_head(64).state_dict(), str(where / HEAD_FILE))
        dirs[kind] = where
    return root, dirs


@pytest.mark.parametrize("path", ["sft init", "reward init", "ppo init (policy and reference)", "ppo reward model",
                                  "ppo critic", "rlhf generate", "rlhf eval", "rlhf eval reward model"])
def test_a_hostile_pickle_on_any_model_path_is_one_clean_error_and_never_runs(hostile, tmp_path, path):

    root, dirs = hostile
    policy, reward = str(dirs["policy"]), str(dirs["reward_model"])
    data = '{train: "builtin:letters", builtin_size: 40, max_length: 16}'
    stages = {
        "sft init": f"[{{stage: sft, init: {policy}, data: {data}, train: {{steps: 1, batch_size: 4}}}}]",
        "reward init": f"[{{stage: reward, init: {policy}, data: {data}, train: {{steps: 1, batch_size: 4}}}}]",
        "ppo init (policy and reference)": f"[{{stage: ppo, init: {policy}, reward: length, iterations: 1}}]",
        "ppo reward model": f"[{{stage: ppo, reward: {{name: reward_model, path: {reward}}}, iterations: 1}}]",
        "ppo critic": f"[{{stage: ppo, reward: length, advantage: gae, critic_init: {reward}, iterations: 1}}]",
    }
    if path in stages:
        config = tmp_path / "c.yaml"
        config.write_text(f"seed: 0\nstages: {stages[path]}\n")
        args = ["run", str(config), "--out", str(tmp_path / "run")]
    elif path == "rlhf generate":
        args = ["generate", policy, "--prompt", "abc", "--max-new-tokens", "2"]
    elif path == "rlhf eval":
        args = ["eval", policy, "--prompts", "builtin:letters", "--reward", "length", "--limit", "2"]
    else:
        args = ["eval", "builtin:tiny", "--prompts", "builtin:letters", "--limit", "2",
                "--reward", f"{{name: reward_model, path: {reward}}}", "--max-new-tokens", "2"]
    result = subprocess.run([sys.executable, "-m", "rlhf_core.cli", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    where = reward if path in ("ppo reward model", "ppo critic", "rlhf eval reward model") else policy
    assert f"from {where!r}: a weights file is a pickle that refers to code, which rlhf never runs" in result.stderr
    assert not (root / "pwned").exists()


def test_the_checkout_kernels_folder_does_not_hide_hugging_faces_kernels_package():
    """From the repository root (where `python -m pytest` and `python -m rlhf_core.cli` run) a bare
    `import kernels` — which transformers makes when Hugging Face's `kernels` is installed — must
    not load rlhf's kernel folder under the wrong name."""
    import importlib.metadata
    from pathlib import Path

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    root = Path(__file__).resolve().parents[2]
    code = "import rlhf_core, kernels; print(kernels.__file__); from kernels import Device"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() != root / "kernels" / "__init__.py"
