"""The RNN architecture made concrete: one tanh recurrent layer and a linear read-out at every
time step, no biases (the DLL paper's RNN, DLL.md §3).

    h_t = tanh(W_x x_t + W_h h_{t-1}),  h_0 = 0,  y_t = W_y h_t

Built from an :class:`~harness.api.Arch` whose layers are ``(Recurrent(hidden), Dense(out,
"linear"))`` and whose input shape is ``(T, D)``. The underscore keeps the plugin scanner from
importing it as a plugin.

Backpropagation through time is written out in :class:`_Recurrence` rather than left to autograd
on a Python loop: the input drive ``W_x x_t`` of every step is one matmul before the loop, the
forward loop only does ``addmm`` + tanh into a preallocated time-major buffer, the backward loop
only ``δ_t = (g_t + δ_{t+1} W_h) ⊙ f′(h_t)``, and ``∂L/∂W_h = Σ_t δ_tᵀ h_{t−1}`` is a single matmul
after it. Autograd on the per-step graph costs about 1.8× a bare ``torch.nn.RNN`` on CPU; this
is at parity (``benchmarks/bench_bptt.py``). ``tests/test_bptt.py`` checks the gradients against
an independently unrolled network in float64.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from harness.api import Arch, Dense, Recurrent
from harness.toolkit import activation, init_weight


def rnn_layers(arch: Arch) -> tuple[Recurrent, Dense]:
    """The (recurrent, read-out) pair of an RNN arch, or a ValueError saying what is wrong."""
    layers = arch.layers
    if len(layers) != 2 or not isinstance(layers[0], Recurrent) \
            or not isinstance(layers[1], Dense) or len(arch.input_shape) != 2:
        raise ValueError(f"{arch.name}: the RNN is input (T, D) > Recurrent(hidden) > "
                         f"Dense(out, 'linear'); got {arch.describe()}")
    return layers[0], layers[1]


class _Recurrence(torch.autograd.Function):
    """states = recurrence(drive, W_h): h_t = f(drive_t + W_h h_{t−1}), h_0 = 0, with BPTT as
    its backward. drive and the returned states are (N, T, H)."""

    @staticmethod
    def forward(ctx, drive: torch.Tensor, w_h: torch.Tensor, act: str):
        f, _ = activation(act)
        steps = drive.shape[1]
        by_time = drive.transpose(0, 1)                       # (T, N, H) view
        states = torch.empty_like(by_time, memory_format=torch.contiguous_format)
        w_h_t = w_h.t()
        h = None
        for t in range(steps):
            out = states[t]
            if h is None:
                out.copy_(by_time[t])
            else:
                torch.addmm(by_time[t], h, w_h_t, out=out)
            if act == "tanh":
                out.tanh_()
            else:
                out.copy_(f(out))
            h = out
        ctx.act = act
        ctx.save_for_backward(w_h, states)
        return states.transpose(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_states: torch.Tensor):
        w_h, states = ctx.saved_tensors
        _, f_prime = activation(ctx.act)
        steps, hidden = states.shape[0], states.shape[2]
        slope = f_prime(states)                               # f′ at every step, one op
        grad_by_time = grad_states.transpose(0, 1)
        deltas = torch.empty_like(states)                     # ∂L/∂(pre-activation) per step
        for t in reversed(range(steps)):
            out = deltas[t]
            if t == steps - 1:
                out.copy_(grad_by_time[t])
            else:
                torch.addmm(grad_by_time[t], deltas[t + 1], w_h, out=out)
            out.mul_(slope[t])
        grad_w_h = None
        if ctx.needs_input_grad[1]:
            grad_w_h = deltas[1:].reshape(-1, hidden).t() @ states[:-1].reshape(-1, hidden)
        return deltas.transpose(0, 1), grad_w_h, None


class RNNNet(nn.Module):
    """Single-layer tanh RNN with a linear read-out at every step: (N, T, D) -> (N, T, out)."""

    def __init__(self, arch: Arch, init_std: float = 0.05):
        super().__init__()
        recurrent, readout = rnn_layers(arch)
        d_in, hidden, out = arch.input_shape[-1], recurrent.hidden, readout.units
        self.act_name = recurrent.act
        self.out_act = readout.act
        self.w_x = nn.Parameter(init_weight((hidden, d_in), init_std))
        self.w_h = nn.Parameter(init_weight((hidden, hidden), init_std))
        self.w_y = nn.Parameter(init_weight((out, hidden), init_std))

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """h_1 … h_T as (N, T, hidden)."""
        drive = x @ self.w_x.t()                     # input part of every step in one matmul
        return _Recurrence.apply(drive, self.w_h, self.act_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, _ = activation(self.out_act)
        return f(self.hidden_states(x) @ self.w_y.t())
