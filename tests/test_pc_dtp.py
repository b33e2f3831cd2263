"""Predictive coding and difference target propagation: PC with fixed predictions converges to
BP's gradients as T grows, PC inference lowers the energy, DTP's targets follow the
difference-correction formula, DTP's inverse loss falls. Tiny nets and synthetic tensors."""
from __future__ import annotations

import pytest
import torch

from algorithms.dtp import (DTPLearner, DTPNetwork, DTPParams, difference_targets,
                            inverse_loss)
from algorithms.pc import PCParams, build_pc_network, inference
from harness.api import Arch, Conv, Dense, Flatten, Pool, Recurrent, RunContext, TaskInfo
from harness.registry import algorithms
from harness.runner import Stepper
from harness.toolkit import loss_value

INFO = TaskInfo(loss="cross_entropy", output_size=5, input_shape=(1, 8, 8))
MLP = Arch("mlp", (1, 8, 8), (Flatten(), Dense(12), Dense(9), Dense(5, "linear")), 5)
CNN = Arch("cnn", (1, 8, 8), (Conv(4, 3, 1), Pool("max", 2), Conv(6, 3), Pool("avg", 2),
                              Flatten(), Dense(7), Dense(5, "linear")), 5)
RNN_INFO = TaskInfo(loss="cross_entropy", output_size=3, input_shape=(6, 4), sequence=True)
RNN = Arch("rnn", (6, 4), (Recurrent(8), Dense(3, "linear")), 3)
CASES = {"mlp": (MLP, INFO, (11, 1, 8, 8), 5), "cnn": (CNN, INFO, (11, 1, 8, 8), 5),
         "rnn": (RNN, RNN_INFO, (5, 6, 4), 3)}


def _case(name, seed=0):
    arch, info, x_shape, classes = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g)
    y_shape = x_shape[:2] if info.sequence else x_shape[:1]
    return arch, info, x, torch.randint(0, classes, y_shape, generator=g)


def _relative_error(grads, reference):
    num = sum((g - r).pow(2).sum() for g, r in zip(grads, reference))
    return float((num / sum(r.pow(2).sum() for r in reference)).sqrt())


@pytest.mark.parametrize("name", ["mlp", "cnn", "rnn"])
def test_pc_with_fixed_predictions_converges_to_bp_gradients(name):
    """The error to BP's (BPTT's) gradient falls monotonically with T and is < 1e-3 at T = 60
    (state step 0.3): with fixed predictions each hidden error is BP's δ times the step
    response of a cascade of first-order filters, which rises monotonically to 1."""
    torch.manual_seed(0)
    arch, info, x, y = _case(name)
    net = build_pc_network(arch, 0.3)
    loss_value(info, net(x), y).backward()
    bp = [w.grad.clone() for w in net.parameters()]
    errors = []
    for steps in (0, 2, 5, 10, 20, 40, 60):
        grads, _, _ = inference(net, x, y, info, steps, 0.3, fixed_predictions=True)
        errors.append(_relative_error(grads, bp))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors
    assert errors[0] > 0.3, errors  # T = 0 leaves the hidden layers without error: far from BP


@pytest.mark.parametrize("name", ["mlp", "cnn", "rnn"])
def test_pc_energy_decreases_over_inference_steps(name):
    torch.manual_seed(1)
    arch, info, x, y = _case(name, seed=1)
    net = build_pc_network(arch, 0.3)
    _, _, energies = inference(net, x, y, info, 15, 0.1, record_energy=True)
    values = [float(e) for e in energies]
    assert len(values) == 16
    assert all(a > b for a, b in zip(values, values[1:])), values
    # the first energy is the forward pass's: hidden errors 0, so E/M is the task loss
    with torch.no_grad():
        loss = float(loss_value(info, net(x), y))
    assert values[0] == pytest.approx(loss, rel=1e-5)


