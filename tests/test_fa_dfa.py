"""Feedback alignment and direct feedback alignment: exactness against BP when the feedback is
the transpose of the forward weights, fixed feedback, reproducible feedback. Tiny nets only."""
from __future__ import annotations

import copy

import pytest
import torch

from algorithms.dfa import build_dfa_network
from algorithms.fa import FAConv2d, FALinear, build_fa_network
from harness.api import Arch, Conv, Dense, Flatten, Pool, Recurrent, RunContext, TaskInfo
from harness.nets import build_sequential, feedback_generator, feedback_tensors
from harness.registry import algorithms
from harness.runner import Stepper
from harness.toolkit import loss_value

INFO = TaskInfo(loss="cross_entropy", output_size=5, input_shape=(1, 8, 8))
MLP = Arch("mlp", (1, 8, 8), (Flatten(), Dense(12), Dense(9, "relu"), Dense(5, "linear")), 5)
CNN = Arch("cnn", (1, 8, 8), (Conv(4, 3, 1), Pool("max", 2), Conv(6, 3), Pool("avg", 2),
                              Flatten(), Dense(7), Dense(5, "linear")), 5)
RNN_INFO = TaskInfo(loss="cross_entropy", output_size=3, input_shape=(6, 4), sequence=True)
RNN = Arch("rnn", (6, 4), (Recurrent(8), Dense(3, "linear")), 3)


