"""What every benchmark shares: peak-memory sampling and a description of the machine."""
from __future__ import annotations

import os
import platform
import threading
import time

import torch


class PeakRSS:
    """Peak resident memory above the starting point, sampled every millisecond (CPU)."""

    def __enter__(self):
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def timed_iteration(run, prompts) -> tuple[object, dict[str, float]]:
    """One PPO iteration of ``run`` (a :class:`~rlhf_plugins.ppo.run.PPORun`) on ``prompts``:
    ``make_experience``, ``update``, the new weights to its generator; returns the Experience and
    the seconds of the whole iteration and of its generate / score / train phases."""
    t0 = time.perf_counter()
    exp = run.make_experience(prompts)
    t1 = time.perf_counter()
    run.update(exp)
    run.generator.update_weights(run.policy)
    t2 = time.perf_counter()
    return exp, {"seconds": t2 - t0, "generate": exp.time_generate, "score": t1 - t0 - exp.time_generate,
                 "train": t2 - t1}
