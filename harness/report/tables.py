"""What the report's tables say, computed from the runs (no formatting here; see render.py).

Every cell is a mean over seeds with its 95% t interval and n (``harness.stats``); "best" is
marked only where the best row is distinguishable from every other row of its column (tests
paired by seed where both rows ran the same seeds), ties as ties; each row's difference to the
suite's baseline comes with its interval and its p-value. The marks' comparisons and the
differences are Holm-corrected in one family over the table (``stats.table_tests``).
Diverged runs are left out of the statistics and counted beside them.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Optional

from harness import profiles, stats
from harness.report.layout import Layout

PROTOCOL_COLUMN = {"clean": "clean_test", "paper": "paper_test"}
PROTOCOL_EPOCH = {"clean": "clean_epoch", "paper": "paper_epoch"}


@dataclass(frozen=True)
class Cell:
    summary: stats.Summary
    mark: Optional[str]                      # best | tied | None
    diverged: int                            # runs left out: their metric went non-finite
    reference: Optional[tuple[float, Optional[float]]]
    delta_reference: Optional[float]         # measured mean − published mean
    at_budget: bool = False                  # every seed selected its planned last epoch


def ok_runs(runs):
    return runs[runs["status"] == "ok"]


def columns(layout: Layout, runs) -> list[tuple[str, str]]:
    present = set(zip(runs["task_label"], runs["arch"]))
    return [c for c in layout.column_order if c in present]


def rows(layout: Layout, runs) -> list[str]:
    present = set(runs["label"])
    return [r for r in layout.row_order if r in present]


def reference(layout: Layout, row: str, algorithm: str, task: str, arch: str):
    entry = row.split(" (")[0]
    for key in ((row, task, arch), (entry, task, arch), (algorithm, task, arch)):
        if key in layout.references:
            return layout.references[key]
    return None


def results(layout: Layout, runs, protocol: str) -> dict[tuple, Cell]:
    """(row, task, arch) → :class:`Cell` of the protocol's selected test metric."""
    value = PROTOCOL_COLUMN[protocol]
    counted = runs[runs["status"].isin(["ok", "diverged"])]
    ok = ok_runs(runs).dropna(subset=[value])
    summaries = stats.cell_summaries(ok, value) if len(ok) else {}
    # a row of one seed is never marked, but takes part: the best must be told apart from it
    # too (stats.best_rows tests it as a new observation of the top row's seeds)
    baseline = layout.baseline if layout.baseline in set(ok["label"]) else None
    marks = stats.best_rows(ok, value, {t: d for t, (_, d) in layout.metrics.items()},
                            baseline=baseline) if len(ok) else {}
    rivals = ok.groupby(["task_label", "arch"])["label"].nunique().to_dict()
    marks = {k: m for k, m in marks.items()      # alone: no contest; one seed: never marked
             if rivals.get(k[1:], 0) >= 2 and summaries[k].n >= 2}
    algorithm_of = dict(zip(counted["label"], counted["algorithm"]))
    planned = {p["key"]: p.get("epochs") for p in layout.plan}
    out = {}
    for (row, task, arch), group in counted.groupby(["label", "task_label", "arch"]):
        summary = summaries.get((row, task, arch), stats.summarize([]))
        ref = reference(layout, row, algorithm_of.get(row, row), task, arch)
        delta = summary.mean - ref[0] if ref and summary.mean is not None else None
        diverged = int((group["status"] == "diverged").sum())
        out[(row, task, arch)] = Cell(summary, marks.get((row, task, arch)), diverged, ref,
                                      delta, not diverged and at_budget(
                                          ok[(ok["label"] == row) & (ok["task_label"] == task)
                                             & (ok["arch"] == arch)], protocol, planned))
    return out


def at_budget(cell, protocol: str, planned: dict) -> bool:
    """Whether every finished run of the cell selected the last epoch of a planned budget of
    more than one epoch (it ran all of them, no early stop): the metric was still improving
    when the budget ended, so the cell measures how fast a rule learns as much as how far."""
    epoch = PROTOCOL_EPOCH[protocol]
    if cell.empty or epoch not in cell.columns:
        return False
    return all(planned.get(key) is not None and planned[key] > 1 and selected == planned[key]
               for key, selected in zip(cell["key"], cell[epoch]))


REFERENCE_PREDICTORS = ("baseline", "majority", "chance", "persistence")
# those that predict one fixed answer whatever the input: beating one is the least a learner
# does (persistence is not one: it reads the target's past, which a model may not be shown)
CONSTANT_PREDICTORS = ("baseline", "majority", "chance")


