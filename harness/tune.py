"""Equal tuning budgets: a suite's ``tune:`` block gives every rule the same number of trials
of the same search, on validation, before its chosen settings run with the suite's seeds and
are reported on test (the DLL paper's FA baseline lost 6 points on MNIST for want of what BP
got; AlgoPerf gives optimisers equal budgets — this gives them to learning rules).

::

    tune:
      trials: 8                # per rule and task/arch cell
      epochs: 5                # per trial (default: the suite's)
      seeds: [0]               # per trial (default: [0]); the objective is their mean
      sampler: tpe             # tpe | qmc (scrambled Sobol) | random — seeded by `seed`
      seed: 0
      include_defaults: false  # true: each rule's first trial is its settings as the suite
                               # gives them, so the search shows whether it beat them
      space:                   # shared by every rule that has the parameter
        lr: {log_uniform: [1.0e-4, 1.0e-2]}
      space_per_algorithm:     # where rules differ (an entry label or a plugin name)
        pc: {state_lr: {uniform: [0.05, 0.3]}, inference_steps: {int: [2, 8]}}

Each (row, task, arch) is an Optuna study (ask/tell, its sampler seeded from ``seed`` and the
cell), each trial an ordinary stored run selected on validation (its best validation metric):
a suite run again asks the same trials in the same order and finds them stored, so tuning
resumes like any run. The best trial's settings then run with the suite's seeds and epochs.
With ``include_defaults`` the first trial of every study is enqueued (Optuna's
``enqueue_trial``) with the row's own values of the searched parameters — a baseline's defaults
get exactly one of the budget's trials, and the sampler learns from it like from any other.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Optional

from harness import params as P
from harness.api import RunSpec, UserError

KINDS = ("log_uniform", "uniform", "int", "choice")
SAMPLERS = ("tpe", "qmc", "random")
TRIAL = " · trial "


def row_of(label: str) -> str:
    """The row a run's label belongs to: a tuning trial's label is its row's, then TRIAL."""
    return str(label).split(TRIAL)[0]


@dataclass(frozen=True)
class Tune:
    trials: int
    epochs: Optional[int]
    seeds: tuple[int, ...]
    sampler: str
    seed: int
    space: tuple                           # ((name, (kind, values)), …)
    per_algorithm: tuple                   # ((entry or plugin, ((name, (kind, values)), …)), …)
    include_defaults: bool = False         # trial 0 of every study: the row's own settings

    def space_for(self, entry: str, algorithm: str, params_cls: type) -> dict[str, tuple]:
        """The search space of one row: the shared space's parameters the plugin has, then
        its own (by entry label, else plugin name)."""
        fields = {f.name for f in P.fields(params_cls)}
        space = {name: dist for name, dist in self.space if name in fields}
        own = dict(self.per_algorithm)
        space.update(dict(own.get(entry, own.get(algorithm, ()))))
        return space


