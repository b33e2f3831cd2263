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

from harness.api import (Algorithm, Arch, Conv, Dense, Learner, RunContext, TaskInfo,
                         TrainParams, param)
from harness.nets import (DISTRIBUTIONS, RNNNet, draw_feedback, feedback_generator,
                          layer_modules, rnn_layers)
from harness.registry import algorithms
from harness.toolkit import ModuleLearner, layer_shapes, loss_and_grad


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

    def projected(self, i: int, flat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """e B_i shaped like hidden output ``h`` and in its memory layout: for a channels-last
        map, B_i's columns taken in (height, width, channel) order, so that the product is
        already channels-last (the same dot products; autograd's ⊙ f′ and the weight gradient
        below then never meet two layouts, which cost DFA's conv step a copy per op)."""
        if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(
                memory_format=torch.channels_last):
            n, c, height, width = h.shape
            return flat.matmul(self._feedback_nhwc(i, c, height, width)).view(
                n, height, width, c).permute(0, 3, 1, 2)
        return flat.matmul(self.feedback(i)).reshape(h.shape)

    def _feedback_nhwc(self, i: int, c: int, height: int, width: int) -> torch.Tensor:
        matrix = self.feedback(i)
        cache = self.__dict__.setdefault("_nhwc", {})
        found = cache.get(i)
        if found is None or found[0] != (matrix.data_ptr(), matrix.device):
            found = ((matrix.data_ptr(), matrix.device),
                     matrix.view(-1, c, height, width).permute(0, 2, 3, 1).reshape(
                         matrix.shape[0], -1).contiguous())
            cache[i] = found
        return found[1]

    def backward_direct(self, output, hidden, error) -> None:
        """Accumulate the DFA gradients in ``.grad``: e at the output, e B_i at hidden i."""
        flat = error.reshape(error.shape[0], -1)
        grads = [self.projected(i, flat, h) for i, h in enumerate(hidden)]
        torch.autograd.backward([output] + hidden, [error] + grads)


class DFARNN(RNNNet):
    """The RNN trained by direct feedback at every time step: δ_t = (e_t B) ⊙ f′(a_t), no error
    through time (the recurrence's backward carries nothing back), the read-out its true
    gradient from the detached states."""

    def __init__(self, arch: Arch, init_std: float, feedback: torch.Tensor):
        super().__init__(arch, init_std, back=None)
        self.register_buffer("feedback0", feedback)  # output × hidden

    def forward_local(self, x):
        states = self.hidden_states(x)
        return self.readout(states.detach()), [states]

    def backward_direct(self, output, hidden, error) -> None:
        torch.autograd.backward([output, hidden[0]], [error, error.matmul(self.feedback0)])


def build_dfa_network(arch: Arch, init_std: float, distribution: str, scale: float,
                      shared: bool, generator: torch.Generator) -> nn.Module:
    out = arch.output_size
    if arch.kind == "rnn":
        recurrent, readout = rnn_layers(arch)
        return DFARNN(arch, init_std, draw_feedback((readout.units, recurrent.hidden),
                                                    distribution, scale, generator))
    blocks, out_shapes, pending = [], [], []
    shapes = [out_shape for _, _, out_shape in layer_shapes(arch)]
    for (layer, module, act), out_shape in zip(layer_modules(arch, init_std), shapes):
        if not isinstance(layer, (Dense, Conv)):
            pending.append(module)              # pools and flatten lead into the next block
            continue
        blocks.append(nn.Sequential(*pending, module, *([act] if act is not None else [])))
        out_shapes.append(tuple(out_shape))
        pending = []
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
        output, hidden = self.network.forward_local(x)
        loss, error = loss_and_grad(self.info, output.detach(), y, self.label_smoothing)
        self.network.backward_direct(output, hidden, error)
        return {"loss": loss}

    def feedback_signals(self, x, y):
        """(hidden layer, e B_i): the error DFA sends each hidden layer's output (diagnostics
        compare it with BP's error there); none for the RNN."""
        if not isinstance(self.network, DFANetwork):
            return []
        with torch.no_grad():
            output, hidden = self.network.forward_local(x)
            _, error = loss_and_grad(self.info, output, y, self.label_smoothing)
            flat = error.reshape(error.shape[0], -1)
            return [(f"layer{i}", self.network.projected(i, flat, h))
                    for i, h in enumerate(hidden)]


@algorithms.register("dfa", aliases=("direct_feedback_alignment",))
class DirectFeedbackAlignment(Algorithm):
    """Direct feedback alignment: the output error sent to every hidden layer by fixed matrices."""

    supports = frozenset({"mlp", "cnn", "rnn"})
    channels_last = True    # its conv steps run faster so on the CPU (harness.nets)
    Params = DFAParams

    def build(self, arch: Arch, info: TaskInfo, params: DFAParams, ctx: RunContext) -> Learner:
        network = build_dfa_network(arch, params.init_std, params.feedback_init,
                                    params.feedback_scale, params.shared,
                                    feedback_generator(ctx.seed))
        return DFALearner(network.to(ctx.device), info, params)