def reference_predictors(layout: Layout, epochs) -> list[tuple[str, str, str, float]]:
    """(task, arch, metric, value): what a task's own reference predictor scores on the test
    split, where the task records one beside the primary metric as a secondary metric named
    ``<predictor>_<primary metric>`` with a predictor of REFERENCE_PREDICTORS (the chars task's
    ``baseline_accuracy``, the most frequent symbol; the forecast task's ``persistence_mse``;
    not a ``balanced_accuracy``), the median over the cell's epochs."""
    out = []
    counted = epochs[epochs["status"].isin(["ok", "diverged"])]
    for task, arch in columns(layout, counted):
        primary = layout.metrics[task][0]
        here = counted[(counted["task_label"] == task) & (counted["arch"] == arch)]
        for column in sorted(here.columns):        # a store's order and a runs.jsonl's differ
            name = column[len("test_"):]
            if (column.startswith("test_") and name.endswith("_" + primary)
                    and name[:-len(primary) - 1] in REFERENCE_PREDICTORS
                    and here[column].notna().any()):
                out.append((task, arch, name, float(here[column].median())))
    return out


def baseline_differences(layout: Layout, runs, protocol: str) -> dict[tuple, stats.Difference]:
    """(row, task, arch) → the row minus the baseline (paired by seed where possible), Holm
    across the table; empty without a baseline that ran."""
    value = PROTOCOL_COLUMN[protocol]
    ok = ok_runs(runs).dropna(subset=[value])
    if not layout.baseline or layout.baseline not in set(ok["label"]):
        return {}
    return stats.baseline_differences(ok, value, layout.baseline,       # one family with
                                      direction={t: d for t, (_, d) in   # the marks' tests
                                                 layout.metrics.items()})


@dataclass(frozen=True)
class Across:
    """The rules across cells. ``common``: the task/arch cells every row with a result has;
    ``iqm_common``: each row's IQM over those (the comparison between rules: the same cells
    for all); ``iqm_own``: over every cell the row has (``n_cells`` says how many; a rule that
    ran other cells is not compared by it); ``profile``: over the common cells (a cell a rule
    could not run, or has not yet, is not counted against it)."""

    common: tuple
    iqm_common: dict
    iqm_own: dict
    profile: Optional[object]


def aggregate(layout: Layout, runs, protocol: str) -> Optional[Across]:
    """:class:`Across` for the baseline-normalised scores; None without a baseline or with
    fewer than two cells. A cell a rule ran counts as its own whether its runs finished or
    diverged: a diverged run scores 0 (no model) in the IQM, and a cell where every seed
    diverged is never within τ in the profile — failing never shrinks the comparison."""
    value = PROTOCOL_COLUMN[protocol]
    ok = ok_runs(runs).dropna(subset=[value])
    ok = ok[ok[value] > 0]
    if not layout.baseline or layout.baseline not in set(ok["label"]):
        return None
    base_cells = set(zip(ok[ok["label"] == layout.baseline]["task_label"],
                         ok[ok["label"] == layout.baseline]["arch"]))
    ok = _in_cells(ok, base_cells)
    if len(base_cells) < 2:
        return None
    diverged = _in_cells(runs[runs["status"] == "diverged"], base_cells)
    directions = {t: d for t, (_, d) in layout.metrics.items()}
    cells_of: dict[str, set] = {}
    for frame in (ok, diverged):
        for row, task, arch in zip(frame["label"], frame["task_label"], frame["arch"]):
            cells_of.setdefault(row, set()).add((task, arch))
    common = set.intersection(*cells_of.values())

    def failed(cells) -> list[tuple]:
        return [(row, task, arch) for row, task, arch in zip(
            diverged["label"], diverged["task_label"], diverged["arch"]) if (task, arch) in cells]
    shared = _in_cells(ok, common)
    order = [c for c in columns(layout, runs) if c in common]
    return Across(tuple(order),
                  profiles.interquartile_means(shared, value, directions, layout.baseline,
                                               failures=failed(common)) if common else {},
                  profiles.interquartile_means(ok, value, directions, layout.baseline,
                                               failures=failed(base_cells)),
                  profiles.performance_profile(shared, value, directions)
                  if len(common) >= 2 else None)


@dataclass(frozen=True)
class Timing:
    row: str
    task: str
    arch: str
    epoch_s: stats.Summary          # per-run median seconds per training epoch (warm-up out)
    ratio: Optional[stats.Summary]  # per-run medians ÷ the baseline's runs of the same setting
    eval_s: float
    memory_mb: Optional[float]
    train_hours: float              # every epoch of every run of the cell, warm-up included
    cpu_share: Optional[float] = None   # median of the CPU runs' shares of their cores
    unlike: tuple = ()              # why the ratio is not like for like (UNLIKE's keys)
    run_ratios: tuple = ()          # each run's ratio (the summary's values), for the plot


