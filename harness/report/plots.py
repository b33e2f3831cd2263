"""The report's figures: one colour per algorithm row — the same in every panel and every figure
of a report, one legend in the suite's row order — integer epoch ticks, validation and test
curves beside the training loss, time per epoch as a ratio to the baseline with its spread, and
the metric against cumulative training time. Every function returns ``(title, file name)``
pairs of the PNGs it wrote (none where there is nothing to draw).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from harness.report.layout import Layout

DPI = 110


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# The harness's rules in a fixed order: each keeps its tab10 colour in every report, whatever
# rows a suite has (bp blue, dll orange, …): a row labelled as the rule, or else the one row of
# that rule's plugin. Other rows take olive and cyan first, then the colours of rules the report
# does not have, in row order.
RULE_COLOURS = ("bp", "dll", "dll-released", "dll_fa", "fa", "dfa", "pc", "dtp")


def palette(rows: list[str], algorithms: Optional[dict] = None) -> dict[str, tuple]:
    """Row label → colour (``algorithms``: row label → its plugin, as the layout records)."""
    import seaborn as sns
    tab10 = sns.color_palette("tab10", 10)
    rule_of = {r: r for r in rows if r in RULE_COLOURS}
    plugins = [(algorithms or {}).get(r) for r in rows]
    for row, plugin in zip(rows, plugins):
        if row not in rule_of and plugin in RULE_COLOURS and plugins.count(plugin) == 1 \
                and plugin not in rule_of.values():
            rule_of[row] = plugin
    fixed = {r: tab10[RULE_COLOURS.index(rule)] for r, rule in rule_of.items()}
    others = [r for r in rows if r not in fixed]
    taken = set(rule_of.values())
    free = tab10[len(RULE_COLOURS):] + [c for r, c in zip(RULE_COLOURS, tab10) if r not in taken]
    if len(others) > len(free):
        free = sns.color_palette("husl", len(others) + len(fixed))[len(fixed):]
    colours = {**fixed, **dict(zip(others, free))}
    return {r: colours[r] for r in rows}


def _legend(fig, colours: dict, rows: list[str]) -> None:
    from matplotlib.lines import Line2D
    handles = [Line2D([0], [0], color=colours[r], lw=2.5) for r in rows]
    fig.legend(handles, rows, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(rows), 5), frameon=False, fontsize=8)


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, out_dir: Path, name: str) -> None:
    plt = _pyplot()
    fig.savefig(out_dir / name, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _ok(epochs):
    frame = epochs[epochs["status"].isin(["ok", "diverged"])].copy()
    if frame.empty:
        return frame
    frame["column"] = frame["task_label"] + "/" + frame["arch"]
    return frame.sort_values(["run_key", "epoch"])


def _cells(layout: Layout, frame) -> list[tuple[str, str]]:
    present = set(zip(frame["task_label"], frame["arch"]))
    return [c for c in layout.column_order if c in present]


def _band(ax, group, x: str, y: str, colour) -> bool:
    """Mean over seeds with a min–max band; False when the column holds no value."""
    values = group[[x, y]].dropna()
    if values.empty:
        return False
    stats = values.groupby(x)[y].agg(["mean", "min", "max"])
    ax.plot(stats.index, stats["mean"], color=colour, lw=1.6, marker="o", ms=2.5)
    if (stats["max"] > stats["min"]).any():
        ax.fill_between(stats.index, stats["min"], stats["max"], color=colour, alpha=0.15, lw=0)
    return True


WIDE = 100.0        # a panel whose positive values span this factor is drawn on a log axis


def _wide(values) -> bool:
    """Whether an error or a loss is better drawn on a log axis: every finite value positive,
    and they span WIDE or more (one row's diverged error, 300 beside the others' 0.02, would
    flatten every other line to zero). Infinities (a diverged loss) are left out."""
    import numpy as np
    values = values[np.isfinite(values.astype(float))]
    return not (values.empty or (values <= 0).any() or values.max() < WIDE * values.min())


def _log_if_wide(ax, values, error: bool = True) -> bool:
    """A log y axis for an error or a loss (``error``: lower is better; an accuracy never)
    whose values are :func:`_wide`; True when it did."""
    if not error or not _wide(values):
        return False
    ax.set_yscale("log")
    return True


FAR = 3.0           # a row this many interquartile ranges outside the others is off the axis


def _far_rows(group_by_row: dict) -> list:
    """Rows whose last-epoch mean lies more than FAR interquartile ranges outside the other
    rows' (Tukey's far-out fences, over four or more rows): a rule that failed, drawn at full
    scale, flattens every other curve of the panel into one line."""
    import numpy as np
    finals = {row: float(v) for row, v in group_by_row.items() if np.isfinite(v)}
    if len(finals) < 4:
        return []
    q1, q3 = np.percentile(list(finals.values()), [25, 75])
    spread = max(q3 - q1, 1e-12 * max(abs(q1), abs(q3), 1.0))
    return [row for row, v in finals.items() if v < q1 - FAR * spread or v > q3 + FAR * spread]


def _fit_to(ax, group, y: str, far: list, rows: list) -> str:
    """Limit the y axis to the rows not ``far`` (their seeds' min–max, padded) and say which
    rows lie off it; "" where none do."""
    import numpy as np
    if not far:
        return ""
    near = group[group["label"].isin([r for r in rows if r not in far])][y].dropna()
    values = near.astype(float)
    values = values[np.isfinite(values)]
    if values.empty:
        return ""
    low, high = float(values.min()), float(values.max())
    pad = 0.05 * (high - low) or 0.05 * max(abs(high), 1e-12)
    ax.set_ylim(low - pad, high + pad)
    return f" ({', '.join(map(str, far))} off the axis)"


def _off_axis(ax, here, column: str, rows: list) -> str:
    """:func:`_fit_to` for the rows far from the others by their runs' last-epoch value."""
    last = here.dropna(subset=[column]).sort_values("epoch")
    finals = last.groupby(["label", "run_key"])[column].last().groupby(level=0).mean()
    return _fit_to(ax, here, column, _far_rows(finals.to_dict()), rows)


def learning_curves(layout: Layout, epochs, out_dir: Path, colours: dict) -> list[tuple[str, str]]:
    """Per task/arch column: validation and test primary metric and the training loss per
    epoch (mean over seeds, band = min–max)."""
    plt = _pyplot()
    frame = _ok(epochs)
    if frame.empty:
        return []
    cells = _cells(layout, frame)
    panels = [("val", "validation {metric}"), ("test", "test {metric}"), (None, "training loss")]
    fig, axes = plt.subplots(len(panels), len(cells), squeeze=False,
                             figsize=(max(6.4, 4.2 * len(cells)), 2.9 * len(panels)))
    rows = [r for r in layout.row_order if r in set(frame["label"])]
    for j, (task, arch) in enumerate(cells):
        here = frame[(frame["task_label"] == task) & (frame["arch"] == arch)]
        metric, direction = layout.metrics.get(task, ("accuracy", "max"))
        drawn_here = here[here["label"].isin(rows)]
        # validation and test share one axis kind: the same metric, decided once
        splits = [c for c in (f"val_{metric}", f"test_{metric}") if c in here]
        metric_log = direction == "min" and bool(splits) and _wide(drawn_here[splits].stack())
        for i, (split, title) in enumerate(panels):
            ax = axes[i][j]
            column = "train_loss" if split is None else f"{split}_{metric}"
            drawn = False
            if column in here:
                for row in rows:
                    group = here[here["label"] == row]
                    drawn |= _band(ax, group, "epoch", column, colours[row])
            if split is None:
                log = drawn and _log_if_wide(ax, drawn_here[column])
            else:
                log = drawn and metric_log
                if log:
                    ax.set_yscale("log")
            # a failed rule's curve is not the panel's scale
            off = _off_axis(ax, drawn_here, column, rows) if drawn and not log else ""
            ax.set_title(f"{task}/{arch}: {title.format(metric=metric)}"
                         + (" (log scale)" if log else "") + off, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            _integer_epochs(ax)
            if not drawn:
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="grey")
    _legend(fig, colours, rows)
    fig.suptitle("Learning curves (mean over seeds; band: min–max over seeds)", y=1.0)
    fig.tight_layout()
    _save(fig, out_dir, "curves.png")
    return [("Learning curves: validation, test and training loss per epoch", "curves.png")]


def metric_vs_time(layout: Layout, epochs, out_dir: Path, colours: dict) -> list[tuple[str, str]]:
    """The test metric against cumulative training seconds, one line per run."""
    plt = _pyplot()
    frame = _ok(epochs)
    if frame.empty:
        return []
    frame["train_seconds"] = frame.groupby("run_key")["train_time_s"].cumsum()
    cells = _cells(layout, frame)
    fig, axes = plt.subplots(1, len(cells), squeeze=False,
                             figsize=(max(6.4, 4.2 * len(cells)), 3.2))
    rows = [r for r in layout.row_order if r in set(frame["label"])]
    for ax, (task, arch) in zip(axes[0], cells):
        here = frame[(frame["task_label"] == task) & (frame["arch"] == arch)]
        metric, direction = layout.metrics.get(task, ("accuracy", "max"))
        column = f"test_{metric}"
        for row in rows:
            for _, run in here[here["label"] == row].groupby("run_key"):
                if column in run:
                    ax.plot(run["train_seconds"], run[column], color=colours[row], lw=1.1,
                            alpha=0.85)
        drawn = here[here["label"].isin(rows)]
        log = column in here and _log_if_wide(ax, drawn[column], direction == "min")
        off = _off_axis(ax, drawn, column, rows) if column in here and not log else ""
        ax.set_title(f"{task}/{arch}" + (" (log scale)" if log else "") + off, fontsize=9)
        ax.set_xlabel("cumulative training seconds", fontsize=8)
        ax.set_ylabel(f"test {metric}", fontsize=8)
        ax.tick_params(labelsize=7)
    _legend(fig, colours, rows)
    fig.suptitle("Test metric against training time (one line per run)", y=1.02)
    fig.tight_layout()
    _save(fig, out_dir, "metric_vs_time.png")
    return [("Test metric against cumulative training time", "metric_vs_time.png")]


def time_ratio(layout: Layout, timings: list, out_dir: Path, colours: dict,
               baseline: Optional[str]) -> list[tuple[str, str]]:
    """Seconds per training epoch (warm-up excluded) of each run as a ratio to the baseline's
    runs of the same column, as the report's time table divides them
    (``harness.report.tables.timing``: the same threads and CPU model where the baseline has
    such runs): a point per run, a bar at the mean; ‡ after a row whose ratio is not like for
    like."""
    plt = _pyplot()
    with_ratio = [t for t in timings if t.run_ratios]
    if not with_ratio or baseline is None:
        return []
    cells = [c for c in layout.column_order if c in {(t.task, t.arch) for t in with_ratio}]
    present = {c: [t for r in layout.row_order for t in with_ratio
                   if (t.row, t.task, t.arch) == (r, *c)] for c in cells}
    # horizontal bars, a panel per cell holding only its rows: readable for 3 rules or 30
    width = min(3, len(cells))
    height = -(-len(cells) // width)
    tallest = max(len(v) for v in present.values())
    fig, grid = plt.subplots(height, width, squeeze=False,
                             figsize=(5.2 * width, (0.26 * tallest + 1.1) * height))
    axes = list(grid.flat)
    for ax in axes[len(cells):]:
        ax.set_visible(False)
    for ax, (task, arch) in zip(axes, cells):
        names = present[(task, arch)]
        for y, t in enumerate(names):
            ax.barh(y, statistics.mean(t.run_ratios), color=colours[t.row], alpha=0.35,
                    height=0.7)
            ax.scatter(t.run_ratios, [y] * len(t.run_ratios), color=colours[t.row], s=12,
                       zorder=3)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(names)), [t.row + (" ‡" if t.unlike else "") for t in names],
                      fontsize=7)
        ax.set_ylim(len(names) - 0.5, -0.5)          # the first row on top
        ax.set_title(f"{task}/{arch}", fontsize=9)
        ax.set_xlabel(f"train s/epoch ÷ {baseline}'s", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"Time per training epoch relative to {baseline} (bar: mean; points: runs; "
                 "‡: not like for like, the report's time table says why)", y=1.02,
                 fontsize=10)
    fig.tight_layout()
    _save(fig, out_dir, "time_ratio.png")
    return [(f"Time per epoch relative to {baseline}", "time_ratio.png")]


