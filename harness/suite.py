"""YAML suite → typed, checked :class:`Suite` → list of :class:`RunSpec`.

The file is parsed once into frozen dataclasses, in one place that validates; every mistake
raises :class:`UserError` with one line naming the file, the key and what is valid. One
:class:`Selector` serves ``overrides[].match``, ``exclude`` and ``--only``; :func:`expand` is the
one pure expansion of the grid. See the README ("Writing a suite") for the format; in short::

    name: quick                 # default: the file's stem
    seeds: 2                    # or a list [0, 1]
    epochs: 5
    batch_size: 128
    protocol: clean             # clean | paper
    baseline: bp                # the row every other row is compared with (default: bp)
    tasks:
      mnist: {archs: [mlp], params: {train_subset: 5000}}
    algorithms:
      bp: {lr: [1e-3, 5e-4]}    # a list is a grid: rows "bp (lr=0.001)", "bp (lr=0.0005)"
      bp-sgd: {algorithm: bp, optimizer: sgd}
    overrides:
      - {match: {task: mnist}, params: {lr: 1e-3}, batch_size: 64}
    exclude:
      - {algorithm: bp-sgd, arch: cnn}
    reference:
      source: "Lv et al. 2025, Table 1"
      values: {bp: {mnist: {mlp: [98.62, 0.17]}}}

A suite is data: nothing in it is executed or unpickled. The YAML is read with a safe loader
that also refuses duplicate keys, anchors and aliases, non-string keys, and files that are not
UTF-8 text or larger than :data:`MAX_SUITE_BYTES`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from harness import params as P
from harness.api import DIAGNOSTICS, PROTOCOLS, Arch, RunContext, RunSpec, UserError
from harness.archspec import parse_archs
from harness.grid import Names, Override, Selector, expand
from harness.registry import algorithms, tasks

MAX_SUITE_BYTES = 256 * 1024
TOP_KEYS = ("name", "description", "store", "seeds", "epochs", "batch_size", "protocol",
            "validation", "patience", "baseline", "diagnostics", "diagnostics_every", "tune",
            "tasks", "algorithms", "overrides", "exclude", "reference")
TASK_KEYS = ("task", "archs", "params", "target")
OVERRIDE_KEYS = ("match", "params", "batch_size", "epochs", "patience", "why")
MATCH_KEYS = ("task", "algorithm", "arch")
EXCLUDE_KEYS = ("task", "algorithm", "arch", "seed")


# --------------------------------------------------------------------------------------------
# Reading the file: safe, bounded, strict
# --------------------------------------------------------------------------------------------

def _loader_class():
    import yaml

    class SuiteLoader(yaml.SafeLoader):
        """PyYAML's safe loader, stricter: no aliases (no "billion laughs"), no duplicate keys,
        only string keys."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.MarkedYAMLError(problem="anchors and aliases (*name) are not allowed "
                                           "in a suite: write each value out", problem_mark=mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen: dict[str, None] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise yaml.MarkedYAMLError(problem="merge keys (<<) are not allowed in a "
                                               "suite", problem_mark=key_node.start_mark)
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise yaml.MarkedYAMLError(problem=f"the key {key!r} is not a name (keys "
                                               "are strings; quote it)",
                                               problem_mark=key_node.start_mark)
                if key in seen:
                    raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r} (a second value "
                                               "would silently replace the first)",
                                               problem_mark=key_node.start_mark)
                seen[key] = None
            return super().construct_mapping(node, deep=deep)

    return SuiteLoader


def read_yaml(path: Path) -> dict:
    """The suite file as a mapping, or a one-line UserError naming the file."""
    import yaml
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a suite file")
    try:
        size = path.stat().st_size
        if size > MAX_SUITE_BYTES:
            raise UserError(f"{path}: {size:,} bytes; a suite file is at most "
                            f"{MAX_SUITE_BYTES // 1024} KB of YAML")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such suite file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if b"\x00" in raw:
        raise UserError(f"{path}: a binary file, not YAML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_loader_class())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where} is not valid YAML ({problem})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a suite") from None
    if data is None:
        raise UserError(f"{path}: the file is empty; a suite is a mapping of keys "
                        f"({', '.join(TOP_KEYS)})")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a suite is a mapping of keys ({', '.join(TOP_KEYS)})")
    return data


# --------------------------------------------------------------------------------------------
# The typed suite
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskEntry:
    label: str                      # the column's name in the report
    task: str                       # the registered task
    version: int
    params: tuple                   # resolved task params (every field, sorted)
    archs: tuple[Arch, ...]
    metrics: tuple[tuple[str, str], ...]   # (metric, direction), the primary first
    target: Optional[float] = None  # a validation score to reach: the report's time to target


