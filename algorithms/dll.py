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

``variant: released`` reproduces the authors' code (DLL.md §5): the MLP in its outer form
(tanh on each layer's input, softmax on the last hidden layer, linear output, MSE-type error,
Θ never trained), Θ updated with a + sign in the CNN, errors clipped to ±clip, updates summed
over the batch, doubled and clipped before an Adam ascent step, and the RNN with tanh′ taken
at step t, plain SGD and no schedule. The released conv ΔΘ (a reshape without a permute) is not
copied: the intended contraction is used. DLL-FA (paper Table 3) is ``theta: frozen``,
registered as ``dll_fa``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from harness.api import (Algorithm, Arch, Conv, Dense, Flatten, Learner, Pool, Recurrent,
                         RunContext, TaskInfo, param)
from harness.registry import algorithms
from harness.toolkit import (TrainParams, activation, init_weight, layer_shapes, loss_and_grad,
                             loss_value, make_optimizer, weight_shape)


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

def _avg_pool_adjoint(err: torch.Tensor, size: int, in_shape: torch.Size) -> torch.Tensor:
    spread = err.repeat_interleave(size, dim=2).repeat_interleave(size, dim=3) / (size * size)
    pad_h, pad_w = in_shape[-2] - spread.shape[-2], in_shape[-1] - spread.shape[-1]
    return F.pad(spread, (0, pad_w, 0, pad_h)) if pad_h or pad_w else spread


