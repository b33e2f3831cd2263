"""Device slots: with ``--device cuda`` runs are spread over every visible GPU, ``--per-gpu K``
runs sharing one, each run pinned to the GPU it got (``cuda:3``) and recorded with it. A GPU's
index is not part of a run's key (which GPU of a node a run lands on does not change its
numbers), its kind is.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import Optional

from harness.api import RunSpec, UserError


def gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class DeviceSlots:
    """A pool of places to run: ``per_gpu`` slots on each of ``count`` GPUs for ``cuda`` (count
    defaults to the visible GPUs), or one device for everything else (``cpu``, ``cuda:2``)."""

    def __init__(self, device: str, per_gpu: int = 1, count: Optional[int] = None):
        if per_gpu < 1:
            raise UserError(f"--per-gpu: must be ≥ 1, not {per_gpu}")
        self.device = device
        if device == "cuda":
            count = gpu_count() if count is None else count
            if count < 1:
                raise UserError("--device cuda: no CUDA device is visible here")
            self.free = [f"cuda:{i}" for _ in range(per_gpu) for i in range(count)]
        else:
            self.free = []
        self.size = len(self.free)
        self.condition = threading.Condition()

    @property
    def pooled(self) -> bool:
        return bool(self.size)

    def acquire(self) -> str:
        """A device for the next run, waiting for one to be free (spread: the next GPU first)."""
        if not self.pooled:
            return self.device
        with self.condition:
            while not self.free:
                self.condition.wait()
            return self.free.pop(0)

    def release(self, device: str) -> None:
        if not self.pooled:
            return
        with self.condition:
            self.free.append(device)
            self.condition.notify()

    def pinned(self, spec: RunSpec, device: str) -> RunSpec:
        return replace(spec, device=device)


def default_jobs(device: str, per_gpu: int, jobs: Optional[int],
                 count: Optional[int] = None) -> int:
    """--jobs when given; else one run per slot on CUDA (every GPU busy), one on the CPU."""
    if jobs is not None:
        return jobs
    if device == "cuda":
        return max(1, (gpu_count() if count is None else count) * per_gpu)
    return 1
