"""Feedback alignment (Lillicrap et al. 2016): errors go down through fixed random matrices.

Each weighted layer is an autograd Function whose backward computes the *true local* weight
gradient (δ_out hᵀ) but sends the error to the layer below through a fixed random feedback
``B`` of Wᵀ's shape instead of through Wᵀ:

    dense      δ_in = δ_out Bᵀ          (B: in × out, i.e. the shape of Wᵀ)
    conv       δ_in = conv_transpose(δ_out, K)   (K: a fixed random kernel of W's shape)
    recurrent  δ_{t-1} += δ_t B_hᵀ, δ_t = (δ_y,t B_yᵀ + …) ⊙ f′   (through time, B_h, B_y fixed)

so the network is an ordinary ``nn.Module`` trained by ``loss.backward()`` and runs at BP's
speed. With B = Wᵀ (K = W) the gradients are exactly BP's (see tests/test_fa_dfa.py).

Feedback tensors are buffers (never parameters, never optimised); they are drawn from a
``torch.Generator`` seeded from the run seed, so the same seed gives the same feedback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.api import (Algorithm, Arch, Dense, Learner, Recurrent, RunContext, TaskInfo,
                         param)
from harness.registry import algorithms
from harness.toolkit import (ModuleLearner, TrainParams, activation_module, build_sequential,
                             init_weight, weight_shape)

DISTRIBUTIONS = ("normal", "uniform")
FEEDBACK_SEED_OFFSET = 7919  # feedback generator = seed + offset: never the weights' stream


# --------------------------------------------------------------------------------------------
# Feedback initialisation
# --------------------------------------------------------------------------------------------

def feedback_generator(seed: int) -> torch.Generator:
    """The CPU generator every feedback tensor of a run is drawn from (same seed, same B)."""
    return torch.Generator(device="cpu").manual_seed(int(seed) + FEEDBACK_SEED_OFFSET)


def draw_feedback(shape: tuple[int, ...], distribution: str, scale: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Fixed random feedback with standard deviation ``scale``: N(0, scale²) or
    U[−√3·scale, √3·scale). Drawn on the CPU (reproducible everywhere), moved by the caller."""
    if distribution == "normal":
        return torch.randn(shape, generator=generator) * scale
    if distribution == "uniform":
        return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * (math.sqrt(3.0) * scale)
    raise ValueError(f"unknown feedback distribution {distribution!r}; valid: "
                     f"{', '.join(DISTRIBUTIONS)}")


# --------------------------------------------------------------------------------------------
# Autograd Functions: true local weight gradient, fixed feedback for the input gradient
# --------------------------------------------------------------------------------------------

