"""Dendritic Localized Learning (Lv et al., ICML 2025): local errors through a learned Θ.

Each hidden unit holds its bottom-up value u (basal), a top-down value x (apical) and their
difference, the soma error ξ = x − u. A second matrix Θ_i per layer, of W_i's shape, carries
errors down instead of W_iᵀ. The fixed point of the apical inference is taken in one top-down
sweep, and W and Θ are updated together, locally (row vectors, per sample, ⊙ elementwise):

    g_i   = ξ_{i+1} ⊙ f′(a_i)                 error at layer i's pre-activation a_i = u_i W_iᵀ
    ξ_i   = g_i Θ_i                           the soma error one layer down   (Θ = W: BP)
    ΔW_i  = ⟨g_iᵀ u_i⟩                        ascent on −loss
    ΔΘ_i  = −⟨g_iᵀ ξ_i⟩                       shrinks ‖ξ_i‖² (the paper's sign)

with ξ_L = −∂ℓ/∂a_L per sample (y_smooth − softmax for cross-entropy) and ⟨·⟩ the batch mean.
Convolutions use the same rules with conv2d's weight and input contractions in place of the
products, max-pool routes errors through its argmax, average-pool spreads them evenly; the
single-layer tanh RNN runs the sweep backwards through time (DLL.md §3). Updates become the
parameters' ``.grad`` (= −Δ) and the shared torch optimiser applies them; Θ learns at
``lr · theta_lr_ratio`` (η/10 in the paper).

A layer's bias (``bias: true`` in its spec; the paper has none) learns Δb_i = ⟨g_i⟩.

``variant: released`` reproduces the authors' code (DLL.md §5), each rule in a class of its own
beside the paper's: :class:`ReleasedMLP` (the outer form: tanh on each layer's input, softmax
on the last hidden layer, linear output, MSE-type error, Θ never trained), :class:`ReleasedCNN`
(Θ updated with a + sign, errors clipped to ±clip, updates summed over the batch, doubled and
clipped before the Adam step) and :class:`ReleasedRNN` (tanh′ taken at step t − 1, the same
sum-and-clip, plain SGD and no schedule). The released conv ΔΘ (a reshape without a permute)
is not copied: the intended contraction is used. DLL-FA (paper Table 3) is ``theta: frozen``,
registered as ``dll_fa``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from algorithms._conv import conv_error_and_weight_sum, conv_weight_sum
from harness.api import (Algorithm, Arch, Conv, Dense, Flatten, Learner, Pool, RunContext,
                         TaskInfo, TrainParams, param)
from harness.nets import avg_pool_adjoint, max_pool_adjoint, rnn_layers, unroll
from harness.registry import algorithms
from harness.toolkit import (activation, init_weight, layer_shapes, loss_and_grad, loss_value,
                             weight_shape)


@dataclass(frozen=True)
class DLLParams(TrainParams):
    label_smoothing: float = param(0.1, "label smoothing of the targets (paper: 0.1)",
                                   min=0.0, max=0.5)
    theta_lr_ratio: float = param(0.1, "Θ's learning rate as a fraction of W's (paper: 1/10)",
                                  min=0.0)
    theta_init_std: float = param(1.0, "Θ ~ N(0, s²) for dense layers (paper: 1)", min=0.0)
    theta_init_std_conv: float = param(0.05, "Θ ~ N(0, s²) for conv and recurrent layers "
                                       "(paper: 0.05)", min=0.0)
    theta: str = param("learn", "learn Θ, or keep it frozen (= DLL-FA)",
                       choices=("learn", "frozen"))
    variant: str = param("paper", "the paper's rules, or the authors' released code",
                         choices=("paper", "released"))
    clip: float = param(50.0, "released variant: clip of propagated errors and summed updates",
                        min=0.0)


@dataclass(frozen=True)
class DLLFAParams(DLLParams):
    theta: str = param("frozen", "learn Θ, or keep it frozen (= DLL-FA)",
                       choices=("learn", "frozen"))


# --------------------------------------------------------------------------------------------
# Feed-forward (MLP and CNN), the paper's form
# --------------------------------------------------------------------------------------------

def _contract(spec, shape, g: torch.Tensor, below: torch.Tensor,
              scale: float = 1.0) -> torch.Tensor:
    """scale · Σ_n g_nᵀ b_n: a dense layer's weight-shaped contraction of the error at its
    output with a tensor at its input (u for ΔW, ξ for ΔΘ); conv2d's weight gradient for a conv
    layer. The scale goes on the smaller side: the error (batch × units) of a dense layer, the
    kernel-shaped result of a conv layer (its error maps are far larger than its kernels)."""
    if isinstance(spec, Dense):
        return (g if scale == 1.0 else g * scale).t().matmul(below)
    out = conv_weight_sum(below, shape, g, spec.padding)
    return out if scale == 1.0 else out.mul_(scale)


def _sum_over_units(spec, g: torch.Tensor) -> torch.Tensor:
    """Σ_n g_n, per output unit (conv: over positions too): the bias's contraction."""
    return g.sum(0) if isinstance(spec, Dense) else g.sum(dim=(0, 2, 3))


