"""Difference target propagation for conv nets, with feedback learned by L-DRL (Ernoult et al.,
ICML 2022, "Towards scaling difference target propagation by learning backprop targets").

Why this variant. Three published routes take DTP to conv nets: DDTP (Meulemans et al. 2020:
direct feedback from the output, trained with a difference reconstruction loss, whose targets
approach Gauss-Newton's, not BP's), the locally connected DTP of Bartunov et al. 2018 (no weight
sharing: many times the parameters and the cost of a conv net, and 98.5 % on MNIST at best) and
L-DRL (Ernoult et al. 2022: layer-wise feedback trained so that each feedback Jacobian matches
the *transpose* of its forward Jacobian, which makes the difference targets BP's targets at small
β; the best DTP results on CIFAR-10 and ImageNet 32×32). The bars here (the DLL paper's DTP CNN,
96.4 % MNIST, 88 % FashionMNIST) are well below what BP reaches on these nets (≥ 99 %, ≥ 91 %),
so the variant that tracks BP is the one most likely to meet them, and it keeps BP's shape of
computation (one conv per layer per sweep), so its cost stays within a small factor of BP's.
DDTP's direct output-to-layer feedback would need a dense map from 10 outputs to every conv
feature map and aims at Gauss-Newton targets; Bartunov's variant gives up the conv structure.

What differs from the paper. Ernoult et al. mirror each forward block in the feedback path
(transposed conv, the forward nonlinearity, max-unpool) and train it with many L-DRL iterations
per batch (20–55 in their CIFAR-10 runs), because that feedback family cannot represent J_Fᵀ
exactly. Here the feedback of each weighted layer is chosen so that J_Fᵀ lies inside it:

    forward layer i    y_i = f(W_i ⊛ h_i),  h_{i+1} = P_i(y_i)  (P_i: the pools/flatten after it)
    feedback           G_i(u) = B_iᵀ ⊛ ψ(u)  on y_i's space, ψ′(y) = f′(f⁻¹(y))
                       (tanh: ψ(y) = y − y³/3; linear: y; sigmoid: y²/2 − y³/3;
                       relu: y on the active units, 0 on the others)

B_i has W_i's shape; B_iᵀ ⊛ is the transposed convolution (conv2d's input gradient) with kernel
B_i, or the product with B_iᵀ for a dense layer. The Jacobian of G_i at y_i is
B_iᵀ diag(f′(a_i)), so B_i = W_i gives exactly J_{F_i}ᵀ = W_iᵀ diag(f′(a_i)) at every sample:
that is what "exact feedback" means in tests/test_dtp_conv.py. Pools and flatten have no weights;
their feedback is fixed at their own transposed Jacobian at the forward pass — max-pool sends a
difference to the unit that won (its argmax), average-pool spreads it evenly (/size²), flatten
reshapes — as DLL routes its errors (algorithms/dll.py).

The L-DRL loss of layer i, with noise ε ~ N(0, σ²) at its input and η ~ N(0, σ²) at its output,
is (‖G_i(y_i + η) − G_i(y_i)‖² − 2⟨ε, G_i(F_i(h_i + ε)) − G_i(y_i)⟩) / 2σ² (scaled by 1/2σ²
here so that σ does not scale the gradient). Because G_i is linear in B_i after a fixed ψ, the
η term's expectation has a closed form, E_η‖B_iᵀ ⊛ (ψ(y_i + η) − ψ(y_i))‖² = σ² Σ B_i² ⊙ w_i
to first order in σ, with w_i = C(1, f′(a_i)²) (f′² summed over the samples and the output
positions that each kernel offset reaches). It is used in place of a sampled η: the same loss
in expectation, with no output noise, no transposed conv of it and half the gradient's variance
(a sampled η was measured too: on FashionMNIST the lower layers' feedback aligned more slowly).
It is a weight decay of each feedback synapse scaled by its presynaptic unit's f′², so it stays
local to the layer. Per batch (⟨·,·⟩ and ‖·‖ summed over a sample, then averaged over N):

    feedback  (k = feedback_updates times, on the first m = feedback_samples samples (0: all),
              forward weights fixed; the feedback kernels' own Adam):
              ε ~ N(0, σ²) at h_i,   r = ψ(f(W_i ⊛ (h_i + ε))) − ψ(y_i)
              L_i(B_i) = ½ Σ B_i² ⊙ w_i − ⟨ε, B_iᵀ ⊛ r⟩ / σ²                 (L-DRL)
              ∂L_i/∂B_i = B_i ⊙ w_i − C(ε, r) / σ²
    targets   Δ_L = t_L − h_L = −β ∂ℓ/∂h_L                      (ℓ: the per-sample task loss)
              d_i = P_iᵀ Δ_{i+1}                                 (the pools' fixed feedback)
              Δ_i = G_i(y_i + d_i) − G_i(y_i) = B_iᵀ ⊛ [ψ(y_i + d_i) − ψ(y_i)]
              t_i = h_i + Δ_i                                    (difference correction)
    forward   min_{W_i} ½‖P_i(f(W_i ⊛ h_i)) − t_{i+1}‖²          (h_i held fixed):
              ∂W_i = C(h_i, −d_i ⊙ f′(a_i)) / N,  stepped by the harness's optimiser

where C(a, b) = Σ_n b_nᵀ a_n is a layer's weight-shaped contraction (conv2d's weight gradient
for a conv layer). With noise small, E[L_i] = ½‖J_{G_i}‖² − tr(J_{G_i} J_{F_i})
= ½‖J_G − J_Fᵀ‖² − ½‖J_F‖² per sample (J_G = B_iᵀ D_i, J_F = D_i W_i, D_i = diag f′(a_i)),
minimal at J_G = J_Fᵀ, i.e. B_i = W_i; its gradient, (B_i − W_i) ⊙ w_i in expectation, relaxes
B_i towards W_i using only quantities at layer i (the input noise, the layer's response to it,
f′ of its units, B_i itself): W_i is never read. With B_i = W_i and β → 0, Δ_i → −β ∂ℓ/∂h_i,
so ∂W_i → β·∂(mean loss)/∂W_i: BP's gradient. At finite β the targets are nonlinear (ψ's
curvature), and with B_i ≠ W_i they are what the learned feedback makes of them.
ψ(y + d) − ψ(y) is evaluated in closed form (d·(1 − y² − yd − d²/3) for tanh), so small target
differences do not cancel in float32. The first weighted layer needs no feedback (no target
below it). Evaluation is a forward pass.

Cost (multiply-accumulates per sample; F = a forward pass, F_0 = its first weighted layer).
BP: forward F, input gradients F − F_0 (none below the first layer), weight gradients F:
3F − F_0. This method: forward F, target differences F − F_0 (one transposed conv or product
per layer above the first), forward weight gradients F, and per feedback update, for every
layer above the first, one conv of the noisy input and one weight contraction, on m of the
batch's N samples: 2(m/N)(F − F_0) (w_i, a one-channel contraction, adds under 1 %). Total
3F − F_0 + 2k(m/N)(F − F_0). MNIST CNN (F = 2.418 M, F_0 = 0.461 M): 10.71 M against BP's
6.79 M with the defaults (k = 1, m = N), a ratio of 1.58; FashionMNIST CNN (F = 9.033 M,
F_0 = 0.922 M): 42.40 M against 26.18 M, 1.62. Elementwise work (ψ, noise, pooling) comes on
top. Measured (benchmarks/bench_dtp_cnn.py: 2,000-image epochs, batch 64, 1 thread, bp and dtp
interleaved, 6 epochs each, on a 2-core machine shared with other jobs): MNIST CNN 1.29 s
against BP's 0.81 s, 1.60×; FashionMNIST CNN 3.36 s against 2.60 s, 1.29× (BP's own epochs
there ranged 1.95–3.10 s: load, not method). Defaults and their selection:
reports/tune_dtp_cnn/selection.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from algorithms._conv import conv_error_below, conv_weight_sum
from harness.api import Arch, Conv, Dense, Flatten, Pool, TaskInfo
from harness.nets import avg_pool_adjoint, max_pool_adjoint
from harness.toolkit import (ModuleLearner, activation, fast_step_options, init_weight,
                             layer_shapes, loss_and_grad, weight_shape)


def psi_difference(act: str, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """ψ(y + d) − ψ(y) for ψ′(y) = f′(f⁻¹(y)), in closed form (no cancellation)."""
    if act == "tanh":           # ψ(y) = y − y³/3:  d − d·[y(y + d) + d²/3]
        inner = torch.add(y, d).mul_(y).addcmul_(d, d, value=1.0 / 3.0)
        return torch.addcmul(d, d, inner, value=-1.0)
    if act == "sigmoid":        # ψ(y) = y²/2 − y³/3
        return d * (y + 0.5 * d - y * y - y * d - d * d / 3.0)
    if act == "relu":           # f′ is 1 on active units, 0 on the others: ψ is linear there
        return d * (y > 0).to(d.dtype)
    if act == "linear":
        return d
    raise ValueError(f"unknown activation {act!r}")


def local_error(act: str, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d ⊙ f′(a) with y = f(a): the target difference at a layer's pre-activation."""
    if act == "tanh":
        return torch.addcmul(d, d * y, y, value=-1.0)
    if act == "linear":
        return d
    return d * activation(act)[1](y)


