"""Architecture specs from a suite's YAML, and the shapes they give — plain data, no torch.

A suite names a task's presets (``archs: [mlp, cnn]``) or writes its own network
(``archs: {wide: {layers: [flatten, {dense: 2048}, {dense: {units: 10, act: linear}}]}}``);
:func:`parse_archs` turns either into :class:`~harness.api.Arch` values, checking every field,
and :func:`layer_shapes` says what each layer receives and gives (so a mistake is caught before
any data is loaded).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from harness import params as P
from harness.api import (ACTIVATIONS, LAYER_KINDS, Arch, Conv, Dense, Flatten, Pool, Recurrent,
                         UserError)

POOL_KINDS = ("max", "avg")
_FIRST = {Dense: "units", Conv: "filters", Recurrent: "hidden", Pool: "kind"}
_POSITIVE = ("units", "filters", "kernel", "size", "hidden")


def layer_shapes(arch: Arch) -> list[tuple[object, tuple[int, ...], tuple[int, ...]]]:
    """(layer, input shape, output shape) for each layer, per sample (no batch axis)."""
    shape = tuple(arch.input_shape)
    out = []
    for layer in arch.layers:
        if isinstance(layer, Flatten):
            new: tuple[int, ...] = (math.prod(shape),)
        elif isinstance(layer, Dense):
            new = (*shape[:-1], layer.units) if len(shape) == 2 else (layer.units,)
        elif isinstance(layer, Conv):
            if len(shape) != 3:
                raise ValueError(f"{arch.name}: a convolution needs a (channels, height, width) "
                                 f"input, not {shape}")
            c, h, w = shape
            k, p = layer.kernel, layer.padding
            new = (layer.filters, h + 2 * p - k + 1, w + 2 * p - k + 1)
        elif isinstance(layer, Pool):
            if len(shape) != 3:
                raise ValueError(f"{arch.name}: pooling needs a (channels, height, width) input, "
                                 f"not {shape}")
            c, h, w = shape
            new = (c, h // layer.size, w // layer.size)
        elif isinstance(layer, Recurrent):
            if len(shape) != 2:
                raise ValueError(f"{arch.name}: a recurrent layer needs a (time, features) "
                                 f"input, not {shape}")
            new = (shape[0], layer.hidden)  # (time, hidden)
        else:
            raise TypeError(f"unknown layer {layer!r}")
        if any(d <= 0 for d in new):
            raise ValueError(f"{arch.name}: layer {layer} gives an empty output from {shape}")
        out.append((layer, shape, new))
        shape = new
    return out


def weight_shape(layer, in_shape: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """The torch-layout weight shape of a layer (None for weightless layers)."""
    if isinstance(layer, Dense):
        return (layer.units, in_shape[-1])
    if isinstance(layer, Conv):
        return (layer.filters, in_shape[0], layer.kernel, layer.kernel)
    return None


def _check(layer, kind: str, where: str) -> None:
    for name, value in vars(layer).items():
        spot = f"{where}.{kind}.{name}"
        if name in _POSITIVE or name == "padding":
            low = 0 if name == "padding" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{spot}: must be an integer ≥ {low}, not {value!r}")
        elif name == "act" and value not in ACTIVATIONS:
            raise UserError(f"{spot}: {value!r} is not one of {', '.join(ACTIVATIONS)}")
        elif name == "bias" and not isinstance(value, bool):
            raise UserError(f"{spot}: must be true or false, not {value!r}")
        elif name == "kind" and value not in POOL_KINDS:
            raise UserError(f"{spot}: {value!r} is not one of {', '.join(POOL_KINDS)}")


def parse_layer(item: Any, where: str):
    if item == "flatten":
        return Flatten()
    if not isinstance(item, dict) or len(item) != 1:
        raise UserError(f"{where}: a layer is 'flatten' or one of "
                        f"{', '.join(k + ': …' for k in LAYER_KINDS if k != 'flatten')}")
    (kind, spec), = item.items()
    if kind not in LAYER_KINDS:
        raise P.unknown_key(str(kind), list(LAYER_KINDS), where, "layer kind")
    cls = LAYER_KINDS[kind]
    first = _FIRST.get(cls)
    if not isinstance(spec, dict):
        spec = {first: spec} if first else {}
    valid = list(cls.__dataclass_fields__)
    for key in spec:
        if key not in valid:
            raise P.unknown_key(str(key), valid, f"{where}.{kind}", "key")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in spec
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{where}.{kind}: needs {', '.join(missing)}")
    layer = cls(**spec)
    _check(layer, kind, where)
    return layer


def parse_archs(task, task_params, spec: Any, where: str, ctx) -> list[Arch]:
    """The architectures a task entry names: its presets by name, or networks written out.
    ``ctx``: the RunContext the task's presets get (its data folder)."""
    presets = task.presets(task_params, ctx)
    if spec is None:
        return list(presets.values())
    if isinstance(spec, str):
        spec = [spec]
    out: list[Arch] = []
    if isinstance(spec, list):
        for i, name in enumerate(spec):
            if not isinstance(name, str) or name not in presets:
                raise P.unknown_key(str(name), list(presets), f"{where}[{i}]", "architecture")
            if presets[name] in out:
                raise UserError(f"{where}[{i}]: {name!r} is named twice")
            out.append(presets[name])
        return out
    if not isinstance(spec, dict):
        raise UserError(f"{where}: a list of preset names ({', '.join(presets)}) or a mapping "
                        "name → {layers: [...]} / preset name")
    reference = next(iter(presets.values()))
    for name, body in spec.items():
        if isinstance(body, str) or body is None:
            key = body or name
            if key not in presets:
                raise P.unknown_key(str(key), list(presets), f"{where}.{name}", "architecture")
            out.append(Arch(name, presets[key].input_shape, presets[key].layers,
                            presets[key].output_size))
            continue
        if not isinstance(body, dict) or set(body) - {"layers"}:
            bad = sorted(set(body) - {"layers"}) if isinstance(body, dict) else [repr(body)]
            raise UserError(f"{where}.{name}: a preset name or {{layers: [...]}}, not "
                            f"{', '.join(map(str, bad))}")
        layers = body.get("layers")
        if not isinstance(layers, list) or not layers:
            raise UserError(f"{where}.{name}.layers: a non-empty list of layers")
        parsed = tuple(parse_layer(item, f"{where}.{name}.layers[{i}]")
                       for i, item in enumerate(layers))
        last = parsed[-1]
        if not isinstance(last, Dense):
            raise UserError(f"{where}.{name}.layers: the last layer must be the dense output "
                            f"layer with {reference.output_size} units")
        if last.units != reference.output_size:
            raise UserError(f"{where}.{name}.layers: the output layer has {last.units} units; "
                            f"the task needs {reference.output_size}")
        arch = Arch(name, reference.input_shape, parsed, reference.output_size)
        try:
            layer_shapes(arch)
        except (ValueError, TypeError) as exc:
            raise UserError(f"{where}.{name}: {exc}") from None
        out.append(arch)
    return out
