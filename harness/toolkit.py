"""Building blocks shared by algorithm plugins, so that what should be equal across algorithms
(optimisers, schedules, initialisation, losses) is written once.

* :class:`~harness.api.TrainParams` — the hyper-parameters every algorithm has (learning rate,
  optimiser by name, momentum, weight decay, linear decay, label smoothing, weight
  initialisation); an algorithm's ``Params`` subclasses it and adds its own.
* :func:`make_optimizer` — the harness's optimiser and schedule from those params (the runner
  calls it; a plugin never does, so the optimiser is the same for every algorithm).
* :class:`ModuleLearner` — a learner around an ``nn.Module`` trained by ``loss.backward()``.
* :func:`loss_and_grad` / :func:`loss_value` — the task loss and its exact gradient with
  respect to the network's output (what local rules start from).
* :func:`activation`, :func:`init_weight` — the pieces of a layer; the networks themselves are
  in :mod:`harness.nets`.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.api import DECAYS, OPTIMIZERS, Learner, Loss, TaskInfo, TrainParams  # noqa: F401
from harness.archspec import layer_shapes, weight_shape  # noqa: F401  (plugins import them from here)


def fast_step_options(parameters: Iterable) -> dict:
    """``{"fused": True}`` when every parameter is a floating tensor on the CPU or a CUDA device:
    one fused kernel per step instead of torch's CPU default, a Python loop over tensors that
    cost about half of an MLP's matrix work here. Every algorithm gets the same step (fairness),
    and the benchmarks' bare-PyTorch baselines use it too. ``parameters`` may be param groups."""
    tensors = []
    for item in parameters:
        tensors += list(item["params"]) if isinstance(item, dict) else [item]
    ok = bool(tensors) and all(t.is_floating_point() and t.device.type in ("cpu", "cuda")
                               for t in tensors)
    return {"fused": True} if ok else {}


def make_optimizer(parameters: Iterable[torch.Tensor], p: TrainParams, epochs: int,
                   lr: Optional[float] = None) -> tuple[torch.optim.Optimizer, list]:
    """The optimiser named in ``p`` and its per-epoch schedule (a list, possibly empty)."""
    lr = p.lr if lr is None else lr
    parameters = list(parameters)
    fast = fast_step_options(parameters)
    if p.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(parameters, lr=lr,
                                                      weight_decay=p.weight_decay, **fast)
    elif p.optimizer == "adamw":
        opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=p.weight_decay, **fast)
    elif p.optimizer == "sgd":
        opt = torch.optim.SGD(parameters, lr=lr, momentum=p.momentum, weight_decay=p.weight_decay,
                              **fast)
    elif p.optimizer == "rmsprop":   # no fused kernel: one multi-tensor pass instead
        opt = torch.optim.RMSprop(parameters, lr=lr, momentum=p.momentum,
                                  weight_decay=p.weight_decay, foreach=True if fast else None)
    else:  # validated before a run starts; kept for direct callers
        raise ValueError(f"unknown optimizer {p.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if p.lr_decay == "linear":
        return opt, [torch.optim.lr_scheduler.LambdaLR(opt, lambda e: max(0.0, 1.0 - e / epochs))]
    if p.lr_decay == "cosine":
        return opt, [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))]
    return opt, []


class ModuleLearner(Learner):
    """A learner around an ``nn.Module`` trained by ``loss.backward()``: BP on an ordinary
    network, and any rule written as custom autograd Functions inside the network (FA). The
    update is the parameters' ``.grad``; the harness's optimiser steps it."""

    def __init__(self, network: nn.Module, info: TaskInfo, params: TrainParams):
        self.network = network
        self.info = info
        self.label_smoothing = params.label_smoothing

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.network.parameters())}]

    def train_step(self, x, y):
        loss = loss_value(self.info, self.network(x), y, self.label_smoothing)
        loss.backward()
        return {"loss": loss.detach()}

    def predict(self, x):
        return self.network(x)

    def state_dict(self):
        return self.network.state_dict()

    def layer_weights(self):
        from harness.nets import weighted_layers
        return weighted_layers(self.network)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

def _flat(info: TaskInfo, output: torch.Tensor, target: torch.Tensor):
    if info.loss == Loss.CROSS_ENTROPY:
        return output.reshape(-1, output.shape[-1]), target.reshape(-1)
    return output, target


def loss_value(info: TaskInfo, output: torch.Tensor, target: torch.Tensor,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """The task loss, averaged over the batch (and time steps): what BP differentiates."""
    out, tgt = _flat(info, output, target)
    if info.loss == Loss.CROSS_ENTROPY:
        return F.cross_entropy(out, tgt, label_smoothing=label_smoothing)
    return F.mse_loss(out, tgt)


def loss_and_grad(info: TaskInfo, output: torch.Tensor, target: torch.Tensor,
                  label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂output) without autograd; the gradient has ``output``'s shape.

    Cross-entropy: (softmax(a) − q)/N with q the smoothed one-hot target; MSE: 2(ŷ − y)/numel.
    Local learning rules take ``−grad`` (scaled as they need) as the output error.
    """
    out, tgt = _flat(info, output, target)
    if info.loss == Loss.CROSS_ENTROPY:
        classes = out.shape[-1]
        log_p = torch.log_softmax(out, dim=-1)
        q = torch.full_like(out, label_smoothing / classes)
        q.scatter_(1, tgt.unsqueeze(1), 1.0 - label_smoothing + label_smoothing / classes)
        loss = -(q * log_p).sum(dim=1).mean()
        grad = (log_p.exp() - q) / out.shape[0]
        return loss.detach(), grad.reshape(output.shape)
    diff = out - tgt
    return diff.pow(2).mean().detach(), (2.0 / diff.numel()) * diff


# --------------------------------------------------------------------------------------------
# Architectures made concrete
# --------------------------------------------------------------------------------------------

def activation(name: str):
    """(f, f′ as a function of f's *output*) for the named activation."""
    if name == "tanh":
        return torch.tanh, lambda y: 1.0 - y * y
    if name == "relu":
        return torch.relu, lambda y: (y > 0).to(y.dtype)
    if name == "sigmoid":
        return torch.sigmoid, lambda y: y * (1.0 - y)
    if name == "linear":
        return (lambda a: a), (lambda y: torch.ones_like(y))
    raise ValueError(f"unknown activation {name!r}")


def activation_module(name: str) -> nn.Module:
    return {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid,
            "linear": nn.Identity}[name]()


def init_weight(shape: tuple[int, ...], std: float, generator: Optional[torch.Generator] = None,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """N(0, std²) when std > 0, else PyTorch's default (Kaiming-uniform, a=√5) for the shape."""
    if std > 0:
        return torch.randn(shape, generator=generator, device=device) * std
    weight = torch.empty(shape, device=device)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight


def count_parameters(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)
