"""Faults real clusters have, on this machine: a rank SIGKILLed in the middle of training, a whole
node lost, and a run over two launchers ("nodes") as a cluster starts it, with the command of docs/recipes/distributed.md.

Every kill is a real SIGKILL of running processes. torchrun starts each worker in a session of its
own, so killing a launcher's process group would leave its workers running: a "node" here is the
launcher and every process under it. Each test starts its launchers in their own process groups,
with a timeout, and kills whatever is left of them in a ``finally``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
try:
    from test_distributed import max_diff, weights
finally:
    sys.path.remove(str(HERE))

# near-greedy sampling (top_p): each rank samples with its own seed, so only a (near-)deterministic
# policy draws the same responses on 1 process and on 2, which a weight comparison needs
CONFIG = """
seed: 0
checkpoint: {every: 2}
stages:
  - stage: sft
    data: {train: "builtin:letters", builtin_size: 200, max_length: 16}
    train: {steps: 12, batch_size: 8, lr: 1.0e-3, log_every: 1}
  - stage: ppo
    data: {train: "builtin:letters", builtin_size: 40}
    reward: letters_gold
    iterations: 8
    prompts_per_batch: 4
    minibatch_size: 4
    generation: {max_new_tokens: 4, top_p: 1.0e-6}
    eval_prompts: 0
"""
STAGES = ("sft", "ppo")
ENDED = "ended without reporting an error (killed by a signal such as SIGKILL or the out-of-memory killer, or crashed)"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "c.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def one_process(config, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one")
    code, log = run_to_end(["run", str(config), "--out", str(root / "run")], root / "run.log")
    assert code == 0, log[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def two_processes(config, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two")
    code, log = run_to_end(["run", str(config), "--out", str(root / "run"), "--nproc", "2"], root / "run.log")
    assert code == 0, log[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def two_nodes(config, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nodes")
    nodes = run_nodes(root, "run", str(config), "--out", str(root / "run"))
    for i, node in enumerate(nodes):
        assert node.returncode == 0, output(root, i)[-3000:]
    return root / "run"


def launch(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A launcher in a process group of its own, its output in ``log`` (a pipe nobody reads while
    we wait could fill and stall the run)."""
    with log.open("w") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def run_to_end(args: list[str], log: Path, timeout: float = 240) -> tuple[int, str]:
    """``rlhf ARGS`` to its end: exit status and output. On a timeout its workers are killed too
    (``subprocess.run`` would kill the launcher alone and leave them running)."""
    proc = launch([sys.executable, "-m", "rlhf_core.cli", *args], log)
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)
    return proc.returncode, log.read_text(errors="replace")


def node_command(port: int, *args: str) -> list[str]:
    """docs/recipes/distributed.md: the command every node of a cluster runs (one process per node here)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "-m", "rlhf_core.cli", *args]


def run_nodes(root: Path, *args: str) -> list[subprocess.Popen]:
    """:func:`start_nodes` and wait for both to end (4 minutes at most; then their trees are killed)."""
    nodes = start_nodes(root, *args)
    try:
        for node in nodes:
            node.wait(timeout=240)
    finally:
        for node in nodes:
            kill_tree(node)
    return nodes


def start_nodes(root: Path, *args: str) -> list[subprocess.Popen]:
    """Two launchers on one rendezvous endpoint, their output in ``node0.log`` and ``node1.log``.
    The first hosts the rendezvous store: the endpoint is this machine's address for both, and the
    first one up takes the port. Which node's process becomes rank 0 is the rendezvous' choice."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [launch(node_command(port, *args), root / "node0.log")]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert nodes[0].poll() is None and time.monotonic() < deadline, output(root, 0)[-3000:]
                time.sleep(0.1)
        nodes.append(launch(node_command(port, *args), root / "node1.log"))
    except BaseException:
        kill_tree(nodes[0])
        raise
    return nodes


def output(root: Path, node: int) -> str:
    return (root / f"node{node}.log").read_text(errors="replace")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (its workers live in sessions of their own)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The launcher's worker processes (its children: torch's launcher runs inside it) by global rank."""
    found = {}
    for child in psutil.Process(launcher.pid).children():
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None:
            found[int(rank)] = child
    return found


def complete_checkpoints(run: Path, stage: str) -> list[int]:
    """Steps of the stage's complete checkpoints (``step-N`` with its ``meta.json``; not ``step-N.tmp``)."""
    found = (re.fullmatch(r"step-(\d+)", m.parent.name) for m in (run / "checkpoints" / stage).glob("step-*/meta.json"))
    return sorted(int(match.group(1)) for match in found if match)