def cpu_share(notes) -> Optional[float]:
    """The share of its cores a run process had (harness.worker), from its stored notes."""
    try:
        value = (json.loads(notes) if isinstance(notes, str) else notes or {}).get("cpu_share")
    except (ValueError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _in_cells(frame, cells: set):
    """The rows of ``frame`` in the given (task label, arch) cells."""
    return frame[[c in cells for c in zip(frame["task_label"], frame["arch"])]] \
        if len(frame) else frame


STARVED = 0.9     # a one-thread run below this CPU share had its core taken by other work
ALL = object()    # a ratio divided by every baseline run of the cell (none of its setting)
UNLIKE = {         # why a time ratio is not like for like
    "threads": "no baseline run made at the same torch threads on the same CPU model",
    "starved": f"one-thread runs (the row's or the baseline's) had less than {STARVED} of their "
               "core: other work slowed them",
    "unrecorded": "the load is not recorded (the row's or the baseline's one-thread runs were "
                  "made before runs noted their CPU share)"}


def timing(layout: Layout, runs, epochs, sessions=None) -> list[Timing]:
    """Each cell's training seconds per epoch and its ratio to the baseline's. A run is divided
    by the baseline's runs made at the same torch threads (one thread or two halves or doubles
    an epoch) on the same CPU model (``sessions``' ``cpu``: the stores hold runs of several
    machines); ``unlike`` says where that was not possible, or where the row's one-thread runs
    or the baseline runs it was divided by had less than STARVED of their cores, or never
    recorded it (the load, not the rule, may have moved the ratio)."""
    counted = epochs[epochs["status"].isin(["ok", "diverged"])]
    if counted.empty:
        return []
    timed = counted[~counted["warmup"]] if (~counted["warmup"]).any() else counted
    per_run = timed.groupby(["label", "task_label", "arch", "run_key"])["train_time_s"].median()
    cpu_of: dict = {}
    if sessions is not None and len(sessions) and {"id", "cpu"} <= set(sessions.columns) \
            and "session_id" in runs.columns:
        by_session = dict(zip(sessions["id"], sessions["cpu"]))
        cpu_of = {key: by_session.get(sid) for key, sid in zip(runs["key"], runs["session_id"])}
    setting_of = {key: (threads, cpu_of.get(key)) for key, threads in zip(   # (threads, CPU)
        runs["key"], runs["threads"])} if "threads" in runs.columns else {}
    finished = runs[runs["status"].isin(["ok", "diverged"])]
    base: dict[tuple, float] = {}          # (task, arch) and (task, arch, setting) → mean
    if layout.baseline:
        ours = per_run[per_run.index.get_level_values(0) == layout.baseline]
        for (task, arch), group in ours.groupby(level=[1, 2]):
            base[(task, arch)] = float(group.mean())
            by_setting: dict = {}
            for (_, _, _, key), seconds in group.items():
                by_setting.setdefault(setting_of.get(key), []).append(seconds)
            for setting, values in by_setting.items():
                base[(task, arch, setting)] = float(statistics.mean(values))
    out = []
    for row in rows(layout, counted):
        for task, arch in columns(layout, counted):
            key = (row, task, arch)
            try:
                medians = per_run.loc[key]
            except KeyError:
                continue
            here = counted[(counted["label"] == row) & (counted["task_label"] == task)
                           & (counted["arch"] == arch)]
            cell = finished[(finished["label"] == row) & (finished["task_label"] == task)
                            & (finished["arch"] == arch)]
            memory = cell["peak_memory_mb"].max()
            shares = _shares(cell, one_thread=False)
            ratio, unlike = None, []
            if (task, arch) in base:
                ratios, divisors = [], set()     # the baseline runs' settings divided by
                for run_key, seconds in medians.items():
                    same = base.get((task, arch, setting_of.get(run_key)))
                    if same is None and "threads" not in unlike:
                        unlike.append("threads")
                    divisors.add(setting_of.get(run_key) if same is not None else ALL)
                    ratios.append(seconds / (same if same is not None else base[(task, arch)]))
                ratio = stats.summarize(ratios)
                baseline_cell = finished[(finished["label"] == layout.baseline)
                                         & (finished["task_label"] == task)
                                         & (finished["arch"] == arch)]
                if ALL not in divisors:
                    baseline_cell = baseline_cell[[setting_of.get(k) in divisors
                                                   for k in baseline_cell["key"]]] \
                        if len(baseline_cell) else baseline_cell
                sides = [(cell, _shares(cell)), (baseline_cell, _shares(baseline_cell))]
                if any(values and statistics.median(values) < STARVED for _, values in sides):
                    unlike.append("starved")
                if any(not values and _one_thread_cpu(frame) for frame, values in sides):
                    unlike.append("unrecorded")
                if row == layout.baseline:       # its own mean: 1 by definition
                    unlike = []
            out.append(Timing(row, task, arch, stats.summarize(medians.tolist()), ratio,
                              float(here["eval_time_s"].mean()),
                              None if memory != memory else float(memory),
                              float(here["train_time_s"].sum()) / 3600.0,
                              statistics.median(shares) if shares else None,
                              tuple(unlike), tuple(ratios) if ratio is not None else ()))
    return out


def _one_thread_cpu(cell) -> bool:
    return {"device", "threads"} <= set(cell.columns) and any(
        str(d).startswith("cpu") and t == 1 for d, t in zip(cell["device"], cell["threads"]))


def _shares(cell, one_thread: bool = True) -> list[float]:
    """The CPU shares the cell's CPU runs noted; ``one_thread``: of its one-thread runs only (a
    run of more threads may fall below 1 with its own threads idle: its share does not tell
    the load)."""
    if not {"notes", "device"} <= set(cell.columns) or (
            one_thread and "threads" not in cell.columns):
        return []
    threads = cell["threads"] if one_thread else [1] * len(cell)
    return [v for v in (cpu_share(n) for n, d, t in zip(cell["notes"], cell["device"], threads)
                        if str(d).startswith("cpu") and t == 1) if v is not None]


def compute_per_rule(timings: list[Timing]) -> dict[str, float]:
    """Row → training hours spent over every cell and run (the cost of its column of results)."""
    total: dict[str, float] = {}
    for t in timings:
        total[t.row] = total.get(t.row, 0.0) + t.train_hours
    return total


def row_parameters(layout: Layout) -> list[tuple[str, dict, dict]]:
    """(row, hyper-parameters common to all its cells, per-cell differences {task/arch: {…}})
    from the plan: every parameter a run of the row was made with."""
    by_row: dict[str, list[tuple[str, dict]]] = {}
    for entry in layout.plan:
        by_row.setdefault(entry["label"], []).append(
            (f"{entry['task']}/{entry['arch']}", dict(entry.get("params") or {},
                                                       batch_size=entry.get("batch_size"),
                                                       epochs=entry.get("epochs"))))
    out = []
    for row in layout.row_order:
        cells = by_row.get(row, [])
        if not cells:
            continue
        keys = set().union(*(p.keys() for _, p in cells))
        common = {k: cells[0][1].get(k) for k in sorted(keys)
                  if all(json.dumps(p.get(k)) == json.dumps(cells[0][1].get(k)) for _, p in cells)}
        differing: dict[str, dict] = {}
        for cell, params in cells:
            extra = {k: v for k, v in params.items() if k not in common}
            if extra:
                differing.setdefault(cell, extra)
        out.append((row, common, differing))
    return out


def median_or_none(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class TimeToTarget:
    row: str
    task: str
    arch: str
    target: float
    reached: int                     # seeds that reached it
    runs: int
    seconds: stats.Summary           # training seconds until the first epoch that reached it
    epochs: stats.Summary


def time_to_target(layout: Layout, epochs) -> list[TimeToTarget]:
    """Per row and task/arch with a target: training seconds (cumulative, warm-up included)
    and epochs until the validation metric first reached it, over the seeds that did."""
    targets = {t: v.get("target") for t, v in layout.raw.get("tasks", {}).items()
               if v.get("target") is not None}
    counted = epochs[epochs["status"].isin(["ok", "diverged"])]
    out = []
    if counted.empty or not targets:
        return out
    for row in rows(layout, counted):
        for task, arch in columns(layout, counted):
            if task not in targets:
                continue
            metric, direction = layout.metrics[task]
            here = counted[(counted["label"] == row) & (counted["task_label"] == task)
                           & (counted["arch"] == arch)]
            column = f"val_{metric}"
            if here.empty or column not in here:
                continue
            seconds, spent, total = [], [], 0
            for _, run in here.sort_values("epoch").groupby("run_key"):
                total += 1
                good = run[column] >= targets[task] if direction == "max" \
                    else run[column] <= targets[task]
                if good.any():
                    first = run[good.values].iloc[0]["epoch"]
                    seconds.append(float(run[run["epoch"] <= first]["train_time_s"].sum()))
                    spent.append(float(first))
            out.append(TimeToTarget(row, task, arch, targets[task], len(seconds), total,
                                    stats.summarize(seconds), stats.summarize(spent)))
    return out
