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

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from algorithms._conv import conv_error_and_weight_sum
from harness.api import Algorithm, Arch, Dense, Learner, RunContext, TaskInfo, TrainParams, param
from harness.nets import (DISTRIBUTIONS, RNNNet, build_sequential, draw_feedback,
                          feedback_generator, rnn_layers)
from harness.registry import algorithms
from harness.toolkit import ModuleLearner, init_weight, weight_shape

# --------------------------------------------------------------------------------------------
# Autograd Functions: true local weight gradient, fixed feedback for the input gradient
# --------------------------------------------------------------------------------------------

class FALinearFunction(torch.autograd.Function):
    """y = x Wᵀ (+ b); backward: ∂W = δᵀ x and ∂b = Σ δ (true), ∂x = δ Bᵀ with B fixed
    (in × out)."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        out = x.matmul(weight.t())
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(feedback.t())
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(
                x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


class FAConv2dFunction(torch.autograd.Function):
    """y = conv2d(x, W) (+ b); backward: ∂W, ∂b true, ∂x = conv_transpose(δ, K) with K fixed."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel, padding):
        ctx.save_for_backward(x, kernel)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out):
        """∂x through K and the true ∂W in one ``convolution_backward`` call, as BP's own
        backward takes them (with W; ``algorithms/_conv.py``)."""
        x, kernel = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x, grad_w = conv_error_and_weight_sum(grad_out, x, kernel, ctx.padding,
                                                       ctx.needs_input_grad[0],
                                                       ctx.needs_input_grad[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _bias(weight: torch.Tensor, wanted: bool) -> Optional[nn.Parameter]:
    return nn.Parameter(torch.zeros(weight.shape[0])) if wanted else None


class FALinear(nn.Module):
    """A dense layer whose error goes down through the fixed buffer ``feedback``."""

    def __init__(self, weight: torch.Tensor, feedback: torch.Tensor, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = _bias(weight, bias)
        self.register_buffer("feedback", feedback)  # in × out (Wᵀ's shape)

    def forward(self, x):
        if not torch.is_grad_enabled():
            out = x.matmul(self.weight.t())
            return out if self.bias is None else out + self.bias
        return FALinearFunction.apply(x, self.weight, self.bias, self.feedback)


class FAConv2d(nn.Module):
    """A convolution whose error goes down through the fixed kernel ``feedback``."""

    def __init__(self, weight: torch.Tensor, feedback: torch.Tensor, padding: int,
                 bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = _bias(weight, bias)
        self.register_buffer("feedback", feedback)  # W's shape
        self.padding = padding

    def forward(self, x):
        if not torch.is_grad_enabled():
            return F.conv2d(x, self.weight, self.bias, padding=self.padding)
        return FAConv2dFunction.apply(x, self.weight, self.bias, self.feedback, self.padding)


def build_fa_network(arch: Arch, init_std: float, distribution: str, scale: float,
                     generator: torch.Generator) -> nn.Module:
    """The architecture with FA layers: an ``nn.Sequential`` (MLP/CNN), or the RNN whose error
    goes back in time through a fixed B_h and down from the read-out through a fixed B_y."""
    if arch.kind == "rnn":
        recurrent, _ = rnn_layers(arch)
        hidden = recurrent.hidden
        b_h = draw_feedback((hidden, hidden), distribution, scale, generator)  # in × out

        def readout(spec, units_in):
            return FALinear(init_weight((spec.units, units_in), init_std),
                            draw_feedback((units_in, spec.units), distribution, scale,
                                          generator), bias=spec.bias)
        return RNNNet(arch, init_std, back=b_h.t().contiguous(), readout=readout)

    def fa_layer(layer, in_shape):
        shape = weight_shape(layer, in_shape)
        if isinstance(layer, Dense):
            return FALinear(init_weight(shape, init_std),
                            draw_feedback(shape[::-1], distribution, scale, generator),
                            bias=layer.bias)
        return FAConv2d(init_weight(shape, init_std),
                        draw_feedback(shape, distribution, scale, generator), layer.padding,
                        bias=layer.bias)
    return build_sequential(arch, init_std, fa_layer)


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


class FALearner(ModuleLearner):
    """BP's learner on the FA network, which says what its feedback is (for diagnostics)."""

    def feedback_pairs(self):
        """(layer, B, what BP uses there): B against Wᵀ (kernels against W); the RNN's B_h
        against W_h (both in W_h's layout) and its read-out's B_y against W_yᵀ."""
        if hasattr(self.network, "w_h"):
            readout = self.network.readout
            return [("recurrent", self.network.feedback, self.network.w_h),
                    ("readout", readout.feedback, readout.weight.t())]
        pairs = []
        for name, weight, _ in self.layer_weights()[1:]:   # nothing goes below the first
            module = next(m for m in self.network.modules() if getattr(m, "weight", None) is weight)
            if isinstance(module, FALinear):
                pairs.append((name, module.feedback, weight.t()))
            elif isinstance(module, FAConv2d):
                pairs.append((name, module.feedback, weight))
        return pairs


@algorithms.register("fa", aliases=("feedback_alignment",))
class FeedbackAlignment(Algorithm):
    """Feedback alignment: errors go down through fixed random matrices (dense, conv, RNN)."""

    supports = frozenset({"mlp", "cnn", "rnn"})
    channels_last = True    # its conv steps run faster so on the CPU (harness.nets)
    Params = FAParams

    def build(self, arch: Arch, info: TaskInfo, params: FAParams, ctx: RunContext) -> Learner:
        network = build_fa_network(arch, params.init_std, params.feedback_init,
                                   params.feedback_scale, feedback_generator(ctx.seed))
        return FALearner(network.to(ctx.device), info, params)
