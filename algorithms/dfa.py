"""Direct feedback alignment (Nøkland 2016): the output error goes straight to every hidden layer.

With e = ∂loss/∂output (the exact output error, :func:`harness.toolkit.loss_and_grad`), every
hidden layer i (dense or conv) gets

    δ_i = (e B_i) ⊙ f′(a_i)          B_i: fixed, (outputs × the layer's full output size)
    ∂W_i = δ_i h_{i−1}ᵀ              (its true local gradient given δ_i)

and the output layer keeps its true gradient e h_{L−1}ᵀ. Implementation: each layer runs on a
*detached* input, so autograd never carries an error from one layer to the next; one
``torch.autograd.backward`` call injects e at the output and e B_i at every hidden layer's
output (after its activation, so autograd's pass through f gives the ⊙ f′(a_i)). No layer
computes an input gradient, so an epoch costs no more than BP's.

RNN: the same at every time step, δ_t = (e_t B) ⊙ f′(a_t), with h_{t−1} detached (no error
through time); W_x and W_h get their local gradients from δ_t, the read-out its true one. It
learns: on a toy recall task (one-hot inputs, target = the input 1 or 2 steps back, hidden 64,
600 Adam steps) it reaches 99% where chance is 12.5% (FA: 100%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from torch import nn

from algorithms.fa import DISTRIBUTIONS, draw_feedback, feedback_generator
from harness.api import (Algorithm, Arch, Conv, Dense, Flatten, Learner, Pool, Recurrent,
                         RunContext, TaskInfo, param)
from harness.registry import algorithms
from harness.toolkit import (ModuleLearner, TrainParams, activation_module, init_weight,
                             layer_shapes, loss_and_grad)


class DFANetwork(nn.Module):
    """A feed-forward net cut into blocks (weightless prefix → weighted layer → activation);
    the last block is the output layer. ``feedback`` holds one fixed matrix per hidden block."""

    def __init__(self, blocks: list[nn.Module], out_shapes: list[tuple[int, ...]],
                 feedback: list[torch.Tensor]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.out_shapes = out_shapes  # per hidden block, per sample
        for i, matrix in enumerate(feedback):
            self.register_buffer(f"feedback{i}", matrix)

    def feedback(self, i: int) -> torch.Tensor:
        return getattr(self, f"feedback{i}")

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def forward_local(self, x) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(output, hidden outputs), each layer computed from a detached input."""
        hidden = []
        for block in self.blocks[:-1]:
            x = block(x.detach())
            hidden.append(x)
        return self.blocks[-1](x.detach()), hidden

    def backward_direct(self, output, hidden, error) -> None:
        """Accumulate the DFA gradients in ``.grad``: e at the output, e B_i at hidden i."""
        flat = error.reshape(error.shape[0], -1)
        grads = [flat.matmul(self.feedback(i)).reshape(h.shape) for i, h in enumerate(hidden)]
        torch.autograd.backward([output] + hidden, [error] + grads)


class DFARNN(nn.Module):
    """h_t = f(x_t W_xᵀ + h_{t−1} W_hᵀ), y_t = h_t W_yᵀ, trained by per-step direct feedback."""

    def __init__(self, input_size: int, hidden: int, output: int, act: str, init_std: float,
                 feedback: torch.Tensor):
        super().__init__()
        self.input = nn.Linear(input_size, hidden, bias=False)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        self.readout = nn.Linear(hidden, output, bias=False)
        with torch.no_grad():
            for module in (self.input, self.recurrent, self.readout):
                module.weight.copy_(init_weight(tuple(module.weight.shape), init_std))
        self.act = activation_module(act)
        self.hidden = hidden
        self.register_buffer("feedback0", feedback)  # output × hidden

    def states(self, x, local: bool):
        drive = self.input(x)
        h = drive.new_zeros(x.shape[0], self.hidden)
        states = []
        for t in range(x.shape[1]):
            h = self.act(drive[:, t] + self.recurrent(h.detach() if local else h))
            states.append(h)
        return torch.stack(states, dim=1)

    def forward(self, x):
        return self.readout(self.states(x, local=False))

    def forward_local(self, x):
        states = self.states(x, local=True)
        return self.readout(states.detach()), [states]

    def backward_direct(self, output, hidden, error) -> None:
        torch.autograd.backward([output, hidden[0]], [error, error.matmul(self.feedback0)])


