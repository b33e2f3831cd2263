"""The RNN architecture made concrete: one tanh recurrent layer and a linear read-out at every
time step, no biases (the DLL paper's RNN, DLL.md §3).

    h_t = tanh(W_x x_t + W_h h_{t-1}),  h_0 = 0,  y_t = W_y h_t

Built from an :class:`~harness.api.Arch` whose layers are ``(Recurrent(hidden), Dense(out,
"linear"))`` and whose input shape is ``(T, D)``. Backpropagation through time is autograd on
this module. The underscore keeps the plugin scanner from importing it as a plugin.
"""
from __future__ import annotations

import torch
from torch import nn

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
        f, _ = activation(self.act_name)
        drive = x @ self.w_x.t()                     # input part of every step in one matmul
        h = x.new_zeros(x.shape[0], self.w_h.shape[0])
        w_h_t = self.w_h.t()
        states = []
        for t in range(x.shape[1]):
            h = f(torch.addmm(drive[:, t], h, w_h_t))
            states.append(h)
        return torch.stack(states, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, _ = activation(self.out_act)
        return f(self.hidden_states(x) @ self.w_y.t())
