"""The network kit every rule builds from, so that an architecture spec means the same network
whatever rule trains it:

* :func:`weighted_layer` — the dense or conv layer of a spec (bias or not), its weights drawn by
  :func:`harness.toolkit.init_weight`; :func:`layer_modules` and :func:`build_sequential` — the
  feed-forward architecture as modules;
* :func:`rnn_layers` — the one shape check of the RNN (recurrent layer + dense read-out);
  :func:`unroll` — the one forward pass over time steps; :class:`Recurrence` — that unroll as an
  autograd Function whose backward carries the error back in time through a matrix of the
  rule's choosing (W_h: backprop through time; a fixed B: feedback alignment; none: the local
  per-step gradient of direct feedback alignment); :class:`RNNNet` — the RNN as a module;
* :func:`feedback_generator` and :func:`draw_feedback` — fixed random feedback, drawn the same
  way for every rule that has it.

BPTT written out (rather than autograd over a Python loop): the input drive ``W_x x_t`` of every
step is one matmul before the loop, the forward loop only ``addmm`` + activation into a
preallocated time-major buffer, the backward loop only ``δ_t = (g_t + δ_{t+1} B) ⊙ f′(h_t)``, and
``∂L/∂W_h = Σ_t δ_tᵀ h_{t−1}`` one matmul after it: at parity with a bare ``torch.nn.RNN`` on CPU
(``benchmarks/bench_bptt.py``), where autograd over the loop costs about 1.8×.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from harness.api import Arch, Conv, Dense, Flatten, Pool, Recurrent
from harness.archspec import layer_shapes
from harness.toolkit import activation, activation_module, init_weight

DISTRIBUTIONS = ("normal", "uniform")
FEEDBACK_SEED_OFFSET = 7919  # feedback generator = seed + offset: never the weights' stream


# --------------------------------------------------------------------------------------------
# Feed-forward networks
# --------------------------------------------------------------------------------------------

def weighted_layer(layer, in_shape: tuple[int, ...], init_std: float) -> nn.Module:
    """``nn.Linear`` / ``nn.Conv2d`` of a Dense / Conv spec: weights from ``init_weight``, the
    bias (where ``bias: true``) zero."""
    if isinstance(layer, Dense):
        module: nn.Module = nn.Linear(in_shape[-1], layer.units, bias=layer.bias)
    else:
        module = nn.Conv2d(in_shape[0], layer.filters, layer.kernel, padding=layer.padding,
                           bias=layer.bias)
    with torch.no_grad():
        module.weight.copy_(init_weight(tuple(module.weight.shape), init_std))
        if module.bias is not None:
            module.bias.zero_()
    return module


def weightless_layer(layer) -> nn.Module:
    if isinstance(layer, Pool):
        return nn.MaxPool2d(layer.size) if layer.kind == "max" else nn.AvgPool2d(layer.size)
    if isinstance(layer, Flatten):
        return nn.Flatten()
    raise TypeError(f"not a feed-forward layer: {layer!r}")


Weighted = Callable[[object, tuple], nn.Module]


def layer_modules(arch: Arch, init_std: float, weighted: Optional[Weighted] = None) \
        -> list[tuple[object, nn.Module, Optional[nn.Module]]]:
    """(spec, module, activation module or None) for each layer of a feed-forward arch, in
    order. ``weighted(layer, in_shape)`` builds the dense/conv modules (default
    :func:`weighted_layer`), so a rule written as custom layers (FA) reuses the rest."""
    out = []
    for layer, in_shape, _ in layer_shapes(arch):
        if isinstance(layer, (Dense, Conv)):
            module = weighted(layer, in_shape) if weighted else weighted_layer(layer, in_shape,
                                                                               init_std)
            out.append((layer, module, None if layer.act == "linear"
                        else activation_module(layer.act)))
        elif isinstance(layer, (Pool, Flatten)):
            out.append((layer, weightless_layer(layer), None))
        else:
            raise TypeError(f"a feed-forward network cannot hold {layer!r}")
    return out


def build_sequential(arch: Arch, init_std: float,
                     weighted: Optional[Weighted] = None, pool_first: bool = True) -> nn.Sequential:
    """The feed-forward (MLP/CNN) architecture as an ``nn.Sequential``: each dense/conv layer
    followed by its activation module; the output layer is the last Dense (its activation is
    usually ``linear``: the loss applies the softmax).

    With ``pool_first`` a max-pool that follows a layer's activation goes before it instead:
    every activation here is monotone, so max-pool(f(a)) = f(max-pool(a)) — the same values and,
    through the pool's argmax, the same gradients — with the activation and its derivative on a
    quarter of the units (a 2×2 pool). ``pool_first=False`` keeps the spec's order, for code
    that needs each layer's output before the pool (the diagnostics' backprop reference)."""
    modules: list[nn.Module] = []
    pending_act: Optional[nn.Module] = None
    for layer, module, act in layer_modules(arch, init_std, weighted):
        if pending_act is not None:
            if pool_first and isinstance(layer, Pool) and layer.kind == "max":
                modules.append(module)
                continue            # the activation waits for the pool
            modules.append(pending_act)
            pending_act = None
        if act is not None and pool_first and isinstance(layer, Conv):
            modules.append(module)
            pending_act = act
        else:
            modules += [module] + ([act] if act is not None else [])
    if pending_act is not None:
        modules.append(pending_act)
    return nn.Sequential(*modules)


def max_pool_adjoint(d: torch.Tensor, indices: torch.Tensor, size: int,
                     in_shape) -> torch.Tensor:
    """A max-pool's transposed Jacobian at its forward pass: each value of ``d`` (at the pool's
    output) goes to the unit that won (``indices``, from ``max_pool2d(return_indices=True)``),
    zeros elsewhere; in ``d``'s memory format."""
    import torch.nn.functional as F
    return F.max_unpool2d(d, indices, size, output_size=tuple(in_shape)[-2:])


