"""The grid of a suite: one :class:`Selector` for ``overrides[].match``, ``exclude`` and
``--only``, and :func:`expand`, the one pure expansion of task entries × architectures ×
algorithm entries × grid points × seeds into :class:`~harness.api.RunSpec` values.

Row labels: an algorithm entry's label, followed by the value of every parameter that is a list
in the entry or in an override that applies to the cell — ``bp (lr=0.001)`` — so two runs that
differ in any setting never share a row label (the report would average two configurations as
if they were seeds); :func:`expand` checks it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Iterable, Optional

from harness import params as P
from harness.api import RunSpec, UserError
from harness.registry import algorithms


@dataclass(frozen=True)
class Names:
    """A suite's entry labels. A value naming a row or column is its label; a plugin name that
    is not itself an entry label names every entry of that plugin."""

    entries: frozenset[str] = frozenset()        # algorithm entry labels
    task_entries: frozenset[str] = frozenset()   # task entry labels


@dataclass(frozen=True)
class Coordinates:
    """Where a run sits in the grid."""

    entry: str                      # algorithm entry label
    algorithm: str                  # registered algorithm
    task_entry: str                 # task entry label
    task: str                       # registered task
    arch: str
    names: Names
    row: str = ""                   # the full row label ("" while overrides are applied)
    seed: Optional[int] = None

    @classmethod
    def of(cls, spec: RunSpec, names: Names) -> "Coordinates":
        return cls(entry=spec.label.split(" (")[0], algorithm=spec.algorithm,
                   task_entry=spec.task_label, task=spec.task, arch=spec.arch.name, names=names,
                   row=spec.label, seed=spec.seed)


def _names(values: tuple, label: str, plugin: str, labels: frozenset) -> bool:
    return label in values or (plugin in values and plugin not in labels)


@dataclass(frozen=True)
class Selector:
    """Part of the grid: each key given must match (an empty key matches everything)."""

    algorithm: tuple[str, ...] = ()
    task: tuple[str, ...] = ()
    arch: tuple[str, ...] = ()
    seed: tuple[int, ...] = ()

    def names_entry(self, label: str, plugin: str, entries: frozenset) -> bool:
        return not self.algorithm or _names(self.algorithm, label, plugin, entries)

    def matches(self, at: Coordinates) -> bool:
        if self.algorithm and at.row not in self.algorithm and not _names(
                self.algorithm, at.entry, at.algorithm, at.names.entries):
            return False
        if self.task and not _names(self.task, at.task_entry, at.task, at.names.task_entries):
            return False
        if self.arch and at.arch not in self.arch:
            return False
        if self.seed and at.seed not in self.seed:
            return False
        return True

    @classmethod
    def parse_only(cls, rules: Iterable[str]) -> list["Selector"]:
        """``--only KEY=V[,V]`` rules (repeatable), each a selector."""
        out = []
        for rule in rules:
            key, _, text = rule.partition("=")
            values = tuple(v for v in text.split(",") if v)
            if key not in ("algorithm", "task", "arch", "seed") or not values:
                raise UserError(f"--only {rule!r}: KEY=VALUE[,VALUE] with KEY one of "
                                f"algorithm, task, arch, seed")
            if key == "seed":
                try:
                    values = tuple(int(v) for v in values)  # type: ignore[assignment]
                except ValueError:
                    raise UserError(f"--only {rule!r}: seeds are integers") from None
            out.append(cls(**{key: values}))
        return out


@dataclass(frozen=True)
class Override:
    """Settings for the cells ``match`` names: parameters per algorithm entry (checked against
    each entry's plugin), batch size, epochs, patience."""

    UNSET: ClassVar[str] = "unset"
    match: Selector
    params: tuple = ()              # ((entry label, checked values), …)
    batch_size: Optional[int] = None
    epochs: Optional[int] = None
    patience: Any = "unset"


def _axes_product(values: dict) -> list[dict]:
    axes = sorted(k for k, v in values.items() if isinstance(v, tuple))
    if not axes:
        return [dict(values)]
    points = []
    for combo in itertools.product(*(values[k] for k in axes)):
        point = dict(values)
        point.update(zip(axes, combo))
        points.append(point)
    return points


def select(specs: Iterable[RunSpec], selectors: list[Selector], names: Names) -> list[RunSpec]:
    """The specs every selector matches."""
    return [s for s in specs if all(sel.matches(Coordinates.of(s, names)) for sel in selectors)]


def expand(task_entries, alg_entries, overrides, excludes, *, seeds, epochs, batch_size,
           patience, protocol, validation, device, suite, where, diagnostics=(),
           diagnostics_every=1) -> tuple[list, list, list]:
    """(specs, row labels in order, (task label, arch) columns in order)."""
    names = Names(frozenset(e.label for e in alg_entries), frozenset(t.label for t in task_entries))
    specs: list[RunSpec] = []
    rows: list[str] = []
    columns: list[tuple[str, str]] = []
    for task in task_entries:
        for arch in task.archs:
            columns.append((task.label, arch.name))
            for entry in alg_entries:
                algorithm = algorithms.get(entry.algorithm)
                at = Coordinates(entry=entry.label, algorithm=entry.algorithm,
                                 task_entry=task.label, task=task.task, arch=arch.name,
                                 names=names)
                merged = dict(entry.values)
                axes = [k for k, v in entry.values if isinstance(v, tuple)]
                run_batch, run_epochs, run_patience = batch_size, epochs, patience
                for rule in overrides:
                    if not rule.match.matches(at):
                        continue
                    for label, values in rule.params:
                        if label == entry.label:
                            merged.update(values)
                            axes += [k for k, v in values if isinstance(v, tuple) and k not in axes]
                    run_batch = rule.batch_size or run_batch
                    run_epochs = rule.epochs or run_epochs
                    if rule.patience != Override.UNSET:
                        run_patience = rule.patience
                for point in _axes_product(merged):
                    row = entry.label + (" (" + ", ".join(f"{k}={point[k]}" for k in axes) + ")"
                                         if axes else "")
                    if row not in rows:
                        rows.append(row)
                    resolved = P.resolve(algorithm.Params, point)
                    reason = algorithm.unsupported(arch, P.build(algorithm.Params, resolved))
                    for seed in seeds:
                        cell = replace(at, row=row, seed=seed)
                        if any(rule.matches(cell) for rule in excludes):
                            continue
                        specs.append(RunSpec(
                            algorithm=entry.algorithm, algorithm_version=entry.version,
                            params=resolved, task=task.task, task_version=task.version,
                            task_params=task.params, arch=arch, seed=seed, epochs=run_epochs,
                            batch_size=run_batch, device=device, protocol=protocol,
                            validation=validation, patience=run_patience,
                            diagnostics=diagnostics, diagnostics_every=diagnostics_every,
                            label=row,
                            task_label=task.label, suite=suite, skip_reason=reason))
    _check_identities(specs, where)
    return specs, [r for r in rows if any(s.label == r for s in specs)], columns


def _check_identities(specs: list[RunSpec], where: str) -> None:
    """One run per key, and one configuration per row label and cell."""
    by_key: dict[str, RunSpec] = {}
    by_cell: dict[tuple, RunSpec] = {}
    for spec in specs:
        other = by_key.setdefault(spec.key(), spec)
        if other is not spec:
            raise UserError(f"{where}: {spec.label} and {other.label} on {spec.task_label}/"
                            f"{spec.arch.name} seed {spec.seed} are the same run; "
                            "give them different parameters or drop one")
        cell = (spec.label, spec.task_label, spec.arch.name, spec.seed)
        other = by_cell.setdefault(cell, spec)
        if other is not spec:
            raise UserError(f"{where}: two configurations of {spec.label} on {spec.task_label}/"
                            f"{spec.arch.name} seed {spec.seed} would share one row; make the "
                            "setting that differs a list in the entry so the label shows it")
