"""YAML suite → checked :class:`Suite` → list of :class:`RunSpec`.

Every mistake raises :class:`UserError` with one line naming the file, the key and what is
valid. See the README ("Writing a suite") for the format; in short::

    name: quick                 # default: the file's stem
    seeds: 2                    # or a list [0, 1]
    epochs: 5
    batch_size: 128
    protocol: clean             # clean | paper
    tasks:
      mnist: {archs: [mlp], params: {train_subset: 5000}}
    algorithms:
      bp: {lr: [1e-3, 5e-4]}    # a list is a grid
      bp-sgd: {algorithm: bp, optimizer: sgd}
    overrides:
      - {match: {task: mnist}, params: {lr: 1e-3}, batch_size: 64}
    exclude:
      - {algorithm: bp-sgd, arch: cnn}
    reference:
      source: "Lv et al. 2025, Table 1"
      values: {bp: {mnist: {mlp: [98.62, 0.17]}}}
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from harness import params as P
from harness.api import (ACTIVATIONS, LAYER_KINDS, PROTOCOLS, Arch, Conv, Dense, Flatten, Pool,
                         Recurrent, RunSpec, UserError)
from harness.registry import algorithms, tasks

TOP_KEYS = ("name", "description", "store", "seeds", "epochs", "batch_size", "protocol",
            "validation", "patience", "tasks", "algorithms", "overrides", "exclude", "reference")
TASK_KEYS = ("task", "archs", "params")
OVERRIDE_KEYS = ("match", "params", "batch_size", "epochs", "patience")
MATCH_KEYS = ("task", "algorithm", "arch")
EXCLUDE_KEYS = ("task", "algorithm", "arch", "seed")


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    store_path: Path
    specs: list[RunSpec]
    references: dict[tuple[str, str, str], tuple[float, Optional[float]]] = field(default_factory=dict)
    reference_source: str = ""
    row_order: list[str] = field(default_factory=list)
    column_order: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, tuple[str, str]] = field(default_factory=dict)   # task -> (metric, direction)


def _load_yaml(path: Path) -> dict:
    import yaml
    if not path.exists():
        raise UserError(f"{path}: no such suite file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where} is not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a suite is a mapping of keys ({', '.join(TOP_KEYS)})")
    return data


def _check_keys(value: Any, valid: tuple, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: must be a mapping with keys {', '.join(valid)}")
    for key in value:
        if key not in valid:
            raise P.unknown_key(str(key), list(valid), where, "key")
    return value


def _int(value: Any, where: str, low: int = 0, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{where}: must be an integer ≥ {low}, not {value!r}")
    return value


def _parse_layer(item: Any, where: str):
    if item == "flatten":
        return Flatten()
    if not isinstance(item, dict) or len(item) != 1:
        raise UserError(f"{where}: a layer is 'flatten' or one of "
                        f"{', '.join(k + ': …' for k in LAYER_KINDS if k != 'flatten')}")
    (kind, spec), = item.items()
    if kind not in LAYER_KINDS:
        raise P.unknown_key(str(kind), list(LAYER_KINDS), where, "layer kind")
    cls = LAYER_KINDS[kind]
    first = {Dense: "units", Conv: "filters", Recurrent: "hidden", Pool: "kind"}.get(cls)
    if not isinstance(spec, dict):
        spec = {first: spec} if first else {}
    valid = tuple(cls.__dataclass_fields__)
    _check_keys(spec, valid, f"{where}.{kind}")
    try:
        layer = cls(**spec)
    except TypeError as exc:
        raise UserError(f"{where}.{kind}: {exc}") from None
    for name in ("units", "filters", "kernel", "size", "hidden"):
        if hasattr(layer, name):
            _int(getattr(layer, name), f"{where}.{kind}.{name}", low=1)
    if hasattr(layer, "act") and layer.act not in ACTIVATIONS:
        raise UserError(f"{where}.{kind}.act: {layer.act!r} is not one of {', '.join(ACTIVATIONS)}")
    if isinstance(layer, Pool) and layer.kind not in ("max", "avg"):
        raise UserError(f"{where}.pool.kind: {layer.kind!r} is not one of max, avg")
    return layer


def _archs(task, task_params, spec: Any, where: str) -> list[Arch]:
    presets = task.presets(task_params)
    if spec is None:
        return list(presets.values())
    if isinstance(spec, str):
        spec = [spec]
    out: list[Arch] = []
    if isinstance(spec, list):
        for i, name in enumerate(spec):
            if not isinstance(name, str) or name not in presets:
                raise P.unknown_key(str(name), list(presets), f"{where}[{i}]", "architecture")
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
        body = _check_keys(body, ("layers",), f"{where}.{name}")
        layers = body.get("layers")
        if not isinstance(layers, list) or not layers:
            raise UserError(f"{where}.{name}.layers: a non-empty list of layers")
        parsed = tuple(_parse_layer(item, f"{where}.{name}.layers[{i}]")
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
            from harness.toolkit import layer_shapes  # shape check needs no data
            layer_shapes(arch)
        except ValueError as exc:
            raise UserError(f"{where}.{name}: {exc}") from None
        out.append(arch)
    return out


def _names(values: list, label: str, name: str, labels: frozenset) -> bool:
    """A value names an entry by its label; a plugin name that is not itself an entry label
    names every entry of that plugin (so `fa` means the `fa` row alone when there is one)."""
    return label in values or (name in values and name not in labels)


def _matches(rule: dict, label: str, algorithm: str, task_label: str, task: str, arch: str,
             seed: Optional[int] = None, labels: frozenset = frozenset()) -> bool:
    for key, value in rule.items():
        values = value if isinstance(value, list) else [value]
        if key == "algorithm" and not _names(values, label, algorithm, labels):
            return False
        if key == "task" and not _names(values, task_label, task, labels):
            return False
        if key == "arch" and arch not in values:
            return False
        if key == "seed" and seed not in values:
            return False
    return True


def _grid(values: dict) -> list[dict]:
    names = [k for k, v in values.items() if isinstance(v, list)]
    if not names:
        return [dict(values)]
    combos = []
    for combo in itertools.product(*(values[k] for k in names)):
        point = dict(values)
        point.update(zip(names, combo))
        combos.append(point)
    return combos


def load(path: str | Path, device: str = "cpu", store: Optional[str] = None) -> Suite:
    """Read, check and expand a suite file."""
    path = Path(path)
    raw = _load_yaml(path)
    where = str(path)
    _check_keys(raw, TOP_KEYS, where)
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"{where}: name: letters, digits, - and _ only, not {name!r}")
    seeds = raw.get("seeds", 1)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(_int(seeds, f"{where}: seeds", low=1)))  # type: ignore[arg-type]
    if not isinstance(seeds, list) or not seeds:
        raise UserError(f"{where}: seeds: a count (e.g. 3) or a non-empty list of integers")
    seeds = [_int(s, f"{where}: seeds[{i}]") for i, s in enumerate(seeds)]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds: {seeds} repeats a seed")
    epochs = _int(raw.get("epochs", 10), f"{where}: epochs", low=1)
    batch_size = _int(raw.get("batch_size", 128), f"{where}: batch_size", low=1)
    patience = _int(raw.get("patience"), f"{where}: patience", low=1, allow_none=True)
    protocol = raw.get("protocol", "clean")
    if protocol not in PROTOCOLS:
        raise UserError(f"{where}: protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    validation = raw.get("validation", 0.1)
    if isinstance(validation, bool) or not isinstance(validation, (int, float)) \
            or not 0.0 <= validation <= 0.9:
        raise UserError(f"{where}: validation: a fraction of the training set in [0, 0.9], "
                        f"not {validation!r}")
    if protocol == "clean" and validation == 0:
        raise UserError(f"{where}: validation: the clean protocol selects epochs on a "
                        "validation split; give a fraction > 0 or use protocol: paper")

    # tasks -------------------------------------------------------------------------------
    task_entries = raw.get("tasks")
    if not isinstance(task_entries, dict) or not task_entries:
        raise UserError(f"{where}: tasks: a mapping of task names, e.g. "
                        f"tasks: {{mnist: {{archs: [mlp]}}}}; valid: {', '.join(tasks.names())}")
    task_rows = []   # (task label, task name, task obj, resolved params, archs)
    metrics: dict[str, tuple[str, str]] = {}
    for label, body in task_entries.items():
        at = f"{where}: tasks.{label}"
        body = _check_keys(body, TASK_KEYS, at)
        task_name = tasks.canonical(str(body.get("task", label)), at)
        task = tasks.get(task_name)
        values = P.check_values(task.Params, _check_keys(body.get("params"), tuple(
            f.name for f in P.fields(task.Params)), f"{at}.params"), f"{at}.params")
        resolved = P.resolve(task.Params, values)
        archs = _archs(task, P.build(task.Params, resolved), body.get("archs"), f"{at}.archs")
        task_rows.append((str(label), task_name, task, resolved, archs))
        metrics[str(label)] = (task.primary_metric, task.metrics[task.primary_metric])

    # algorithms --------------------------------------------------------------------------
    alg_entries = raw.get("algorithms")
    if not isinstance(alg_entries, dict) or not alg_entries:
        raise UserError(f"{where}: algorithms: a mapping of algorithm names to their "
                        f"parameters; valid: {', '.join(algorithms.names())}")
    alg_rows = []   # (label, algorithm name, algorithm obj, checked values)
    for label, body in alg_entries.items():
        at = f"{where}: algorithms.{label}"
        if body is not None and not isinstance(body, dict):
            raise UserError(f"{at}: a mapping of parameter names to values, not {body!r}")
        body = dict(body or {})
        alg_name = algorithms.canonical(str(body.pop("algorithm", label)), at)
        algorithm = algorithms.get(alg_name)
        alg_rows.append((str(label), alg_name, algorithm,
                         P.check_values(algorithm.Params, body, at, grid=True)))
    alg_labels = [r[0] for r in alg_rows] + [r[1] for r in alg_rows]
    task_labels = [r[0] for r in task_rows] + [r[1] for r in task_rows]
    entry_labels = frozenset(r[0] for r in alg_rows) | frozenset(r[0] for r in task_rows)
    arch_names = sorted({a.name for r in task_rows for a in r[4]})

    def check_rule(rule: Any, valid_keys: tuple, at: str) -> dict:
        rule = _check_keys(rule, valid_keys, at)
        for key, value in rule.items():
            values = value if isinstance(value, list) else [value]
            pool = {"algorithm": alg_labels, "task": task_labels, "arch": arch_names}.get(key)
            for v in values:
                if pool is not None and v not in pool:
                    raise P.unknown_key(str(v), sorted(set(pool)), f"{at}.{key}", key)
        return rule

    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list):
        raise UserError(f"{where}: overrides: a list of {{match: …, params: …}} rules")
    checked_overrides = []
    for i, rule in enumerate(overrides):
        at = f"{where}: overrides[{i}]"
        rule = _check_keys(rule, OVERRIDE_KEYS, at)
        match = check_rule(rule.get("match"), MATCH_KEYS, f"{at}.match")
        checked_overrides.append((match, rule))
        for key in ("batch_size", "epochs"):
            if key in rule:
                _int(rule[key], f"{at}.{key}", low=1)
        if "patience" in rule:
            _int(rule["patience"], f"{at}.patience", low=1, allow_none=True)
        if "params" in rule:
            targets = [r for r in alg_rows if _matches({k: v for k, v in match.items()
                                                        if k == "algorithm"}, r[0], r[1], "", "", "",
                                                       labels=entry_labels)]
            for label, _, algorithm, _ in targets:
                P.check_values(algorithm.Params, _check_keys(rule["params"], tuple(
                    f.name for f in P.fields(algorithm.Params)), f"{at}.params ({label})"),
                    f"{at}.params ({label})", grid=True)
    excludes = raw.get("exclude") or []
    if not isinstance(excludes, list):
        raise UserError(f"{where}: exclude: a list of rules like {{algorithm: bp, arch: cnn}}")
    checked_excludes = [check_rule(rule, EXCLUDE_KEYS, f"{where}: exclude[{i}]")
                        for i, rule in enumerate(excludes)]

    # expansion ---------------------------------------------------------------------------
    specs: list[RunSpec] = []
    row_order: list[str] = []
    columns: list[tuple[str, str]] = []
    for task_label, task_name, task, task_params, archs in task_rows:
        for arch in archs:
            columns.append((task_label, arch.name))
            for label, alg_name, algorithm, values in alg_rows:
                merged, run_batch, run_epochs, run_patience = dict(values), batch_size, epochs, patience
                for match, rule in checked_overrides:
                    if _matches(match, label, alg_name, task_label, task_name, arch.name,
                                labels=entry_labels):
                        merged.update(P.check_values(algorithm.Params, rule.get("params") or {},
                                                     f"{where}: overrides", grid=True))
                        run_batch = rule.get("batch_size", run_batch)
                        run_epochs = rule.get("epochs", run_epochs)
                        run_patience = rule.get("patience", run_patience)
                grid_names = [k for k, v in values.items() if isinstance(v, list)]
                for point in _grid(merged):
                    row = label + (" (" + ", ".join(f"{k}={point[k]}" for k in grid_names) + ")"
                                   if grid_names else "")
                    if row not in row_order:
                        row_order.append(row)
                    resolved = P.resolve(algorithm.Params, point)
                    reason = algorithm.unsupported(arch, P.build(algorithm.Params, resolved))
                    for seed in seeds:
                        if any(_matches(rule, label, alg_name, task_label, task_name, arch.name,
                                        seed, entry_labels) for rule in checked_excludes):
                            continue
                        specs.append(RunSpec(
                            algorithm=alg_name, params=resolved, task=task_name,
                            task_params=task_params, arch=arch, seed=seed, epochs=run_epochs,
                            batch_size=run_batch, device=device, protocol=protocol,
                            validation=float(validation), patience=run_patience, label=row,
                            task_label=task_label, suite=name, skip_reason=reason))
    seen: dict[str, RunSpec] = {}
    for spec in specs:
        other = seen.setdefault(spec.key(), spec)
        if other is not spec:
            raise UserError(f"{where}: {spec.label} and {other.label} on {spec.task}/"
                            f"{spec.arch.name} seed {spec.seed} are the same run; "
                            "give them different parameters or drop one")

    references, source = _references(raw.get("reference"), where, alg_labels, task_labels,
                                     arch_names)
    store_path = Path(store or raw.get("store") or Path("results") / f"{name}.sqlite")
    return Suite(name=name, path=path, description=str(raw.get("description", "")),
                 store_path=store_path, specs=specs, references=references,
                 reference_source=source, row_order=row_order, column_order=columns,
                 metrics=metrics)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _references(raw: Any, where: str, alg_labels, task_labels, arch_names):
    if raw is None:
        return {}, ""
    at = f"{where}: reference"
    raw = _check_keys(raw, ("source", "values"), at)
    values = raw.get("values") or {}
    out: dict[tuple[str, str, str], tuple[float, Optional[float]]] = {}
    if not isinstance(values, dict):
        raise UserError(f"{at}.values: algorithm → task → arch → value or [mean, std]")
    for alg, per_task in values.items():
        if alg not in alg_labels:
            raise P.unknown_key(str(alg), sorted(set(alg_labels)), f"{at}.values", "algorithm")
        if not isinstance(per_task, dict):
            raise UserError(f"{at}.values.{alg}: a mapping task → arch → value, not {per_task!r}")
        for task, per_arch in per_task.items():
            if task not in task_labels:
                raise P.unknown_key(str(task), sorted(set(task_labels)), f"{at}.values.{alg}", "task")
            if not isinstance(per_arch, dict):
                raise UserError(f"{at}.values.{alg}.{task}: a mapping arch → value, not {per_arch!r}")
            for arch, value in per_arch.items():
                if arch not in arch_names:
                    raise P.unknown_key(str(arch), arch_names, f"{at}.values.{alg}.{task}", "arch")
                spot = f"{at}.values.{alg}.{task}.{arch}"
                if _number(value):
                    out[(str(alg), str(task), str(arch))] = (float(value), None)
                elif isinstance(value, list) and len(value) == 2 and _number(value[0]) and (
                        value[1] is None or _number(value[1])):
                    std = None if value[1] is None else float(value[1])
                    out[(str(alg), str(task), str(arch))] = (float(value[0]), std)
                else:
                    raise UserError(f"{spot}: a number, [mean, std] or [mean, null] (std not "
                                    f"published), not {value!r}")
    return out, str(raw.get("source", ""))
