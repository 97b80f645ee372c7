"""Checkpoints hold no pickle that resume would run, record every file's size and checksum, and
fall back past a damaged one; a full disk keeps the previous checkpoint complete."""
from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from rlhf_core.atomic import DiskFullError, atomic_dir, remove_orphans
from rlhf_core.checkpoint import (FORMAT, CheckpointError, Checkpointer, _sha256, _tensor_state, read_extra, verify,
                                  write_extra)


class Payload:
    """Unpickling this creates ``marker``: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 5)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def save_steps(directory: Path, steps=(1, 2), keep: int = 3) -> Checkpointer:
    ckpt = Checkpointer(directory, every=1, keep=keep, on_signal=False)
    for step in steps:
        model, optimizer = model_and_optimizer(step)
        ckpt.save(step, {"model": model}, {"model": optimizer}, {"note": f"step {step}"})
    return ckpt


def rewrite_meta(path: Path) -> None:
    """What an attacker who edits a checkpoint would also do: record the new files' checksums."""
    meta = json.loads((path / "meta.json").read_text())
    meta["files"] = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
                     for f in sorted(path.iterdir()) if f.name != "meta.json"}
    (path / "meta.json").write_text(json.dumps(meta))


def test_extra_state_round_trips_without_pickle(tmp_path):
    rng = random.Random(3)
    extra = {
        "prompt_rng": rng.getstate(),  # a tuple holding a tuple of 625 ints
        "torch": torch.get_rng_state(),
        "window": {"loss": [1.5, 2.0]}, "last": {"kl": float("nan"), "reward_mean": -0.25},
        "by_id": {0: torch.arange(3.0), 7: (1, "a")}, "__dunder": None, "flags": [True, False, None],
    }
    write_extra(tmp_path, 0, extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra-rank0.json", "extra-rank0.safetensors"]
    back = read_extra(tmp_path, 0)
    assert back["prompt_rng"] == extra["prompt_rng"] and random.Random()  # tuples stay tuples
    restored = random.Random()
    restored.setstate(back["prompt_rng"])
    assert restored.random() == rng.random()
    assert torch.equal(back["torch"], extra["torch"]) and back["torch"].dtype == torch.uint8
    assert math.isnan(back["last"]["kl"]) and back["last"]["reward_mean"] == -0.25
    assert set(back["by_id"]) == {0, 7} and torch.equal(back["by_id"][0], torch.arange(3.0))
    assert back["by_id"][7] == (1, "a") and back["__dunder"] is None and back["flags"] == [True, False, None]


def test_extra_state_of_an_unsupported_type_is_an_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"extra\.estimator\.fn of type function"):
        write_extra(tmp_path, 0, {"estimator": {"fn": len.__call__ and (lambda: 0)}})


def test_checkpoint_restores_model_optimizer_and_extra_and_records_checksums(tmp_path):
    ckpt = save_steps(tmp_path / "ck", steps=(1, 2))
    step, path = ckpt.latest()
    meta = json.loads((path / "meta.json").read_text())
    assert step == 2 and meta["format"] == FORMAT
    assert set(meta["files"]) == {".metadata", "__0_0.distcp", "extra-rank0.json", "extra-rank0.safetensors"}
    assert not list(path.glob("*.pt"))
    fresh, optimizer = model_and_optimizer(99)
    extra = Checkpointer(tmp_path / "ck", 1, 3, False).restore({"model": fresh}, {"model": optimizer})
    saved_model, saved_optimizer = model_and_optimizer(2)
    assert extra["note"] == "step 2" and extra["step"] == 2
    for a, b in zip(fresh.parameters(), saved_model.parameters()):
        assert torch.equal(a, b)
    assert optimizer.state_dict()["param_groups"][0]["lr"] == 1e-2
    for a, b in zip(optimizer.state_dict()["state"].values(), saved_optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_a_pickle_in_place_of_the_extra_state_never_runs(tmp_path):
    """A checkpoint in the old layout, or one crafted to look like it: refused, payload not run."""
    ckpt = save_steps(tmp_path / "ck", steps=(1,))
    _, path = ckpt.latest()
    marker = tmp_path / "pwned"
    torch.save({"rng": Payload(marker)}, path / "extra-rank0.pt")
    (path / "extra-rank0.json").unlink()
    (path / "extra-rank0.safetensors").unlink()
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1}))  # the old format's meta.json
    with pytest.raises(CheckpointError, match="older rlhf whose checkpoints hold pickles"):
        Checkpointer(tmp_path / "ck", 1, 3, False).restore(*_targets())
    (path / "meta.json").write_text(json.dumps(meta))
    rewrite_meta(path)  # checksums that match: the refusal comes from the format, not the damage
    with pytest.raises(CheckpointError, match="extra-rank0.json is missing"):
        Checkpointer(tmp_path / "ck", 1, 3, False).restore(*_targets())
    assert not marker.exists()


