"""The network kit: optional biases for every rule (with the gradient identities that hold for
them), one unroll over time for every RNN, and the README's task example trained by bp and dll
without any engine edit."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from harness import params as P
from harness.api import Arch, Conv, Dense, Flatten, Pool, Recurrent, RunContext, RunSpec, TaskInfo
from harness.nets import build_sequential, feedback_generator
from harness.registry import algorithms, discover, tasks
from harness.runner import Stepper, execute
from harness.toolkit import loss_and_grad, loss_value

ROOT = Path(__file__).resolve().parent.parent
INFO = TaskInfo(loss="cross_entropy", output_size=5, input_shape=(1, 8, 8))
MLP_BIAS = Arch("mlpb", (1, 8, 8), (Flatten(), Dense(12, bias=True), Dense(9, bias=True),
                                    Dense(5, "linear", bias=True)), 5)
CNN_BIAS = Arch("cnnb", (1, 8, 8), (Conv(4, 3, 1, bias=True), Pool("max", 2), Conv(6, 3),
                                    Pool("avg", 2), Flatten(), Dense(7, bias=True),
                                    Dense(5, "linear")), 5)
RNN_BIAS = Arch("rnnb", (6, 4), (Recurrent(8), Dense(3, "linear", bias=True)), 3)
RNN_INFO = TaskInfo(loss="cross_entropy", output_size=3, input_shape=(6, 4), sequence=True)


def _batch(arch, info, seed=0, n=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *arch.input_shape), generator=g)
    shape = (n, arch.input_shape[0]) if info.sequence else (n,)
    return x, torch.randint(0, info.output_size, shape, generator=g)


@pytest.mark.parametrize("name", ["bp", "fa", "dfa", "pc", "dtp", "dll", "dll_fa"])
@pytest.mark.parametrize("arch,info", [(MLP_BIAS, INFO), (CNN_BIAS, INFO), (RNN_BIAS, RNN_INFO)],
                         ids=["mlp", "cnn", "rnn"])
def test_every_rule_learns_its_biases(name, arch, info):
    alg = algorithms.get(name)
    params = alg.Params(lr=1e-2)
    if alg.unsupported(arch, params):
        pytest.skip(alg.unsupported(arch, params))
    torch.manual_seed(0)
    learner = alg.build(arch, info, params, RunContext(epochs=2))
    stepper = Stepper(learner, params, epochs=2)
    stepped = [p for g in stepper.optimizer.param_groups for p in g["params"]]
    biases = [p for p in stepped if p.dim() == 1]
    wanted = sum(getattr(layer, "bias", False) for layer in arch.layers)
    assert len(biases) == wanted, (name, [tuple(p.shape) for p in stepped])
    before = [b.detach().clone() for b in biases]
    x, y = _batch(arch, info)
    for _ in range(3):
        stepper.step(x, y)
    assert all(b.grad is not None and torch.isfinite(b.grad).all() for b in biases)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, biases))


def test_dfa_bias_gradient_is_its_local_delta():
    """One hidden layer with output feedback = W_out: DFA's δ is BP's, so are the biases'."""
    from algorithms.dfa import build_dfa_network
    arch = Arch("one", (1, 8, 8), (Flatten(), Dense(10, bias=True), Dense(5, "linear", bias=True)), 5)
    torch.manual_seed(3)
    bp_net = build_sequential(arch, 0.3)
    dfa_net = build_dfa_network(arch, 0.3, "normal", 1.0, False, feedback_generator(0))
    with torch.no_grad():
        for bp_m, dfa_m in ((bp_net[1], dfa_net.blocks[0][1]), (bp_net[3], dfa_net.blocks[1][0])):
            bp_m.bias.normal_(0, 0.3)
            dfa_m.weight.copy_(bp_m.weight)
            dfa_m.bias.copy_(bp_m.bias)
        dfa_net.feedback0.copy_(bp_net[3].weight)
    x, y = _batch(arch, INFO)
    loss_value(INFO, bp_net(x), y).backward()
    output, hidden = dfa_net.forward_local(x)
    _, error = loss_and_grad(INFO, output.detach(), y)
    dfa_net.backward_direct(output, hidden, error)
    for bp_m, dfa_m in ((bp_net[1], dfa_net.blocks[0][1]), (bp_net[3], dfa_net.blocks[1][0])):
        torch.testing.assert_close(dfa_m.bias.grad, bp_m.bias.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch,info", [(MLP_BIAS, INFO), (RNN_BIAS, RNN_INFO)], ids=["mlp", "rnn"])
def test_fixed_prediction_pc_converges_to_bp_with_biases(arch, info):
    from algorithms.pc import build_pc_network, inference
    torch.manual_seed(0)
    net = build_pc_network(arch, 0.3)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
    x, y = _batch(arch, info)
    loss_value(info, net(x), y).backward()
    bp = [w.grad.clone() for w in net.parameters()]
    grads, _, _ = inference(net, x, y, info, 60, 0.3, fixed_predictions=True)
    error = sum((g - r).pow(2).sum() for g, r in zip(grads, bp)) / sum(r.pow(2).sum() for r in bp)
    assert float(error.sqrt()) < 1e-3


def test_dtp_bias_gradient_is_the_local_loss_gradient():
    """Each layer's ∂W_i and ∂b_i are those of ½‖f(W_i h_i + b_i) − t_{i+1}‖²/N, h_i fixed."""
    from algorithms.dtp import DTPNetwork, forward_gradients
    torch.manual_seed(1)
    net = DTPNetwork(MLP_BIAS, 0.3)
    with torch.no_grad():
        for b in net.biases:
            b.normal_(0, 0.3)
        hs = net.activations(torch.randn(9, 1, 8, 8))
    targets = [None] + [h + 0.1 * torch.randn_like(h) for h in hs[1:]]
    got = forward_gradients(net, hs, targets)
    expected_weights, expected_biases = [], []
    for i, weight in enumerate(net.weights):
        w = weight.detach().clone().requires_grad_()
        b = net.biases[net.bias_of[i]].detach().clone().requires_grad_() \
            if i in net.bias_of else None
        a = hs[i] @ w.t() + (b if b is not None else 0.0)
        out = torch.tanh(a) if net.acts[i] == "tanh" else a
        (0.5 * (out - targets[i + 1]).pow(2).sum() / len(hs[0])).backward()
        expected_weights.append(w.grad)
        if b is not None:
            expected_biases.append(b.grad)
    expected = expected_weights + expected_biases
    assert len(got) == len(expected) == len(net.forward_parameters()) == 6
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_one_unroll_over_time_in_the_whole_code_base():
    """Every RNN of every rule runs its forward steps through harness.nets.unroll."""
    loops = []
    for path in sorted([*ROOT.glob("algorithms/*.py"), *ROOT.glob("harness/*.py")]):
        text = path.read_text()
        for match in re.finditer(r"for t in range\(([^)]*)\)", text):
            if "reversed" not in match.group(0) and "- 1, -1, -1" not in match.group(1):
                loops.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert loops == ["harness/nets.py: for t in range(drive.shape[1])"], loops


def test_the_readme_task_example_trains_with_bp_and_dll(tmp_path):
    """The README's "Adding a task" example, run as written, with two rules."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# tasks/majority.py\n.*?)```", readme, re.S).group(1)
    folder = tmp_path / "readme" / "tasks"
    folder.mkdir(parents=True)
    (folder / "majority.py").write_text(code)
    discover([tmp_path / "readme"])
    task = tasks.get("majority")
    task_params = P.resolve(task.Params, {})
    arch = task.presets(P.build(task.Params, task_params), RunContext())["mlp"]
    for name, lr in (("bp", 1e-2), ("dll", 1e-2)):
        alg = algorithms.get(name)
        spec = RunSpec(algorithm=name, params=P.resolve(alg.Params, {"lr": lr}),
                       task="majority", task_params=task_params, arch=arch, seed=0, epochs=4,
                       batch_size=64)
        result = execute(spec, str(tmp_path))
        assert result.status == "ok", result.traceback
        assert result.epochs[-1].metrics["test"]["accuracy"] > 85, name


POOLED = Arch("pooled", (1, 10, 10), (Conv(4, 3, 1, bias=True), Pool("max", 2), Conv(6, 3, 1),
                                      Pool("avg", 2), Flatten(), Dense(5, "linear")), 5)


def test_pool_first_is_the_same_network_with_the_same_gradients():
    """build_sequential puts a max-pool before the activation it follows (monotone: the same
    values and winners); outputs and gradients equal the spec-order network's."""
    torch.manual_seed(0)
    first = build_sequential(POOLED, 0.3)
    spec_order = build_sequential(POOLED, 0.3, pool_first=False)
    spec_order.load_state_dict(first.state_dict())
    assert [type(m).__name__ for m in first][:3] == ["Conv2d", "MaxPool2d", "Tanh"]
    assert [type(m).__name__ for m in spec_order][:3] == ["Conv2d", "Tanh", "MaxPool2d"]
    x, y = _batch(POOLED, INFO, seed=1, n=16)
    for net in (first, spec_order):
        loss_value(INFO, net(x), y).backward()
    torch.testing.assert_close(first(x), spec_order(x), rtol=0, atol=0)
    for a, b in zip(first.parameters(), spec_order.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_pool_adjoints_are_the_pools_own_backward():
    from harness.nets import avg_pool_adjoint, max_pool_adjoint
    g = torch.Generator().manual_seed(2)
    for layout in (torch.contiguous_format, torch.channels_last):
        h = torch.randn(3, 4, 11, 11, generator=g).to(memory_format=layout).requires_grad_(True)
        out, indices = torch.nn.functional.max_pool2d(h, 2, return_indices=True)
        d = torch.randn(out.shape, generator=g).to(memory_format=layout)
        out.backward(d)
        assert torch.equal(max_pool_adjoint(d, indices, 2, h.shape), h.grad)
        h.grad = None
        out = torch.nn.functional.avg_pool2d(h, 2)         # 11 → 5: the last row gets none
        out.backward(d)
        routed = avg_pool_adjoint(d, 2, h.shape)
        assert torch.equal(routed, h.grad) and routed.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("name", ["bp", "fa", "dfa", "pc", "dll", "dll_fa", "dtp"])
def test_channels_last_changes_speed_not_numbers(name):
    """prefer_channels_last converts every 4-d tensor of a learner in place (one-channel kernels
    too), the optimiser built after it steps the same tensors, and a few steps give the same
    weights as the default layout, up to float rounding."""
    import copy

    from harness.nets import prefer_channels_last
    alg = algorithms.get(name)
    params = alg.Params(lr=1e-3)
    torch.manual_seed(3)
    plain = alg.build(POOLED, INFO, params, RunContext(epochs=1))
    fast = copy.deepcopy(plain)
    assert prefer_channels_last(fast, POOLED, "cpu")
    kernels = [p for group in fast.parameter_groups() for p in group["params"] if p.dim() == 4]
    assert kernels and all(k.is_contiguous(memory_format=torch.channels_last) and
                           k.stride()[1] == 1 for k in kernels)       # the 1-channel one too
    steppers = [Stepper(plain, params), Stepper(fast, params)]
    for step in range(4):
        x, y = _batch(POOLED, INFO, seed=10 + step, n=16)
        for i, stepper in enumerate(steppers):
            torch.manual_seed(step)
            stepper.step(x.to(memory_format=torch.channels_last) if i else x, y)
    for a, b in zip([p for g in plain.parameter_groups() for p in g["params"]],
                    [p for g in fast.parameter_groups() for p in g["params"]]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not prefer_channels_last(copy.deepcopy(plain), MLP_BIAS, "cpu")   # no convs: no-op


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("c_in,c_out,size,kernel,padding", [(1, 4, 10, 5, 2), (3, 5, 9, 3, 1),
                                                            (4, 2, 6, 3, 0)])
def test_plugin_conv_contractions_are_torchs_to_the_bit(channels_last, c_in, c_out, size, kernel,
                                                        padding):
    """algorithms/_conv.py (DLL's, FA's and the conv DTP's hand-taken conv contractions) gives
    torch.nn.grad's numbers exactly, in the maps' memory layout (tensors laid out as the runner
    lays them, harness.nets.prefer_channels_last: cloned to channels-last)."""
    from torch.nn.grad import conv2d_input, conv2d_weight

    from algorithms._conv import conv_error_and_weight_sum, conv_error_below, conv_weight_sum
    g = torch.Generator().manual_seed(c_in * 100 + size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    below = torch.randn(7, c_in, size, size, generator=g).clone(memory_format=fmt)
    kernel_ = torch.randn(c_out, c_in, kernel, kernel, generator=g).clone(memory_format=fmt)
    out = size + 2 * padding - kernel + 1
    error = torch.randn(7, c_out, out, out, generator=g).clone(memory_format=fmt)
    sent = conv2d_input(below.shape, kernel_, error, padding=padding)
    total = conv2d_weight(below, kernel_.shape, error, padding=padding)
    assert torch.equal(conv_error_below(below.shape, kernel_, error, padding), sent)
    assert torch.equal(conv_weight_sum(below, kernel_.shape, error, padding), total)
    both = conv_error_and_weight_sum(error, below, kernel_, padding)
    assert torch.equal(both[0], sent) and torch.equal(both[1], total)
    if channels_last and c_in > 1:
        assert conv_error_below(below.shape, kernel_, error, padding).is_contiguous(
            memory_format=torch.channels_last)