def build_dfa_network(arch: Arch, init_std: float, distribution: str, scale: float,
                      shared: bool, generator: torch.Generator) -> nn.Module:
    out = arch.output_size
    if arch.kind == "rnn":
        layers = arch.layers
        if len(layers) != 2 or not isinstance(layers[0], Recurrent) \
                or not isinstance(layers[1], Dense):
            raise ValueError(f"{arch.name}: DFA's RNN is (Recurrent(h), Dense(out, linear)), "
                             f"got {arch.describe()}")
        hidden = layers[0].hidden
        return DFARNN(arch.input_shape[-1], hidden, layers[1].units, layers[0].act, init_std,
                      draw_feedback((layers[1].units, hidden), distribution, scale, generator))
    blocks, out_shapes, pending = [], [], []
    for layer, in_shape, out_shape in layer_shapes(arch):
        if isinstance(layer, Pool):
            pending.append(nn.MaxPool2d(layer.size) if layer.kind == "max"
                           else nn.AvgPool2d(layer.size))
            continue
        if isinstance(layer, Flatten):
            pending.append(nn.Flatten())
            continue
        if isinstance(layer, Dense):
            module: nn.Module = nn.Linear(in_shape[-1], layer.units, bias=False)
        elif isinstance(layer, Conv):
            module = nn.Conv2d(in_shape[0], layer.filters, layer.kernel, padding=layer.padding,
                               bias=False)
        else:
            raise TypeError(f"DFA cannot build {layer!r}")
        with torch.no_grad():
            module.weight.copy_(init_weight(tuple(module.weight.shape), init_std))
        parts = pending + [module]
        if layer.act != "linear":
            parts.append(activation_module(layer.act))
        pending = []
        blocks.append(nn.Sequential(*parts))
        out_shapes.append(tuple(out_shape))
    if pending:
        raise ValueError(f"{arch.name}: the last layer must be the dense output layer")
    hidden_shapes = out_shapes[:-1]
    sizes = [math.prod(s) for s in hidden_shapes]
    if shared:
        matrix = draw_feedback((out, max(sizes, default=0)), distribution, scale, generator)
        feedback = [matrix[:, :size].clone() for size in sizes]
    else:
        feedback = [draw_feedback((out, size), distribution, scale, generator) for size in sizes]
    return DFANetwork(blocks, hidden_shapes, feedback)


@dataclass(frozen=True)
class DFAParams(TrainParams):
    lr: float = param(3e-3, "learning rate (tuned: suites/tune_fa_dfa.yaml chose 3e-3 for the "
                      "MNIST MLP and CNN, 1e-3 for the FashionMNIST MLP, on validation)", min=0.0)
    feedback_init: str = param("normal", "distribution of the fixed feedback B_i",
                               choices=DISTRIBUTIONS)
    feedback_scale: float = param(0.05, "standard deviation of B_i's entries (under Adam the "
                                  "scale barely matters: the sweep 0.005-0.5 moved nothing)",
                                  min=0.0)
    shared: bool = param(False, "one random matrix sliced per layer (B_i = B[:, :size_i])")


class DFALearner(ModuleLearner):
    """The network's own backward is replaced by the direct projections of the output error."""

    def train_step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        output, hidden = self.network.forward_local(x)
        loss, error = loss_and_grad(self.info, output.detach(), y, self.label_smoothing)
        self.network.backward_direct(output, hidden, error)
        self.optimizer.step()
        return {"loss": loss}


@algorithms.register("dfa", aliases=("direct_feedback_alignment",))
class DirectFeedbackAlignment(Algorithm):
    """Direct feedback alignment: the output error sent to every hidden layer by fixed matrices."""

    supports = frozenset({"mlp", "cnn", "rnn"})
    Params = DFAParams

    def build(self, arch: Arch, info: TaskInfo, params: DFAParams, ctx: RunContext) -> Learner:
        network = build_dfa_network(arch, params.init_std, params.feedback_init,
                                    params.feedback_scale, params.shared,
                                    feedback_generator(ctx.seed))
        return DFALearner(network.to(ctx.device), info, params, ctx.epochs)