@dataclass(frozen=True)
class AlgorithmEntry:
    label: str                      # the row's name (before grid coordinates)
    algorithm: str                  # the registered algorithm
    version: int
    values: tuple                   # checked values as written; a tuple value is a grid axis


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    store_path: Path
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    protocol: str
    validation: float
    patience: Optional[int]
    baseline: Optional[str]
    tasks: tuple[TaskEntry, ...]
    algorithms: tuple[AlgorithmEntry, ...]
    overrides: tuple[Override, ...]
    excludes: tuple[Selector, ...]
    specs: tuple[RunSpec, ...]
    row_order: tuple[str, ...]
    column_order: tuple[tuple[str, str], ...]
    references: dict = field(default_factory=dict)   # (row, task label, arch) -> (mean, std)
    # each override as written: {"match", "sets", "why"} — where a report's settings come from
    provenance: tuple = ()
    reference_source: str = ""
    tune: Optional[Any] = None                       # harness.tune.Tune: equal tuning budgets

    def names(self) -> Names:
        return Names(frozenset(e.label for e in self.algorithms),
                     frozenset(t.label for t in self.tasks))

    @property
    def metrics(self) -> dict[str, tuple[str, str]]:
        """Task label → (primary metric, direction)."""
        return {t.label: t.metrics[0] for t in self.tasks}

    def structure(self, plan: Optional[list] = None) -> dict:
        """What a report needs besides the runs, as plain data: recorded in the store when the
        suite runs, so that reports are rebuilt without the YAML, the plugins or torch.
        ``plan``: (spec, role, trial) of every run when it is not the grid itself (a tuned
        suite: its trials and its final runs)."""
        from harness.api import _canonical
        plan = plan if plan is not None else [(s, None, None) for s in self.specs]
        rows = []
        for spec in self.specs:
            if spec.label not in [r["label"] for r in rows]:
                rows.append({"label": spec.label, "algorithm": spec.algorithm})
        rows.sort(key=lambda r: self.row_order.index(r["label"]))
        return _canonical({
            "name": self.name, "path": _relative(self.path), "description": self.description,
            "protocol": self.protocol,
            "baseline": self.baseline, "seeds": list(self.seeds), "epochs": self.epochs,
            "batch_size": self.batch_size, "validation": self.validation,
            "patience": self.patience, "rows": rows,
            "columns": [{"task": task, "arch": arch} for task, arch in self.column_order],
            "tasks": {t.label: {"task": t.task, "metrics": [list(m) for m in t.metrics],
                                "params": dict(t.params), "target": t.target}
                      for t in self.tasks},
            "references": [{"row": r, "task": t, "arch": a, "mean": m, "std": s}
                           for (r, t, a), (m, s) in self.references.items()],
            "reference_source": self.reference_source,
            **({"overrides": [dict(p) for p in self.provenance]} if self.provenance else {}),
            "tune": None if self.tune is None else {"trials": self.tune.trials,
                                                    "sampler": self.tune.sampler,
                                                    "seeds": list(self.tune.seeds),
                                                    "epochs": self.tune.epochs,
                                                    **({"include_defaults": True}
                                                       if self.tune.include_defaults else {})},
            "plan": [{"key": s.key(), "label": s.label, "algorithm": s.algorithm,
                      "task": s.task_label, "arch": s.arch.name, "seed": s.seed,
                      "epochs": s.epochs, "batch_size": s.batch_size,
                      "params": dict(s.params), "skip_reason": s.skip_reason,
                      **({"role": role, "trial": trial} if role else {})}
                     for s, role, trial in plan]})


def _relative(path: Path) -> str:
    """A suite file as a report names it: relative to the working folder where it lies in it
    (``suites/x.yaml``), else its name — never a machine path."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return Path(path).name


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


def _frozen(values: dict) -> tuple:
    """Checked values with lists as tuples (grid axes), sorted by name: hashable."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))


def _seeds(raw: Any, where: str) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return tuple(range(_int(raw, f"{where}: seeds", low=1)))  # type: ignore[arg-type]
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: seeds: a count (e.g. 3) or a non-empty list of integers")
    seeds = tuple(_int(s, f"{where}: seeds[{i}]") for i, s in enumerate(raw))
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds: {list(seeds)} repeats a seed")
    return seeds  # type: ignore[return-value]