def avg_pool_adjoint(d: torch.Tensor, size: int, in_shape) -> torch.Tensor:
    """An average-pool's transposed Jacobian: each value of ``d`` spread evenly (/size²) over
    its window; units past the last whole window (11 → 5) get zero. torch's own average-pool
    backward (exactly these numbers, in ``d``'s memory format, one pass)."""
    like = torch.empty(tuple(in_shape), dtype=d.dtype, device=d.device).to(
        memory_format=torch.channels_last if _is_channels_last(d) else torch.contiguous_format)
    return torch.ops.aten.avg_pool2d_backward(d, like, [size, size], [size, size], [0, 0],
                                              False, True, None)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.shape[1] > 1 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous()


def prefer_channels_last(learner, arch: Arch, device) -> bool:
    """On the CPU, hold a conv learner's 4-d tensors (weights, kernels, feedback kernels) in
    channels-last order, where oneDNN's convolutions are fastest; the runner does it for rules
    that set ``Algorithm.channels_last`` (measured: BP 1.8×, FA 1.6×, DFA 1.5×, PC 1.5× on the
    MNIST CNN, one thread; DLL's and DTP's hand-written conv backward gain nothing or lose).
    The numbers are the same up to float rounding. Every tensor reachable from the learner's
    attributes (modules, parameters, lists and dicts of them) is converted in place, so the
    optimisers built around them keep working. True when it converted; nothing happens for
    networks without convolutions or on other devices (CUDA keeps torch's default)."""
    if torch.device(device).type != "cpu" or not any(isinstance(l, Conv) for l in arch.layers):
        return False
    channels_last = torch.channels_last
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                visit(t, depth + 1)
        elif isinstance(obj, torch.Tensor):
            if obj.dim() == 4 and obj.is_floating_point():
                # clone, not contiguous(): a one-channel kernel is "contiguous" both ways and
                # would keep its strides, and with them the whole first layer in NCHW
                obj.data = obj.data.clone(memory_format=channels_last)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)

    visit(dict(vars(learner)), 0)
    return True