def _distribution(raw: Any, where: str) -> tuple:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise UserError(f"{where}: one of {', '.join(f'{{{k}: …}}' for k in KINDS)}")
    (kind, values), = raw.items()
    if kind not in KINDS:
        raise P.unknown_key(str(kind), list(KINDS), where, "distribution")
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.choice: a non-empty list of values")
        return kind, tuple(values)
    if not isinstance(values, list) or len(values) != 2:
        raise UserError(f"{where}.{kind}: [low, high]")
    try:
        low, high = (int(v) if kind == "int" else float(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"{where}.{kind}: [low, high] numbers, not {values!r}") from None
    if not low < high or (kind == "log_uniform" and low <= 0):
        raise UserError(f"{where}.{kind}: needs low < high" + (" and low > 0"
                                                                 if kind == "log_uniform" else ""))
    return kind, (low, high)


def _space(raw: Any, where: str) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a mapping parameter → distribution")
    return tuple(sorted((str(k), _distribution(v, f"{where}.{k}")) for k, v in raw.items()))


def parse(raw: Any, where: str, entries) -> Optional[Tune]:
    """The checked ``tune:`` block (``entries``: the suite's algorithm entries)."""
    if raw is None:
        return None
    at = f"{where}: tune"
    if not isinstance(raw, dict):
        raise UserError(f"{at}: a mapping with trials, space, …")
    keys = ("trials", "epochs", "seeds", "sampler", "seed", "space", "space_per_algorithm",
            "include_defaults")
    for key in raw:
        if key not in keys:
            raise P.unknown_key(str(key), list(keys), at, "key")
    trials = raw.get("trials")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise UserError(f"{at}.trials: a number of trials ≥ 1, not {trials!r}")
    epochs = raw.get("epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                               or epochs < 1):
        raise UserError(f"{at}.epochs: an integer ≥ 1, not {epochs!r}")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise UserError(f"{at}.seeds: a count or a list of seeds, not {raw.get('seeds')!r}")
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise UserError(f"{at}.sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{at}.seed: an integer, not {seed!r}")
    include_defaults = raw.get("include_defaults", False)
    if not isinstance(include_defaults, bool):
        raise UserError(f"{at}.include_defaults: true or false, not {include_defaults!r}")
    space = _space(raw.get("space"), f"{at}.space")
    own_raw = raw.get("space_per_algorithm") or {}
    if not isinstance(own_raw, dict):
        raise UserError(f"{at}.space_per_algorithm: a mapping algorithm → its space")
    names = {e.label for e in entries} | {e.algorithm for e in entries}
    per_algorithm = []
    for name, body in own_raw.items():
        if name not in names:
            raise P.unknown_key(str(name), sorted(names), f"{at}.space_per_algorithm",
                                "algorithm")
        per_algorithm.append((str(name), _space(body, f"{at}.space_per_algorithm.{name}")))
    tune = Tune(trials, epochs, tuple(seeds), sampler, seed, space, tuple(per_algorithm),
                include_defaults)
    from harness.registry import algorithms
    for entry in entries:                   # every value the space can give must be valid
        params_cls = algorithms.get(entry.algorithm).Params
        space = tune.space_for(entry.label, entry.algorithm, params_cls)
        fields = {f.name for f in P.fields(params_cls)}
        for name, (kind, values) in space.items():
            if name not in fields:
                raise P.unknown_key(name, sorted(fields),
                                    f"{at}.space_per_algorithm.{entry.label}", "parameter")
            for value in (values if kind == "choice" else values):
                P.check_values(params_cls, {name: value}, f"{at} ({entry.label}).{name}")
        if not space:
            raise UserError(f"{at}: no parameter of the space belongs to {entry.label} "
                            f"({entry.algorithm}); give it one in space_per_algorithm")
        if include_defaults:
            by_name = {f.name: f for f in P.fields(params_cls)}
            written = dict(entry.values)
            own = {name: written.get(name, P.default_of(by_name[name])) for name in space}
            check_inside(space, own, f"{at}.include_defaults ({entry.label})")
    return tune


def check_inside(space: dict, values: dict, where: str) -> None:
    """Every value of ``values`` (a row's own settings) lies in its dimension of ``space``."""
    for name, (kind, bounds) in space.items():
        value = values.get(name)
        if isinstance(value, tuple):
            raise UserError(f"{where}: {name} is a grid axis {list(value)}; a tuned row takes "
                            f"one value of it (or leave include_defaults out)")
        inside = (value in bounds if kind == "choice" else
                  value is not None and bounds[0] <= value <= bounds[1])
        if not inside:
            shown = f"{{{kind}: {list(bounds)}}}"
            raise UserError(f"{where}: its {name} {value!r} lies outside the space {name} "
                            f"{shown}; widen the space or set {name} in the row")


# --------------------------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------------------------

def _optuna_distribution(kind: str, values):
    from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                      IntDistribution)
    if kind == "log_uniform":
        return FloatDistribution(values[0], values[1], log=True)
    if kind == "uniform":
        return FloatDistribution(values[0], values[1])
    if kind == "int":
        return IntDistribution(values[0], values[1])
    return CategoricalDistribution(list(values))


def _sampler(tune: Tune, cell_seed: int):
    from optuna import samplers
    if tune.sampler == "qmc":
        return samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=cell_seed)
    if tune.sampler == "random":
        return samplers.RandomSampler(seed=cell_seed)
    return samplers.TPESampler(seed=cell_seed, n_startup_trials=max(2, tune.trials // 3))


def first_best(values, direction: str) -> Optional[int]:
    """The index of the best of ``[(index, value or None)]``, the earliest on a tie: a later
    trial that only matches an earlier one (trial 0: the row's own settings, with
    include_defaults) does not displace it, nor reads as "still improving"."""
    scored = [(i, v) for i, v in values if v is not None]
    if not scored:
        return None
    best = (max if direction == "max" else min)(v for _, v in scored)
    return min(i for i, v in scored if v == best)


class Study:
    """One row on one task/arch: its Optuna study, the specs of its trials, its best."""

    def __init__(self, tune: Tune, template: RunSpec, params_cls: type, direction: str):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.tune, self.template, self.params_cls = tune, template, params_cls
        self.direction = direction
        cell = f"{template.label}|{template.task_label}|{template.arch.name}"
        cell_seed = int(hashlib.sha256(f"{tune.seed}|{cell}".encode()).hexdigest()[:8], 16)
        self.study = optuna.create_study(direction="maximize" if direction == "max"
                                         else "minimize", sampler=_sampler(tune, cell_seed))
        space = tune.space_for(template.label.split(" (")[0], template.algorithm, params_cls)
        self.distributions = {n: _optuna_distribution(k, v) for n, (k, v) in space.items()}
        if tune.include_defaults:           # trial 1: the row's own settings
            own = {name: value for name, value in template.params if name in space}
            check_inside(space, own, f"tune.include_defaults ({template.label}, "
                                     f"{template.task_label}/{template.arch.name})")
            self.study.enqueue_trial(own)
        self.trials: list[tuple[Any, dict, list[RunSpec]]] = []   # (trial, sampled, specs)
        self.values: list[Optional[float]] = []

    def ask(self) -> list[RunSpec]:
        """The next trial's runs (one per trial seed)."""
        trial = self.study.ask(self.distributions)
        sampled = P.check_values(self.params_cls, dict(trial.params), "tune")
        params = P.resolve(self.params_cls, {**dict(self.template.params), **sampled})
        index = len(self.trials)
        specs = [replace(self.template, params=params, seed=seed,
                         epochs=self.tune.epochs or self.template.epochs,
                         label=f"{self.template.label}{TRIAL}{index}")
                 for seed in self.tune.seeds]
        self.trials.append((trial, sampled, specs))
        return specs

    def tell(self, value: Optional[float]) -> None:
        from optuna.trial import TrialState
        trial = self.trials[len(self.values)][0]
        if value is None:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, value)
        self.values.append(value)

    @property
    def done(self) -> bool:
        return len(self.trials) >= self.tune.trials

    def best(self) -> Optional[tuple[int, dict]]:
        index = first_best([(i, v) for i, v in enumerate(self.values)], self.direction)
        return None if index is None else (index, self.trials[index][1])

    def finals(self, seeds: tuple[int, ...]) -> list[RunSpec]:
        """The suite's runs of this row and cell with the best trial's settings."""
        chosen = self.best()
        if chosen is None:
            return []
        params = P.resolve(self.params_cls, {**dict(self.template.params), **chosen[1]})
        return [replace(self.template, params=params, seed=seed) for seed in seeds]


# --------------------------------------------------------------------------------------------
# The tuning run
# --------------------------------------------------------------------------------------------

def _value(store_path, specs: list[RunSpec]) -> Optional[float]:
    """A trial's objective: the mean over its seeds of each run's best validation metric
    (None when none of its runs finished ok)."""
    import sqlite3
    keys = [s.key() for s in specs]
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        rows = conn.execute(f"SELECT clean_val FROM runs WHERE status = 'ok' AND key IN "
                            f"({', '.join('?' for _ in keys)})", keys).fetchall()
    finally:
        conn.close()
    values = [v for (v,) in rows if v is not None]
    return sum(values) / len(values) if values else None


def run(suite, specs: list[RunSpec], run_specs, store_path, log=print,
        studies: Optional[list] = None) -> list[Study]:
    """Tune every (row, task, arch) of ``specs`` — ``run_specs(list)`` runs a batch, stored
    runs skipped — then run each row's chosen settings with its seeds. Returns the studies
    (also appended to ``studies`` as they are made, for a caller that is interrupted)."""
    from harness.registry import algorithms, tasks
    tune = suite.tune
    templates: dict[tuple, RunSpec] = {}
    seeds: dict[tuple, list[int]] = {}
    for spec in specs:
        cell = (spec.label, spec.task_label, spec.arch.name)
        seeds.setdefault(cell, []).append(spec.seed)
        if cell not in templates or spec.seed < templates[cell].seed:
            templates[cell] = spec
    studies = [] if studies is None else studies
    skipped = [t for t in templates.values() if t.skip_reason]
    if skipped:
        run_specs(skipped)                    # recorded as skipped, with their reason
    for cell, template in templates.items():
        if template.skip_reason:
            continue
        task = tasks.get(template.task)
        metric = task.primary_metric
        studies.append(Study(tune, template, algorithms.get(template.algorithm).Params,
                             task.metrics[metric]))
    for round_ in range(tune.trials):
        batch = [s for study in studies if not study.done for s in study.ask()]
        if not batch:
            break
        log(f"tuning: trial {round_ + 1} of {tune.trials} for {len(studies)} row × cell "
            "studies")
        run_specs(batch)
        for study in studies:
            if len(study.values) < len(study.trials):
                study.tell(_value(store_path, study.trials[-1][2]))
    finals = [s for study in studies for s in study.finals(
        tuple(sorted(seeds[(study.template.label, study.template.task_label,
                            study.template.arch.name)])))]
    if finals:
        log(f"tuning done: {len(finals)} runs of the chosen settings")
        run_specs(finals)
    return studies


def plan(suite, studies: list[Study]) -> list[tuple[RunSpec, str, Optional[int]]]:
    """The suite's plan once tuned: (spec, role, trial index) of every trial and final run."""
    out = []
    for study in studies:
        for index, (_, _, specs) in enumerate(study.trials):
            out += [(s, "trial", index) for s in specs]
        out += [(s, "final", None) for s in study.finals(
            tuple(sorted({s.seed for s in suite.specs
                          if (s.label, s.task_label, s.arch.name) == (
                              study.template.label, study.template.task_label,
                              study.template.arch.name)})))]
    return out
