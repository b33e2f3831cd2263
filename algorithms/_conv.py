"""The two contractions of a stride-1 convolution that the local rules take by hand (DLL's,
FA's, the conv DTP's): the error sent to the input through a kernel, and the weight-shaped
correlation of an input with an error — each one ``convolution_backward`` call, as the
autograd backward of ``F.conv2d`` takes them.

``torch.nn.grad.conv2d_input``/``conv2d_weight`` give the same numbers (to the bit, checked in
``tests/test_nets.py``), but they pass the operand they do not need as a one-element tensor
expanded to its shape, which is never channels-last: the CPU backend then takes channels-last
maps through copies. Here the unused operand is an empty tensor in the maps' layout. Measured
on the paper's MNIST CNN at batch 64, one thread, channels-last: the second layer's input error
5.2 → 3.1 ms, its weight sum 3.7 → 3.1 ms; DLL and FA also take both of a layer's contractions
in one call, as BP's backward does.

A module of the plugin package, so the fingerprint of every rule that imports it covers it.
"""
from __future__ import annotations

from typing import Optional

import torch


def _layout(t: torch.Tensor) -> torch.memory_format:
    return (torch.channels_last if t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


def _backward(error, below, kernel, padding: int, mask):
    pad = [padding, padding]
    return torch.ops.aten.convolution_backward(error, below, kernel, None, [1, 1], pad, [1, 1],
                                               False, [0, 0], 1, mask)


def conv_error_below(in_shape, kernel: torch.Tensor, error: torch.Tensor,
                     padding: int) -> torch.Tensor:
    """The error at the input of a conv layer: ``error`` (at its output) sent down through
    ``kernel`` (conv2d's input gradient with that kernel)."""
    layout = _layout(error) if in_shape[1] > 1 else torch.contiguous_format  # as torch's
    below = torch.empty(tuple(in_shape), dtype=error.dtype, device=error.device,
                        memory_format=layout)
    return _backward(error, below, kernel, padding, [True, False, False])[0]


def conv_weight_sum(below: torch.Tensor, shape, error: torch.Tensor,
                    padding: int) -> torch.Tensor:
    """Σ_n corr(below_n, error_n), of the kernel's ``shape``: conv2d's weight gradient."""
    kernel = torch.empty(tuple(shape), dtype=error.dtype, device=error.device,
                         memory_format=_layout(error))
    return _backward(error, below, kernel, padding, [False, True, False])[1]


def conv_error_and_weight_sum(error: torch.Tensor, below: torch.Tensor, kernel: torch.Tensor,
                              padding: int, want_error: bool = True,
                              want_weight: bool = True
                              ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Both in one call: (``error`` sent below through ``kernel``, Σ_n corr(below_n, error_n))
    — the weight sum does not read the kernel's values, only its shape."""
    sent, total, _ = _backward(error, below, kernel, padding, [want_error, want_weight, False])
    return sent, total