class FeedForwardDLL(Learner):
    """DLL on a stack of dense/conv/pool/flatten layers (the last dense is the output), with
    the paper's rules; :class:`ReleasedCNN` and :class:`ReleasedMLP` change what they must."""

    def __init__(self, arch: Arch, info: TaskInfo, p: DLLParams, ctx: RunContext):
        self.info, self.p = info, p
        device = torch.device(ctx.device)
        self.layers = []          # (spec, W or None, Θ or None, b or None)
        weights, thetas, biases = [], [], []
        first_weighted = True
        for spec, in_shape, _ in layer_shapes(arch):
            shape = weight_shape(spec, in_shape)
            if shape is None:
                self.layers.append((spec, None, None, None))
                continue
            w = torch.nn.Parameter(init_weight(shape, p.init_std, device=device))
            theta = None
            if not first_weighted:  # no error is sent below the first weighted layer
                std = p.theta_init_std if isinstance(spec, Dense) else p.theta_init_std_conv
                theta = torch.nn.Parameter(init_weight(shape, std, device=device))
                thetas.append(theta)
            bias = torch.nn.Parameter(torch.zeros(shape[0], device=device)) if spec.bias else None
            if bias is not None:
                biases.append(bias)
            weights.append(w)
            self.layers.append((spec, w, theta, bias))
            first_weighted = False
        self.weights, self.thetas, self.biases = weights, thetas, biases
        self.learn_theta = p.theta == "learn" and bool(thetas)

    def parameter_groups(self) -> list[dict]:
        groups = [{"params": self.weights + self.biases}]
        if self.learn_theta:      # Θ at lr · theta_lr_ratio (the paper's η/10)
            groups.append({"params": self.thetas, "lr": self.p.lr * self.p.theta_lr_ratio})
        return groups

    @property
    def _pooled_first(self) -> frozenset:
        """Conv layers followed by a max-pool: there the pool goes before the activation (every
        activation is monotone, so f(max-pool(a)) = max-pool(f(a)) and the argmax is the same
        unit), and the error's derivative is taken at the pool's output before it is routed
        back: the same numbers, with f and f′ on a quarter of the units."""
        found = self.__dict__.get("_pooled")
        if found is None:
            found = frozenset(i for i, (spec, *_) in enumerate(self.layers[:-1])
                              if isinstance(spec, Conv) and isinstance(self.layers[i + 1][0], Pool)
                              and self.layers[i + 1][0].kind == "max")
            self.__dict__["_pooled"] = found
        return found

    def _forward(self, x: torch.Tensor, keep: bool):
        cache = []
        h = x
        pooled_first = self._pooled_first
        for index, (spec, w, _, b) in enumerate(self.layers):
            extra = None
            if isinstance(spec, Dense):
                a = h.matmul(w.t())
                out = activation(spec.act)[0](a if b is None else a + b)
            elif isinstance(spec, Conv):
                out = F.conv2d(h, w, b, padding=spec.padding)
                if index not in pooled_first:      # else the pool after it applies f
                    out = activation(spec.act)[0](out)
            elif isinstance(spec, Pool) and spec.kind == "max":
                out, extra = F.max_pool2d(h, spec.size, return_indices=True)
                if index - 1 in pooled_first:
                    out = activation(self.layers[index - 1][0].act)[0](out)
            elif isinstance(spec, Pool):
                out = F.avg_pool2d(h, spec.size)
            else:
                out = h.flatten(1)
            if keep:
                cache.append((h, out, extra))
            h = out
        return h, cache

    def predict(self, x):
        with torch.no_grad():
            return self._forward(x, keep=False)[0]

    @torch.no_grad()
    def train_step(self, x, y):
        output, cache = self._forward(x, keep=True)
        loss, grad = loss_and_grad(self.info, output, y, self.p.label_smoothing)
        n = output.shape[0]
        self.updates(cache, -n * grad, n)
        return {"loss": loss}

    # the rules of one weighted layer: .grad = −Δ --------------------------------------------
    def weight_grad(self, spec, shape, g: torch.Tensor, below: torch.Tensor, n: int,
                    total: Optional[torch.Tensor] = None):
        """ΔW = ⟨gᵀu⟩ (Δb = ⟨g⟩ with ``shape`` None), the batch mean folded into the small error
        tensor before the contraction (no extra pass over the weights); ``total``: a conv
        layer's contraction Σ gᵀu, already taken (with the error sent below, in one call)."""
        if shape is None:
            return _sum_over_units(spec, g) * (-1.0 / n)
        if total is not None:
            return total.mul_(-1.0 / n)
        return _contract(spec, shape, g, below, -1.0 / n)

    def feedback_error(self, error: torch.Tensor) -> torch.Tensor:
        """ξ one layer down, as propagated (the paper keeps it as it is)."""
        return error

    def theta_grad(self, spec, shape, g: torch.Tensor, xi_below: torch.Tensor, n: int):
        """ΔΘ = −⟨gᵀξ⟩: it shrinks ‖ξ‖² (the paper's sign)."""
        return _contract(spec, shape, g, xi_below, 1.0 / n)

    def updates(self, cache, err: torch.Tensor, n: int) -> None:
        """The top-down sweep from the output error ``err`` (per sample): sets every .grad."""
        pooled_first, g_routed = self._pooled_first, None
        for index in range(len(self.layers) - 1, -1, -1):
            spec, w, theta, bias = self.layers[index]
            inp, out, extra = cache[index]
            if w is None:   # pools and flatten only route the error
                if isinstance(spec, Flatten):
                    err = err.reshape(inp.shape)
                elif spec.kind == "max":
                    if index - 1 in pooled_first:    # g = e ⊙ f′ at the winners, then routed
                        act = self.layers[index - 1][0].act
                        err = err if act == "linear" else err * activation(act)[1](out)
                        g_routed = max_pool_adjoint(err, extra, spec.size, inp.shape)
                        continue
                    err = max_pool_adjoint(err, extra, spec.size, inp.shape)
                else:
                    err = avg_pool_adjoint(err, spec.size, inp.shape)
                continue
            if g_routed is not None:
                g, g_routed = g_routed, None
            else:
                g = err if spec.act == "linear" else err * activation(spec.act)[1](out)
            below = total = None
            if theta is not None and isinstance(spec, Conv):
                below, total = conv_error_and_weight_sum(g, inp, theta, spec.padding)
            w.grad = self.weight_grad(spec, w.shape, g, inp, n, total)
            if bias is not None:
                bias.grad = self.weight_grad(spec, None, g, inp, n)
            if theta is None:
                break       # the first weighted layer: nothing below needs an error
            if below is None:
                below = g.matmul(theta)
            below = self.feedback_error(below)
            if self.learn_theta:
                theta.grad = self.theta_grad(spec, theta.shape, g, below, n)
            err = below

    def layer_weights(self):
        weighted = [(w, b) for _, w, _, b in self.layers if w is not None]
        return [(f"layer{i}", w, b) for i, (w, b) in enumerate(weighted)]

    def feedback_pairs(self):
        """(layer, Θ, W): Θ carries the error down where BP would use W."""
        weighted = [(w, theta) for _, w, theta, _ in self.layers if w is not None]
        return [(f"layer{i}", theta, w) for i, (w, theta) in enumerate(weighted)
                if theta is not None]

    def state_dict(self):
        state = {f"W{i}": w.detach() for i, w in enumerate(self.weights)}
        state.update({f"Theta{i + 1}": t.detach() for i, t in enumerate(self.thetas)})
        state.update({f"b{i}": b.detach() for i, b in enumerate(self.biases)})
        return state