def _targets():
    model, optimizer = model_and_optimizer(5)
    return {"model": model}, {"model": optimizer}


def test_a_crafted_dcp_metadata_is_refused_and_its_payload_never_runs(tmp_path):
    ckpt = save_steps(tmp_path / "ck", steps=(1,))
    _, path = ckpt.latest()
    marker = tmp_path / "pwned"
    import pickle

    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rewrite_meta(path)
    with pytest.raises(CheckpointError, match=r"\.metadata refers to io\.open, which checkpoint metadata never holds.*could run code"):
        Checkpointer(tmp_path / "ck", 1, 3, False).restore(*_targets())
    assert not marker.exists()
    # Plain pickle.load, what DCP's own reader does, would have run it: the test can tell.
    pickle.loads((path / ".metadata").read_bytes())
    assert marker.exists()


def test_a_crafted_non_tensor_entry_in_the_dcp_data_never_runs(tmp_path):
    """DCP stores non-tensor values (optimizer hyper-parameters) as pickles in its data files."""
    ckpt = save_steps(tmp_path / "ck", steps=(1,))
    _, path = ckpt.latest()
    marker = tmp_path / "pwned"
    model, optimizer = model_and_optimizer(1)
    state = _tensor_state({"model": model}, {"model": optimizer})
    state["optim.model"]["param_groups"][0]["lr"] = Payload(marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))
    rewrite_meta(path)
    with pytest.raises(CheckpointError, match=r"param_groups.*not a plain value.*could run code"):
        Checkpointer(tmp_path / "ck", 1, 3, False).restore(*_targets())
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    ckpt = save_steps(tmp_path / "ck", steps=(1, 2, 3))
    _, newest = ckpt.latest()
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-10]))
    else:
        shard.unlink()
    assert verify(newest) is not None and verify(newest.with_name("step-00000002")) is None
    again = Checkpointer(tmp_path / "ck", 1, 3, False)
    assert again.latest()[0] == 2
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged" in err and "resuming from the previous complete checkpoint" in err
    assert {"flip": "does not match its recorded SHA-256", "truncate": "bytes, ", "missing": "is missing"}[damage] in err
    model, optimizer = model_and_optimizer(7)
    assert again.restore({"model": model}, {"model": optimizer})["step"] == 2
    assert capsys.readouterr().err.count("is damaged") == 0  # one notice per checkpoint, not per call


def test_no_intact_checkpoint_left_is_a_clear_error(tmp_path):
    ckpt = save_steps(tmp_path / "ck", steps=(1, 2))
    for _, path in ckpt.complete():
        (path / "extra-rank0.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no complete checkpoint is left to resume from: remove"):
        Checkpointer(tmp_path / "ck", 1, 3, False).latest()


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".sft.tmp-{dead}").mkdir()
    (tmp_path / f".summary.json.tmp-{dead}").write_text("{")
    (tmp_path / f".sft.tmp-{os.getpid()}").mkdir()  # a write in progress
    (tmp_path / "sft").mkdir()
    removed = remove_orphans(tmp_path)
    assert sorted(p.name for p in removed) == [f".sft.tmp-{dead}", f".summary.json.tmp-{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".sft.tmp-{os.getpid()}", "sft"]
    ck = Checkpointer(tmp_path / "ck", 1, 2, False)
    (tmp_path / "ck" / "step-00000004.tmp").mkdir(parents=True)
    assert [p.name for p in ck.remove_unfinished()] == ["step-00000004.tmp"]


def test_disk_full_during_a_directory_write_names_the_path_and_keeps_the_previous_contents(tmp_path, monkeypatch):
    target = tmp_path / "sft"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"old")
    with pytest.raises(DiskFullError, match=rf"writing {target}: it needs about 2\.0 MB, .* MB free"):
        with atomic_dir(target, needed_bytes=2 * 2**20) as tmp:
            raise OSError(28, "No space left on device")
    assert (target / "model.safetensors").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]


