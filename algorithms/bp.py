"""Backpropagation: autograd on the same architecture, the reference for every other rule."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.api import Algorithm, Arch, Learner, RunContext, TaskInfo
from harness.registry import algorithms
from harness.toolkit import TrainParams, build_sequential, loss_value, make_optimizer


@dataclass(frozen=True)
class BPParams(TrainParams):
    pass


class BPLearner(Learner):
    def __init__(self, network: torch.nn.Module, info: TaskInfo, params: BPParams, epochs: int):
        self.network = network
        self.info = info
        self.label_smoothing = params.label_smoothing
        self.optimizer, self.schedulers = make_optimizer(network.parameters(), params, epochs)

    def train_step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_value(self.info, self.network(x), y, self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def predict(self, x):
        return self.network(x)

    def state_dict(self):
        return self.network.state_dict()


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
        return BPLearner(network, info, params, ctx.epochs)