class FALinearFunction(torch.autograd.Function):
    """y = x Wᵀ; backward: ∂W = δᵀ x (true), ∂x = δ Bᵀ with B fixed (in × out)."""

    @staticmethod
    def forward(ctx, x, weight, feedback):
        ctx.save_for_backward(x, feedback)
        return x.matmul(weight.t())

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(feedback.t())
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(
                x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w, None


class FAConv2dFunction(torch.autograd.Function):
    """y = conv2d(x, W); backward: ∂W true, ∂x = conv_transpose(δ, K) with K fixed."""

    @staticmethod
    def forward(ctx, x, weight, kernel, padding):
        ctx.save_for_backward(x, kernel)
        ctx.padding = padding
        ctx.weight_shape = weight.shape
        return F.conv2d(x, weight, padding=padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, kernel = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, kernel, grad_out, padding=ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_w = torch.nn.grad.conv2d_weight(x, ctx.weight_shape, grad_out,
                                                 padding=ctx.padding)
        return grad_x, grad_w, None, None


class FALinear(nn.Module):
    """A bias-free dense layer whose error goes down through the fixed buffer ``feedback``."""

    def __init__(self, weight: torch.Tensor, feedback: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.register_buffer("feedback", feedback)  # in × out (Wᵀ's shape)

    def forward(self, x):
        if not torch.is_grad_enabled():
            return x.matmul(self.weight.t())
        return FALinearFunction.apply(x, self.weight, self.feedback)


class FAConv2d(nn.Module):
    """A bias-free convolution whose error goes down through the fixed kernel ``feedback``."""

    def __init__(self, weight: torch.Tensor, feedback: torch.Tensor, padding: int):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.register_buffer("feedback", feedback)  # W's shape
        self.padding = padding

    def forward(self, x):
        if not torch.is_grad_enabled():
            return F.conv2d(x, self.weight, padding=self.padding)
        return FAConv2dFunction.apply(x, self.weight, self.feedback, self.padding)


class FARNN(nn.Module):
    """h_t = f(x_t W_xᵀ + h_{t−1} W_hᵀ), y_t = h_t W_yᵀ, with the recurrent and read-out
    matmuls sending errors back through fixed B_h, B_y (through time, by autograd)."""

    def __init__(self, input_size: int, hidden: int, output: int, act: str, init_std: float,
                 distribution: str, scale: float, generator: torch.Generator):
        super().__init__()
        self.input = FALinear(init_weight((hidden, input_size), init_std),
                              torch.zeros(input_size, hidden))  # ∂x is never needed
        self.recurrent = FALinear(init_weight((hidden, hidden), init_std),
                                  draw_feedback((hidden, hidden), distribution, scale, generator))
        self.readout = FALinear(init_weight((output, hidden), init_std),
                                draw_feedback((hidden, output), distribution, scale, generator))
        self.act = activation_module(act)
        self.hidden = hidden

    def forward(self, x):  # x: (N, T, D) → (N, T, out)
        drive = self.input(x)  # one matmul for every step
        h = drive.new_zeros(x.shape[0], self.hidden)
        states = []
        for t in range(x.shape[1]):
            h = self.act(drive[:, t] + self.recurrent(h))
            states.append(h)
        return self.readout(torch.stack(states, dim=1))


def build_fa_network(arch: Arch, init_std: float, distribution: str, scale: float,
                     generator: torch.Generator) -> nn.Module:
    """The architecture with FA layers: an ``nn.Sequential`` (MLP/CNN) or an :class:`FARNN`."""
    if arch.kind == "rnn":
        layers = arch.layers
        if len(layers) != 2 or not isinstance(layers[0], Recurrent) \
                or not isinstance(layers[1], Dense):
            raise ValueError(f"{arch.name}: FA's RNN is (Recurrent(h), Dense(out, linear)), "
                             f"got {arch.describe()}")
        return FARNN(arch.input_shape[-1], layers[0].hidden, layers[1].units, layers[0].act,
                     init_std, distribution, scale, generator)
    def fa_layer(layer, in_shape):
        shape = weight_shape(layer, in_shape)
        if isinstance(layer, Dense):
            return FALinear(init_weight(shape, init_std),
                            draw_feedback(shape[::-1], distribution, scale, generator))
        return FAConv2d(init_weight(shape, init_std),
                        draw_feedback(shape, distribution, scale, generator), layer.padding)
    return build_sequential(arch, init_std, fa_layer)


def feedback_tensors(network: nn.Module) -> dict[str, torch.Tensor]:
    """Every fixed feedback tensor of a network, by name (buffers named ``feedback…``)."""
    return {name: buf for name, buf in network.named_buffers()
            if name.rsplit(".", 1)[-1].startswith("feedback")}


# --------------------------------------------------------------------------------------------
# The plugin
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FAParams(TrainParams):
    lr: float = param(3e-4, "learning rate (tuned on validation, suites/tune_fa_dfa.yaml: 3e-4 "
                      "for the MNIST MLP on full data; on 10k subsets 1e-3 for the FashionMNIST "
                      "MLP and 3e-3 for the MNIST CNN)", min=0.0)
    feedback_init: str = param("normal", "distribution of the fixed feedback B",
                               choices=DISTRIBUTIONS)
    feedback_scale: float = param(0.05, "standard deviation of B's entries (0.05 = the weights' "
                                  "init_std: B drawn like W; under Adam the scale barely "
                                  "matters, the sweep 0.005-0.5 moved nothing)", min=0.0)


@algorithms.register("fa", aliases=("feedback_alignment",))
class FeedbackAlignment(Algorithm):
    """Feedback alignment: errors go down through fixed random matrices (dense, conv, RNN)."""

    supports = frozenset({"mlp", "cnn", "rnn"})
    Params = FAParams

    def build(self, arch: Arch, info: TaskInfo, params: FAParams, ctx: RunContext) -> Learner:
        network = build_fa_network(arch, params.init_std, params.feedback_init,
                                   params.feedback_scale, feedback_generator(ctx.seed))
        return ModuleLearner(network.to(ctx.device), info, params, ctx.epochs)
