"""One process or many: the process group, sharding (FSDP2 / DDP), global reductions, full state
dicts for saving. Everything here is a no-op in a single process, so stages call it unconditionally.

Launch with ``torchrun --nproc_per_node N -m rlhf_core.cli run CONFIG`` (or ``rlhf run CONFIG
--nproc N``): torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`init` joins the process
group (``nccl`` on CUDA, ``gloo`` on CPU).

Semantics that do not depend on the number of processes: every batch size in a config is global.
A rank takes its contiguous share of each global batch (:func:`shard`), and a loss that is a mean
over its share is weighted by ``local_count / global_count * world_size`` before backward, so that
the gradient all-reduce (an average over ranks) yields exactly the global mean's gradient.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .errors import ModelLoadError


#: The supported plugin API of this module (see docs/reference/api.md).
__all__ = ["masked_mean", "all_reduce_sum", "all_reduce_max", "all_gather_objects", "shard", "world_size",
           "rank", "is_main_process", "barrier", "unwrap", "resolve_device"]


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: the process group's, before it is joined the launcher's ``RANK``
    (0 in a single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (the one that writes files, bars and logs), and always in a single process."""
    return rank() == 0


def launched_distributed() -> bool:
    """True when torchrun (or another launcher) started several processes."""
    return planned_world_size() > 1


def init(device_type: str) -> None:
    """Join the process group when launched with several processes (idempotent)."""
    if not launched_distributed() or dist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    _processes[:] = all_gather_objects(_this_process())


def shutdown() -> None:
    """Leave the process group cleanly (a barrier first, so no rank tears it down under another)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_FAILURE_KEY = "rlhf/failure"
#: Every rank's process as :func:`_this_process` describes it, gathered when the group starts.
_processes: list[dict[str, Any] | None] = []
#: Set once the launcher's store failed to answer (its host, node 0's launcher, is gone).
_store_lost: list[bool] = []


def _with_store(action: Any) -> Any:
    """``action(store)`` on the launcher's key-value store, or None when it cannot be reached: asked
    once, then left alone, so that the reason a rank stops is not buried under connection errors."""
    if _store_lost:
        return None
    try:
        return action(dist.distributed_c10d._get_default_store())
    except Exception:
        _store_lost.append(True)
        return None


def report_failure(message: str) -> None:
    """Tell the other ranks (through the launcher's key-value store) why this rank is stopping, so
    that rank 0 can record the real reason instead of 'interrupted'. The first report stays: later
    ones are consequences of it."""
    _with_store(lambda store: store.compare_set(_FAILURE_KEY, "", message))


def failure_elsewhere() -> str | None:
    """Why another rank stopped: the message it reported with :func:`report_failure`, else, when a
    rank on this machine ended without a word (SIGKILL, the out-of-memory killer, a crash), which
    one (reported in turn, for the ranks on other machines). None when neither is known."""
    if world_size() == 1:
        return None
    reported = _with_store(lambda store: store.get(_FAILURE_KEY) if store.check([_FAILURE_KEY]) else None)
    if reported is not None:
        return reported.decode("utf-8", "replace")
    ended = ended_ranks()
    if not ended:
        return None
    who = f"rank {ended[0]}" if len(ended) == 1 else f"ranks {', '.join(map(str, ended))}"
    message = (f"[{who}] ended without reporting an error (killed by a signal such as SIGKILL or the "
               "out-of-memory killer, or crashed)")
    report_failure(message)
    return message


def ended_ranks() -> list[int]:
    """The other ranks on this machine whose process has ended or is ending. Only processes on the
    same machine can be checked (Linux: ``/proc``); a rank elsewhere reports its own peers."""
    me = _processes[rank()] if len(_processes) > rank() else None
    if me is None:
        return []
    return [r for r, other in enumerate(_processes)
            if r != rank() and other is not None and other["machine"] == me["machine"] and _has_ended(other)]


def _this_process() -> dict[str, Any] | None:
    """This process as a peer on the same machine can look it up: the machine (boot id and pid
    namespace, so that containers sharing a host do not mix), pid and start time (a reused pid is
    another process). None without ``/proc``."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
        return {"machine": f"{boot}/{os.readlink('/proc/self/ns/pid')}", "pid": os.getpid(),
                "start": _proc_stat(os.getpid())[2]}
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int, int]:
    """``(state, flags, start time)`` of a process from ``/proc/PID/stat`` (fields 3, 9 and 22)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return fields[0], int(fields[6]), int(fields[19])


def _has_ended(process: dict[str, Any]) -> bool:
    try:
        state, flags, start = _proc_stat(process["pid"])
    except (OSError, IndexError, ValueError):
        return True  # gone (and reaped by the launcher)
    # A zombie or dead process, one that is exiting (PF_EXITING: a killed process closes its sockets,
    # which is what breaks the others' collectives, before it becomes a zombie), or a reused pid.
    return state in ("Z", "X") or bool(flags & 0x4) or start != process["start"]


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has finished writing a checkpoint the others will read)."""
    if world_size() > 1:
        dist.barrier()