def test_pc_weight_update_is_local_and_steps_the_shared_optimiser():
    """One train_step sets every weight's .grad (finite) and changes every weight."""
    torch.manual_seed(2)
    arch, info, x, y = _case("mlp")
    alg = algorithms.get("pc")
    learner = alg.build(arch, info, PCParams(lr=1e-2), RunContext())
    before = [w.detach().clone() for w in learner.network.parameters()]
    out = Stepper(learner, PCParams(lr=1e-2)).step(x, y)
    assert torch.isfinite(torch.as_tensor(out["loss"]))
    for w, b in zip(learner.network.parameters(), before):
        assert w.grad is not None and torch.isfinite(w.grad).all()
        assert not torch.equal(w.detach(), b)
    assert learner.predict(x).shape == (11, 5)


def _linear_dtp(seed=3):
    """A 3-layer linear DTP net with square, invertible layers and exact inverses V_i = W_i⁻¹."""
    arch = Arch("lin", (4,), (Dense(4, "linear"), Dense(4, "linear"), Dense(4, "linear")), 4)
    g = torch.Generator().manual_seed(seed)
    net = DTPNetwork(arch, 0.5)
    with torch.no_grad():
        for w in net.weights:
            w.copy_(torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g))
        for i, v in enumerate(net.inverses, start=1):
            v.copy_(torch.linalg.inv(net.weights[i]))
    return net, g


def test_dtp_targets_match_the_difference_correction_by_hand():
    net, g = _linear_dtp()
    x = torch.randn(6, 4, generator=g)
    hs = net.activations(x)
    t3 = hs[3] + 0.1 * torch.randn(6, 4, generator=g)
    targets = difference_targets(net, hs, t3)
    W1, W2 = net.weights[1], net.weights[2]
    V1, V2 = torch.linalg.inv(W1), torch.linalg.inv(W2)
    # by hand: t_i = V_i t_{i+1} + h_i − V_i h_{i+1}
    t2 = t3 @ V2.T + hs[2] - hs[3] @ V2.T
    t1 = t2 @ V1.T + hs[1] - hs[2] @ V1.T
    torch.testing.assert_close(targets[2], t2)
    torch.testing.assert_close(targets[1], t1)
    # exact inverses: the correction vanishes and the targets are the exact pre-images
    torch.testing.assert_close(targets[2], t3 @ V2.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(targets[1], t3 @ V2.T @ V1.T, atol=1e-5, rtol=1e-5)
    assert targets[0] is None


def test_dtp_difference_correction_cancels_an_imperfect_inverse():
    """With t_{i+1} = h_{i+1} the target is h_i, however wrong the inverse."""
    net, g = _linear_dtp()
    with torch.no_grad():
        for v in net.inverses:
            v.add_(torch.randn(4, 4, generator=g))
    hs = net.activations(torch.randn(6, 4, generator=g))
    targets = difference_targets(net, hs, hs[-1].clone())
    for i in (1, 2):
        torch.testing.assert_close(targets[i], hs[i])


def test_dtp_inverse_loss_falls_when_only_inverses_train():
    torch.manual_seed(4)
    arch = Arch("mlp", (1, 8, 8), (Flatten(), Dense(16), Dense(12), Dense(5, "linear")), 5)
    params = DTPParams(lr=0.0, inverse_lr=1e-2, inverse_updates=1, inverse_noise=0.1)
    learner = DTPLearner(DTPNetwork(arch, 0.3), INFO, params)
    stepper = Stepper(learner, params)
    forward = [w.detach().clone() for w in learner.network.weights]
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 5, (64,))
    hs = learner.network.activations(x)

    def measured():
        torch.manual_seed(5)  # the same noise each time
        with torch.no_grad():
            return float(inverse_loss(learner.network, hs, 0.1))

    before = measured()
    for _ in range(60):
        stepper.step(x, y)
    after = measured()
    assert after < 0.5 * before, (before, after)
    for w, f in zip(learner.network.weights, forward):  # lr 0: forward weights unchanged
        torch.testing.assert_close(w.detach(), f)