def _batch(shape=(1, 8, 8), n=11, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def _fa_twin_of(bp_net: torch.nn.Sequential, arch: Arch) -> torch.nn.Module:
    """An FA network with BP's weights and feedback set to the transposes (kernels to W)."""
    fa_net = build_fa_network(arch, 0.3, "normal", 1.0, feedback_generator(0))
    bp_weighted = [m for m in bp_net if hasattr(m, "weight")]
    fa_weighted = [m for m in fa_net if isinstance(m, (FALinear, FAConv2d))]
    assert len(bp_weighted) == len(fa_weighted)
    with torch.no_grad():
        for bp_m, fa_m in zip(bp_weighted, fa_weighted):
            fa_m.weight.copy_(bp_m.weight)
            fa_m.feedback.copy_(bp_m.weight.t() if isinstance(fa_m, FALinear) else bp_m.weight)
            if bp_m.bias is not None:
                bp_m.bias.normal_(0, 0.3)            # away from 0, so they matter
                fa_m.bias.copy_(bp_m.bias)
    return fa_net


MLP_BIAS = Arch("mlpb", (1, 8, 8), (Flatten(), Dense(12, bias=True), Dense(9, "relu"),
                                    Dense(5, "linear", bias=True)), 5)
CNN_BIAS = Arch("cnnb", (1, 8, 8), (Conv(4, 3, 1, bias=True), Pool("max", 2), Conv(6, 3),
                                    Pool("avg", 2), Flatten(), Dense(7, bias=True),
                                    Dense(5, "linear")), 5)


def _grads(net, kinds):
    out = []
    for m in net:
        if isinstance(m, kinds):
            out += [m.weight.grad] + ([m.bias.grad] if m.bias is not None else [])
    return out


@pytest.mark.parametrize("arch", [MLP, CNN, MLP_BIAS, CNN_BIAS],
                         ids=["dense", "conv", "dense+bias", "conv+bias"])
def test_fa_with_transposed_feedback_gives_bp_gradients(arch):
    torch.manual_seed(1)
    bp_net = build_sequential(arch, 0.3)
    fa_net = _fa_twin_of(bp_net, arch)
    x, y = _batch()
    loss_value(INFO, bp_net(x), y).backward()
    loss_value(INFO, fa_net(x), y).backward()
    bp_grads = _grads(bp_net, (torch.nn.Linear, torch.nn.Conv2d))
    fa_grads = _grads(fa_net, (FALinear, FAConv2d))
    assert len(bp_grads) == len(fa_grads) > 0
    for bp_g, fa_g in zip(bp_grads, fa_grads):
        torch.testing.assert_close(fa_g, bp_g, rtol=1e-5, atol=1e-7)


def test_fa_with_random_feedback_differs_from_bp():
    """The converse: the test above is not passing because feedback is ignored."""
    torch.manual_seed(1)
    bp_net = build_sequential(MLP, 0.3)
    fa_net = _fa_twin_of(bp_net, MLP)
    with torch.no_grad():
        fa_net[3].feedback.normal_()  # dense9's feedback: the error into the first layer
    x, y = _batch()
    loss_value(INFO, bp_net(x), y).backward()
    loss_value(INFO, fa_net(x), y).backward()
    assert not torch.allclose(fa_net[1].weight.grad, bp_net[1].weight.grad)
    torch.testing.assert_close(fa_net[-1].weight.grad, bp_net[-1].weight.grad)  # output: true


def test_fa_rnn_with_transposed_feedback_gives_bp_gradients_through_time():
    torch.manual_seed(2)
    fa_net = build_fa_network(RNN, 0.3, "normal", 1.0, feedback_generator(0))
    with torch.no_grad():
        fa_net.feedback.copy_(fa_net.w_h)                  # B in W_h's layout: δ_{t+1} B
        fa_net.readout.feedback.copy_(fa_net.readout.weight.t())
    weights = [fa_net.w_x, fa_net.w_h, fa_net.readout.weight]
    x = torch.randn(5, 6, 4)
    y = torch.randint(0, 3, (5, 6))
    loss_value(RNN_INFO, fa_net(x), y).backward()
    fa_grads = [w.grad.clone() for w in weights]
    with torch.no_grad():  # the same RNN by plain autograd
        wx, wh, wy = (w.detach().clone().requires_grad_() for w in weights)
    h = torch.zeros(5, 8)
    outs = []
    for t in range(6):
        h = torch.tanh(x[:, t] @ wx.t() + h @ wh.t())
        outs.append(h @ wy.t())
    loss_value(RNN_INFO, torch.stack(outs, 1), y).backward()
    for fa_g, bp_g in zip(fa_grads, (wx.grad, wh.grad, wy.grad)):
        torch.testing.assert_close(fa_g, bp_g, rtol=1e-5, atol=1e-7)


def test_dfa_one_hidden_layer_with_output_transpose_gives_bp_gradient():
    arch = Arch("one", (1, 8, 8), (Flatten(), Dense(10), Dense(5, "linear")), 5)
    torch.manual_seed(3)
    bp_net = build_sequential(arch, 0.3)
    dfa_net = build_dfa_network(arch, 0.3, "normal", 1.0, False, feedback_generator(0))
    with torch.no_grad():
        dfa_net.blocks[0][1].weight.copy_(bp_net[1].weight)
        dfa_net.blocks[1][0].weight.copy_(bp_net[3].weight)
        dfa_net.feedback0.copy_(bp_net[3].weight)  # (out × hidden): e B = e W_out = δ's BP form
    x, y = _batch()
    loss_value(INFO, bp_net(x), y).backward()
    output, hidden = dfa_net.forward_local(x)
    from harness.toolkit import loss_and_grad
    _, error = loss_and_grad(INFO, output.detach(), y)
    dfa_net.backward_direct(output, hidden, error)
    torch.testing.assert_close(dfa_net.blocks[0][1].weight.grad, bp_net[1].weight.grad,
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dfa_net.blocks[1][0].weight.grad, bp_net[3].weight.grad,
                               rtol=1e-5, atol=1e-7)


def test_dfa_sends_output_error_to_every_hidden_layer_conv_included():
    torch.manual_seed(0)      # the weights: not whatever the tests before left in the stream
    net = build_dfa_network(CNN, 0.3, "normal", 1.0, False, feedback_generator(0))
    x, y = _batch()
    output, hidden = net.forward_local(x)
    assert [tuple(h.shape[1:]) for h in hidden] == [(4, 8, 8), (6, 2, 2), (7,)]
    assert [net.feedback(i).shape for i in range(3)] == [(5, 256), (5, 24), (5, 7)]
    error = torch.randn_like(output)
    net.backward_direct(output, hidden, error)
    conv1 = net.blocks[0][0]
    manual = torch.nn.grad.conv2d_weight(  # δ_1 = (e B_1) ⊙ f′(a_1), local weight gradient
        x, conv1.weight.shape,
        (error @ net.feedback(0)).reshape(hidden[0].shape) * (1 - hidden[0].detach() ** 2),
        padding=1)
    torch.testing.assert_close(conv1.weight.grad, manual, rtol=1e-5, atol=1e-5)  # float32 sums


def test_dfa_shared_feedback_is_one_matrix_sliced():
    net = build_dfa_network(MLP, 0.3, "uniform", 1.0, True, feedback_generator(0))
    torch.testing.assert_close(net.feedback(1), net.feedback(0)[:, :9])


def _train(name: str, arch: Arch, info: TaskInfo, seed: int, steps: int = 3, **params):
    alg = algorithms.get(name)
    p = alg.Params(**params)
    torch.manual_seed(seed)
    learner = alg.build(arch, info, p, RunContext(seed=seed, epochs=2))
    stepper = Stepper(learner, p, epochs=2)
    before = {k: v.clone() for k, v in feedback_tensors(learner.network).items()}
    weights = [w.detach().clone() for w in learner.network.parameters()]
    for step in range(steps):
        if info.sequence:
            x, y = torch.randn(7, 6, 4), torch.randint(0, 3, (7, 6))
        else:
            x, y = _batch(seed=step)
        stepper.step(x, y)
    stepper.end_epoch()
    return learner, stepper, before, weights


@pytest.mark.parametrize("name,arch,info", [("fa", CNN, INFO), ("dfa", CNN, INFO),
                                            ("fa", RNN, RNN_INFO), ("dfa", RNN, RNN_INFO)])
def test_feedback_is_fixed_while_weights_learn(name, arch, info):
    learner, stepper, before, weights = _train(name, arch, info, seed=4, lr=1e-2)
    after = feedback_tensors(learner.network)
    assert before and before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert not any(buf.requires_grad for buf in after.values())
    opt_tensors = {id(p) for g in stepper.optimizer.param_groups for p in g["params"]}
    assert not opt_tensors & {id(b) for b in after.values()}
    for w0, w1 in zip(weights, learner.network.parameters()):
        assert not torch.equal(w0, w1.detach())


@pytest.mark.parametrize("name", ["fa", "dfa"])
def test_same_seed_same_feedback(name):
    def feedback(seed, **params):
        alg = algorithms.get(name)
        learner = alg.build(CNN, INFO, alg.Params(**params), RunContext(seed=seed))
        return feedback_tensors(learner.network)
    a, b, c = feedback(5), feedback(5), feedback(6)
    for key in a:
        assert torch.equal(a[key], b[key])
        assert not torch.equal(a[key], c[key])
    scaled = feedback(5, feedback_scale=0.5, feedback_init="normal")
    key = next(iter(a))
    torch.testing.assert_close(scaled[key], a[key] * (0.5 / algorithms.get(name).Params().feedback_scale))


def test_predict_is_the_plain_forward():
    for name in ("fa", "dfa"):
        alg = algorithms.get(name)
        learner = alg.build(CNN, INFO, alg.Params(), RunContext(seed=0))
        x, _ = _batch()
        with torch.no_grad():
            out = learner.predict(x)
        assert out.shape == (11, 5)
        copy.deepcopy(learner.state_dict())


def test_dfa_conv_gradients_are_the_same_in_channels_last():
    """The channels-last step (what the runner uses on conv nets) projects e B_i straight into
    the layout of each hidden map: its gradients are, to the bit, those of the plain product
    reshaped (which autograd then had to bring to the map's layout), and the contiguous
    step's up to the conv kernels' rounding."""
    arch = Arch("cnn3", (3, 12, 12), (Conv(4, 3, 1), Pool("max", 2), Conv(6, 3, 1),
                                      Pool("max", 2), Flatten(), Dense(7), Dense(5, "linear")), 5)
    torch.manual_seed(0)
    net = build_dfa_network(arch, 0.3, "normal", 1.0, False, feedback_generator(0))
    x, error = torch.randn(9, 3, 12, 12), torch.randn(9, 5)
    twins = [copy.deepcopy(net), copy.deepcopy(net)]
    for twin in twins:
        for p in twin.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    output, hidden = net.forward_local(x)
    net.backward_direct(output, hidden, error)
    x_last = x.contiguous(memory_format=torch.channels_last)
    output, hidden = twins[0].forward_local(x_last)
    assert [h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last)
            and not h.is_contiguous() for h in hidden] == [True, True, False]
    twins[0].backward_direct(output, hidden, error)
    output, hidden = twins[1].forward_local(x_last)           # the plain product, reshaped
    torch.autograd.backward([output] + hidden, [error] + [
        error.matmul(twins[1].feedback(i)).reshape(h.shape) for i, h in enumerate(hidden)])
    for (name, p), q, r in zip(net.named_parameters(), twins[0].parameters(),
                               twins[1].parameters()):
        assert torch.equal(q.grad, r.grad), name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5)
