"""DLL: with Θ = W and Θ frozen the updates are backprop's gradients (dense, conv, RNN through
time); the conv ΔΘ is the intended contraction; the Θ step has the paper's sign; DLL-FA never
changes Θ; the released variant matches a hand computation of the released rules."""
from __future__ import annotations

import pytest
import torch

from harness.api import Arch, Conv, Dense, Flatten, Pool, Recurrent, RunContext, TaskInfo
from harness.registry import algorithms
from harness.runner import Stepper
from harness.toolkit import loss_value

CE = TaskInfo("cross_entropy", 3, (1, 6, 6))


@pytest.fixture(autouse=True)
def _float64():
    """Exactness tests in double precision (restored after each test)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def build(arch, info=CE, name="dll", **params):
    """A learner whose train_step sets the .grads (the harness would step them; here we look)."""
    alg = algorithms.get(name)
    return alg.build(arch, info, alg.Params(**params), RunContext(epochs=2))


def tie_theta_to_w(learner):
    with torch.no_grad():
        for _, w, theta, _ in learner.layers:
            if theta is not None:
                theta.copy_(w)


def autograd_grads(arch, weights, x, y, info=CE, smoothing=0.0, biases=()):
    """BP's gradients (weights, then biases) on an independently written forward pass."""
    ws = [w.detach().clone().requires_grad_() for w in weights]
    bs = [b.detach().clone().requires_grad_() for b in biases]
    h, k, j = x, 0, 0
    for layer in arch.layers:
        if isinstance(layer, Dense):
            h = h @ ws[k].t()
            if layer.bias:
                h, j = h + bs[j], j + 1
            k += 1
        elif isinstance(layer, Conv):
            h = torch.nn.functional.conv2d(h, ws[k], bs[j] if layer.bias else None,
                                           padding=layer.padding)
            j += int(layer.bias)
            k += 1
        elif isinstance(layer, Pool):
            h = (torch.nn.functional.max_pool2d if layer.kind == "max"
                 else torch.nn.functional.avg_pool2d)(h, layer.size)
            continue
        else:
            h = h.flatten(1)
            continue
        if layer.act == "tanh":
            h = torch.tanh(h)
    loss_value(info, h, y, smoothing).backward()
    return [w.grad for w in ws] + [b.grad for b in bs]


MLP = Arch("mlp", (1, 6, 6), (Flatten(), Dense(10), Dense(7), Dense(3, "linear")), 3)
CNN = Arch("cnn", (1, 6, 6), (Conv(4, 3, 1), Pool("max", 2), Conv(5, 2), Pool("avg", 2),
                              Flatten(), Dense(6), Dense(3, "linear")), 3)
MLP_BIAS = Arch("mlpb", (1, 6, 6), (Flatten(), Dense(10, bias=True), Dense(7),
                                    Dense(3, "linear", bias=True)), 3)
CNN_BIAS = Arch("cnnb", (1, 6, 6), (Conv(4, 3, 1, bias=True), Pool("max", 2), Conv(5, 2),
                                    Pool("avg", 2), Flatten(), Dense(6, bias=True),
                                    Dense(3, "linear")), 3)