def conv_unsupported(arch: Arch) -> Optional[str]:
    """Why the conv DTP cannot build ``arch`` (None when it can)."""
    try:
        shapes = layer_shapes(arch)
    except (ValueError, TypeError) as error:
        return str(error)
    if not shapes or not isinstance(shapes[-1][0], (Dense, Conv)):
        return "dtp needs a weighted (dense) output layer"
    for layer, in_shape, _ in shapes:
        if not isinstance(layer, (Dense, Conv, Pool, Flatten)):
            return f"dtp's conv path builds conv/pool/flatten/dense layers, not {layer}"
        if isinstance(layer, Dense) and len(in_shape) != 1:
            return "dtp's conv path needs a flatten before its dense layers"
        if isinstance(layer, Pool) and layer.kind not in ("max", "avg"):
            return f"unknown pool kind {layer.kind!r}"
    return None


@dataclass
class LayerState:
    """What the forward pass leaves at weighted layer i: its input h_i, its activation
    y_i = f(a_i), what the pools and flatten after it need to route differences back (input
    shapes; a max-pool's argmax indices and output) and its block's output h_{i+1}."""

    h_in: torch.Tensor
    y: torch.Tensor
    post: list
    h_out: torch.Tensor


class ConvDTPNetwork(nn.Module):
    """Weighted layers W_0 … W_{L−1} (conv or dense, each with a bias b_i where its spec asks
    for one), each followed by the weightless layers up to the next one, and feedback kernels
    B_1 … B_{L−1} of the weights' shapes (``feedbacks[i − 1]`` carries targets from layer i's
    output down to its input). A bias moves a layer's operating point, not its Jacobian, so
    the feedback is the same with or without one."""

    def __init__(self, arch: Arch, init_std: float, feedback_init_std: Optional[float] = None):
        super().__init__()
        reason = conv_unsupported(arch)
        if reason:
            raise ValueError(f"{arch.name}: {reason}")
        self.pre: list = []             # weightless layers before the first weighted one
        self.specs: list = []
        self.posts: list[list] = []
        weights = []
        for layer, in_shape, _ in layer_shapes(arch):
            if isinstance(layer, (Dense, Conv)):
                self.specs.append(layer)
                self.posts.append([])
                weights.append(nn.Parameter(init_weight(weight_shape(layer, in_shape), init_std)))
            elif self.specs:
                self.posts[-1].append(layer)
            else:
                self.pre.append(layer)
        self.weights = nn.ParameterList(weights)
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(spec.units if isinstance(
            spec, Dense) else spec.filters)) for spec in self.specs if spec.bias)
        self.bias_of: dict[int, int] = {}
        for i, spec in enumerate(self.specs):
            if spec.bias:
                self.bias_of[i] = len(self.bias_of)
        std = init_std if feedback_init_std is None else feedback_init_std
        self.feedbacks = nn.ParameterList(nn.Parameter(init_weight(tuple(w.shape), std))
                                          for w in weights[1:])

    # ---- the layer-level operations -------------------------------------------------------

    def linear(self, i: int, h: torch.Tensor, kernel: Optional[torch.Tensor] = None):
        """W_i ⊛ h + b_i (or ``kernel`` ⊛ h + b_i)."""
        w = self.weights[i] if kernel is None else kernel
        spec = self.specs[i]
        b = self.biases[self.bias_of[i]] if i in self.bias_of else None
        if isinstance(spec, Dense):
            return F.linear(h, w, b)
        return F.conv2d(h, w, b, padding=spec.padding)

    def forward_parameters(self) -> list[nn.Parameter]:
        """What the harness's optimiser steps: the weights, then the biases."""
        return list(self.weights) + list(self.biases)

    def feedback(self, i: int, e: torch.Tensor, in_shape: torch.Size,
                 kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B_iᵀ ⊛ e: the transposed conv (or product) with the feedback kernel, for i ≥ 1."""
        b = self.feedbacks[i - 1] if kernel is None else kernel
        spec = self.specs[i]
        if isinstance(spec, Dense):
            return e.matmul(b)
        return conv_error_below(in_shape, b, e, spec.padding)

    def contract(self, i: int, below: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
        """C(below, above) = Σ_n above_nᵀ below_n, in W_i's shape."""
        spec = self.specs[i]
        if isinstance(spec, Dense):
            return above.t().matmul(below)
        return conv_weight_sum(below, self.weights[i].shape, above, spec.padding)

    def act(self, i: int):
        return activation(self.specs[i].act)

    def _pools_first(self, i: int) -> bool:
        posts = self.posts[i]
        return bool(posts) and isinstance(posts[0], Pool) and posts[0].kind == "max"

    def _post(self, i: int, y: torch.Tensor, keep: bool, act=None):
        """The pools and flatten after layer i, from its activation y; with ``act`` given, y is
        the pre-activation and ``act`` is applied after the leading max-pool (monotone: the
        same values and winners)."""
        states, h = [], y
        for position, layer in enumerate(self.posts[i]):
            if isinstance(layer, Flatten):
                state, out = h.shape, h.flatten(1)
            elif layer.kind == "max":
                out, indices = F.max_pool2d(h, layer.size, return_indices=True)
                if act is not None and position == 0:
                    out = act(out)
                state = (indices, h.shape, out)
            else:
                state, out = h.shape, F.avg_pool2d(h, layer.size)
            if keep:
                states.append(state)
            h = out
        return h, states

    def _adjoint(self, layers: list, post: list, d: torch.Tensor) -> torch.Tensor:
        for layer, state in zip(reversed(layers), reversed(post)):
            if isinstance(layer, Flatten):
                d = d.reshape(state)
            elif layer.kind == "max":
                indices, shape, _ = state
                d = max_pool_adjoint(d, indices, layer.size, shape)
            else:
                d = avg_pool_adjoint(d, layer.size, state)
        return d

    def post_adjoint(self, i: int, post: list, d: torch.Tensor) -> torch.Tensor:
        """P_iᵀ d: a difference at layer i's block output carried to y_i (the pools' and the
        flatten's transposed Jacobians at the forward pass)."""
        return self._adjoint(self.posts[i], post, d)

    def at_activation(self, i: int, state: "LayerState", delta: torch.Tensor, *fns):
        """[fn(y_i, P_iᵀ Δ) for fn in fns], for elementwise fns with fn(y, 0) = 0. When a
        max-pool follows the activation they are evaluated at the pool's output (exactly the
        same numbers: P_iᵀΔ is 0 off the argmax, and y_i there is the pooled value) and routed
        to the argmax afterwards: a quarter of the elementwise work."""
        posts, post = self.posts[i], state.post
        pooled = bool(posts) and isinstance(posts[0], Pool) and posts[0].kind == "max"
        if not pooled:
            d = self._adjoint(posts, post, delta)
            return [fn(state.y, d) for fn in fns]
        d = self._adjoint(posts[1:], post[1:], delta)
        indices, shape, out = post[0]
        return [max_pool_adjoint(fn(out, d), indices, posts[0].size, shape)
                for fn in fns]

    # ---- passes ----------------------------------------------------------------------------

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.pre:
            if isinstance(layer, Flatten):
                x = x.flatten(1)
            elif layer.kind == "max":
                x = F.max_pool2d(x, layer.size)
            else:
                x = F.avg_pool2d(x, layer.size)
        return x

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[LayerState]]:
        """The forward pass, keeping each weighted layer's state. The first layer has no feedback,
        so nothing needs its activation at every unit: when a max-pool follows it, the pool goes
        first and f runs on the winners only (its y is then None)."""
        h = self._pre(x)
        states = []
        for i in range(len(self.specs)):
            f = self.act(i)[0]
            if i == 0 and self._pools_first(i):
                y, (out, post) = None, self._post(i, self.linear(i, h), keep=True, act=f)
            else:
                y = f(self.linear(i, h))
                out, post = self._post(i, y, keep=True)
            states.append(LayerState(h, y, post, out))
            h = out
        return h, states

    def forward(self, x):
        h = self._pre(x)
        for i in range(len(self.specs)):
            f = self.act(i)[0]
            h = (self._post(i, self.linear(i, h), keep=False, act=f)[0] if self._pools_first(i)
                 else self._post(i, f(self.linear(i, h)), keep=False)[0])
        return h


