"""Difference target propagation (Lee et al. 2015; Bartunov et al. 2018) for the MLP.

Forward layers h_{i+1} = f_i(W_i h_i) (h_0 = the flattened image, h_L = the logits). Every
hidden layer i ≥ 1 has a learned approximate inverse g_i(h_{i+1}) = f_{i−1}(V_i h_{i+1}) ≈ h_i
with its own weights V_i and its own Adam. Per batch:

    inverses   k times: ε ~ N(0, σ²),  min_V  Σ_i ½‖g_i(f_i(h_i + ε)) − (h_i + ε)‖²
    targets    t_L = h_L − β ∂ℓ/∂h_L                      (one gradient step from the output)
               t_i = g_i(t_{i+1}) + h_i − g_i(h_{i+1})    (difference correction)
    forward    min_{W_i} ½‖f_i(W_i h_i) − t_{i+1}‖²        (gradient within the layer only:
               ∂W_i = ((h_{i+1} − t_{i+1}) ⊙ f_i′) h_iᵀ / N)

ℓ is the per-sample task loss (its exact gradient from :func:`harness.toolkit.loss_and_grad`),
so t_L − h_L = −β·(softmax − onehot). The difference correction makes t_i = h_i whenever
t_{i+1} = h_{i+1}, whatever the inverse's error, and with exact linear inverses gives
t_i = W_i⁻¹ t_{i+1} (tests/test_pc_dtp.py). Evaluation is a forward pass.

Convolutional nets (``arch.kind == "cnn"``) are trained by :mod:`algorithms._dtp_conv`: the
same difference targets and layer-local losses, with each layer's feedback learned by L-DRL
(Ernoult et al. 2022) so that it approaches the transposed forward Jacobian; pools and flatten
carry targets through their own transposed Jacobians. Its parameters are ``target_step`` (shared)
and the ``feedback_*`` ones; the ``inverse_*`` ones are the MLP's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from algorithms._dtp_conv import ConvDTPLearner, ConvDTPNetwork, conv_unsupported
from harness.api import (Algorithm, Arch, Dense, Flatten, Learner, RunContext, TaskInfo,
                         TrainParams, param)
from harness.registry import algorithms
from harness.toolkit import (ModuleLearner, activation, fast_step_options, init_weight,
                             layer_shapes, loss_and_grad)


class DTPNetwork(nn.Module):
    """Dense layers W_0 … W_{L−1} (after an optional leading Flatten; each with a bias b_i where
    its spec asks for one) and inverses V_1 … V_{L−1} (``inverses[i−1]`` maps h_{i+1} back to
    h_i)."""

    def __init__(self, arch: Arch, init_std: float):
        super().__init__()
        dense = []
        for position, (layer, in_shape, _) in enumerate(layer_shapes(arch)):
            if isinstance(layer, Flatten) and position == 0:
                continue
            if not isinstance(layer, Dense) or len(in_shape) != 1:
                raise ValueError(f"{arch.name}: DTP builds [Flatten,] Dense… only, "
                                 f"got {arch.describe()}")
            dense.append((layer, in_shape[0]))
        self.weights = nn.ParameterList(nn.Parameter(init_weight((layer.units, n_in), init_std))
                                        for layer, n_in in dense)
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(layer.units))
                                       for layer, _ in dense if layer.bias)
        self.bias_of = {}
        for i, (layer, _) in enumerate(dense):
            if layer.bias:
                self.bias_of[i] = len(self.bias_of)
        self.acts = [layer.act for layer, _ in dense]
        self.inverses = nn.ParameterList(
            nn.Parameter(init_weight((n_in, layer.units), init_std)) for layer, n_in in dense[1:])

    def forward_parameters(self) -> list[nn.Parameter]:
        return list(self.weights) + list(self.biases)

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """f_i(W_i h (+ b_i))."""
        a = h.matmul(self.weights[i].t())
        if i in self.bias_of:
            a = a + self.biases[self.bias_of[i]]
        return activation(self.acts[i])[0](a)

    def inverse(self, i: int, h_above: torch.Tensor) -> torch.Tensor:
        """g_i(h_{i+1}) = f_{i−1}(V_i h_{i+1}) ≈ h_i, for 1 ≤ i ≤ L−1."""
        return activation(self.acts[i - 1])[0](h_above.matmul(self.inverses[i - 1].t()))

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        hs = [x.reshape(x.shape[0], -1)]
        for i in range(len(self.weights)):
            hs.append(self.layer(i, hs[-1]))
        return hs

    def forward(self, x):
        return self.activations(x)[-1]


@torch.no_grad()   # constants of the rule: in-place sums, no graph
def difference_targets(net: DTPNetwork, hs: list[torch.Tensor],
                       output_target: torch.Tensor) -> list[Optional[torch.Tensor]]:
    """t_L = output_target, t_i = g_i(t_{i+1}) + h_i − g_i(h_{i+1}) down to i = 1 (t_0: None)."""
    targets: list[Optional[torch.Tensor]] = [None] * len(hs)
    targets[-1] = output_target
    for i in range(len(hs) - 2, 0, -1):
        targets[i] = net.inverse(i, targets[i + 1]).add_(hs[i]).sub_(net.inverse(i, hs[i + 1]))
    return targets


def inverse_loss(net: DTPNetwork, hs: list[torch.Tensor], noise: float) -> torch.Tensor:
    """Σ_i ½‖g_i(f_i(h_i + ε)) − (h_i + ε)‖² / N over the hidden layers (forward W fixed)."""
    total = hs[0].new_zeros(())
    for i in range(1, len(hs) - 1):
        corrupted = hs[i] + noise * torch.randn_like(hs[i])
        with torch.no_grad():
            above = net.layer(i, corrupted)
        total = total + 0.5 * (net.inverse(i, above) - corrupted).pow(2).sum()
    return total / hs[0].shape[0]


@torch.no_grad()   # constants of the rule: in-place sums, no graph
def forward_gradients(net: DTPNetwork, hs: list[torch.Tensor],
                      targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """∂/∂W_i (and ∂/∂b_i) of ½‖h_{i+1} − t_{i+1}‖² / N with h_i held fixed (the layer-local
    gradient), in the order of :meth:`DTPNetwork.forward_parameters`."""
    weight_grads, bias_grads = [], []
    for i in range(len(net.weights)):
        derivative = activation(net.acts[i])[1](hs[i + 1])
        delta = (hs[i + 1] - targets[i + 1]).mul_(derivative)
        weight_grads.append(delta.t().matmul(hs[i]).div_(hs[0].shape[0]))
        if i in net.bias_of:
            bias_grads.append(delta.sum(0).div_(hs[0].shape[0]))
    return weight_grads + bias_grads


@dataclass(frozen=True)
class DTPParams(TrainParams):
    target_step: float = param(0.5, "β: the output target is h_L − β ∂ℓ/∂h_L", min=0.0)
    inverse_noise: float = param(0.1, "MLP: σ of the Gaussian corruption in the inverses' "
                                 "reconstruction loss", min=0.0)
    inverse_lr: float = param(3e-4, "MLP: learning rate of the inverses' own Adam", min=0.0)
    inverse_updates: int = param(1, "MLP: inverse Adam steps per batch (before the targets)",
                                 min=0)
    feedback_lr: float = param(3e-3, "CNN: learning rate of the feedback kernels' own Adam "
                               "(L-DRL)", min=0.0)
    feedback_noise: float = param(0.05, "CNN: σ of the noise at each layer's input in the "
                                  "feedback (L-DRL) loss", min=1e-6)
    feedback_updates: int = param(1, "CNN: feedback Adam steps per batch (before the targets)",
                                  min=0)
    feedback_samples: int = param(0, "CNN: how many of the batch's samples the feedback loss "
                                  "uses (0 = all): its cost scales with it", min=0)


class DTPLearner(ModuleLearner):
    """The forward weights are the harness's to step; the inverses have their own Adam — the
    one optimiser a plugin builds (the declared exception: they learn a reconstruction, not the
    task). predict and state_dict are ModuleLearner's."""

    def __init__(self, network: DTPNetwork, info: TaskInfo, params: DTPParams):
        super().__init__(network, info, params)
        self.p = params
        inverses = list(network.inverses.parameters())
        self.inverse_optimizer = torch.optim.Adam(inverses, lr=params.inverse_lr,
                                                  **fast_step_options(inverses))

    def parameter_groups(self) -> list[dict]:
        return [{"params": self.network.forward_parameters()}]

    def layer_weights(self):
        net = self.network
        return [(f"layer{i}", w, net.biases[net.bias_of[i]] if i in net.bias_of else None)
                for i, w in enumerate(net.weights)]

    def train_step(self, x, y):
        net, p = self.network, self.p
        with torch.no_grad():
            hs = net.activations(x)
        reconstruction = None
        for _ in range(p.inverse_updates):
            self.inverse_optimizer.zero_grad(set_to_none=True)
            reconstruction = inverse_loss(net, hs, p.inverse_noise)
            reconstruction.backward()
            self.inverse_optimizer.step()
        with torch.no_grad():
            loss, out_grad = loss_and_grad(self.info, hs[-1], y, p.label_smoothing)
            output_target = hs[-1] - p.target_step * out_grad * hs[-1].shape[0]
            targets = difference_targets(net, hs, output_target)
            for weight, grad in zip(net.forward_parameters(), forward_gradients(net, hs, targets)):
                weight.grad = grad
        stats = {"loss": loss}
        if reconstruction is not None:      # logged: averaged over the epoch, split "train"
            stats["inverse_loss"] = reconstruction.detach()
        return stats


@algorithms.register("dtp", aliases=("target_propagation", "difference_target_propagation"))
class DifferenceTargetPropagation(Algorithm):
    """Difference target propagation: learned inverses/feedback carry targets; local losses."""

    supports = frozenset({"mlp", "cnn"})
    channels_last = True    # its conv steps run faster so on the CPU (harness.nets)
    Params = DTPParams

    def unsupported(self, arch: Arch, params) -> Optional[str]:
        reason = super().unsupported(arch, params)
        if reason is None and arch.kind == "cnn":
            reason = conv_unsupported(arch)
        return reason

    def build(self, arch: Arch, info: TaskInfo, params: DTPParams, ctx: RunContext) -> Learner:
        if arch.kind == "cnn":
            return ConvDTPLearner(ConvDTPNetwork(arch, params.init_std).to(ctx.device), info,
                                  params)
        return DTPLearner(DTPNetwork(arch, params.init_std).to(ctx.device), info, params)