DISK_CONFIG = """
seed: 0
checkpoint: {every: 2, keep: 1}
stages:
  - stage: sft
    data: {train: "builtin:letters", builtin_size: 100, max_length: 16}
    train: {steps: 6, batch_size: 8, lr: 1.0e-3, log_every: 1}
"""


@pytest.fixture
def small_disk(tmp_path):
    """A size-limited tmpfs mounted by the test (root only; skipped with the reason elsewhere)."""
    import subprocess

    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _rlhf(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "rlhf_core.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a run and its resume; the final-model case below stays in the default suite
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_the_run_resumes(tmp_path, small_disk):
    import subprocess

    config = tmp_path / "c.yaml"
    config.write_text(DISK_CONFIG)
    disk = small_disk("3m")  # one checkpoint (~1.9 MB: weights + two AdamW moments) fits, two do not
    out = disk / "run"
    result = _rlhf("run", str(config), "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"no space left on the device while writing {out}/checkpoints/sft/step-00000004.tmp: it needs about" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"].startswith("failed: no space left on the device")
    kept = sorted((out / "checkpoints" / "sft").iterdir())
    assert [p.name for p in kept] == ["step-00000002"] and verify(kept[0]) is None  # complete, checksums match
    subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)  # the user frees space
    result = _rlhf("run", "--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from step 2" in result.stdout
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


def test_a_full_disk_while_saving_the_final_model_names_it_and_what_it_needs(tmp_path, small_disk):
    config = tmp_path / "c.yaml"
    config.write_text(DISK_CONFIG.replace("every: 2", "every: 0"))
    out = small_disk("400k") / "run"  # the model alone is ~0.6 MB
    result = _rlhf("run", str(config), "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"no space left on the device while writing {out}/sft: it needs about 0.6 MB" in result.stderr
    assert json.loads((out / "summary.json").read_text())["status"].startswith("failed: no space left")
    assert not (out / "sft").exists() and not list(out.glob(".sft.tmp-*"))  # nothing half-written looks finished


def test_each_checkpoint_file_is_hashed_once_however_often_latest_is_asked(tmp_path, monkeypatch):
    import rlhf_core.checkpoint as ckmod

    save_steps(tmp_path / "ck", steps=(1, 2))
    hashed = []
    real = ckmod._sha256
    monkeypatch.setattr(ckmod, "_sha256", lambda path: hashed.append(path.name) or real(path))
    again = Checkpointer(tmp_path / "ck", 1, 3, False)
    assert again.latest()[0] == again.latest()[0] == 2
    model, optimizer = model_and_optimizer(3)
    assert again.restore({"model": model}, {"model": optimizer})["step"] == 2
    assert sorted(hashed) == [".metadata", "__0_0.distcp", "extra-rank0.json", "extra-rank0.safetensors"]


def test_garbled_checkpoint_files_are_clear_errors(tmp_path):
    """Files whose checksums match (rewritten with them) but whose content is not what rlhf wrote."""
    ckpt = save_steps(tmp_path / "ck", steps=(1,))
    _, path = ckpt.latest()
    (path / ".metadata").write_bytes(b"\x80\x04not a pickle")
    rewrite_meta(path)
    with pytest.raises(CheckpointError, match=r"\.metadata is not DCP metadata \(UnpicklingError"):
        Checkpointer(tmp_path / "ck", 1, 3, False).restore(*_targets())
    import pickle

    (path / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    rewrite_meta(path)
    with pytest.raises(CheckpointError, match=r"\.metadata holds a dict, not DCP metadata"):
        Checkpointer(tmp_path / "ck", 1, 3, False).restore(*_targets())
    ckpt = save_steps(tmp_path / "ck2", steps=(1,))
    _, path = ckpt.latest()
    (path / "extra-rank0.json").write_text('{"rng": {"__tensor__": "t99"}}')
    rewrite_meta(path)
    with pytest.raises(CheckpointError, match=r"extra-rank0.json is not a state this rlhf wrote \(KeyError"):
        Checkpointer(tmp_path / "ck2", 1, 3, False).restore(*_targets())
    (path / "meta.json").write_text("{torn")
    with pytest.raises(CheckpointError, match=r"is damaged \(meta.json unreadable"):
        Checkpointer(tmp_path / "ck2", 1, 3, False).latest()
