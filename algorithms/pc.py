"""Predictive coding (Whittington & Bogacz 2017; Millidge et al. 2020; PCX, ICLR 2025).

Value nodes x_i sit after every hidden weighted layer; each layer predicts the node above from
the node below, μ_{i+1} = F_i(x_i; W_i) (F_i = the layer, its activation and any pooling /
flattening after it). With M the number of loss terms in the batch (N, or N·T for sequences):

    ε_i     = x_i − μ_i                                        prediction errors
    E       = Σ_i ½‖ε_i‖² + M·ℓ(μ_L, y)                        energy (x_L clamped via the loss)
    ∂E/∂x_i = ε_i + J_iᵀ ∂E/∂μ_{i+1},   ∂E/∂μ_{i+1} = −ε_{i+1} (hidden) or M·ℓ′ (output)
    x_i    ← x_i − γ·v,  v ← m·v + ∂E/∂x_i                     T inference steps (SGD, momentum m)
    ∂W_i    = (1/M) (∂μ_{i+1}/∂W_i)ᵀ ∂E/∂μ_{i+1}               local: x_i is a detached leaf

J_iᵀ(·) and ∂μ/∂W are vector–Jacobian products of one layer on its own detached input
(torch.autograd.grad), so every weight's gradient is a function of its own layer's input node
and the error above it only. The nodes start at a forward pass (all hidden ε = 0, so that
pass is the first step's prediction); evaluation is a plain forward pass.

Defaults (suites/tune_pc_dtp.yaml, chosen on validation; reports/tune_pc_dtp/): standard PC,
T = 3 inference steps at state step 0.1, weights at lr 3e-4. At step 0.3 and lr 1e-3 standard
PC matched BP on a 10,000-image sweep but collapsed after 6 epochs on full MNIST; the
full-data stage of the sweep picked the smaller steps. These defaults are the MLP's: T must
reach the depth for the first layer to learn (below), and on the paper CNN (4 value nodes) the
same kind of search chose T = 8 (suites/tune_pc_cnn.yaml, which the paper table follows).

``fixed_predictions`` (Millidge et al. 2020; the DLL paper's RNN baseline) keeps μ and the
Jacobians at their forward-pass values during inference; then the hidden errors converge to
BP's (BPTT's) errors and ΔW to BP's gradient as T grows (tests/test_pc_dtp.py). On a
feed-forward net each node error stays an exact multiple of BP's, so once T reaches the bottom
node the weight gradients are BP's times one scalar per layer — which Adam divides out: there
it is BP, not a rival (tune_pc_dtp: BP's validation accuracy to the digit on MNIST at
every T and step, within 0.12 points on FashionMNIST).
It is the form to use for the RNN, where credit through time makes it differ from BPTT until
T is large (suites/paper_table.yaml: 100 steps at 0.1, as the DLL paper compares). T = 1 with
γ = 1 is the one-step variant: each node gets only the error of the layer (or read-out)
directly above it, no credit through time.

RNN (tanh, (N, T, D) → (N, T, out)): one value node h_t per time step,
μ_t = tanh(W_x x_t + W_h h_{t−1}), read-out ŷ_t = W_y h_t, all time steps predicted at once.

Cost per batch (standard PC on a feed-forward net, :func:`layered_inference`): the nodes start
at the forward pass, so an error goes down one layer per inference step, and only the layers it
has reached are differentiated and predicted again; at T = 3 that is 1.26× BP's matrix work on
the MNIST MLP and 0.69× on the paper's MNIST CNN, whose first conv layer the error never reaches
(its weight gradient is exactly zero until T ≥ 4 there). The RNN and fixed predictions
(:func:`dense_inference`): a forward pass, T state backward passes, T−1 re-predictions (none
with fixed predictions), a forward at the final nodes and the weight products
(benchmarks/bench_roofline.py counts each, checked against torch's dispatcher).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.api import (Algorithm, Arch, Conv, Dense, Learner, Pool, RunContext, TaskInfo,
                         TrainParams, param)
from harness.nets import Affine, layer_modules, recurrence, rnn_layers
from harness.registry import algorithms
from harness.toolkit import ModuleLearner, activation_module, init_weight, loss_and_grad


# --------------------------------------------------------------------------------------------
# Networks of value nodes: each says how every node and the output are predicted
# --------------------------------------------------------------------------------------------

class PCFeedForward(nn.Module):
    """MLP/CNN as blocks [weighted layer, activation, pool/flatten…]; a node after each but the
    last. ``stem`` holds weightless layers before the first weighted one (the MLP's Flatten)."""

    def __init__(self, arch: Arch, init_std: float):
        super().__init__()
        stem: list[nn.Module] = []
        blocks: list[list[nn.Module]] = []
        for layer, module, act in layer_modules(arch, init_std):
            if isinstance(layer, (Dense, Conv)):
                blocks.append([module] + ([act] if act is not None else []))
            elif (blocks and isinstance(layer, Pool) and layer.kind == "max"
                  and len(blocks[-1]) == 2):     # [conv, f] + max-pool → [conv, max-pool, f]:
                blocks[-1].insert(1, module)     # f monotone, the same node values and
            else:                                # gradients, f on a quarter of the units
                (blocks[-1] if blocks else stem).append(module)   # pools, flatten close it
        self.stem = nn.Sequential(*stem)
        self.blocks = nn.ModuleList(nn.Sequential(*b) for b in blocks)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def init_nodes(self, x):
        """Forward pass: nodes := predictions. Returns (leaves, μ's, output), the graph of each
        prediction starting at the (detached) node below — the first inference step's."""
        below, leaves, mus = self.stem(x), [], []
        for block in self.blocks[:-1]:
            mus.append(block(below))
            below = mus[-1].detach().requires_grad_()
            leaves.append(below)
        return leaves, mus, self.blocks[-1](below)

    def predictions(self, x, nodes, first=None):
        """(μ_1 … μ_{L−1}, μ_L): each from the node below only. μ_1 depends on the input
        alone, so inference passes the forward pass's as ``first`` instead of recomputing it."""
        mus = [self.blocks[0](self.stem(x)) if first is None else first]
        mus += [block(node) for block, node in zip(self.blocks[1:], nodes)]
        return mus[:-1], mus[-1]


class PCRecurrent(nn.Module):
    """The RNN: h_t = f(W_x x_t + W_h h_{t−1}), ŷ_t = g(W_y h_t (+ b_y)); one node tensor
    (N, T, H) holds every h_t."""

    def __init__(self, arch: Arch, init_std: float):
        super().__init__()
        recurrent, readout = rnn_layers(arch)
        hidden, inputs = recurrent.hidden, arch.input_shape[-1]
        self.w_x = nn.Parameter(init_weight((hidden, inputs), init_std))
        self.w_h = nn.Parameter(init_weight((hidden, hidden), init_std))
        self.readout = Affine(init_weight((readout.units, hidden), init_std), bias=readout.bias)
        self.act_name = recurrent.act
        self.act = activation_module(recurrent.act)
        self.readout_act = activation_module(readout.act)

    def states(self, x):
        """h_1 … h_T of a forward pass, (N, T, H) (differentiable by BPTT: BP's reference)."""
        return recurrence(x.matmul(self.w_x.t()), self.w_h, self.act_name,
                          back=self.w_h).contiguous()

    def forward(self, x):
        return self.readout_act(self.readout(self.states(x)))

    def predictions(self, x, nodes, first=None):
        (h,) = nodes
        previous = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # h_{t−1}, h_0 = 0
        mu = self.act(x.matmul(self.w_x.t()) + previous.matmul(self.w_h.t()))
        return [mu], self.readout_act(self.readout(h))

    def init_nodes(self, x):
        with torch.no_grad():
            leaf = self.states(x).requires_grad_()
        mus, out = self.predictions(x, [leaf])
        return [leaf], mus, out


# --------------------------------------------------------------------------------------------
# Energy, inference, local weight gradients
# --------------------------------------------------------------------------------------------

def energy(nodes, mus, loss, n_terms):
    """E = Σ_i ½‖x_i − μ_i‖² + M·ℓ, reported per loss term (E/M)."""
    return (sum(0.5 * (x - mu).pow(2).sum() for x, mu in zip(nodes, mus)) + n_terms * loss) / n_terms


def _node_step(node, velocity, error, top_down, momentum: float, state_lr: float):
    """One state update, (x_i − γ·v, v) with v = m·v + ∂E/∂x_i and ∂E/∂x_i = ε_i + J_iᵀ(·).
    Without momentum (the defaults) v is ∂E/∂x_i itself, formed in place in ``error`` (a fresh
    tensor the caller no longer reads): three fewer passes over the node and no velocity kept.
    That is m·v + ∂E/∂x_i with m = 0 value for value: 0·v is a zero, and adding a zero changes
    nothing but, where ∂E/∂x_i is −0, the sign of that zero; where v is already not finite the
    node is too, and the run diverges either way."""
    if not momentum:
        return node - error.add_(top_down).mul_(state_lr), None
    velocity = momentum * velocity + (error + top_down)
    return node - state_lr * velocity, velocity


def _per_term(grads, cotangents, n_terms: int) -> list[torch.Tensor]:
    """Each weight gradient divided by M, in place where it is a tensor of its own (the usual
    case: a product autograd just made, so no second pass over fresh memory), else into a new
    tensor: autograd may hand back a cotangent itself, or one tensor for two weights (a weight
    added straight onto a node's shape)."""
    seen = {t.untyped_storage().data_ptr() for t in cotangents}
    out = []
    for g in grads:
        where = g.untyped_storage().data_ptr()
        out.append(g / n_terms if where in seen else g.div_(n_terms))
        seen.add(where)
    return out


def inference(net, x, y, info: TaskInfo, steps: int, state_lr: float, momentum: float = 0.0,
              fixed_predictions: bool = False, label_smoothing: float = 0.0,
              record_energy: bool = False):
    """Run T inference steps on one batch and return (weight gradients, the forward pass's
    task loss, energies).

    ``energies`` (when recorded) holds E/M before each state update and after the last.
    A feed-forward net with re-predictions takes :func:`layered_inference` (the same numbers,
    without the work that is exactly zero); the RNN and fixed predictions take
    :func:`dense_inference`.
    """
    if isinstance(net, PCFeedForward) and not fixed_predictions:
        return layered_inference(net, x, y, info, steps, state_lr, momentum, label_smoothing,
                                 record_energy)
    return dense_inference(net, x, y, info, steps, state_lr, momentum, fixed_predictions,
                           label_smoothing, record_energy)


def dense_inference(net, x, y, info: TaskInfo, steps: int, state_lr: float,
                    momentum: float = 0.0, fixed_predictions: bool = False,
                    label_smoothing: float = 0.0, record_energy: bool = False):
    """Every node, error and Jacobian product at every step, for any net (:func:`inference`)."""
    leaves, mus, out = net.init_nodes(x)
    first = mus[0].detach() if isinstance(net, PCFeedForward) and mus else None
    n_terms = out.shape[0] * (out.shape[1] if info.sequence else 1)
    nodes = [leaf.detach() for leaf in leaves]
    velocity = [torch.zeros_like(node) if momentum else None for node in nodes]
    loss, out_grad = loss_and_grad(info, out.detach(), y, label_smoothing)
    forward_loss = loss                                   # the forward pass's: what is reported
    energies = []
    for step in range(steps):
        if step > 0 and not fixed_predictions:          # re-predict from the moved nodes
            leaves = [node.requires_grad_() for node in nodes]
            mus, out = net.predictions(x, leaves, first=first)
            loss, out_grad = loss_and_grad(info, out.detach(), y, label_smoothing)
        errors = [node - mu.detach() for node, mu in zip(nodes, mus)]           # ε_i
        if record_energy:
            energies.append(energy(nodes, [m.detach() for m in mus], loss, n_terms).detach())
        dE_dmu = [-e for e in errors] + [n_terms * out_grad]
        linked = [(mu, g) for mu, g in zip(mus + [out], dE_dmu) if mu.requires_grad]
        top_down = torch.autograd.grad([m for m, _ in linked], leaves, [g for _, g in linked],
                                       retain_graph=fixed_predictions)         # J_iᵀ ∂E/∂μ_{i+1}
        with torch.no_grad():
            for i, (e, jt) in enumerate(zip(errors, top_down)):
                nodes[i], velocity[i] = _node_step(nodes[i], velocity[i], e, jt, momentum,
                                                   state_lr)
    if not fixed_predictions:                             # predictions at the final nodes
        mus, out = net.predictions(x, nodes)
        loss, out_grad = loss_and_grad(info, out.detach(), y, label_smoothing)
    errors = [node - mu.detach() for node, mu in zip(nodes, mus)]
    if record_energy:
        energies.append(energy(nodes, [m.detach() for m in mus], loss, n_terms).detach())
    weights = [w for w in net.parameters()]
    dE_dmu = [-e for e in errors] + [n_terms * out_grad]
    grads = torch.autograd.grad(mus + [out], weights, dE_dmu)                  # local ∂E/∂W_i
    return _per_term(grads, dE_dmu, n_terms), forward_loss, energies


def layered_inference(net: PCFeedForward, x, y, info: TaskInfo, steps: int, state_lr: float,
                      momentum: float = 0.0, label_smoothing: float = 0.0,
                      record_energy: bool = False):
    """:func:`dense_inference` of a feed-forward net with re-predictions, less its exact zeros.

    The nodes start at the forward pass, so every hidden error is 0 there and only the output
    loss pulls: at step s only the top s+1 nodes have moved from their forward values (an error
    goes down one layer per step). What dense inference computes beyond them is exactly zero or
    exactly what it had: the Jacobian products of zero errors, the re-predictions of blocks whose
    input node has not moved, and the weight gradients of blocks whose error is still zero (the
    bottom blocks' when T is below the depth). Here block j (0 = the input's) carries error to its
    input node from step depth − j on, is predicted again once that node has moved, and keeps its
    forward-pass graph until then. For finite values the result is the dense schedule's, value
    for value (tests/test_pc_dtp.py; where a node is already NaN the dense schedule spreads it
    into the bottom blocks, this one leaves them 0), for 0.59× its matrix work on the paper's
    MNIST MLP at T = 3 and 0.27× on its MNIST CNN (benchmarks/bench_roofline.py counts it).
    """
    blocks = net.blocks
    depth = len(blocks) - 1               # value nodes: the outputs of blocks 0 … depth−1
    preds: list[torch.Tensor] = []        # preds[j]: block j's prediction (preds[depth]: output)
    leaves: list = [None]                 # leaves[j]: block j's (detached) input, j ≥ 1
    for j, block in enumerate(blocks):    # the forward pass, one graph per block
        preds.append(block(net.stem(x) if j == 0 else leaves[j]))
        if j < depth:
            leaves.append(preds[j].detach().requires_grad_())
    nodes = [leaf.detach() for leaf in leaves[1:]]          # nodes[i]: block i's output node
    velocity = [torch.zeros_like(node) if momentum else None for node in nodes]
    n_terms = preds[depth].shape[0] * (preds[depth].shape[1] if info.sequence else 1)

    def predict_again(j: int) -> None:    # block j from its input node as it is now
        leaves[j] = nodes[j - 1].detach().requires_grad_()
        preds[j] = blocks[j](leaves[j])

    def record(loss) -> None:
        if record_energy:
            energies.append(energy(nodes, [p.detach() for p in preds[:depth]], loss,
                                   n_terms).detach())

    loss, out_grad = loss_and_grad(info, preds[depth].detach(), y, label_smoothing)
    forward_loss = loss                                   # the forward pass's: what is reported
    energies: list = []
    for step in range(steps):
        low = max(depth - step, 1)        # blocks low … depth carry error to their input node
        if step > 0:                      # blocks whose input node moved at the last step
            for j in range(max(depth - step + 1, 1), depth + 1):
                predict_again(j)
            loss, out_grad = loss_and_grad(info, preds[depth].detach(), y, label_smoothing)
        record(loss)
        if not depth:                     # no value nodes: nothing to infer
            continue
        errors = [nodes[i] - preds[i].detach() for i in range(low - 1, depth)]  # ε_i, i ≥ low−1
        cotangents = [-e for e in errors[1:]] + [n_terms * out_grad]            # ∂E/∂μ_j, j ≥ low
        top_down = torch.autograd.grad(preds[low:], leaves[low:], cotangents)  # J_iᵀ ∂E/∂μ_{i+1}
        with torch.no_grad():
            for i, e, jt in zip(range(low - 1, depth), errors, top_down):
                nodes[i], velocity[i] = _node_step(nodes[i], velocity[i], e, jt, momentum,
                                                   state_lr)
    last = max(depth - steps, 0)          # blocks last … depth have error at the final nodes
    for j in range(max(depth - steps + 1, 1), depth + 1):   # their inputs moved
        predict_again(j)
    loss, out_grad = loss_and_grad(info, preds[depth].detach(), y, label_smoothing)
    record(loss)
    weights = [w for block in blocks[last:] for w in block.parameters()]
    cotangents = [-(nodes[i] - preds[i].detach()) for i in range(last, depth)]
    cotangents.append(n_terms * out_grad)
    grads = _per_term(torch.autograd.grad(preds[last:], weights, cotangents), cotangents, n_terms)
    by_weight = {id(w): g for w, g in zip(weights, grads)}    # the blocks below: exactly 0
    return ([by_weight[id(w)] if id(w) in by_weight else torch.zeros_like(w)
             for w in net.parameters()], forward_loss, energies)


# --------------------------------------------------------------------------------------------
# The plugin
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PCParams(TrainParams):
    lr: float = param(3e-4, "learning rate of the weights (chosen on validation, full MNIST: "
                      "suites/tune_pc_dtp.yaml)", min=0.0)
    inference_steps: int = param(3, "T: inference steps on the value nodes per batch", min=0)
    state_lr: float = param(0.1, "γ: step size of the value-node updates (SGD); 0.3 at lr 1e-3 "
                            "collapses on full MNIST", min=0.0)
    state_momentum: float = param(0.0, "momentum of the value-node SGD (0 = plain SGD)",
                                  min=0.0, max=1.0)
    fixed_predictions: bool = param(False, "keep predictions and Jacobians at the forward "
                                    "pass during inference (Millidge et al. 2020; the DLL "
                                    "paper's RNN baseline; on a feed-forward net under Adam "
                                    "it trains exactly as BP)")


class PCLearner(ModuleLearner):
    def __init__(self, network: nn.Module, info: TaskInfo, params: PCParams):
        super().__init__(network, info, params)
        self.p = params

    def train_step(self, x, y):
        p = self.p
        grads, loss, _ = inference(self.network, x, y, self.info, p.inference_steps, p.state_lr,
                                   p.state_momentum, p.fixed_predictions, p.label_smoothing)
        for weight, grad in zip(self.network.parameters(), grads):
            weight.grad = grad
        return {"loss": loss}


def build_pc_network(arch: Arch, init_std: float) -> nn.Module:
    return PCRecurrent(arch, init_std) if arch.kind == "rnn" else PCFeedForward(arch, init_std)


@algorithms.register("pc", aliases=("predictive_coding",))
class PredictiveCoding(Algorithm):
    """Predictive coding: T inference steps on value nodes, local weight updates (MLP, CNN, RNN)."""

    supports = frozenset({"mlp", "cnn", "rnn"})
    channels_last = True    # its conv steps run faster so on the CPU (harness.nets)
    Params = PCParams

    def build(self, arch: Arch, info: TaskInfo, params: PCParams, ctx: RunContext) -> Learner:
        network = build_pc_network(arch, params.init_std).to(ctx.device)
        return PCLearner(network, info, params)