def _contract(spec, shape, g: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """Σ_n g_nᵀ b_n: a dense layer's weight-shaped contraction of the error at its output with
    a tensor at its input (u for ΔW, ξ for ΔΘ); conv2d's weight gradient for a conv layer."""
    if isinstance(spec, Dense):
        return g.t().matmul(below)
    return conv2d_weight(below, shape, g, padding=spec.padding)


class FeedForwardDLL(Learner):
    """DLL on a stack of dense/conv/pool/flatten layers (the last dense is the output)."""

    def __init__(self, arch: Arch, info: TaskInfo, p: DLLParams, ctx: RunContext):
        self.info, self.p, self.released = info, p, p.variant == "released"
        device = torch.device(ctx.device)
        self.layers = []          # (spec, W or None, Θ or None)
        weights, thetas = [], []
        first_weighted = True
        for spec, in_shape, _ in layer_shapes(arch):
            shape = weight_shape(spec, in_shape)
            if shape is None:
                self.layers.append((spec, None, None))
                continue
            w = torch.nn.Parameter(init_weight(shape, p.init_std, device=device))
            theta = None
            if not first_weighted:  # no error is sent below the first weighted layer
                std = p.theta_init_std if isinstance(spec, Dense) else p.theta_init_std_conv
                theta = torch.nn.Parameter(init_weight(shape, std, device=device))
                thetas.append(theta)
            weights.append(w)
            self.layers.append((spec, w, theta))
            first_weighted = False
        self.weights, self.thetas = weights, thetas
        self.learn_theta = p.theta == "learn" and bool(thetas)
        groups = [{"params": weights}]
        if self.learn_theta:
            groups.append({"params": thetas, "lr": p.lr * p.theta_lr_ratio})
        self.optimizer, self.schedulers = make_optimizer(groups, p, ctx.epochs)

    def _forward(self, x: torch.Tensor, keep: bool):
        cache = []
        h = x
        for spec, w, _ in self.layers:
            extra = None
            if isinstance(spec, Dense):
                out = activation(spec.act)[0](h.matmul(w.t()))
            elif isinstance(spec, Conv):
                out = activation(spec.act)[0](F.conv2d(h, w, padding=spec.padding))
            elif isinstance(spec, Pool) and spec.kind == "max":
                out, extra = F.max_pool2d(h, spec.size, return_indices=True)
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
        self.optimizer.step()
        return {"loss": loss}

    def updates(self, cache, err: torch.Tensor, n: int) -> None:
        """The top-down sweep from the output error ``err`` (per sample): sets every .grad."""
        clip = self.p.clip if self.released else None
        last = len(self.layers) - 1
        for index in range(last, -1, -1):
            spec, w, theta = self.layers[index]
            inp, out, extra = cache[index]
            if w is None:   # pools and flatten only route the error
                if isinstance(spec, Flatten):
                    err = err.reshape(inp.shape)
                elif spec.kind == "max":
                    err = F.max_unpool2d(err, extra, spec.size, output_size=inp.shape[-2:])
                else:
                    err = _avg_pool_adjoint(err, spec.size, inp.shape)
                continue
            g = err if spec.act == "linear" else err * activation(spec.act)[1](out)
            # .grad = −Δ. Paper: the batch mean, folded into the small error tensor before the
            # contraction (no extra pass over the weights). Released: the batch sum, doubled,
            # clipped.
            if clip is None:
                w.grad = _contract(spec, w.shape, g * (-1.0 / n), inp)
            else:
                w.grad = -(2.0 * _contract(spec, w.shape, g, inp)).clamp(-clip, clip)
            if theta is None:
                break       # the first weighted layer: nothing below needs an error
            if isinstance(spec, Dense):
                below = g.matmul(theta)
            else:
                below = conv2d_input(inp.shape, theta, g, padding=spec.padding)
            if clip is not None:
                below = below.clamp(-clip, clip)
            if self.learn_theta:
                if clip is None:    # ΔΘ = −⟨gᵀξ⟩ shrinks ‖ξ‖² (the paper's sign)
                    theta.grad = _contract(spec, theta.shape, g * (1.0 / n), below)
                else:               # released: ΔΘ = +Σ gᵀξ, growing ‖ξ‖
                    theta.grad = -(2.0 * _contract(spec, theta.shape, g, below)).clamp(-clip, clip)
            err = below

    def state_dict(self):
        state = {f"W{i}": w.detach() for i, w in enumerate(self.weights)}
        state.update({f"Theta{i + 1}": t.detach() for i, t in enumerate(self.thetas)})
        return state


class ReleasedMLP(FeedForwardDLL):
    """The released code's MLP: u_{i+1} = f_i(u_i) W_iᵀ with f = tanh on every layer's input
    (raw pixels included) but softmax on the last hidden layer, a linear output and the error
    y_smooth − u_L; Θ (N(0, 1)) never trains. The softmax's derivative is taken elementwise,
    s(1 − s), as in the released code's per-unit error."""

    def _transfer(self, index: int):
        dense = [i for i, (s, _, _) in enumerate(self.layers) if isinstance(s, Dense)]
        if index == dense[-1]:
            return (lambda u: torch.softmax(u, dim=1)), (lambda z: z * (1.0 - z))
        return activation("tanh")

    def _forward(self, x, keep):
        cache, h = [], x
        for index, (spec, w, _) in enumerate(self.layers):
            if isinstance(spec, Dense):
                z = self._transfer(index)[0](h)
                out = z.matmul(w.t())
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
            spec, w, theta = self.layers[index]
            inp, _, z = cache[index]
            if not isinstance(spec, Dense):
                continue
            w.grad = -(2.0 * err.t().matmul(z)).clamp(-clip, clip)
            if theta is None:
                break
            derivative = self._transfer(index)[1](z)
            err = (err.matmul(theta) * derivative).clamp(-clip, clip)
        self.optimizer.step()
        return {"loss": loss_value(self.info, output, y)}


# --------------------------------------------------------------------------------------------
# The single-layer tanh RNN, through time
# --------------------------------------------------------------------------------------------

class RecurrentDLL(Learner):
    """h_t = tanh(W_x x_t + W_h h_{t−1}), y_t = W_y h_t; errors backwards in time through Θ_y, Θ_h:
    e^h_t = e^y_t Θ_y + (e^h_{t+1} ⊙ f′_{t+1}) Θ_h; ΔW_x = Σ_t g_tᵀ x_t, ΔW_h = Σ_t g_tᵀ h_{t−1},
    ΔW_y = Σ_t e^y_tᵀ h_t with g_t = e^h_t ⊙ f′_t; ΔΘ_y = −Σ_t e^y_tᵀ e^h_t,
    ΔΘ_h = −Σ_{t≥2} g_tᵀ e^h_{t−1}."""

    def __init__(self, arch: Arch, info: TaskInfo, p: DLLParams, ctx: RunContext):
        self.info, self.p, self.released = info, p, p.variant == "released"
        recurrent, readout = arch.layers
        steps, inputs = arch.input_shape
        hidden, out = recurrent.hidden, readout.units
        device = torch.device(ctx.device)

        def new(shape, std):
            return torch.nn.Parameter(init_weight(shape, std, device=device))
        self.w_x, self.w_h, self.w_y = (new((hidden, inputs), p.init_std),
                                        new((hidden, hidden), p.init_std),
                                        new((out, hidden), p.init_std))
        self.theta_y = new((out, hidden), p.theta_init_std_conv)
        self.theta_h = new((hidden, hidden), p.theta_init_std_conv)
        self.learn_theta = p.theta == "learn"
        groups = [{"params": [self.w_x, self.w_h, self.w_y]}]
        if self.learn_theta:
            groups.append({"params": [self.theta_y, self.theta_h], "lr": p.lr * p.theta_lr_ratio})
        # released: plain SGD and a schedule that has no effect
        opt_params = replace(p, optimizer="sgd", momentum=0.0, lr_decay="none") if self.released else p
        self.optimizer, self.schedulers = make_optimizer(groups, opt_params, ctx.epochs)

    def _forward(self, x):
        drive = x.matmul(self.w_x.t())                      # (N, T, H) in one product
        h = torch.zeros(x.shape[0], self.w_h.shape[0], device=x.device, dtype=x.dtype)
        states = []
        for t in range(x.shape[1]):
            h = torch.tanh(drive[:, t] + h.matmul(self.w_h.t()))
            states.append(h)
        hs = torch.stack(states, dim=1)                     # (N, T, H)
        return hs.matmul(self.w_y.t()), hs

    def predict(self, x):
        with torch.no_grad():
            return self._forward(x)[0]

    @torch.no_grad()
    def train_step(self, x, y):
        output, hs = self._forward(x)
        loss, grad = loss_and_grad(self.info, output, y, self.p.label_smoothing)
        scale = output.shape[0] * output.shape[1]           # per sample and step
        self.updates(x, hs, -scale * grad, scale)
        self.optimizer.step()
        return {"loss": loss}

    def updates(self, x, hs, e_y, scale):
        clip = self.p.clip if self.released else None
        fprime = 1.0 - hs * hs                              # f′_t, (N, T, H)
        steps = x.shape[1]
        from_y = e_y.matmul(self.theta_y)                   # Θ_yᵀ e^y_t for every t at once
        e_h = torch.empty_like(hs)
        carried = torch.zeros_like(hs[:, 0])
        for t in range(steps - 1, -1, -1):
            e_h[:, t] = from_y[:, t] + carried
            # paper: tanh′ at step t (it feeds e^h_{t−1} through W_h at t); released: at t−1
            k = t if not self.released else max(t - 1, 0)
            carried = (e_h[:, t] * fprime[:, k]).matmul(self.theta_h)
        g = e_h * fprime
        h_prev = torch.cat([torch.zeros_like(hs[:, :1]), hs[:, :-1]], dim=1)

        def total(a, b):        # Σ_{n,t} a_{n,t}ᵀ b_{n,t}
            return a.reshape(-1, a.shape[-1]).t().matmul(b.reshape(-1, b.shape[-1]))

        def as_grad(delta):
            return -(delta / scale if clip is None else delta.clamp(-clip, clip))
        self.w_y.grad = as_grad(total(e_y, hs))
        self.w_x.grad = as_grad(total(g, x))
        self.w_h.grad = as_grad(total(g, h_prev))
        if self.learn_theta:
            self.theta_y.grad = as_grad(-total(e_y, e_h))
            self.theta_h.grad = as_grad(-total(g[:, 1:], e_h[:, :-1]))

    def state_dict(self):
        return {name: getattr(self, name).detach()
                for name in ("w_x", "w_h", "w_y", "theta_y", "theta_h")}


# --------------------------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------------------------

@algorithms.register("dll")
class DLL(Algorithm):
    """Dendritic Localized Learning: soma errors sent down through a learned Θ (Lv et al. 2025)."""

    supports = frozenset({"mlp", "cnn", "rnn"})
    Params = DLLParams

    def unsupported(self, arch: Arch, params) -> Optional[str]:
        reason = super().unsupported(arch, params)
        if reason:
            return reason
        if arch.kind == "rnn" and not (len(arch.layers) == 2 and isinstance(arch.layers[0], Recurrent)
                                       and isinstance(arch.layers[1], Dense)):
            return f"{self.name} trains a single recurrent layer with a dense read-out"
        if params.variant == "released" and arch.kind == "mlp" and not any(
                isinstance(layer, Dense) for layer in arch.layers[:-1]):
            return f"{self.name} variant released needs a hidden dense layer (softmax)"
        return None

    def build(self, arch: Arch, info: TaskInfo, params: DLLParams, ctx: RunContext) -> Learner:
        if arch.kind == "rnn":
            return RecurrentDLL(arch, info, params, ctx)
        if arch.kind == "mlp" and params.variant == "released":
            return ReleasedMLP(arch, info, replace(params, theta="frozen"), ctx)
        return FeedForwardDLL(arch, info, params, ctx)


@algorithms.register("dll_fa", aliases=("dll-fa",))
class DLLFA(DLL):
    """DLL-FA: DLL with Θ random and frozen (the paper's Table 3 ablation)."""

    Params = DLLFAParams