# --------------------------------------------------------------------------------------------
# The RNN
# --------------------------------------------------------------------------------------------

def rnn_layers(arch: Arch) -> tuple[Recurrent, Dense]:
    """The (recurrent, read-out) pair of an RNN arch, or a ValueError saying what is wrong."""
    layers = arch.layers
    if len(layers) != 2 or not isinstance(layers[0], Recurrent) \
            or not isinstance(layers[1], Dense) or len(arch.input_shape) != 2:
        raise ValueError(f"{arch.name}: the RNN is input (T, D) > Recurrent(hidden) > "
                         f"Dense(out, 'linear'); got {arch.describe()}")
    return layers[0], layers[1]


def unroll(drive: torch.Tensor, w_h: torch.Tensor, act: str) -> torch.Tensor:
    """h_t = f(drive_t + W_h h_{t−1}), h_0 = 0, for every step: (N, T, H) drive → (T, N, H)
    states, time-major and contiguous — the one loop over time steps of the code base. Forward
    only (no autograd); :func:`recurrence` is the differentiable form."""
    f, _ = activation(act)
    by_time = drive.transpose(0, 1)                       # (T, N, H) view
    states = torch.empty_like(by_time, memory_format=torch.contiguous_format)
    w_h_t = w_h.t()
    h = None
    for t in range(drive.shape[1]):
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
    return states


class Recurrence(torch.autograd.Function):
    """states = recurrence(drive, W_h, B): h_t = f(drive_t + W_h h_{t−1}), with a backward
    that sends δ_{t+1} back in time as δ_{t+1} B (B of W_h's shape: W_h itself is BPTT, a fixed
    matrix is feedback alignment through time; None sends nothing back). ∂W_h is the true local
    gradient Σ_t δ_tᵀ h_{t−1} either way. drive and the returned states are (N, T, H)."""

    @staticmethod
    def forward(ctx, drive: torch.Tensor, w_h: torch.Tensor, back: Optional[torch.Tensor],
                act: str):
        states = unroll(drive, w_h, act)
        ctx.act = act
        ctx.has_back = back is not None
        ctx.save_for_backward(states, back if back is not None else w_h)
        return states.transpose(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_states: torch.Tensor):
        states, back = ctx.saved_tensors
        _, f_prime = activation(ctx.act)
        steps, hidden = states.shape[0], states.shape[2]
        slope = f_prime(states)                               # f′ at every step, one op
        grad_by_time = grad_states.transpose(0, 1)
        deltas = torch.empty_like(states)                     # ∂L/∂(pre-activation) per step
        for t in reversed(range(steps)):
            out = deltas[t]
            if t == steps - 1 or not ctx.has_back:
                out.copy_(grad_by_time[t])
            else:
                torch.addmm(grad_by_time[t], deltas[t + 1], back, out=out)
            out.mul_(slope[t])
        grad_w_h = None
        if ctx.needs_input_grad[1]:
            grad_w_h = deltas[1:].reshape(-1, hidden).t() @ states[:-1].reshape(-1, hidden)
        return deltas.transpose(0, 1), grad_w_h, None, None


def recurrence(drive: torch.Tensor, w_h: torch.Tensor, act: str,
               back: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, T, H) states of the recurrence, differentiable as :class:`Recurrence` says."""
    return Recurrence.apply(drive, w_h, back, act)


class Affine(nn.Module):
    """x Wᵀ (+ b): a dense layer whose weight comes from :func:`init_weight` alone (no draw of
    torch's own initialisation first), for networks written with explicit weights."""

    def __init__(self, weight: torch.Tensor, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device)) \
            if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.t()
        return out if self.bias is None else out + self.bias


