"""Backpropagation: autograd on the same architecture, the reference for every other rule."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.api import Algorithm, Arch, Learner, RunContext, TaskInfo
from harness.registry import algorithms
from harness.toolkit import ModuleLearner, TrainParams, build_sequential


@dataclass(frozen=True)
class BPParams(TrainParams):
    pass


@algorithms.register("bp", aliases=("backprop", "backpropagation"))
class Backprop(Algorithm):
    """Backpropagation (autograd), the reference every other rule is measured against."""

    supports = frozenset({"mlp", "cnn", "rnn"})
    Params = BPParams

    def build(self, arch: Arch, info: TaskInfo, params: BPParams, ctx: RunContext) -> Learner:
        if arch.kind == "rnn":  # BP through time: autograd on the unrolled recurrence
            from algorithms._rnn import RNNNet
            network: torch.nn.Module = RNNNet(arch, params.init_std).to(ctx.device)
        else:
            network = build_sequential(arch, params.init_std).to(ctx.device)
        return ModuleLearner(network, info, params, ctx.epochs)
