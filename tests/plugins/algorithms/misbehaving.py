"""Algorithms that misbehave on purpose, for the runner's status tests."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from harness.api import Algorithm, TrainParams, param
from harness.nets import build_sequential
from harness.registry import algorithms
from harness.toolkit import ModuleLearner


@dataclass(frozen=True)
class NaNParams(TrainParams):
    nan_after: int = param(3, "training steps before the loss turns NaN", min=0)


class NaNLearner(ModuleLearner):
    steps = 0

    def train_step(self, x, y):
        self.steps += 1
        out = super().train_step(x, y)
        if self.steps > self.nan_after:
            return {"loss": torch.tensor(float("nan"))}
        return out


@algorithms.register("nan_after")
class NaNAfter(Algorithm):
    """BP whose loss turns NaN after a few steps (tests divergence)."""

    supports = frozenset({"mlp", "cnn"})
    Params = NaNParams

    def build(self, arch, info, params, ctx):
        learner = NaNLearner(build_sequential(arch, params.init_std), info, params)
        learner.nan_after = params.nan_after
        return learner


@algorithms.register("raises")
class Raises(Algorithm):
    """An algorithm whose training step raises (tests the error status)."""

    supports = frozenset({"mlp"})
    Params = TrainParams

    def build(self, arch, info, params, ctx):
        learner = ModuleLearner(build_sequential(arch, params.init_std), info, params)

        def boom(x, y):
            raise RuntimeError("deliberate failure in train_step")
        learner.train_step = boom
        return learner


@dataclass(frozen=True)
class SlowParams(TrainParams):
    sleep_s: float = param(0.0, "seconds to sleep per step", min=0.0)


@algorithms.register("slow_bp")
class SlowBP(Algorithm):
    """BP that sleeps in every step (tests resuming a killed suite)."""

    supports = frozenset({"mlp"})
    Params = SlowParams

    def build(self, arch, info, params, ctx):
        learner = ModuleLearner(build_sequential(arch, params.init_std), info, params)
        step = learner.train_step

        def slow(x, y):
            time.sleep(params.sleep_s)
            return step(x, y)
        learner.train_step = slow
        return learner


@dataclass(frozen=True)
class ExitParams(TrainParams):
    how: str = param("os_exit", "how the training step ends its process",
                     choices=("os_exit", "sys_exit", "sigkill", "segfault", "hang"))
    after: int = param(2, "training steps before it does", min=0)


@algorithms.register("dies")
class Dies(Algorithm):
    """BP whose training step ends its own process (os._exit, sys.exit, SIGKILL, a segfault)
    or hangs, after a few steps (tests the supervisor)."""

    supports = frozenset({"mlp"})
    Params = ExitParams

    def build(self, arch, info, params, ctx):
        import os
        import signal
        import sys
        learner = ModuleLearner(build_sequential(arch, params.init_std), info, params)
        step = learner.train_step
        calls = [0]

        def dying(x, y):
            calls[0] += 1
            if calls[0] > params.after:
                if params.how == "os_exit":
                    os._exit(3)
                if params.how == "sys_exit":
                    sys.exit(4)
                if params.how == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if params.how == "segfault":
                    import ctypes
                    ctypes.string_at(0)
                time.sleep(3600)
            return step(x, y)
        learner.train_step = dying
        return learner
