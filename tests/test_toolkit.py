"""The shared building blocks: exact output gradients, optimisers by name, layer shapes."""
from __future__ import annotations

import pytest
import torch

from harness.api import Arch, Conv, Dense, Flatten, Pool, TaskInfo, TrainParams
from harness.nets import build_sequential
from harness.runner import Stepper
from harness.toolkit import layer_shapes, loss_and_grad, loss_value, make_optimizer


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


def test_every_algorithm_steps_the_same_fused_optimiser():
    """Fairness and speed: the fused kernel for every learner on CPU (DLL's Θ group included),
    torch's default for tensors it cannot fuse, and the fused step equals the plain one."""
    from harness.api import RunContext
    from harness.registry import algorithms, discover
    discover()
    arch = Arch("mlp", (1, 4, 4), (Flatten(), Dense(6), Dense(3, "linear")), 3)
    info = TaskInfo(loss="cross_entropy", output_size=3, input_shape=(1, 4, 4))
    ctx = RunContext(epochs=2)
    for name in ("bp", "dll", "fa", "dfa", "pc", "dtp"):
        alg = algorithms.get(name)
        learner = alg.build(arch, info, alg.Params(), ctx)
        stepper = Stepper(learner, alg.Params(), 2)      # the harness's, as a run builds it
        assert stepper.optimizer.defaults["fused"] is True, name
        assert not any(isinstance(v, torch.optim.Optimizer) for k, v in vars(learner).items()
                       if k != "inverse_optimizer"), name   # no learner builds its own
    assert learner.inverse_optimizer.defaults["fused"] is True   # DTP's inverses, same kernel
    opt, _ = make_optimizer([torch.ones(2, dtype=torch.int64)], TrainParams(), 2)
    assert not opt.defaults["fused"]                       # integers: torch's default step
    torch.manual_seed(0)
    start, grads = torch.randn(5, 4), [torch.randn(5, 4) for _ in range(3)]
    finals = []
    for build in (lambda w: make_optimizer([w], TrainParams(lr=1e-2, lr_decay="none"), 2)[0],
                  lambda w: torch.optim.Adam([w], lr=1e-2)):
        w = torch.nn.Parameter(start.clone())
        opt = build(w)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        finals.append(w.detach())
    assert torch.allclose(finals[0], finals[1], atol=1e-6)


def test_paper_cnn_shapes():
    arch = Arch("cnn", (1, 28, 28), (Conv(32, 5), Pool("max", 2), Conv(64, 3), Pool("max", 2),
                                     Conv(16, 3), Flatten(), Dense(200), Dense(10, "linear")), 10)
    shapes = [out for _, _, out in layer_shapes(arch)]
    assert shapes[5] == (144,)
    net = build_sequential(arch, 0.05)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert all(m.bias is None for m in net if hasattr(m, "bias"))