def wait_for_training(run: Path, stage: str, launchers: list[subprocess.Popen]) -> None:
    """Until ``stage`` has a complete checkpoint and has logged a step past it: mid-stage, with
    something to resume from."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in launchers), "the run ended before it could be killed"
        done = complete_checkpoints(run, stage)
        try:
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
        except (OSError, ValueError):
            rows = []
        if done and any(r["stage"] == stage and r["step"] > done[-1] for r in rows):
            return
        time.sleep(0.005)
    raise AssertionError(f"stage {stage} did not get past its first checkpoint in time")


def assert_identical(a: Path, b: Path) -> None:
    for stage in STAGES:
        x, y = weights(a / stage), weights(b / stage)
        assert x.keys() == y.keys() and x and all(torch.equal(x[k], y[k]) for k in x), stage


@pytest.mark.slow
@pytest.mark.parametrize("victim, stage", [(1, "sft"), (0, "ppo")])
def test_a_killed_rank_ends_the_job_promptly_and_the_run_resumes_to_the_same_weights(
        config, two_processes, tmp_path, victim, stage):
    """kill -9 of one worker of ``rlhf run --nproc 2``: the other rank's collective breaks, it finds
    the dead rank's process gone and says so; the launcher names the rank and its signal. Rank 0
    writes summary.json: when rank 1 dies it records the reason, when rank 0 itself dies the
    launcher does. Resuming continues from the last complete checkpoint to the uninterrupted
    2-process run's weights, bit for bit."""
    out = tmp_path / "run"
    launcher = launch([sys.executable, "-m", "rlhf_core.cli", "run", str(config), "--out", str(out), "--nproc", "2"],
                      tmp_path / "launcher.log")
    try:
        wait_for_training(out, stage, [launcher])
        workers(launcher)[victim].kill()
        killed = time.monotonic()
        launcher.wait(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        kill_tree(launcher)
    log = (tmp_path / "launcher.log").read_text(errors="replace")
    assert launcher.returncode == 1 and elapsed < 30, log[-3000:]  # seconds, not a collective's timeout
    assert f"Error: [rank {1 - victim}] stopped because [rank {victim}] {ENDED}" in log
    assert f"Error: rank {victim} was killed by SIGKILL (exit code -9) and the launcher stopped" in log
    assert "Traceback" not in log
    summary = json.loads((out / "summary.json").read_text())
    reason = f"[rank 1] {ENDED}" if victim == 1 else "[rank 0] killed by SIGKILL (exit code -9)"
    assert summary["status"] == f"failed: {reason}"
    assert summary["stages_completed"] == list(STAGES[:STAGES.index(stage)])
    assert complete_checkpoints(out, stage)
    code, log = run_to_end(["run", "--resume", str(out), "--nproc", "2"], tmp_path / "resume.log")
    assert code == 0, log[-3000:]
    assert f"== stage {stage} ({stage}), resuming from step" in log
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert_identical(two_processes, out)


@pytest.mark.slow
def test_two_nodes_train_the_same_weights_as_one_process(one_process, two_nodes):
    """Two torchrun launchers meeting at a c10d rendezvous endpoint (docs/recipes/distributed.md),
    one process each: SFT and PPO end with the weights of a 1-process run (2-vs-1 tolerance)."""
    summary = json.loads((two_nodes / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["stages_completed"] == list(STAGES)
    for stage in STAGES:
        assert max_diff(one_process / stage, two_nodes / stage) <= 1e-5, stage


@pytest.mark.slow
@pytest.mark.parametrize("lost", [0, 1], ids=["the-store-host", "the-other-node"])
def test_a_lost_node_ends_the_other_promptly_and_both_resume(config, two_nodes, tmp_path, lost):
    """SIGKILL of one node's launcher and its worker in the middle of PPO: the node that hosts the
    rendezvous store (which goes with it), or the other one. The surviving rank names the lost one;
    summary.json records it when rank 0 survives, and stays ``running`` when rank 0 is lost, as a
    kill -9 of its writer leaves it. The surviving launcher exits non-zero within seconds (with a
    launcher per node, a rank taken down by another node exits 1: its launcher would otherwise wait
    minutes for the lost node at its exit barrier), and ``--resume`` on the same two launchers
    finishes with the uninterrupted run's weights."""
    out = tmp_path / "run"
    nodes = start_nodes(tmp_path, "run", str(config), "--out", str(out))
    survivor = nodes[1 - lost]
    try:
        wait_for_training(out, "ppo", nodes)
        (lost_rank,), (survivor_rank,) = workers(nodes[lost]), workers(survivor)
        kill_tree(nodes[lost])
        killed = time.monotonic()
        survivor.wait(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        for node in nodes:
            kill_tree(node)
    log = output(tmp_path, 1 - lost)
    assert survivor.returncode == 1 and elapsed < 30, log[-3000:]
    assert f"Error: [rank {survivor_rank}] stopped because [rank {lost_rank}] {ENDED}" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == (f"failed: [rank 1] {ENDED}" if lost_rank == 1 else "running")
    assert summary["stages_completed"] == ["sft"] and complete_checkpoints(out, "ppo")
    nodes = run_nodes(tmp_path, "run", "--resume", str(out))
    assert [n.returncode for n in nodes] == [0, 0], output(tmp_path, 0)[-3000:] + output(tmp_path, 1)[-3000:]
    assert "== stage ppo (ppo), resuming from step" in output(tmp_path, 0)
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert_identical(two_nodes, out)


HOLD_SOCKETS = """
import os, time, torch
from rlhf_core import hookimpl

class HoldSockets:
    def __init__(self, ctx=None, *, pid_file: str = ""):
        if os.environ["RANK"] == "1":  # a child that keeps this rank's connections open after it dies
            child = os.fork()
            if child == 0:
                time.sleep(120)
                os._exit(0)
            with open(pid_file, "w") as fh:
                fh.write(str(child))

    def __call__(self, prompts, responses):
        return torch.zeros(len(responses))

@hookimpl
def rlhf_register_rewards(register):
    register("hold_sockets", HoldSockets)
"""


@pytest.mark.slow
def test_a_rank_that_dies_silently_is_named_and_the_job_ends_within_seconds(tmp_path):
    """A killed rank whose connections stay open (a forked child holds its sockets here; NCCL sees
    every dead peer this way) breaks no collective: its peer just waits. The launcher sends it
    SIGTERM; its watchdog sees the dead rank's process gone, so it does not wait out the grace for
    a checkpoint-on-signal (a collective that cannot complete; the launcher's SIGKILL 30 s later
    would come first and leave summary.json ``running``), records the dead rank and exits."""
    (tmp_path / "hold_sockets.py").write_text(HOLD_SOCKETS)
    pid_file = tmp_path / "child.pid"
    config = tmp_path / "c.yaml"
    config.write_text(f"""
plugins: [hold_sockets]
checkpoint: {{every: 2}}
stages:
  - stage: ppo
    data: {{train: "builtin:letters", builtin_size: 40}}
    reward: {{name: hold_sockets, pid_file: {pid_file}}}
    iterations: 30
    prompts_per_batch: 4
    minibatch_size: 4
    generation: {{max_new_tokens: 4}}
    eval_prompts: 0
""")
    out = tmp_path / "run"
    launcher = launch([sys.executable, "-m", "rlhf_core.cli", "run", str(config), "--out", str(out), "--nproc", "2"],
                      tmp_path / "launcher.log",
                      env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    try:
        wait_for_training(out, "ppo", [launcher])
        workers(launcher)[1].kill()
        killed = time.monotonic()
        launcher.wait(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        kill_tree(launcher)
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    log = (tmp_path / "launcher.log").read_text(errors="replace")
    assert launcher.returncode == 1 and elapsed < 15, log[-3000:]  # the watchdog's 3 s, not the launcher's 30
    assert f"Error: [rank 0] stopped because [rank 1] {ENDED}" in log
    assert json.loads((out / "summary.json").read_text())["status"] == f"failed: [rank 1] {ENDED}"
    assert complete_checkpoints(out, "ppo")