class ReleasedRules:
    """The released code's update arithmetic (DLL.md §5.3–4), for the conv net and the RNN:
    every propagated error clipped to ±clip; every update summed over the batch, doubled and
    clipped; Θ's with a + sign (growing ‖ξ‖)."""

    p: DLLParams

    def weight_grad(self, spec, shape, g, below, n, total=None):
        if shape is None:
            total = _sum_over_units(spec, g)
        elif total is None:
            total = _contract(spec, shape, g, below)
        return -(2.0 * total).clamp(-self.p.clip, self.p.clip)

    def feedback_error(self, error):
        return error.clamp(-self.p.clip, self.p.clip)

    def theta_grad(self, spec, shape, g, xi_below, n):
        return -(2.0 * _contract(spec, shape, g, xi_below)).clamp(-self.p.clip, self.p.clip)


class ReleasedCNN(ReleasedRules, FeedForwardDLL):
    """The released code's conv net: the paper's form with the released update arithmetic."""


class ReleasedMLP(FeedForwardDLL):
    """The released code's MLP: u_{i+1} = f_i(u_i) W_iᵀ with f = tanh on every layer's input
    (raw pixels included) but softmax on the last hidden layer, a linear output and the error
    y_smooth − u_L; Θ (N(0, 1)) never trains. The error sent through the softmax layer's Θ is
    not multiplied by any derivative of the softmax: the released model.py builds that layer with
    ``df=linear_deriv`` (1), and its backward multiplies by ``df`` of the layer's input."""

    def layer_weights(self):
        return None            # the outer form is not the architecture's plain network

    def _transfer(self, index: int):
        dense = [i for i, layer in enumerate(self.layers) if isinstance(layer[0], Dense)]
        if index == dense[-1]:
            return (lambda u: torch.softmax(u, dim=1)), (lambda z: torch.ones_like(z))
        return activation("tanh")

    def _forward(self, x, keep):
        cache, h = [], x
        for index, (spec, w, _, b) in enumerate(self.layers):
            if isinstance(spec, Dense):
                z = self._transfer(index)[0](h)
                out = z.matmul(w.t()) if b is None else z.matmul(w.t()) + b
                if keep:
                    cache.append((h, out, z))
                h = out
            else:   # flatten
                if keep:
                    cache.append((h, h.flatten(1), None))
                h = h.flatten(1)
        return h, cache

    @torch.no_grad()
    def train_step(self, x, y):
        output, cache = self._forward(x, keep=True)
        classes = output.shape[1]
        smooth = self.p.label_smoothing
        target = torch.full_like(output, smooth / classes)
        target.scatter_(1, y.unsqueeze(1), 1.0 - smooth + smooth / classes)
        err, clip = target - output, self.p.clip
        for index in range(len(self.layers) - 1, -1, -1):
            spec, w, theta, bias = self.layers[index]
            inp, _, z = cache[index]
            if not isinstance(spec, Dense):
                continue
            w.grad = -(2.0 * err.t().matmul(z)).clamp(-clip, clip)
            if bias is not None:
                bias.grad = -(2.0 * err.sum(0)).clamp(-clip, clip)
            if theta is None:
                break
            derivative = self._transfer(index)[1](z)
            err = (err.matmul(theta) * derivative).clamp(-clip, clip)
        return {"loss": loss_value(self.info, output, y)}