def _task_entries(raw: Any, where: str, ctx: RunContext) -> tuple[TaskEntry, ...]:
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: tasks: a mapping of task names, e.g. "
                        f"tasks: {{mnist: {{archs: [mlp]}}}}; valid: {', '.join(tasks.names())}")
    out = []
    for label, body in raw.items():
        at = f"{where}: tasks.{label}"
        body = _check_keys(body, TASK_KEYS, at)
        name = tasks.canonical(str(body.get("task", label)), at)
        task = tasks.get(name)
        names = tuple(f.name for f in P.fields(task.Params))
        values = P.check_values(task.Params, _check_keys(body.get("params"), names,
                                                          f"{at}.params"), f"{at}.params")
        resolved = P.resolve(task.Params, values)
        archs = parse_archs(task, P.build(task.Params, resolved), body.get("archs"),
                            f"{at}.archs", ctx)
        metrics = tuple(task.metrics.items())
        target = body.get("target")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))):
            raise UserError(f"{at}.target: a value of {metrics[0][0]} to reach on validation, "
                            f"not {target!r}")
        out.append(TaskEntry(str(label), name, int(task.version), resolved, tuple(archs),
                             metrics, None if target is None else float(target)))
    return tuple(out)


def _algorithm_entries(raw: Any, where: str) -> tuple[AlgorithmEntry, ...]:
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: algorithms: a mapping of algorithm names to their "
                        f"parameters; valid: {', '.join(algorithms.names())}")
    out = []
    for label, body in raw.items():
        at = f"{where}: algorithms.{label}"
        if body is not None and not isinstance(body, dict):
            raise UserError(f"{at}: a mapping of parameter names to values, not {body!r}")
        body = dict(body or {})
        name = algorithms.canonical(str(body.pop("algorithm", label)), at)
        algorithm = algorithms.get(name)
        values = P.check_values(algorithm.Params, body, at, grid=True)
        out.append(AlgorithmEntry(str(label), name, int(algorithm.version), _frozen(values)))
    return tuple(out)


def _selector(rule: Any, valid_keys: tuple, at: str, names: dict[str, list]) -> Selector:
    rule = _check_keys(rule, valid_keys, at)
    parts: dict[str, tuple] = {}
    for key, value in rule.items():
        values = value if isinstance(value, list) else [value]
        if key == "seed":
            parts[key] = tuple(_int(v, f"{at}.seed") for v in values)
            continue
        for v in values:
            if not isinstance(v, str) or v not in names[key]:
                raise P.unknown_key(str(v), sorted(set(names[key])), f"{at}.{key}", key)
        parts[key] = tuple(values)
    return Selector(**parts)


def _overrides(raw: Any, where: str, entries: tuple[AlgorithmEntry, ...],
               names: dict[str, list], labels: Names) -> tuple[Override, ...]:
    raw = raw or []
    if not isinstance(raw, list):
        raise UserError(f"{where}: overrides: a list of {{match: …, params: …}} rules")
    out = []
    for i, rule in enumerate(raw):
        at = f"{where}: overrides[{i}]"
        rule = _check_keys(rule, OVERRIDE_KEYS, at)
        match = _selector(rule.get("match"), MATCH_KEYS, f"{at}.match", names)
        for key in ("batch_size", "epochs"):
            if key in rule:
                _int(rule[key], f"{at}.{key}", low=1)
        if "patience" in rule:
            _int(rule["patience"], f"{at}.patience", low=1, allow_none=True)
        if "why" in rule and (not isinstance(rule["why"], str) or not rule["why"].strip()):
            raise UserError(f"{at}.why: a sentence saying where these settings come from "
                            f"(shown in the report), not {rule['why']!r}")
        per_entry = []
        params = rule.get("params")
        if params is not None:
            targets = [e for e in entries
                       if match.names_entry(e.label, e.algorithm, labels.entries)]
            for entry in targets:
                algorithm = algorithms.get(entry.algorithm)
                spot = f"{at}.params ({entry.label})"
                checked = P.check_values(algorithm.Params, _check_keys(params, tuple(
                    f.name for f in P.fields(algorithm.Params)), spot), spot, grid=True)
                per_entry.append((entry.label, _frozen(checked)))
        out.append(Override(match=match, params=tuple(per_entry),
                            batch_size=rule.get("batch_size"), epochs=rule.get("epochs"),
                            patience=rule.get("patience", Override.UNSET)))
    return tuple(out)


def _provenance(raw: Any) -> tuple:
    """Each override as the report's settings section shows it (called on rules
    :func:`_overrides` has checked): what it matches, what it sets, and its ``why``."""
    out = []
    for rule in raw or []:
        match = {k: v for k, v in (rule.get("match") or {}).items()}
        sets = {k: rule[k] for k in ("batch_size", "epochs", "patience") if k in rule}
        sets.update(rule.get("params") or {})
        out.append({"match": match, "sets": sets, "why": rule.get("why", "").strip()})
    return tuple(out)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _references(raw: Any, where: str, names: dict[str, list]):
    if raw is None:
        return {}, ""
    at = f"{where}: reference"
    raw = _check_keys(raw, ("source", "values"), at)
    values = raw.get("values") or {}
    out: dict[tuple[str, str, str], tuple[float, Optional[float]]] = {}
    if not isinstance(values, dict):
        raise UserError(f"{at}.values: algorithm → task → arch → value or [mean, std]")
    for alg, per_task in values.items():
        if alg not in names["algorithm"]:
            raise P.unknown_key(str(alg), sorted(set(names["algorithm"])), f"{at}.values",
                                "algorithm")
        if not isinstance(per_task, dict):
            raise UserError(f"{at}.values.{alg}: a mapping task → arch → value, not {per_task!r}")
        for task, per_arch in per_task.items():
            if task not in names["task"]:
                raise P.unknown_key(str(task), sorted(set(names["task"])),
                                    f"{at}.values.{alg}", "task")
            if not isinstance(per_arch, dict):
                raise UserError(f"{at}.values.{alg}.{task}: a mapping arch → value, "
                                f"not {per_arch!r}")
            for arch, value in per_arch.items():
                if arch not in names["arch"]:
                    raise P.unknown_key(str(arch), names["arch"], f"{at}.values.{alg}.{task}",
                                        "arch")
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