def test_dtp_supports_the_cnn_and_the_mlp():
    """The CNN runs the conv path (algorithms/_dtp_conv.py, tests/test_dtp_conv.py)."""
    assert algorithms.get("dtp").unsupported(CNN, DTPParams()) is None
    assert algorithms.get("dtp").unsupported(MLP, DTPParams()) is None


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_fixed_prediction_pc_is_bp_up_to_one_scalar_per_layer(name):
    """Why fixed predictions are not PC's default on feed-forward nets: once T reaches the
    bottom node, each weight gradient is BP's times one positive scalar per layer (the node
    dynamics are linear and every error is built from the one above only), which Adam divides
    out. Standard PC, re-predicting from moved nodes, is not."""
    torch.manual_seed(2)
    arch, info, x, y = _case(name, seed=2)
    net = build_pc_network(arch, 0.3)
    loss_value(info, net(x), y).backward()
    bp = [w.grad.clone() for w in net.parameters()]

    def cosines(fixed):
        grads, _, _ = inference(net, x, y, info, 3, 0.3, fixed_predictions=fixed)
        return [float(torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0))
                for g, r in zip(grads, bp)]
    assert min(cosines(True)) > 1 - 1e-6
    assert min(cosines(False)) < 0.999


DEPTH1 = Arch("mlp", (1, 8, 8), (Flatten(), Dense(9), Dense(5, "linear")), 5)


def _layered_case(name, seed):
    if name == "depth1":          # one value node
        _, info, x, y = _case("mlp", seed=seed)
        return DEPTH1, info, x, y, False
    if name == "cnn_channels_last":
        arch, info, x, y = _case("cnn", seed=seed)
        return arch, info, x.contiguous(memory_format=torch.channels_last), y, True
    return (*_case(name, seed=seed), False)


@pytest.mark.parametrize("name", ["mlp", "cnn", "depth1", "cnn_channels_last"])
@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4, 7])
def test_layered_pc_inference_gives_the_dense_schedules_numbers(name, steps):
    """The feed-forward schedule that skips exact zeros (untouched nodes, their zero errors and
    unmoved blocks' re-predictions) returns the dense schedule's gradients, loss and energies
    value for value: T below, at and above the depth (1 node, 2 in the MLP, 3 in the CNN), with
    momentum and label smoothing, and in the channels-last layout the CNN runs in."""
    from algorithms.pc import dense_inference, layered_inference
    torch.manual_seed(2)
    arch, info, x, y, channels_last = _layered_case(name, seed=2)
    net = build_pc_network(arch, 0.3)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    for momentum, smoothing in ((0.0, 0.0), (0.5, 0.1)):
        dense = dense_inference(net, x, y, info, steps, 0.2, momentum,
                                label_smoothing=smoothing, record_energy=True)
        layered = layered_inference(net, x, y, info, steps, 0.2, momentum, smoothing,
                                    record_energy=True)
        assert len(dense[0]) == len(layered[0]) == len(list(net.parameters()))
        for d, l in zip(dense[0], layered[0]):
            assert torch.equal(d, l), (steps, momentum, float((d - l).abs().max()))
        assert torch.equal(dense[1], layered[1])
        assert [float(e) for e in dense[2]] == [float(e) for e in layered[2]]
        # below the depth the bottom weights have no error yet: exactly zero, in both
        assert bool(layered[0][0].any()) == (steps >= len(net.blocks) - 1)