# --------------------------------------------------------------------------------------------
# Targets, forward updates, feedback training
# --------------------------------------------------------------------------------------------

def target_differences(net: ConvDTPNetwork, states: list[LayerState],
                       output_difference: torch.Tensor) -> list[torch.Tensor]:
    """Δ_{i+1} = t_{i+1} − h_{i+1} at each weighted layer's block output, top-down from
    Δ_L = ``output_difference``: Δ_i = B_iᵀ ⊛ [ψ(y_i + P_iᵀ Δ_{i+1}) − ψ(y_i)]."""
    deltas: list[torch.Tensor] = [output_difference] * len(states)
    for i in range(len(states) - 1, 0, -1):
        act = net.specs[i].act
        e, = net.at_activation(i, states[i], deltas[i], partial(psi_difference, act))
        deltas[i - 1] = net.feedback(i, e, states[i].h_in.shape)
    return deltas


def difference_targets(net: ConvDTPNetwork, states: list[LayerState],
                       output_target: torch.Tensor) -> list[torch.Tensor]:
    """t_{i+1} for each weighted layer i's block output (the last is ``output_target``)."""
    deltas = target_differences(net, states, output_target - states[-1].h_out)
    return [s.h_out + d for s, d in zip(states, deltas)]


def forward_gradients(net: ConvDTPNetwork, states: list[LayerState],
                      deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """∂/∂W_i (and ∂/∂b_i) of ½‖P_i(f(W_i ⊛ h_i + b_i)) − t_{i+1}‖² / N with h_i fixed, from
    Δ_{i+1} = t_{i+1} − h_{i+1}: −C(h_i, P_iᵀΔ_{i+1} ⊙ f′(a_i)) / N (the bias: that local
    error summed over the samples and positions), in the order of
    :meth:`ConvDTPNetwork.forward_parameters`. Only layer i's own quantities enter."""
    n = states[0].h_in.shape[0]
    grads, bias_grads = [], []
    for i, (state, delta) in enumerate(zip(states, deltas)):
        g, = net.at_activation(i, state, delta, partial(local_error, net.specs[i].act))
        grads.append(net.contract(i, state.h_in, g).mul_(-1.0 / n))
        if i in net.bias_of:
            bias_grads.append(_bias_gradient(g, n))
    return grads + bias_grads


def _bias_gradient(local: torch.Tensor, n: int) -> torch.Tensor:
    """−Σ over samples (and positions) of a layer's local error / N."""
    dims = [0] + list(range(2, local.dim()))
    return local.sum(dims).mul_(-1.0 / n)


def targets_and_gradients(net: ConvDTPNetwork, states: list[LayerState],
                          output_difference: torch.Tensor):
    """:func:`target_differences` and :func:`forward_gradients` in one top-down sweep (each
    layer's routed difference computed once): (Δ's, the gradients in the order of
    :meth:`ConvDTPNetwork.forward_parameters`)."""
    n = states[0].h_in.shape[0]
    deltas: list[torch.Tensor] = [output_difference] * len(states)
    grads: list[torch.Tensor] = [output_difference] * len(states)
    bias_grads: dict[int, torch.Tensor] = {}
    for i in range(len(states) - 1, -1, -1):
        act = net.specs[i].act
        fns = [partial(local_error, act)] + ([partial(psi_difference, act)] if i else [])
        outs = net.at_activation(i, states[i], deltas[i], *fns)
        grads[i] = net.contract(i, states[i].h_in, outs[0]).mul_(-1.0 / n)
        if i in net.bias_of:
            bias_grads[i] = _bias_gradient(outs[0], n)
        if i:
            deltas[i - 1] = net.feedback(i, outs[1], states[i].h_in.shape)
    return deltas, grads + [bias_grads[i] for i in sorted(bias_grads)]


def feedback_noise(states: list[LayerState], sigma: float,
                   generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """ε ~ N(0, σ²) at the input h_i of every layer with feedback (i ≥ 1)."""
    # drawn in the default (row-major) order and then laid out like h_i: the same numbers in
    # either memory format, and normal_ is slow on a channels-last tensor
    return [torch.empty(s.h_in.shape, dtype=s.h_in.dtype, device=s.h_in.device)
            .normal_(0.0, sigma, generator=generator).to(memory_format=_format_of(s.h_in))
            for s in states[1:]]


def _format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 and not t.is_contiguous() and \
        t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _response(net: ConvDTPNetwork, i: int, state: LayerState, eps: torch.Tensor):
    """r = ψ(f(W_i ⊛ (h_i + ε))) − ψ(y_i): the layer's response to input noise, in ψ's terms
    (forward weights fixed)."""
    with torch.no_grad():
        noisy = net.act(i)[0](net.linear(i, state.h_in + eps))
        return psi_difference(net.specs[i].act, state.y, noisy.sub_(state.y))


def output_noise_weights(net: ConvDTPNetwork, i: int, state: LayerState) -> torch.Tensor:
    """w_i = C(1, f′(a_i)²): Σ over samples and output positions of f′², per output unit and
    kernel offset (offsets that fall on the padding count no positions), broadcastable to
    B_i's shape. E_η‖B_iᵀ ⊛ (f′(a_i) ⊙ η)‖² = σ² Σ B_i² ⊙ w_i."""
    d2 = net.act(i)[1](state.y).pow(2)
    spec, b = net.specs[i], net.feedbacks[i - 1]
    if isinstance(spec, Dense):
        return d2.sum(0).unsqueeze(1)
    ones = torch.ones((d2.shape[0], 1) + tuple(state.h_in.shape[2:]), dtype=d2.dtype,
                      device=d2.device)
    return conv_weight_sum(ones, (b.shape[0], 1) + tuple(b.shape[2:]), d2, spec.padding)


def feedback_loss(net: ConvDTPNetwork, states: list[LayerState], noise: list[torch.Tensor],
                  sigma: float) -> torch.Tensor:
    """Σ_i L_i(B_i) = Σ_i [½ Σ B_i² ⊙ w_i − ⟨ε, B_iᵀ ⊛ r⟩ / σ²] / N, differentiable in the
    B_i: what :func:`feedback_gradients` differentiates by hand."""
    n = states[0].h_in.shape[0]
    total = states[0].h_in.new_zeros(())
    for i, (state, eps) in enumerate(zip(states[1:], noise), start=1):
        r = _response(net, i, state, eps)
        w = output_noise_weights(net, i, state)
        back = net.feedback(i, r, state.h_in.shape)
        total = total + 0.5 * (net.feedbacks[i - 1].pow(2) * w).sum() \
            - (eps * back).sum() / (sigma * sigma)
    return total / n


def feedback_gradients(net: ConvDTPNetwork, states: list[LayerState], noise: list[torch.Tensor],
                       sigma: float) -> list[torch.Tensor]:
    """∂L_i/∂B_i = [B_i ⊙ w_i − C(ε, r) / σ²] / N."""
    n = states[0].h_in.shape[0]
    grads = []
    for i, (state, eps) in enumerate(zip(states[1:], noise), start=1):
        r = _response(net, i, state, eps)
        hebbian = net.contract(i, eps, r).mul_(1.0 / (sigma * sigma))
        decay = net.feedbacks[i - 1].detach() * output_noise_weights(net, i, state)
        grads.append(decay.sub_(hebbian).mul_(1.0 / n))
    return grads


def feedback_alignment(net: ConvDTPNetwork) -> list[float]:
    """cos(B_i, W_i) per layer with feedback: 1 when the feedback is exact (a diagnostic; the
    learning rule never reads W_i)."""
    return [float(F.cosine_similarity(b.detach().flatten(), w.detach().flatten(), dim=0))
            for b, w in zip(net.feedbacks, list(net.weights)[1:])]


class ConvDTPLearner(ModuleLearner):
    """The forward weights and biases are the harness's to step; the feedback kernels have
    their own Adam — the one optimiser a plugin builds (the declared exception: they learn the
    forward Jacobian's transpose, not the task). predict and state_dict are ModuleLearner's."""

    def __init__(self, network: ConvDTPNetwork, info: TaskInfo, params):
        super().__init__(network, info, params)
        self.p = params
        feedbacks = list(network.feedbacks.parameters())
        self.feedback_optimizer = (torch.optim.Adam(feedbacks, lr=params.feedback_lr,
                                                    **fast_step_options(feedbacks))
                                   if feedbacks else None)

    def parameter_groups(self) -> list[dict]:
        return [{"params": self.network.forward_parameters()}]

    def layer_weights(self):
        net = self.network
        return [(f"layer{i}", w, net.biases[net.bias_of[i]] if i in net.bias_of else None)
                for i, w in enumerate(net.weights)]

    def feedback_pairs(self):
        """B_i against W_i, what BP's transposed conv (or product) uses at layer i."""
        net = self.network
        return [(f"layer{i}", b, w)
                for i, (b, w) in enumerate(zip(net.feedbacks, list(net.weights)[1:]), start=1)]

    @torch.no_grad()
    def train_step(self, x, y):
        net, p = self.network, self.p
        output, states = net.run(x)
        stats = {}
        if self.feedback_optimizer is not None and p.feedback_updates:
            m = p.feedback_samples
            sample = states if not m or m >= x.shape[0] else \
                [LayerState(s.h_in[:m], None if s.y is None else s.y[:m], [], s.h_out[:m])
                 for s in states]
            for _ in range(p.feedback_updates):
                noise = feedback_noise(sample, p.feedback_noise)
                for b, grad in zip(net.feedbacks,
                                   feedback_gradients(net, sample, noise, p.feedback_noise)):
                    b.grad = grad
                self.feedback_optimizer.step()
        loss, out_grad = loss_and_grad(self.info, output, y, p.label_smoothing)
        _, grads = targets_and_gradients(net, states,
                                         out_grad.mul_(-p.target_step * output.shape[0]))
        for weight, grad in zip(net.forward_parameters(), grads):
            weight.grad = grad
        stats["loss"] = loss
        return stats