class RNNNet(nn.Module):
    """Single-layer RNN with a dense read-out at every step, (N, T, D) → (N, T, out):
    h_t = f(W_x x_t + W_h h_{t−1}), y_t = g(W_y h_t (+ b_y)) — the DLL paper's RNN. ``back``
    chooses how errors go back in time (see :class:`Recurrence`): ``"weights"`` (BPTT), a fixed
    tensor of W_h's shape, or None; ``readout(spec, hidden)`` builds the read-out module (FA's
    sends its error down through a fixed matrix). Weights are drawn W_x, W_h, W_y in order."""

    def __init__(self, arch: Arch, init_std: float = 0.05, back: object = "weights",
                 readout: Optional[Callable[[Dense, int], nn.Module]] = None):
        super().__init__()
        recurrent, read = rnn_layers(arch)
        d_in, hidden = arch.input_shape[-1], recurrent.hidden
        self.act_name = recurrent.act
        self.out_act = read.act
        self.w_x = nn.Parameter(init_weight((hidden, d_in), init_std))
        self.w_h = nn.Parameter(init_weight((hidden, hidden), init_std))
        self.readout = readout(read, hidden) if readout is not None else Affine(
            init_weight((read.units, hidden), init_std), bias=read.bias)
        if isinstance(back, torch.Tensor):
            self.register_buffer("feedback", back)   # fixed: never a parameter
        else:
            self.feedback = None
        self.back_mode = "fixed" if isinstance(back, torch.Tensor) else (
            "weights" if back == "weights" else "none")

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """h_1 … h_T as (N, T, hidden)."""
        drive = x @ self.w_x.t()                     # input part of every step in one matmul
        back = self.w_h if self.back_mode == "weights" else self.feedback
        return recurrence(drive, self.w_h, self.act_name, back)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, _ = activation(self.out_act)
        return f(self.readout(self.hidden_states(x)))


# --------------------------------------------------------------------------------------------
# Fixed random feedback
# --------------------------------------------------------------------------------------------

def feedback_generator(seed: int) -> torch.Generator:
    """The CPU generator every feedback tensor of a run is drawn from (same seed, same B)."""
    return torch.Generator(device="cpu").manual_seed(int(seed) + FEEDBACK_SEED_OFFSET)


def draw_feedback(shape: tuple[int, ...], distribution: str, scale: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Fixed random feedback with standard deviation ``scale``: N(0, scale²) or
    U[−√3·scale, √3·scale). Drawn on the CPU (reproducible everywhere), moved by the caller."""
    if distribution == "normal":
        return torch.randn(shape, generator=generator) * scale
    if distribution == "uniform":
        return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * (math.sqrt(3.0) * scale)
    raise ValueError(f"unknown feedback distribution {distribution!r}; valid: "
                     f"{', '.join(DISTRIBUTIONS)}")


def feedback_tensors(network: nn.Module) -> dict[str, torch.Tensor]:
    """Every fixed feedback tensor of a network, by name (buffers named ``feedback…``)."""
    return {name: buf for name, buf in network.named_buffers()
            if name.rsplit(".", 1)[-1].startswith("feedback")}


def weighted_layers(network: nn.Module) -> list[tuple[str, torch.Tensor, Optional[torch.Tensor]]]:
    """(name, weight, bias or None) of each weighted layer of a network built here, in the
    architecture's order: ``input``, ``recurrent``, ``readout`` for the RNN; ``layer<i>`` (the
    index among the weighted layers) for feed-forward nets."""
    if hasattr(network, "w_x") and hasattr(network, "w_h") and hasattr(network, "readout"):
        readout = network.readout
        return [("input", network.w_x, None), ("recurrent", network.w_h, None),
                ("readout", readout.weight, getattr(readout, "bias", None))]
    out = []
    for module in network.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and module is not network:
            out.append((f"layer{len(out)}", weight, getattr(module, "bias", None)))
    return out