# --------------------------------------------------------------------------------------------
# The single-layer tanh RNN, through time
# --------------------------------------------------------------------------------------------

class RecurrentDLL(Learner):
    """h_t = tanh(W_x x_t + W_h h_{t−1}), y_t = W_y h_t (+ b_y); errors backwards in time through
    Θ_y, Θ_h: e^h_t = e^y_t Θ_y + (e^h_{t+1} ⊙ f′_{t+1}) Θ_h; ΔW_x = Σ_t g_tᵀ x_t,
    ΔW_h = Σ_t g_tᵀ h_{t−1}, ΔW_y = Σ_t e^y_tᵀ h_t with g_t = e^h_t ⊙ f′_t; ΔΘ_y = −Σ_t e^y_tᵀ e^h_t,
    ΔΘ_h = −Σ_{t≥2} g_tᵀ e^h_{t−1}; each averaged over samples and steps."""

    def __init__(self, arch: Arch, info: TaskInfo, p: DLLParams, ctx: RunContext):
        self.info, self.p = info, p
        recurrent, readout = rnn_layers(arch)
        inputs = arch.input_shape[-1]
        hidden, out = recurrent.hidden, readout.units
        device = torch.device(ctx.device)

        def new(shape, std):
            return torch.nn.Parameter(init_weight(shape, std, device=device))
        self.w_x, self.w_h, self.w_y = (new((hidden, inputs), p.init_std),
                                        new((hidden, hidden), p.init_std),
                                        new((out, hidden), p.init_std))
        self.b_y = torch.nn.Parameter(torch.zeros(out, device=device)) if readout.bias else None
        self.theta_y = new((out, hidden), p.theta_init_std_conv)
        self.theta_h = new((hidden, hidden), p.theta_init_std_conv)
        self.learn_theta = p.theta == "learn"

    def parameter_groups(self) -> list[dict]:
        weights = [self.w_x, self.w_h, self.w_y] + ([self.b_y] if self.b_y is not None else [])
        groups = [{"params": weights}]
        if self.learn_theta:
            groups.append({"params": [self.theta_y, self.theta_h],
                           "lr": self.p.lr * self.p.theta_lr_ratio})
        return groups

    def _forward(self, x):
        drive = x.matmul(self.w_x.t())                      # (N, T, H) in one product
        hs = unroll(drive, self.w_h, "tanh").transpose(0, 1).contiguous()   # (N, T, H)
        out = hs.matmul(self.w_y.t())
        return (out if self.b_y is None else out + self.b_y), hs

    def predict(self, x):
        with torch.no_grad():
            return self._forward(x)[0]

    @torch.no_grad()
    def train_step(self, x, y):
        output, hs = self._forward(x)
        loss, grad = loss_and_grad(self.info, output, y, self.p.label_smoothing)
        scale = output.shape[0] * output.shape[1]           # per sample and step
        self.updates(x, hs, -scale * grad, scale)
        return {"loss": loss}

    def slope_step(self, t: int) -> int:
        """Where tanh′ is taken for the error sent back from step t: at t (it feeds e^h_{t−1}
        through W_h at step t)."""
        return t

    def as_grad(self, delta: torch.Tensor, scale: int) -> torch.Tensor:
        """.grad = −Δ, Δ averaged over samples and steps."""
        return -(delta / scale)

    def updates(self, x, hs, e_y, scale):
        fprime = 1.0 - hs * hs                              # f′_t, (N, T, H)
        steps = x.shape[1]
        from_y = e_y.matmul(self.theta_y)                   # Θ_yᵀ e^y_t for every t at once
        e_h = torch.empty_like(hs)
        carried = torch.zeros_like(hs[:, 0])
        for t in range(steps - 1, -1, -1):
            e_h[:, t] = from_y[:, t] + carried
            carried = (e_h[:, t] * fprime[:, self.slope_step(t)]).matmul(self.theta_h)
        g = e_h * fprime
        h_prev = torch.cat([torch.zeros_like(hs[:, :1]), hs[:, :-1]], dim=1)

        def total(a, b):        # Σ_{n,t} a_{n,t}ᵀ b_{n,t}
            return a.reshape(-1, a.shape[-1]).t().matmul(b.reshape(-1, b.shape[-1]))
        self.w_y.grad = self.as_grad(total(e_y, hs), scale)
        if self.b_y is not None:
            self.b_y.grad = self.as_grad(e_y.reshape(-1, e_y.shape[-1]).sum(0), scale)
        self.w_x.grad = self.as_grad(total(g, x), scale)
        self.w_h.grad = self.as_grad(total(g, h_prev), scale)
        if self.learn_theta:
            self.theta_y.grad = self.as_grad(-total(e_y, e_h), scale)
            self.theta_h.grad = self.as_grad(-total(g[:, 1:], e_h[:, :-1]), scale)

    def layer_weights(self):
        return [("input", self.w_x, None), ("recurrent", self.w_h, None),
                ("readout", self.w_y, self.b_y)]

    def feedback_pairs(self):
        return [("recurrent", self.theta_h, self.w_h), ("readout", self.theta_y, self.w_y)]

    def state_dict(self):
        names = ("w_x", "w_h", "w_y", "theta_y", "theta_h") + (("b_y",) if self.b_y is not None
                                                                else ())
        return {name: getattr(self, name).detach() for name in names}


