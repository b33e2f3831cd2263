"""BP through time: the harness's RNN trained by BP gets exactly the gradients of an unrolled
network written here independently (float64), and its shapes follow the RNN convention."""
import torch

from harness.api import Arch, Dense, Recurrent, RunContext, TaskInfo
from harness.registry import algorithms, discover
from harness.nets import RNNNet
from harness.runner import Stepper
from harness.toolkit import loss_value


def _arch(T=5, D=3, H=4, out=6):
    return Arch("rnn", (T, D), (Recurrent(H), Dense(out, "linear")), out)


def _unrolled_loss(w_x, w_h, w_y, x, y, loss):
    """The network written out step by step, without the module: explicit h_t per step."""
    n, steps, _ = x.shape
    h = torch.zeros(n, w_h.shape[0], dtype=x.dtype)
    total = 0.0
    for t in range(steps):
        h = torch.tanh(x[:, t, :] @ w_x.T + h @ w_h.T)
        out = h @ w_y.T
        if loss == "cross_entropy":
            logp = out - torch.logsumexp(out, dim=1, keepdim=True)
            total = total - logp.gather(1, y[:, t:t + 1]).sum()
        else:
            total = total + ((out - y[:, t, :]) ** 2).sum()
    count = n * steps * (1 if loss == "cross_entropy" else w_y.shape[0])
    return total / count


def _check(loss):
    torch.manual_seed(0)
    arch = _arch()
    net = RNNNet(arch, init_std=0.5).double()
    x = torch.randn(7, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 6, (7, 5)) if loss == "cross_entropy" else \
        torch.randn(7, 5, 6, dtype=torch.float64)
    info = TaskInfo(loss=loss, output_size=6, input_shape=(5, 3), sequence=True)
    out = net(x)
    assert out.shape == (7, 5, 6)
    value = loss_value(info, out, y)
    grads = torch.autograd.grad(value, [net.w_x, net.w_h, net.readout.weight])
    leaves = [p.detach().clone().requires_grad_(True) for p in (net.w_x, net.w_h, net.readout.weight)]
    reference = _unrolled_loss(*leaves, x, y, loss)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    ref_grads = torch.autograd.grad(reference, leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads)


def test_bptt_gradients_equal_unrolled_network_cross_entropy():
    _check("cross_entropy")


def test_bptt_gradients_equal_unrolled_network_mse():
    _check("mse")


def test_bptt_hidden_gradient_by_hand_last_step():
    """∂L/∂W_h by the BPTT recursion written out by hand (δ_t = (W_hᵀ δ_{t+1} + W_yᵀ e_t)⊙(1−h_t²))."""
    torch.manual_seed(1)
    net = RNNNet(_arch(T=4, D=2, H=3, out=2), init_std=0.7).double()
    x = torch.randn(5, 4, 2, dtype=torch.float64)
    y = torch.randn(5, 4, 2, dtype=torch.float64)
    value = ((net(x) - y) ** 2).sum() / 2
    value.backward()
    with torch.no_grad():
        hs = net.hidden_states(x)
        e = hs @ net.readout.weight.T - y                      # ∂L/∂y_t
        delta = torch.zeros(5, 3, dtype=torch.float64)
        g_h = torch.zeros_like(net.w_h)
        g_x = torch.zeros_like(net.w_x)
        for t in reversed(range(4)):
            delta = (delta @ net.w_h + e[:, t] @ net.readout.weight) * (1 - hs[:, t] ** 2)
            prev = hs[:, t - 1] if t > 0 else torch.zeros_like(hs[:, 0])
            g_h += delta.T @ prev
            g_x += delta.T @ x[:, t]
            # delta now is ∂L/∂a_t; propagate to h_{t-1} on the next iteration via W_h
    torch.testing.assert_close(net.w_h.grad, g_h)
    torch.testing.assert_close(net.w_x.grad, g_x)


def test_bp_plugin_trains_rnn():
    discover()
    algorithm = algorithms.get("bp")
    arch = _arch()
    params = algorithm.Params(lr=1e-2, lr_decay="none")
    assert algorithm.unsupported(arch, params) is None
    info = TaskInfo(loss="cross_entropy", output_size=6, input_shape=(5, 3), sequence=True)
    learner = algorithm.build(arch, info, params, RunContext(epochs=1))
    stepper = Stepper(learner, params)
    torch.manual_seed(0)
    x = torch.randn(16, 5, 3)
    y = torch.randint(0, 6, (16, 5))
    first = float(stepper.step(x, y)["loss"])
    for _ in range(60):
        last = float(stepper.step(x, y)["loss"])
    assert last < first
    assert learner.predict(x).shape == (16, 5, 6)


def test_written_out_bptt_matches_autograd_for_every_activation():
    """The recurrence's own backward (harness/nets.py) against autograd on a step-by-step
    loop, for each activation a Recurrent layer may name, under a random output gradient."""
    from harness.toolkit import activation
    for act in ("tanh", "relu", "sigmoid", "linear"):
        torch.manual_seed(3)
        net = RNNNet(Arch("rnn", (6, 3), (Recurrent(5, act), Dense(4, "linear")), 4),
                     init_std=0.5).double()
        x = torch.randn(7, 6, 3, dtype=torch.float64)
        leaves = [p.detach().clone().requires_grad_(True) for p in (net.w_x, net.w_h, net.readout.weight)]
        f, _ = activation(act)
        h, outs = torch.zeros(7, 5, dtype=torch.float64), []
        for t in range(6):
            h = f(x[:, t] @ leaves[0].T + h @ leaves[1].T)
            outs.append(h @ leaves[2].T)
        reference = torch.stack(outs, dim=1)
        out = net(x)
        torch.testing.assert_close(out, reference)
        g = torch.randn_like(out)
        got = torch.autograd.grad((out * g).sum(), [net.w_x, net.w_h, net.readout.weight])
        want = torch.autograd.grad((reference * g).sum(), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
