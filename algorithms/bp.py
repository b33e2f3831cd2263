"""Backpropagation: autograd on the same architecture, the reference for every other rule."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.api import Algorithm, Arch, Learner, RunContext, TaskInfo, TrainParams
from harness.nets import RNNNet, build_sequential
from harness.registry import algorithms
from harness.toolkit import ModuleLearner


@dataclass(frozen=True)
class BPParams(TrainParams):
    pass


@algorithms.register("bp", aliases=("backprop", "backpropagation"))
class Backprop(Algorithm):
    """Backpropagation (autograd), the reference every other rule is measured against."""

    supports = frozenset({"mlp", "cnn", "rnn"})
    channels_last = True    # its conv steps run faster so on the CPU (harness.nets)
    Params = BPParams

    def build(self, arch: Arch, info: TaskInfo, params: BPParams, ctx: RunContext) -> Learner:
        if arch.kind == "rnn":  # BP through time (harness.nets.Recurrence)
            network: torch.nn.Module = RNNNet(arch, params.init_std)
        else:
            network = build_sequential(arch, params.init_std)
        return ModuleLearner(network.to(ctx.device), info, params)