class ReleasedRNN(RecurrentDLL):
    """The released code's RNN: tanh′ taken at step t − 1 where step t's belongs, every Δ
    summed and clipped to ±clip, plain SGD, and a learning-rate schedule with no effect."""

    def optimizer_settings(self, params: TrainParams) -> TrainParams:
        return replace(params, optimizer="sgd", momentum=0.0, lr_decay="none")

    def slope_step(self, t: int) -> int:
        return max(t - 1, 0)

    def as_grad(self, delta, scale):
        return -delta.clamp(-self.p.clip, self.p.clip)


# --------------------------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------------------------

@algorithms.register("dll")
class DLL(Algorithm):
    """Dendritic Localized Learning: soma errors sent down through a learned Θ (Lv et al. 2025)."""

    supports = frozenset({"mlp", "cnn", "rnn"})
    channels_last = True    # its conv steps run faster so on the CPU (harness.nets)
    Params = DLLParams

    def unsupported(self, arch: Arch, params) -> Optional[str]:
        reason = super().unsupported(arch, params)
        if reason:
            return reason
        if arch.kind == "rnn":
            try:
                rnn_layers(arch)
            except ValueError:
                return f"{self.name} trains a single recurrent layer with a dense read-out"
        if params.variant == "released" and arch.kind == "mlp" and not any(
                isinstance(layer, Dense) for layer in arch.layers[:-1]):
            return f"{self.name} variant released needs a hidden dense layer (softmax)"
        return None

    def build(self, arch: Arch, info: TaskInfo, params: DLLParams, ctx: RunContext) -> Learner:
        released = params.variant == "released"
        if arch.kind == "rnn":
            return (ReleasedRNN if released else RecurrentDLL)(arch, info, params, ctx)
        if arch.kind == "mlp" and released:
            return ReleasedMLP(arch, info, replace(params, theta="frozen"), ctx)
        return (ReleasedCNN if released else FeedForwardDLL)(arch, info, params, ctx)


@algorithms.register("dll_fa", aliases=("dll-fa",))
class DLLFA(DLL):
    """DLL-FA: DLL with Θ random and frozen (the paper's Table 3 ablation)."""

    Params = DLLFAParams
