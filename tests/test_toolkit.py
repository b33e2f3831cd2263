"""The shared building blocks: exact output gradients, optimisers by name, layer shapes."""
from __future__ import annotations

import pytest
import torch

from harness.api import Arch, Conv, Dense, Flatten, Pool, TaskInfo
from harness.toolkit import (TrainParams, build_sequential, layer_shapes, loss_and_grad,
                             loss_value, make_optimizer)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(16, 10), (4, 5, 7)])
def test_cross_entropy_grad_matches_autograd(smoothing, shape):
    info = TaskInfo("cross_entropy", shape[-1], (1,))
    out = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, shape[-1], shape[:-1])
    loss = loss_value(info, out, target, smoothing)
    loss.backward()
    value, grad = loss_and_grad(info, out.detach(), target, smoothing)
    assert torch.allclose(value, loss.detach())
    assert torch.allclose(grad, out.grad)


def test_mse_grad_matches_autograd():
    info = TaskInfo("mse", 3, (1,))
    out = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 6, 3, dtype=torch.float64)
    loss_value(info, out, target).backward()
    assert torch.allclose(loss_and_grad(info, out.detach(), target)[1], out.grad)


def test_optimizers_by_name():
    w = torch.nn.Parameter(torch.ones(3))
    for name, cls in (("adam", torch.optim.Adam), ("sgd", torch.optim.SGD),
                      ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)):
        opt, scheds = make_optimizer([w], TrainParams(optimizer=name, lr_decay="none"), 5)
        assert isinstance(opt, cls) and scheds == []


def test_paper_cnn_shapes():
    arch = Arch("cnn", (1, 28, 28), (Conv(32, 5), Pool("max", 2), Conv(64, 3), Pool("max", 2),
                                     Conv(16, 3), Flatten(), Dense(200), Dense(10, "linear")), 10)
    shapes = [out for _, _, out in layer_shapes(arch)]
    assert shapes[5] == (144,)
    net = build_sequential(arch, 0.05)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert all(m.bias is None for m in net if hasattr(m, "bias"))