def load(path: str | Path, device: str = "cpu", store: Optional[str] = None,
         data_dir: Optional[Path] = None) -> Suite:
    """Read, check and expand a suite file. ``data_dir``: where the runs will find their data
    (task presets may look there: a corpus's vocabulary); default the project's."""
    path = Path(path)
    raw = read_yaml(path)
    where = str(path)
    _check_keys(raw, TOP_KEYS, where)
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or \
            not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"{where}: name: letters, digits, - and _ only, not {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{where}: description: a text, not {description!r}")
    seeds = _seeds(raw.get("seeds", 1), where)
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

    from harness.data import default_data_dir
    context = RunContext(device=device, data_dir=str(data_dir or default_data_dir()))
    task_entries = _task_entries(raw.get("tasks"), where, context)
    alg_entries = _algorithm_entries(raw.get("algorithms"), where)
    names = {"algorithm": [e.label for e in alg_entries] + [e.algorithm for e in alg_entries],
             "task": [t.label for t in task_entries] + [t.task for t in task_entries],
             "arch": sorted({a.name for t in task_entries for a in t.archs})}
    labels = Names(frozenset(e.label for e in alg_entries), frozenset(t.label for t in task_entries))
    overrides = _overrides(raw.get("overrides"), where, alg_entries, names, labels)
    excludes_raw = raw.get("exclude") or []
    if not isinstance(excludes_raw, list):
        raise UserError(f"{where}: exclude: a list of rules like {{algorithm: bp, arch: cnn}}")
    excludes = tuple(_selector(rule, EXCLUDE_KEYS, f"{where}: exclude[{i}]", names)
                     for i, rule in enumerate(excludes_raw))
    diagnostics = raw.get("diagnostics") or []
    if isinstance(diagnostics, str):
        diagnostics = [diagnostics]
    if not isinstance(diagnostics, list) or any(d not in DIAGNOSTICS for d in diagnostics):
        raise UserError(f"{where}: diagnostics: a list of {', '.join(DIAGNOSTICS)}, not "
                        f"{raw.get('diagnostics')!r}")
    diagnostics_every = _int(raw.get("diagnostics_every", 1), f"{where}: diagnostics_every",
                             low=1)
    baseline = raw.get("baseline")
    entry_labels = [e.label for e in alg_entries]
    if baseline is None:
        baseline = "bp" if "bp" in entry_labels else None
    elif not isinstance(baseline, str) or baseline not in entry_labels:
        raise P.unknown_key(str(baseline), entry_labels, f"{where}: baseline",
                            "algorithm entry")

    specs, rows, columns = expand(
        task_entries, alg_entries, overrides, excludes, seeds=seeds, epochs=epochs,
        batch_size=batch_size, patience=patience, protocol=protocol,
        validation=float(validation), device=device, suite=name, where=where,
        diagnostics=tuple(dict.fromkeys(diagnostics)), diagnostics_every=diagnostics_every)
    references, source = _references(raw.get("reference"), where, names)
    from harness import tune as tune_mod
    tune = tune_mod.parse(raw.get("tune"), where, alg_entries)
    store_raw = store or raw.get("store")
    if store_raw is not None and not isinstance(store_raw, str):
        raise UserError(f"{where}: store: a file path, not {store_raw!r}")
    store_path = Path(store_raw) if store_raw else Path("results") / f"{name}.sqlite"
    return Suite(name=name, path=path, description=description, store_path=store_path,
                 seeds=seeds, epochs=epochs, batch_size=batch_size, protocol=protocol,
                 validation=float(validation), patience=patience, baseline=baseline,
                 tasks=task_entries, algorithms=alg_entries, overrides=overrides,
                 excludes=excludes, specs=tuple(specs), row_order=tuple(rows),
                 column_order=tuple(columns), references=references, reference_source=source,
                 tune=tune, provenance=_provenance(raw.get("overrides")))