@pytest.mark.parametrize("arch", [MLP, CNN, MLP_BIAS, CNN_BIAS],
                         ids=["dense", "conv", "dense+bias", "conv+bias"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_theta_equal_w_gives_backprop_gradients(arch, smoothing):
    torch.manual_seed(0)
    learner = build(arch, theta="frozen", label_smoothing=smoothing, init_std=0.3)
    tie_theta_to_w(learner)
    with torch.no_grad():                       # biases away from 0, so they matter
        for b in learner.biases:
            b.normal_(0, 0.3)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    learner.train_step(x, y)
    expected = autograd_grads(arch, learner.weights, x, y, smoothing=smoothing,
                              biases=learner.biases)
    mine = learner.weights + learner.biases
    assert len(mine) == len(expected) and len(learner.biases) == sum(
        getattr(layer, "bias", False) for layer in arch.layers)
    for w, g in zip(mine, expected):
        assert torch.allclose(w.grad, g, atol=1e-12, rtol=1e-9)
    assert all(t.grad is None for t in learner.thetas)      # frozen: no Θ update


@pytest.mark.parametrize("bias", [False, True], ids=["plain", "readout bias"])
def test_rnn_theta_equal_w_gives_bptt_gradients(bias):
    torch.manual_seed(1)
    steps, inputs, hidden, out = 5, 3, 6, 4
    arch = Arch("rnn", (steps, inputs), (Recurrent(hidden), Dense(out, "linear", bias=bias)),
                out)
    info = TaskInfo("cross_entropy", out, (steps, inputs), sequence=True)
    learner = build(arch, info, theta="frozen", init_std=0.4, label_smoothing=0.0)
    with torch.no_grad():
        learner.theta_y.copy_(learner.w_y)
        learner.theta_h.copy_(learner.w_h)
        if bias:
            learner.b_y.normal_(0, 0.3)
    x, y = torch.randn(4, steps, inputs), torch.randint(0, out, (4, steps))
    learner.train_step(x, y)
    mine = [learner.w_x, learner.w_h, learner.w_y] + ([learner.b_y] if bias else [])
    refs = [p.detach().clone().requires_grad_() for p in mine]
    w_x, w_h, w_y = refs[:3]
    h, outs = torch.zeros(4, hidden), []
    for t in range(steps):                                    # the unrolled network
        h = torch.tanh(x[:, t] @ w_x.t() + h @ w_h.t())
        outs.append(h @ w_y.t() + (refs[3] if bias else 0.0))
    loss_value(info, torch.stack(outs, 1), y).backward()
    for got, ref in zip(mine, refs):
        assert torch.allclose(got.grad, ref.grad, atol=1e-12, rtol=1e-9)


def test_conv_theta_update_is_the_intended_contraction():
    """ΔΘ = −⟨Σ_positions g[n, f, p] · ξ-patch[n, c, p + (i, j)]⟩ (einsum over unfolded patches
    of the error sent below), not the released code's reshape."""
    torch.manual_seed(2)
    arch = Arch("c", (2, 5, 5), (Conv(3, 2), Conv(4, 3, 1), Flatten(), Dense(3, "linear")), 3)
    learner = build(arch, TaskInfo("cross_entropy", 3, (2, 5, 5)), init_std=0.3)
    tie_theta_to_w(learner)                # so the error reaching conv 2 is BP's, by autograd
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    learner.train_step(x, y)
    w1, w2, w3 = (w.detach().clone().requires_grad_() for w in learner.weights)
    conv = torch.nn.functional.conv2d
    h1 = torch.tanh(conv(x, w1))
    a2 = conv(h1, w2, padding=1)
    out = torch.tanh(a2).flatten(1) @ w3.t()
    g = -len(y) * torch.autograd.grad(loss_value(learner.info, out, y, 0.1), a2)[0]
    theta = learner.layers[1][2]
    xi = torch.nn.grad.conv2d_input(h1.shape, theta.detach(), g, padding=1)
    patches = torch.nn.functional.unfold(torch.nn.functional.pad(xi, (1, 1, 1, 1)), 3)
    delta = -torch.einsum("nfp,nkp->fk", g.flatten(2), patches).reshape(theta.shape) / len(y)
    assert torch.allclose(theta.grad, -delta, atol=1e-12)


@pytest.mark.parametrize("variant,shrinks", [("paper", True), ("released", False)])
def test_theta_step_has_the_papers_sign(variant, shrinks):
    """A small optimiser step on Θ shrinks ‖ξ‖² of the layer below (paper); released grows it."""
    from harness.toolkit import loss_and_grad
    torch.manual_seed(3)
    arch = Arch("m", (5,), (Dense(6), Dense(3, "linear")), 3)
    learner = build(arch, TaskInfo("cross_entropy", 3, (5,)), variant=variant, init_std=0.3)
    if variant == "released":   # the released MLP never trains Θ; its CNN rule is used here
        from algorithms.dll import ReleasedCNN
        alg = algorithms.get("dll")
        learner = ReleasedCNN(arch, learner.info, alg.Params(variant="released", init_std=0.3),
                              RunContext(epochs=2))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    output, _ = learner._forward(x, keep=False)
    g = -len(y) * loss_and_grad(learner.info, output, y, 0.1)[1]
    learner.train_step(x, y)
    theta = learner.thetas[0].detach()
    before = (g @ theta).pow(2).sum()
    after = (g @ (theta - 1e-4 * learner.thetas[0].grad)).pow(2).sum()
    assert (after < before) == shrinks


@pytest.mark.parametrize("name,changes", [("dll", True), ("dll_fa", False)])
def test_dll_fa_leaves_theta_unchanged_and_dll_changes_it(name, changes):
    torch.manual_seed(4)
    alg = algorithms.get(name)
    params = alg.Params(lr=1e-2)
    learner = alg.build(CNN, CE, params, RunContext(epochs=2))
    stepper = Stepper(learner, params, epochs=2)
    before = [t.detach().clone() for t in learner.thetas]
    weights_before = [w.detach().clone() for w in learner.weights]
    for _ in range(3):
        stepper.step(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)))
    moved = [not torch.equal(b, t) for b, t in zip(before, learner.thetas)]
    assert all(moved) if changes else not any(moved)
    assert all(not torch.equal(b, w) for b, w in zip(weights_before, learner.weights))