@pytest.mark.parametrize("name", ["mlp", "cnn", "depth1"])
def test_layered_pc_inference_does_only_the_counted_matrix_work(name, monkeypatch):
    """The matrix FLOPs torch dispatches in one layered inference are exactly the roofline
    benchmark's count of the schedule (benchmarks/bench_roofline.py macs_pc), for every T: a
    block predicted again or differentiated once too often would show here, not in the values."""
    import importlib

    from algorithms.pc import layered_inference
    from conftest import ROOT
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    roofline = importlib.import_module("bench_roofline")
    arch, info, x, y, _ = _layered_case(name, seed=3)
    net = build_pc_network(arch, 0.3)
    depth = len(net.blocks) - 1
    for steps in range(depth + 3):
        with roofline.MatrixFlops() as counter:
            layered_inference(net, x, y, info, steps, 0.2)
        counted = roofline.macs_pc(arch, PCParams(inference_steps=steps))
        assert counter.total == 2 * counted * len(y), (name, steps)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_pc_state_step_is_the_written_update_to_the_bit(momentum):
    """The in-place state step (no momentum: ∂E/∂x formed in the spent error) gives the numbers of
    x − γ·(m·v + (ε + Jᵀ·)) as written, so a speed change here moves no stored run."""
    from algorithms.pc import _node_step
    g = torch.Generator().manual_seed(3)
    node, velocity, error, top_down = (torch.randn(7, 5, 4, 4, generator=g) for _ in range(4))
    node = node.contiguous(memory_format=torch.channels_last)
    expected_v = momentum * velocity + (error + top_down)
    expected = node - 0.37 * expected_v
    got, got_v = _node_step(node, velocity, error.clone(), top_down, momentum, 0.37)
    assert torch.equal(got, expected)
    assert (got_v is None) if not momentum else torch.equal(got_v, expected_v)


def test_dtp_targets_and_local_gradients_are_the_written_formulas_to_the_bit():
    """In-place sums in difference_targets and forward_gradients: the same numbers as the
    out-of-place formulas, on a tanh net with biases, called with autograd enabled."""
    from algorithms.dtp import forward_gradients
    from harness.toolkit import activation
    torch.manual_seed(5)
    arch = Arch("mlp", (1, 8, 8), (Flatten(), Dense(16, bias=True), Dense(12, bias=True),
                                   Dense(5, "linear", bias=True)), 5)
    net = DTPNetwork(arch, 0.3)
    x = torch.randn(9, 1, 8, 8)
    hs = net.activations(x)                         # with a graph: the functions hold none
    t_out = hs[-1] + 0.1 * torch.randn_like(hs[-1])
    targets = difference_targets(net, hs, t_out)
    with torch.no_grad():
        expect = [None] * len(hs)
        expect[-1] = t_out
        for i in range(len(hs) - 2, 0, -1):
            expect[i] = net.inverse(i, expect[i + 1]) + hs[i] - net.inverse(i, hs[i + 1])
        for i in range(1, len(hs)):
            assert torch.equal(targets[i], expect[i]), i
        grads = forward_gradients(net, hs, targets)
        layers = len(net.weights)
        assert len(grads) == 2 * layers
        for i in range(layers):
            delta = (hs[i + 1] - targets[i + 1]) * activation(net.acts[i])[1](hs[i + 1])
            assert torch.equal(grads[i], delta.t().matmul(hs[i]) / hs[0].shape[0]), i
            assert torch.equal(grads[layers + i], delta.sum(0) / hs[0].shape[0]), i


def test_pc_gradients_divided_in_place_only_where_autograd_made_them_apart():
    """autograd.grad may return a cotangent itself, or one tensor for two inputs; those are
    divided into new tensors, so no cotangent changes and nothing is divided twice."""
    from algorithms.pc import _per_term
    cotangent = torch.full((3,), 6.0)
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    ga, gb = torch.autograd.grad(a + b, [a, b], cotangent)       # the cotangent, twice over
    fresh = torch.full((2,), 6.0)
    got = _per_term([ga, gb, fresh], [cotangent], 3)
    assert [t.tolist() for t in got] == [[2.0] * 3, [2.0] * 3, [2.0] * 2]
    assert cotangent.tolist() == [6.0] * 3
    assert got[2] is fresh                                         # its own: divided in place
