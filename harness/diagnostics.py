"""Why a rule learns as it does: on a fixed probe batch of the training split, how far each
layer's update is from backprop's gradient of the same network on the same batch, and how far
its feedback is from what backprop would send.

Stored per epoch (every ``diagnostics_every`` epochs) under the split ``diagnostics``:

* ``update_angle/<layer>`` — degrees between the rule's update (the ``.grad`` its train_step
  sets) and BP's gradient;
* ``norm_ratio/<layer>`` — ‖update‖ / ‖BP's gradient‖;
* ``feedback_angle/<layer>`` — for rules with feedback: degrees between the feedback and BP's
  counterpart — FA's B and Wᵀ, DLL's Θ and W (Lillicrap et al. 2016 measure alignment so), and
  for DFA the error it sends a hidden layer (e B_i) and BP's error at that layer's output.

The probe works on a copy of the learner, with the random state saved and restored around it,
so diagnostics change nothing of the run (same seed, same numbers, with or without them).
A learner takes part by giving its weighted layers (``layer_weights()``), and its feedback
(``feedback_pairs()`` or ``feedback_signals(x, y)``); see :class:`harness.api.Learner`.
"""
from __future__ import annotations

import copy
import math

import torch

from harness.api import Arch, Split, TaskInfo
from harness.toolkit import loss_value

PROBE_SIZE = 256


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Degrees between two tensors taken as vectors (nan if either is zero)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    norms = a.norm() * b.norm()
    if norms == 0:
        return math.nan
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a.dot(b) / norms)))))


def _bp_network(arch: Arch, device):
    from harness.nets import RNNNet, build_sequential
    net = (RNNNet(arch, 0.05) if arch.kind == "rnn"
           else build_sequential(arch, 0.05, pool_first=False))   # each layer's output kept
    return net.to(device)


def _copy_into(net, layers) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Copy (name, weight, bias) of a rule's layers into the BP network's weighted layers (in
    order); returns the BP network's (name, weight, bias) parameters."""
    from harness.nets import weighted_layers
    targets = weighted_layers(net)
    if len(targets) != len(layers):
        raise ValueError(f"{len(layers)} layers from the rule, {len(targets)} in BP's network")
    with torch.no_grad():
        for (_, w, b), (_, tw, tb) in zip(layers, targets):
            tw.copy_(w.reshape(tw.shape))
            if tb is not None:
                tb.copy_(b if b is not None else torch.zeros_like(tb))
    return targets


def alignment(learner, arch: Arch, info: TaskInfo, x: torch.Tensor, y: torch.Tensor,
              label_smoothing: float = 0.0) -> dict[str, float]:
    """The diagnostics of one probe batch (see the module docstring); {} for a learner that
    does not say what its layers are."""
    layers_of = getattr(learner, "layer_weights", None)
    if layers_of is None or layers_of() is None:
        return {}
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if x.is_cuda else None
    try:
        probe = copy.deepcopy(learner)
        for group in probe.parameter_groups():
            for p in group["params"]:
                p.grad = None
        probe.train_step(x, y)
        rule_layers = probe.layer_weights()
        bp = _bp_network(arch, x.device)
        bp_layers = _copy_into(bp, rule_layers)
        outputs = _hooked_outputs(bp)
        loss_value(info, bp(x), y, label_smoothing).backward()
        out: dict[str, float] = {}
        for (name, w, b), (_, bw, bb) in zip(rule_layers, bp_layers):
            if w.grad is None or bw.grad is None:
                continue
            rule = [w.grad] + ([b.grad] if b is not None and b.grad is not None else [])
            ref = [bw.grad] + ([bb.grad] if bb is not None and b is not None else [])
            rule_flat = torch.cat([t.flatten() for t in rule])
            ref_flat = torch.cat([t.flatten() for t in ref])
            out[f"update_angle/{name}"] = angle(rule_flat, ref_flat)
            out[f"norm_ratio/{name}"] = float(rule_flat.norm() / ref_flat.norm()) \
                if float(ref_flat.norm()) > 0 else math.nan
        pairs = getattr(probe, "feedback_pairs", None)
        for name, feedback, counterpart in (pairs() if pairs else []):
            out[f"feedback_angle/{name}"] = angle(feedback, counterpart)
        signals = getattr(probe, "feedback_signals", None)
        if signals is not None:
            bp_errors = [t.grad for t in outputs[:-1]]
            for (name, sent), error in zip(signals(x, y), bp_errors):
                if error is not None:
                    out[f"feedback_angle/{name}"] = angle(sent, error)
        return out
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


def _hooked_outputs(net) -> list[torch.Tensor]:
    """The outputs of each weighted layer after its activation, in a forward pass of the BP
    network ``net`` (an nn.Sequential; none for the RNN), kept with their gradients."""
    from torch import nn
    kept: list[torch.Tensor] = []
    if not isinstance(net, nn.Sequential):
        return kept
    modules = list(net)

    def keep(_, __, output):
        output.retain_grad()
        kept.append(output)
    for i, module in enumerate(modules):
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            after = modules[i + 1] if i + 1 < len(modules) else None
            (after if isinstance(after, (nn.Tanh, nn.ReLU, nn.Sigmoid)) else module
             ).register_forward_hook(keep)
    return kept


def probe_batch(x: torch.Tensor, y: torch.Tensor, seed: int):
    """A fixed batch of the training split (the same one every epoch)."""
    g = torch.Generator().manual_seed(seed + 104729)
    idx = torch.randperm(len(y), generator=g)[:PROBE_SIZE].to(x.device)
    return x[idx], y[idx]


SPLIT = Split.DIAGNOSTICS