def _all_reduce(tensor: torch.Tensor, op: Any) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (a new tensor; ``tensor`` itself in a single process)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The maximum over ranks of ``tensor``."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def lockstep_chunks(items: Sequence, size: int, device: torch.device | str, stand_in: Any) -> Iterator[tuple[list, bool]]:
    """``(chunk, real)`` for chunks of ``size`` of this rank's ``items``, as many on every rank as
    the rank with the most has: a sharded model needs the same number of forwards on each. A rank
    that ran out gets ``([stand_in], False)``: run it, drop its output."""
    count = -(-len(items) // size)
    count = int(all_reduce_max(torch.tensor(count, device=device)))
    for i in range(count):
        chunk = list(items[i * size:(i + 1) * size])
        yield (chunk, True) if chunk else ([stand_in], False)


def global_mean(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Average of each number over ranks (for logged metrics: every rank contributes equally)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    total = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device))
    return {k: float(v) / world_size() for k, v in zip(keys, total.tolist())}


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, *,
                global_: bool = False) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 where the mask is empty), differentiable; along ``dim``
    when given. With ``global_`` and several processes, the (detached) mean over every rank's
    masked elements: a collective that every rank must call; in a single process the two are the
    same computation. The project's one masked mean."""
    mask = mask.to(values.dtype) if values.is_floating_point() else mask.float()
    total, count = (values * mask).sum(dim) if dim is not None else (values * mask).sum(), \
        mask.sum(dim) if dim is not None else mask.sum()
    if global_ and world_size() > 1:
        if dim is not None:
            raise ValueError("masked_mean: global_ reduces over every element; leave dim unset")
        both = all_reduce_sum(torch.stack([total.detach().double(), count.detach().double()]))
        return (both[0] / both[1].clamp(min=1)).to(total.dtype)
    return total / count.clamp(min=1)


def planned_world_size() -> int:
    """The number of processes this run was launched with (readable before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard(items: Sequence[Any]) -> list[Any]:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    n, w, r = len(items), world_size(), rank()
    start, stop = r * n // w, (r + 1) * n // w
    return list(items[start:stop])


def loss_weights(local_counts: list[float], device: torch.device) -> list[float]:
    """Weights for losses that are means over ``local_counts[i]`` units each: with
    ``sum_i w_i * loss_i`` on every rank, the ranks' averaged gradient is the gradient of the mean
    over every unit of every rank (``w_i = local_counts[i] / global total * world size``). One
    collective for all of them."""
    total = float(all_reduce_sum(torch.tensor(float(sum(local_counts)), dtype=torch.float64, device=device)))
    return [n / total * world_size() if total > 0 else 0.0 for n in local_counts]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (``_no_split_modules`` classes), the unit of sharding."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    base = getattr(model, "backbone", None)
    if base is not None:
        names |= set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def resolve_strategy(strategy: str) -> str:
    """``auto`` -> ``fsdp`` with several processes, else ``none``."""
    if strategy == "auto":
        return "fsdp" if world_size() > 1 else "none"
    return strategy if world_size() > 1 else "none"


def wrap(model: nn.Module, dist_cfg: Any, device: torch.device, *, trainable: bool = True) -> nn.Module:
    """Shard ``model`` as ``distributed.strategy`` says: FSDP2 ``fully_shard`` per transformer block
    plus the root (torchtune's layout), DDP for trainable models, or nothing in a single process.
    Frozen models (``trainable=False``) under ``ddp`` stay whole on every rank (no gradients to sync)."""
    strategy = resolve_strategy(dist_cfg.strategy)
    if strategy == "none":
        return model
    if strategy == "ddp":
        if not trainable or not any(p.requires_grad for p in model.parameters()):
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": dist_cfg.reshard_after_forward}
    if dist_cfg.param_dtype == "bfloat16" or (dist_cfg.param_dtype == "auto" and device.type == "cuda"
                                              and torch.cuda.is_bf16_supported()):
        # bf16 compute and all-gathers, fp32 gradient reduction and fp32 master weights.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if dist_cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # A peft model shards its inner model: that is what generate and the wrapper's forward call, so
    # the root's hooks (which gather embeddings and head) run on every path.
    root = model.get_base_model() if hasattr(model, "rlhf_lora") else model
    for block in transformer_blocks(root):
        fully_shard(block, **kwargs)
    fully_shard(root, **kwargs)
    return model


def is_ddp(model: nn.Module) -> bool:
    """True for a DDP wrapper."""
    return type(model).__name__ == "DistributedDataParallel"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own)."""
    return model.module if is_ddp(model) else model


@contextlib.contextmanager
def gathered(model: nn.Module, reshard_after: bool = True) -> Iterator[nn.Module]:
    """Keep an FSDP2 model's parameters gathered for the block (e.g. token-by-token generation:
    one all-gather per block instead of one per block per token), then free them again. A no-op
    for unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    root = next((m for m in model.modules() if isinstance(m, FSDPModule)), None)  # outermost (a peft model's inner)
    if root is None:
        yield model
        return
    root.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        root.set_reshard_after_forward(reshard_after)
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def full_state_dict(model: nn.Module, *, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict, gathered on rank 0 on CPU (None elsewhere), or with
    ``everywhere`` on every rank on the model's device (e.g. to push weights into a generation
    engine per rank). A collective for sharded models: every rank must call it."""
    model = unwrap(model)
    if world_size() == 1 or not any(_is_dtensor(p) for p in model.parameters()):
        if everywhere:
            return {k: v.detach() for k, v in model.state_dict().items()}
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if is_main_process() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    return state if everywhere or rank() == 0 else None


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA; a CPU process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """The largest per-process peak over every rank, in MiB: on CUDA the memory torch allocated
    since :func:`reset_peak_memory`, on CPU the process's peak resident set size so far."""
    mine = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    return float(all_reduce_max(torch.tensor(float(mine), dtype=torch.float64, device=device)))


def peak_rss_mb() -> float:
    """This process's own peak resident set size in MiB: ``VmHWM`` on Linux. Not ``ru_maxrss``,
    which Linux carries across ``exec``, so that a process started by a large parent reports the
    parent's size at the fork."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` (0 = no clipping) returning a plain tensor for sharded parameters too."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if _is_dtensor(norm) else norm


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise ``torch.device(spec)`` (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ModelLoadError(f"model.device: {exc}; accepted: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device is {spec!r} but CUDA is not available; use 'auto' or 'cpu'")
    return device