def test_released_mlp_matches_a_hand_computation():
    """Outer form u1 = tanh(x) W0ᵀ, u2 = softmax(u1) W1ᵀ; e = y_smooth − u2; ΔW summed over the
    batch, doubled, clipped (to ±0.5 here so the clip acts); hidden error through frozen Θ1,
    clipped, times no softmax derivative: the released model.py gives the softmax layer
    df=linear_deriv (an earlier port multiplied by s(1 − s) and learned 30 points below)."""
    arch = Arch("m", (2,), (Dense(3), Dense(2, "linear")), 2)
    info = TaskInfo("cross_entropy", 2, (2,))
    learner = build(arch, info, variant="released", clip=0.5, label_smoothing=0.1)
    w0 = torch.tensor([[0.1, -0.2], [0.3, 0.0], [-0.1, 0.2]])
    w1 = torch.tensor([[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]])
    th1 = torch.tensor([[1.0, -1.0, 0.5], [0.5, 2.0, -1.0]])
    with torch.no_grad():
        learner.weights[0].copy_(w0)
        learner.weights[1].copy_(w1)
        learner.thetas[0].copy_(th1)
    x = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    y = torch.tensor([0, 1])
    learner.train_step(x, y)
    z0 = torch.tanh(x)
    u1 = z0 @ w0.t()
    z1 = torch.softmax(u1, dim=1)
    u2 = z1 @ w1.t()
    target = torch.tensor([[0.95, 0.05], [0.05, 0.95]])
    e2 = target - u2
    d_w1 = (2 * e2.t() @ z1).clamp(-0.5, 0.5)
    e1 = (e2 @ th1).clamp(-0.5, 0.5)
    d_w0 = (2 * e1.t() @ z0).clamp(-0.5, 0.5)
    assert torch.allclose(learner.weights[1].grad, -d_w1)
    assert torch.allclose(learner.weights[0].grad, -d_w0)
    assert learner.thetas[0].grad is None          # Θ never trains in the released MLP
    assert (d_w0.abs() == 0.5).any() or (d_w1.abs() == 0.5).any()   # the clip did act


def test_released_rnn_uses_sgd_and_clips():
    arch = Arch("rnn", (4, 2), (Recurrent(3), Dense(2, "linear")), 2)
    info = TaskInfo("mse", 2, (4, 2), sequence=True)
    alg = algorithms.get("dll")
    params = alg.Params(variant="released", clip=1e-3, lr=0.1)
    learner = alg.build(arch, info, params, RunContext(epochs=2))
    stepper = Stepper(learner, params, epochs=2)
    assert isinstance(stepper.optimizer, torch.optim.SGD) and stepper.schedules == []
    assert stepper.optimizer.defaults["momentum"] == 0.0
    learner.train_step(torch.randn(3, 4, 2), torch.randn(3, 4, 2))
    for p in (learner.w_x, learner.w_h, learner.w_y, learner.theta_y, learner.theta_h):
        assert p.grad.abs().max() <= 1e-3 + 1e-15


def test_unsupported_rnn_shape_is_a_reason():
    arch = Arch("rnn2", (4, 2), (Recurrent(3), Recurrent(3), Dense(2, "linear")), 2)
    assert "single recurrent layer" in algorithms.get("dll").unsupported(arch, algorithms.get("dll").Params())
