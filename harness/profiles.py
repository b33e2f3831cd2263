"""Across tasks: baseline-normalised scores, their interquartile mean with a stratified
bootstrap interval, and performance profiles (with their plot).

After Agarwal et al. 2021 ("Deep RL at the edge of the statistical precipice", rliable): the
interquartile mean (``scipy.stats.trim_mean(x, 0.25)``) of every run's normalised score
resists the outlier cell that a mean follows and, unlike a median, uses half the runs; its
interval comes from ``scipy.stats.bootstrap`` with each task/arch cell a separate sample, so
runs are resampled within their cell (stratified). Performance profiles are Dolan and Moré's
(2002): for each rule, the fraction of cells where its mean is within a factor τ of the best
rule's mean. Ratios need positive values (accuracies, errors, MSEs). No torch here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats as sps

from harness.stats import CELL, CONFIDENCE, PerCell, finite_values, seed_values, setting


@dataclass(frozen=True)
class Aggregate:
    """One rule across cells: ``iqm`` of its normalised scores over all its runs of all its
    cells, the stratified-bootstrap ``confidence`` interval (percentile method; None when
    every cell has a single run: nothing to resample), ``n_runs`` and ``n_cells`` used."""

    row: str
    iqm: float
    ci: Optional[tuple[float, float]]
    n_runs: int
    n_cells: int
    confidence: float = CONFIDENCE
    n_resamples: int = 0
    note: str = ""


@dataclass(frozen=True)
class Profile:
    """Performance profiles: ``fractions[row][i]`` = the fraction of the ``cells`` where that
    row's mean is within a factor ``taus[i]`` of the best row's mean; ``ratios[row]`` = its
    ratio per cell (≥ 1; inf where the row has no value there)."""

    taus: tuple[float, ...]
    cells: tuple[tuple, ...]
    fractions: Mapping[str, tuple[float, ...]]
    ratios: Mapping[str, tuple[float, ...]]


def _means(runs, value, row, cells, seed) -> dict[tuple, float]:
    means = {}
    for key, vals in seed_values(runs, value, row, cells, seed).items():
        kept, _ = finite_values(vals)
        if kept:
            mean = float(np.mean(list(kept.values())))
            if mean <= 0:
                raise ValueError(f"{'/'.join(map(str, key))}: mean {mean} is not positive; "
                                 "ratios to another mean need positive values")
            means[key] = mean
    return means


def normalized_scores(runs, value: str, direction: PerCell, baseline: str = "bp", *,
                      row: str = "label", cells: Sequence[str] = CELL,
                      seed: str = "seed") -> list[tuple[tuple, object, float]]:
    """``[((row, *cell), seed, score)]``: each run's value over the baseline's mean in its
    cell ("max" metric) or the baseline's mean over the value ("min"): 1 = as good as the
    baseline, above 1 better. Cells where the baseline has no value are left out."""
    groups = seed_values(runs, value, row, cells, seed)
    base = _means(runs[runs[row] == baseline], value, row, cells, seed)
    if not base:
        raise ValueError(f"baseline row {baseline!r} has no values")
    scores = []
    for key, vals in groups.items():
        reference = base.get((baseline, *key[1:]))
        if reference is None:
            continue
        higher_better = setting(direction, key[1:]) == "max"
        for s, v in finite_values(vals)[0].items():
            if v <= 0:
                raise ValueError(f"{'/'.join(map(str, key))} seed {s}: value {v} is not "
                                 "positive; a ratio to the baseline needs positive values")
            scores.append((key, s, v / reference if higher_better else reference / v))
    return scores


def interquartile_means(runs, value: str, direction: PerCell, baseline: str = "bp", *,
                        row: str = "label", cells: Sequence[str] = CELL, seed: str = "seed",
                        confidence: float = CONFIDENCE, n_resamples: int = 2000,
                        random_state: int = 0,
                        failures: Sequence[tuple] = ()) -> dict[str, Aggregate]:
    """Row → ``Aggregate``: the IQM of the row's normalised scores (``normalized_scores``)
    with a stratified bootstrap interval (cells = strata, reproducible for a given
    ``random_state``). A row that ran fewer cells is aggregated over those it ran
    (``n_cells`` says how many). ``failures``: ``(row, *cell)`` of each run that failed
    (diverged), scored 0 — no model — in its cell, so that failing is never better than
    scoring badly."""
    strata: dict[str, dict[tuple, list[float]]] = {}
    for key, _, score in normalized_scores(runs, value, direction, baseline, row=row,
                                           cells=cells, seed=seed):
        strata.setdefault(key[0], {}).setdefault(key[1:], []).append(score)
    for key in failures:
        strata.setdefault(key[0], {}).setdefault(tuple(key[1:]), []).append(0.0)
    out = {}
    for name, by_cell in strata.items():
        samples = [np.asarray(v) for v in by_cell.values() if len(v) >= 2]
        # a one-run cell resamples to itself: it joins every resample unchanged
        fixed = np.asarray([v[0] for v in by_cell.values() if len(v) == 1])
        everything = np.concatenate(samples + [fixed])
        point = float(sps.trim_mean(everything, 0.25))
        common = dict(row=name, iqm=point, n_runs=int(everything.size),
                      n_cells=len(by_cell), confidence=confidence)
        if not samples:
            out[name] = Aggregate(ci=None, **common,
                                  note="one run per cell: nothing to resample, no interval")
            continue

        def iqm(*resampled, axis=-1):
            parts = [np.moveaxis(x, axis, -1) for x in resampled]
            shape = parts[0].shape[:-1]
            parts.append(np.broadcast_to(fixed, shape + fixed.shape))
            return sps.trim_mean(np.concatenate(parts, axis=-1), 0.25, axis=-1)

        result = sps.bootstrap(samples, iqm, paired=False, vectorized=True,
                               n_resamples=n_resamples, confidence_level=confidence,
                               method="percentile",
                               random_state=np.random.default_rng(random_state))
        ci = result.confidence_interval
        out[name] = Aggregate(ci=(float(ci.low), float(ci.high)), n_resamples=n_resamples,
                              **common)
    return out


def performance_profile(runs, value: str, direction: PerCell, *, row: str = "label",
                        cells: Sequence[str] = CELL, seed: str = "seed",
                        taus: Optional[Sequence[float]] = None, tau_max: Optional[float] = None,
                        points: int = 101) -> Profile:
    """Dolan–Moré profiles of the rows' cell means. Ratio in a cell: best mean / the row's
    ("max") or the row's / best ("min"); a row absent from a cell never counts there. The τ
    grid: ``taus``, or ``points`` geometric steps from 1 to ``tau_max`` (by default just
    past the largest finite ratio, so that every curve reaches its final height)."""
    means = _means(runs, value, row, cells, seed)
    names = sorted({key[0] for key in means}, key=str)
    cell_keys = sorted({key[1:] for key in means}, key=lambda c: tuple(map(str, c)))
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for cell in cell_keys:
        here = {name: means[(name, *cell)] for name in names if (name, *cell) in means}
        higher_better = setting(direction, cell) == "max"
        best = max(here.values()) if higher_better else min(here.values())
        for name in names:
            mean = here.get(name)
            ratios[name].append(math.inf if mean is None else
                                best / mean if higher_better else mean / best)
    if taus is None:
        finite = [r for rs in ratios.values() for r in rs if math.isfinite(r)]
        top = tau_max if tau_max is not None else max(max(finite, default=1.0) * 1.02, 1.01)
        taus = np.geomspace(1.0, top, points)
    grid = np.asarray(taus, dtype=float)
    fractions = {name: tuple(float(f) for f in
                             (np.asarray(rs)[None, :] <= grid[:, None]).mean(axis=1))
                 for name, rs in ratios.items()}
    return Profile(tuple(float(t) for t in grid), tuple(cell_keys), fractions,
                   {name: tuple(rs) for name, rs in ratios.items()})


def plot_profile(profile: Profile, colours: Mapping[str, object], *, ax=None,
                 title: str = "Performance profile"):
    """Step curves of ``profile``, one per row in the colour ``colours`` gives it (every row
    must have one: ``harness.report.plots.palette``, so a rule has its colour of every other
    figure); draws on ``ax`` or a new figure, returns the figure (not saved)."""
    from matplotlib.figure import Figure
    missing = [name for name in profile.fractions if name not in colours]
    if missing:
        raise ValueError("no colour for " + ", ".join(map(str, missing)))
    if ax is None:
        fig = Figure(figsize=(6.0, 4.0))
        ax = fig.subplots()
    # the legend in the report's row order (the order ``colours`` was made in)
    order = [n for n in colours if n in profile.fractions]
    order += [n for n in profile.fractions if n not in order]
    for name in order:
        ax.step(profile.taus, profile.fractions[name], where="post", color=colours[name],
                label=str(name))
    if profile.taus and profile.taus[-1] > 10:
        ax.set_xscale("log")
    if profile.taus and profile.taus[-1] > 1.0:
        ax.set_xlim(1.0, profile.taus[-1])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("τ: within this factor of the best rule's mean")
    ax.set_ylabel(f"fraction of the {len(profile.cells)} task/arch cells")
    ax.set_title(title)
    if len(order) > 8:                      # a sweep: beside the axes, not over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    else:
        ax.legend(fontsize=8)
    return ax.figure