def alignment(layout: Layout, epochs, out_dir: Path, colours: dict) -> list[tuple[str, str]]:
    """Per task/arch with diagnostics: a panel per rule, the angle between each layer's update
    and BP's gradient (solid) and between its feedback and BP's (dashed) over epochs."""
    plt = _pyplot()
    frame = _ok(epochs)
    columns = [c for c in frame.columns if c.startswith("diagnostics_update_angle/")]
    if frame.empty or not columns:
        return []
    made = []
    for task, arch in _cells(layout, frame):
        here = frame[(frame["task_label"] == task) & (frame["arch"] == arch)]
        rows = [r for r in layout.row_order if r in set(here["label"])
                and here[here["label"] == r][columns].notna().any().any()]
        if not rows:
            continue
        layers = sorted({c.split("/", 1)[1] for c in here.columns
                         if c.startswith("diagnostics_") and "angle/" in c
                         and here[c].notna().any()})
        shades = dict(zip(layers, plt.cm.viridis([i / max(1, len(layers) - 1) * 0.85
                                                  for i in range(len(layers))])))
        angles = here[[c for c in here.columns if c.startswith("diagnostics_")
                       and "angle/" in c]].max().max()
        top = 180 if angles > 95 else 95
        width = min(4, len(rows))
        height = -(-len(rows) // width)
        fig, grid = plt.subplots(height, width, squeeze=False, sharey=True,
                                 figsize=(3.4 * width, 2.9 * height))
        axes = list(grid.flat)
        for ax in axes[len(rows):]:
            ax.set_visible(False)
        legend: dict[tuple, tuple] = {}
        for ax, row in zip(axes, rows):
            group = here[here["label"] == row]
            for layer in layers:
                for kind, style in (("update", "-"), ("feedback", "--")):
                    column = f"diagnostics_{kind}_angle/{layer}"
                    if column in group and group[column].notna().any():
                        stats = group.groupby("epoch")[column].mean()
                        line, = ax.plot(stats.index, stats.values, style, color=shades[layer],
                                        lw=1.5)
                        legend.setdefault((kind != "update", layers.index(layer)),
                                          (line, f"{layer} {kind}"))
            ax.set_title(row, fontsize=9, color=colours[row])
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_ylim(-3, top + 3)
            ax.set_yticks([0, 45, 90, 135, 180] if top == 180 else [0, 30, 60, 90])
            ax.tick_params(labelsize=7)
            _integer_epochs(ax)
        for line in grid:
            line[0].set_ylabel("degrees to BP's", fontsize=8)
        ordered = [legend[k] for k in sorted(legend)]
        fig.legend([h for h, _ in ordered], [lab for _, lab in ordered], loc="upper center",
                   bbox_to_anchor=(0.5, 0.0), ncol=max(1, len(layers)), frameon=False,
                   fontsize=7)
        fig.suptitle(f"{task}/{arch}: angle between each layer's update and BP's gradient "
                     "(solid) and between its feedback and BP's (dashed)", y=1.03, fontsize=10)
        fig.tight_layout()
        name = f"alignment_{task}_{arch}.png".replace("/", "_")
        _save(fig, out_dir, name)
        made.append((f"Alignment with backprop on {task}/{arch}", name))
    return made


def logged(layout: Layout, epochs, out_dir: Path, colours: dict) -> list[tuple[str, str]]:
    """Every scalar a rule's train_step returned beside the loss (split ``train``), by name,
    per epoch."""
    plt = _pyplot()
    frame = _ok(epochs)
    names = sorted(c[len("train_"):] for c in frame.columns
                   if c.startswith("train_") and c not in ("train_time_s", "train_loss")
                   and frame[c].notna().any())
    if frame.empty or not names:
        return []
    # only the cells and rows that logged something: a rule that logs nothing has no line
    frame = frame[frame[[f"train_{n}" for n in names]].notna().any(axis=1)]
    cells = _cells(layout, frame)
    fig, axes = plt.subplots(len(names), len(cells), squeeze=False,
                             figsize=(max(6.4, 4.2 * len(cells)), 2.9 * len(names)))
    rows = [r for r in layout.row_order if r in set(frame["label"])]
    for i, name in enumerate(names):
        for j, (task, arch) in enumerate(cells):
            ax = axes[i][j]
            here = frame[(frame["task_label"] == task) & (frame["arch"] == arch)]
            drawn = [_band(ax, here[here["label"] == row], "epoch", f"train_{name}",
                           colours[row]) for row in rows]
            if not any(drawn):
                ax.text(0.5, 0.5, "no rule logs this here", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="grey")
            ax.set_title(f"{task}/{arch}: {name}", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            _integer_epochs(ax)
    _legend(fig, colours, rows)
    fig.suptitle("Scalars the rules log (mean over seeds; band: min–max)", y=1.0)
    fig.tight_layout()
    _save(fig, out_dir, "logged.png")
    return [("Logged scalars", "logged.png")]


def tuning(layout: Layout, trials, out_dir: Path, colours: dict) -> list[tuple[str, str]]:
    """Best validation so far against the trial, one line per rule, a panel per task/arch."""
    from harness.report.render import _trial_values, best_so_far
    if trials is None or len(trials) == 0:
        return []
    plt = _pyplot()
    values = _trial_values(trials)
    cells = [c for c in layout.column_order if any(k[1:] == c for k in values)]
    fig, axes = plt.subplots(1, len(cells), squeeze=False,
                             figsize=(max(6.4, 4.4 * len(cells)), 3.3))
    rows = [r for r in layout.row_order if any(k[0] == r for k in values)]
    for ax, (task, arch) in zip(axes[0], cells):
        metric, direction = layout.metrics[task]
        for row in rows:
            found = values.get((row, task, arch))
            if not found:
                continue
            curve = best_so_far(found, direction)
            ax.plot([i for i, _, _ in found], curve, color=colours[row], lw=1.8,
                    marker="o", ms=3, drawstyle="steps-post")
        ax.set_title(f"{task}/{arch}", fontsize=9)
        ax.set_xlabel("trial (numbered from 0, as the runs are labelled)", fontsize=8)
        ax.set_ylabel(f"best validation {metric} so far", fontsize=8)
        ax.tick_params(labelsize=7)
        _integer_epochs(ax)
    _legend(fig, colours, rows)
    fig.suptitle("Tuning: the best validation score found so far, per rule (equal budgets)",
                 y=1.02, fontsize=10)
    fig.tight_layout()
    _save(fig, out_dir, "tuning.png")
    return [("Tuning: best validation so far per trial", "tuning.png")]
