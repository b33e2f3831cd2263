"""Uncertainty for the results tables: t intervals per cell, tests against a baseline,
Holm's correction, best-and-tied marks and the comparison of two result sets.

Every number here is computed by scipy.stats or statsmodels; this module only chooses the test
(paired by seed where both sides ran the same seeds, Welch's otherwise), refuses to test where
a side has fewer than two seeds, and says so instead of inventing an interval. Intervals and
tests follow Bouthillier et al. 2021 ("Accounting for variance in machine learning
benchmarks"); the aggregate across tasks (interquartile mean, stratified bootstrap,
performance profiles) is in ``harness.profiles``.

Functions over a runs DataFrame take the name of the value column (``clean_test``, …), the
row column (``label``), the cell columns (``task_label``, ``arch``) and the seed column; the
caller passes the runs that may count (status ``ok``). Results are keyed by
``(row, *cell)``, e.g. ``("fa", "mnist", "mlp")``. No torch here: a report runs without it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Hashable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
ALPHA = 0.05
DIRECTIONS = ("max", "min")
CELL = ("task_label", "arch")

Values = Union[Sequence[Optional[float]], Mapping[Hashable, Optional[float]]]
PerCell = Union[str, float, Mapping]   # one setting for every cell, or per cell / per task


@dataclass(frozen=True)
class Summary:
    """One cell's seeds: ``n`` finite values used, ``dropped`` (NaN/None) left out, their
    mean, sample standard deviation (ddof = 1) and the Student-t ``confidence`` interval of
    the mean. ``std`` and ``ci`` are None below two values (``note`` says why)."""

    n: int
    dropped: int
    mean: Optional[float]
    std: Optional[float]
    ci: Optional[tuple[float, float]]
    confidence: float = CONFIDENCE
    note: str = ""


@dataclass(frozen=True)
class Difference:
    """``a − b`` for one cell: ``estimate`` = mean(a) − mean(b) (the mean paired difference
    when ``paired``), its ``confidence`` interval and two-sided ``p`` (paired t-test by seed,
    or Welch's), ``p_holm`` once corrected with the rest of its table (None until then).
    ``n_a``/``n_b``: the values used (pairs: both equal). ``ci``/``p`` are None where no test
    could be made (fewer than two values on a side, or no variance at all); ``note`` says why."""

    estimate: Optional[float]
    ci: Optional[tuple[float, float]]
    p: Optional[float]
    paired: bool
    n_a: int
    n_b: int
    mean_a: Optional[float]
    mean_b: Optional[float]
    confidence: float = CONFIDENCE
    p_holm: Optional[float] = None
    note: str = ""

    def significant(self, alpha: float = ALPHA) -> bool:
        """Whether the corrected p-value (the raw one if never corrected) is below ``alpha``."""
        p = self.p_holm if self.p_holm is not None else self.p
        return p is not None and p < alpha


@dataclass(frozen=True)
class Change:
    """One cell present in both result sets A and B: ``metric`` = B − A of the value column
    (Holm-corrected across cells), ``time`` = B − A of the time column (its own Holm family;
    None when no time column was given), and the metric's ``direction``."""

    key: tuple
    direction: str
    metric: Difference
    time: Optional[Difference]


def finite_values(values: Values) -> tuple[dict, int]:
    """The finite values keyed by seed (by position for a plain sequence), and how many of
    the given values were NaN/None."""
    items = values.items() if isinstance(values, Mapping) else enumerate(values)
    kept = {k: float(v) for k, v in items if v is not None and math.isfinite(float(v))}
    return kept, len(values) - len(kept)


def _interval(ci) -> Optional[tuple[float, float]]:
    low, high = float(ci.low), float(ci.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


# What a metric can take, by its name (the tasks' words): a t interval of few seeds reaches
# past it (an MSE interval below 0, an accuracy one above 100), and the mean cannot be there.
PERCENT_SUFFIX = "accuracy"
NON_NEGATIVE = ("mse", "mae", "rmse", "loss", "bpc", "perplexity", "s", "epochs", "ratio")


def metric_range(metric: str) -> tuple[float, float]:
    """The values ``metric`` can take: an accuracy (any name ending in ``accuracy``) is a
    percentage, 0 to 100; an error, a loss, a duration or a ratio of durations (``mse``,
    ``persistence_mse``, ``mse_orig``, ``bpc``, ``s``, ``ratio``, …) is at least 0; any other
    metric is unbounded."""
    name = metric.removesuffix("_orig")      # the same quantity in the data's own units
    if name.endswith(PERCENT_SUFFIX):
        return 0.0, 100.0
    if name in NON_NEGATIVE or name.rsplit("_", 1)[-1] in NON_NEGATIVE:
        return 0.0, math.inf
    return -math.inf, math.inf


def within_range(summary: Summary, metric: str) -> Summary:
    """``summary`` with its interval cut at what ``metric`` can take (the true mean lies in
    that range, so the cut interval covers it as often as the t interval does)."""
    if summary.ci is None:
        return summary
    low, high = metric_range(metric)
    cut = (max(summary.ci[0], low), min(summary.ci[1], high))
    return summary if cut == summary.ci else replace(summary, ci=cut)


def summarize(values: Values, confidence: float = CONFIDENCE) -> Summary:
    """n, mean, sample std and the t interval of the mean of one cell's values (a sequence,
    or seed → value); NaN/None are dropped and counted in ``dropped``."""
    kept, dropped = finite_values(values)
    arr = np.fromiter(kept.values(), dtype=float, count=len(kept))
    if arr.size == 0:
        return Summary(0, dropped, None, None, None, confidence, "no values")
    if arr.size == 1:
        return Summary(1, dropped, float(arr[0]), None, None, confidence,
                       "one value: no spread, no interval")
    with warnings.catch_warnings():   # precision loss on (near-)constant samples
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = sps.ttest_1samp(arr, 0.0).confidence_interval(confidence)
    return Summary(int(arr.size), dropped, float(arr.mean()), float(arr.std(ddof=1)),
                   _interval(ci), confidence)


def difference(a: Values, b: Values, confidence: float = CONFIDENCE) -> Difference:
    """``a − b`` with a CI and a two-sided p-value: ``scipy.stats.ttest_rel`` when ``a`` and
    ``b`` are seed → value mappings with the same seeds (two or more), Welch's
    ``ttest_ind(equal_var=False)`` otherwise; no test when a side has fewer than two values."""
    a_kept, _ = finite_values(a)
    b_kept, _ = finite_values(b)
    n_a, n_b = len(a_kept), len(b_kept)
    mean_a = float(np.mean(list(a_kept.values()))) if n_a else None
    mean_b = float(np.mean(list(b_kept.values()))) if n_b else None
    estimate = mean_a - mean_b if n_a and n_b else None
    paired = (isinstance(a, Mapping) and isinstance(b, Mapping) and n_a >= 2
              and set(a_kept) == set(b_kept))
    common = dict(n_a=n_a, n_b=n_b, mean_a=mean_a, mean_b=mean_b, confidence=confidence)
    if n_a < 2 or n_b < 2:
        return Difference(estimate, None, None, False, **common,
                          note="fewer than two values on a side: no test")
    with warnings.catch_warnings():   # precision loss on (near-)constant samples
        warnings.simplefilter("ignore", RuntimeWarning)
        if paired:
            x = list(a_kept.values())
            y = [b_kept[s] for s in a_kept]
            result = sps.ttest_rel(x, y)
            estimate = float(np.mean(np.subtract(x, y)))
        else:
            result = sps.ttest_ind(list(a_kept.values()), list(b_kept.values()), equal_var=False)
        ci = _interval(result.confidence_interval(confidence))
    p = float(result.pvalue)
    if not math.isfinite(p):
        return Difference(estimate, ci, None, paired, **common,
                          note="no variance (identical values): no test")
    return Difference(estimate, ci, p, paired, **common)


def format_p(p: float, alpha: float = ALPHA) -> str:
    """``p`` to two significant digits, or as many more as keep it on its side of ``alpha``
    (0.0497 is not printed as 0.05 beside a mark that says "below 0.05")."""
    for digits in range(2, 7):
        text = f"{p:.{digits}g}"
        if (float(text) < alpha) == (p < alpha):
            return text
    return repr(p)


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm-corrected p-values (``statsmodels.stats.multitest.multipletests``); a None (no
    test) stays None and is not part of the family."""
    from statsmodels.stats.multitest import multipletests
    tested = [i for i, p in enumerate(pvalues) if p is not None]
    out: list[Optional[float]] = [None] * len(pvalues)
    if tested:
        corrected = multipletests([pvalues[i] for i in tested], method="holm")[1]
        for i, p in zip(tested, corrected):
            out[i] = float(p)
    return out


def _with_holm(diffs: dict) -> dict:
    keys = list(diffs)
    corrected = holm([diffs[k].p for k in keys])
    return {k: replace(diffs[k], p_holm=p) for k, p in zip(keys, corrected)}


def setting(per_cell: PerCell, cell: tuple, what: str = "direction"):
    """A per-cell setting: ``per_cell`` itself, or its entry for the cell tuple, or for the
    cell's first part (the task label)."""
    if not isinstance(per_cell, Mapping):
        value = per_cell
    elif cell in per_cell:
        value = per_cell[cell]
    elif cell and cell[0] in per_cell:
        value = per_cell[cell[0]]
    else:
        raise ValueError(f"no {what} given for cell {'/'.join(map(str, cell))}")
    if what == "direction" and value not in DIRECTIONS:
        raise ValueError(f"direction {value!r} for {'/'.join(map(str, cell))}: "
                         f"expected one of {', '.join(DIRECTIONS)}")
    return value


def seed_values(runs, value: str, row: str = "label", cells: Sequence[str] = CELL,
                seed: str = "seed") -> dict[tuple, dict]:
    """``(row, *cell)`` → {seed: value} from a runs DataFrame (NaN kept, to be counted); a seed
    twice in one group is an error (pairing by seed would be ambiguous)."""
    groups: dict[tuple, dict] = {}
    columns = [row, *cells, seed, value]
    for *key, s, v in runs[columns].itertuples(index=False, name=None):
        group = groups.setdefault(tuple(key), {})
        if s in group:
            raise ValueError(f"seed {s} appears twice in {'/'.join(map(str, key))}")
        group[s] = v
    return groups


def cell_summaries(runs, value: str, *, row: str = "label", cells: Sequence[str] = CELL,
                   seed: str = "seed", confidence: float = CONFIDENCE) -> dict[tuple, Summary]:
    """``(row, *cell)`` → ``summarize`` of that group's values."""
    return {key: summarize(vals, confidence)
            for key, vals in seed_values(runs, value, row, cells, seed).items()}


def baseline_differences(runs, value: str, baseline: str = "bp", *, row: str = "label",
                         cells: Sequence[str] = CELL, seed: str = "seed",
                         confidence: float = CONFIDENCE,
                         direction: Optional[PerCell] = None) -> dict[tuple, Difference]:
    """``(row, *cell)`` → ``difference(rule, baseline)`` for every row other than
    ``baseline`` in every cell where the baseline ran; p-values Holm-corrected across the
    whole table — together with :func:`best_rows`' comparisons where ``direction`` is given
    (:func:`table_tests`: one family for the marks and the differences of one table)."""
    if direction is not None:
        return table_tests(runs, value, direction, baseline, row=row, cells=cells, seed=seed,
                           confidence=confidence)[1]
    return _with_holm(_raw_differences(seed_values(runs, value, row, cells, seed), baseline,
                                       confidence))


def _raw_differences(groups: dict, baseline: str, confidence: float) -> dict[tuple, Difference]:
    if not any(key[0] == baseline for key in groups):
        raise ValueError(f"baseline row {baseline!r} is not among the rows: "
                         + ", ".join(sorted({str(k[0]) for k in groups})))
    return {key: difference(vals, groups[(baseline, *key[1:])], confidence)
            for key, vals in groups.items()
            if key[0] != baseline and (baseline, *key[1:]) in groups}


def single_value_p(values: Values, y: float) -> Optional[float]:
    """Two-sided p that one value ``y`` (a row of one seed) comes from the population of
    ``values`` (two or more): Student's t of a new observation against their mean and spread,
    the prediction-interval test — ``scipy.stats.ttest_ind(values, [y], equal_var=True)``, to
    which the single value adds no variance. None below two values or without spread."""
    kept, _ = finite_values(values)
    if len(kept) < 2 or not math.isfinite(float(y)):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(sps.ttest_ind(list(kept.values()), [float(y)], equal_var=True).pvalue)
    return p if math.isfinite(p) else None


def best_rows(runs, value: str, direction: PerCell, *, row: str = "label",
              cells: Sequence[str] = CELL, seed: str = "seed", alpha: float = ALPHA,
              baseline: Optional[str] = None) -> dict[tuple, Optional[str]]:
    """``(row, *cell)`` → ``"best"``, ``"tied"`` or None. In each cell the row with the best
    mean among those of two or more values is ``best`` only where its difference to every
    other row is significant (paired where possible), with Holm's correction over every cell's
    comparisons together — and, given the ``baseline``, over the table's differences to it as
    well (:func:`table_tests`), so that a mark never claims a difference that the difference
    column calls noise; otherwise it and the rows not distinguishable from it are ``tied``. A
    row of one value is never best: it is tested against the top row's seeds as a new
    observation of them (``single_value_p``) where it is worse than their mean, and is never
    told apart where it is better. A row alone in its cell is best; a cell of single values
    only is all tied."""
    return table_tests(runs, value, direction, baseline, row=row, cells=cells, seed=seed,
                       alpha=alpha)[0]


def _pair(cell: tuple, a, b) -> tuple:
    """One comparison's name, whichever way round it was made (the tests are symmetric)."""
    return (cell, frozenset((a, b)))


def table_tests(runs, value: str, direction: PerCell, baseline: Optional[str] = None, *,
                row: str = "label", cells: Sequence[str] = CELL, seed: str = "seed",
                alpha: float = ALPHA, confidence: float = CONFIDENCE
                ) -> tuple[dict[tuple, Optional[str]], dict[tuple, Difference]]:
    """(marks as :func:`best_rows` gives them, differences to ``baseline`` as
    :func:`baseline_differences` gives them — empty without one) from one Holm family: every
    distinct comparison either makes (the best row against each other row of its cell, each
    row against the baseline; a pair both make is one test, counted once), so that the two
    never disagree about a pair."""
    groups = seed_values(runs, value, row, cells, seed)
    by_cell: dict[tuple, list] = {}
    for key, vals in groups.items():
        summary = summarize(vals)
        if summary.n:
            by_cell.setdefault(key[1:], []).append((summary.mean, key, vals, summary.n))
    marks: dict[tuple, Optional[str]] = {key: None for key in groups}
    tests: list[tuple[tuple, tuple, tuple]] = []       # (pair, top, other) of every cell
    family: dict[tuple, Optional[float]] = {}          # pair → its raw p
    for cell, entries in by_cell.items():
        sign = 1.0 if setting(direction, cell) == "max" else -1.0
        entries.sort(key=lambda e: (e[3] < 2, -sign * e[0]))     # seeded rows first, best first
        (top_mean, top, top_vals, top_n), others = entries[0], entries[1:]

        def p_of(mean, vals, n):
            if n >= 2 and top_n >= 2:
                return difference(top_vals, vals).p
            if top_n >= 2 and sign * (top_mean - mean) > 0:     # one value, worse than the top
                return single_value_p(top_vals, mean)
            return None                                          # one value as good: no test
        marks[top] = "best"
        for mean, key, vals, n in others:
            pair = _pair(cell, top[0], key[0])
            family[pair] = p_of(mean, vals, n)
            tests.append((pair, top, key))
    diffs = _raw_differences(groups, baseline, confidence) if baseline is not None else {}
    for key, d in diffs.items():
        pair = _pair(key[1:], key[0], baseline)
        if pair not in family:                       # a pair the marks did not test
            family[pair] = d.p
    pairs = list(family)
    corrected = dict(zip(pairs, holm([family[p] for p in pairs])))
    for pair, top, key in tests:
        p = corrected[pair]
        if p is None or p >= alpha:                              # not told apart from the top
            marks[top] = marks[key] = "tied"
    diffs = {key: replace(d, p_holm=corrected[_pair(key[1:], key[0], baseline)]
                          if d.p is not None else None) for key, d in diffs.items()}
    return marks, diffs


def compare(a, b, value: str, direction: PerCell, *, time: Optional[str] = None,
            row: str = "label", cells: Sequence[str] = CELL, seed: str = "seed",
            confidence: float = CONFIDENCE) -> list[Change]:
    """Result set B against A (two runs DataFrames with the same columns), per ``(row,
    *cell)`` present in both: B − A of ``value`` and of the per-run ``time`` column (e.g.
    mean train seconds per epoch), paired by seed where possible; Holm across cells, for the
    metric and for the time separately."""
    groups_a = seed_values(a, value, row, cells, seed)
    groups_b = seed_values(b, value, row, cells, seed)
    keys = sorted(set(groups_a) & set(groups_b), key=lambda k: tuple(map(str, k)))
    metric = _with_holm({k: difference(groups_b[k], groups_a[k], confidence) for k in keys})
    times: dict = {}
    if time is not None:
        time_a = seed_values(a, time, row, cells, seed)
        time_b = seed_values(b, time, row, cells, seed)
        times = _with_holm({k: difference(time_b[k], time_a[k], confidence) for k in keys})
    return [Change(k, setting(direction, k[1:]), metric[k], times.get(k)) for k in keys]


def regressions(changes: Sequence[Change], threshold: PerCell, *, alpha: float = ALPHA,
                time_threshold: Optional[float] = None) -> list[Change]:
    """The changes that are regressions: the metric moved in its bad direction by more than
    ``threshold`` (in the metric's units; one number, or per cell/task) with a corrected p
    below ``alpha``; with ``time_threshold`` (a fraction: 0.1 = 10 % slower), also those whose
    time grew by more than that fraction of A's, significantly."""
    found = []
    for change in changes:
        m = change.metric
        worse = None if m.estimate is None else (
            -m.estimate if change.direction == "max" else m.estimate)
        limit = float(setting(threshold, change.key[1:], "threshold"))
        slower = False
        t = change.time
        if time_threshold is not None and t is not None and t.estimate is not None and t.mean_a:
            slower = t.significant(alpha) and t.estimate / t.mean_a > time_threshold
        if (worse is not None and m.significant(alpha) and worse > limit) or slower:
            found.append(change)
    return found


def has_regression(changes: Sequence[Change], threshold: PerCell, *, alpha: float = ALPHA,
                   time_threshold: Optional[float] = None) -> bool:
    """Whether ``regressions`` finds any (for ``bench.py compare`` to exit 1)."""
    return bool(regressions(changes, threshold, alpha=alpha, time_threshold=time_threshold))
