"""Markdown for the report's tables (tabulate, GitHub style): numbers formatted per metric,
user-written text escaped, marks explained in each table's caption."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from harness import stats
from harness.report import tables
from harness.report.layout import Layout, md
from harness.tune import row_of

ARROW = {"max": "↑", "min": "↓"}
MARKS = ("**bold**: best, distinguishable from every other row of its column (tests paired by "
         "seed where possible, p < 0.05 after Holm's correction over one family: every such "
         "comparison of the table and every difference to the baseline, so a mark can change as "
         "other cells fill; a row with one seed is tested as a new observation of the best "
         "row's seeds, and one as good as the best is never told apart from it); *italic*: not "
         "told apart from the best — it may be as good, or its seeds too few or too spread to "
         "tell (read its interval); a row with one seed is never marked itself; ↗ every "
         "finished seed's selected epoch was the last of its budget: still improving when "
         "training stopped; † runs that diverged, left out of the statistics; § runs made with "
         "older code than the current (stale); ✗ the mean does no better than the task's constant "
         "reference predictor (the most frequent symbol or class, named in the table's caption): "
         "the rule did not learn the task.")
CELLS = ("mean [95% t interval, cut where it passes what the metric can take: an accuracy's "
         "0–100, an error's 0] (seeds)")


def fmt(value: Optional[float], metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if metric.endswith("accuracy"):
        return f"{value:.2f}"
    if metric in ("s", "epochs"):                  # durations, not metrics
        return f"{value:.1f}"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"


def signed(value: Optional[float], metric: str) -> str:
    if value is None:
        return "–"
    text = fmt(abs(value), metric)
    return ("+" if value >= 0 else "−") + text


def summary_text(summary: stats.Summary, metric: str) -> str:
    """``98.41 [98.28, 98.54] (4)``; ``98.41 (1)`` without an interval; ``–`` when empty. The
    interval is cut at what the metric can take (:func:`harness.stats.metric_range`)."""
    if not summary.n:
        return "–"
    summary = stats.within_range(summary, metric)
    if summary.ci is None:
        return f"{fmt(summary.mean, metric)} ({summary.n})"
    low, high = summary.ci
    return f"{fmt(summary.mean, metric)} [{fmt(low, metric)}, {fmt(high, metric)}] ({summary.n})"


def cell_text(cell: tables.Cell, metric: str) -> str:
    text = summary_text(cell.summary, metric)
    if cell.mark == "best" and cell.summary.n:
        text = f"**{text}**"
    elif cell.mark == "tied" and cell.summary.n:
        text = f"*{text}*"
    if cell.at_budget and cell.summary.n:
        text += " ↗"
    if cell.diverged:
        text += f" † {cell.diverged}"
    return text


def _table(rows, headers) -> str:
    from tabulate import tabulate
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def no_better(cell: tables.Cell, direction: str, reference: Optional[float]) -> bool:
    """Whether the cell's mean does no better than the task's reference predictor's score."""
    mean = cell.summary.mean
    if reference is None or mean is None or not cell.summary.n:
        return False
    return mean <= reference if direction == "max" else mean >= reference


def results_table(layout: Layout, runs, protocol: str, stale: frozenset = frozenset(),
                  predictors: Sequence[tuple] = ()) -> Optional[str]:
    """Rows × task/arch of the protocol's selected test metric: mean [95% CI] (n), marks, and
    the published value with the difference where the suite gives one. ``predictors``: the
    tasks' reference predictors (:func:`tables.reference_predictors`), for the ✗ mark."""
    floor: dict[tuple, float] = {}      # a constant predictor: a learner that cannot beat it
    for task, arch, name, value in predictors:               # learnt nothing (the best such)
        if name.split("_", 1)[0] in tables.CONSTANT_PREDICTORS:
            best = max if layout.metrics[task][1] == "max" else min
            floor[(task, arch)] = best(value, floor.get((task, arch), value))
    cells = tables.results(layout, runs, protocol)
    if not cells:
        return None
    counted = runs[runs["status"].isin(["ok", "diverged"])]
    columns, rows = tables.columns(layout, counted), tables.rows(layout, counted)
    with_refs = {c for c in columns if any(cells.get((r, *c)) and cells[(r, *c)].reference
                                           for r in rows)}
    headers = ["algorithm"]
    for task, arch in columns:
        metric, direction = layout.metrics[task]
        headers.append(md(f"{task}/{arch} {metric} {ARROW[direction]}"))
        if (task, arch) in with_refs:
            headers += ["published", "Δ"]
    lines = []
    for row in rows:
        line = [md(row)]
        for task, arch in columns:
            metric = layout.metrics[task][0]
            cell = cells.get((row, task, arch))
            line.append((cell_text(cell, metric) if cell else "–")
                        + (" §" if (row, task, arch) in stale else "")
                        + (" ✗" if cell and no_better(cell, layout.metrics[task][1],
                                                     floor.get((task, arch))) else ""))
            if (task, arch) in with_refs:
                ref = cell.reference if cell else None
                if ref is None:
                    line += ["", ""]
                else:
                    line.append(fmt(ref[0], metric) + (f" ± {fmt(ref[1], metric)}"
                                                       if ref[1] is not None else ""))
                    line.append(signed(cell.delta_reference, metric) if cell else "–")
        lines.append(line)
    return _table(lines, headers)


def differences_table(layout: Layout, runs, protocol: str) -> Optional[str]:
    diffs = tables.baseline_differences(layout, runs, protocol)
    if not diffs:
        return None
    counted = runs[runs["status"] == "ok"]
    columns, rows = tables.columns(layout, counted), tables.rows(layout, counted)
    headers = ["algorithm"] + [md(f"{t}/{a}") for t, a in columns]
    lines = []
    for row in rows:
        if row == layout.baseline:
            continue
        line = [md(row)]
        for task, arch in columns:
            d = diffs.get((row, task, arch))
            metric = layout.metrics[task][0]
            if d is None or d.estimate is None:
                line.append("–")
                continue
            text = signed(d.estimate, metric)
            if d.ci is not None:
                text += f" [{signed(d.ci[0], metric)}, {signed(d.ci[1], metric)}]"
            if d.p_holm is not None:
                text += f" p={stats.format_p(d.p_holm)}" + (" *" if d.significant() else "")
            n = min(d.n_a, d.n_b)
            text += (" (one seed: no test)" if n < 2
                     else f" ({'paired' if d.paired else 'unpaired'}, {n})")
            line.append(text)
        lines.append(line)
    return _table(lines, headers)


def aggregate_table(layout: Layout, runs, protocol: str) -> Optional[str]:
    across = tables.aggregate(layout, runs, protocol)
    if across is None:
        return None

    def text(a) -> str:
        if a is None:
            return "–"
        return f"{a.iqm:.3f} " + (f"[{a.ci[0]:.3f}, {a.ci[1]:.3f}]" if a.ci
                                  else "(no interval: one run per cell)")
    lines = []
    # each rule's own cells beside, where some rule has more than the common ones
    beside = any(a.n_cells > len(across.common) for a in across.iqm_own.values())
    for row in layout.row_order:
        own = across.iqm_own.get(row)
        if own is None:
            continue
        shared = across.iqm_common.get(row)
        lines.append([md(row), text(shared), shared.n_runs if shared else "–"]
                     + ([text(own), own.n_runs, own.n_cells] if beside else []))
    common = ", ".join(md(f"{t}/{a}") for t, a in across.common) or "none"
    return (f"The cells every rule here has: {common}.\n\n" + _table(lines, [
        "algorithm", f"IQM of score ÷ {md(layout.baseline)}'s, common cells [95% CI]", "runs"]
        + (["IQM over all its cells [95% CI]", "runs", "cells"] if beside else [])))


def timing_table(layout: Layout, timings: list) -> Optional[str]:
    """The time table of ``tables.timing``'s cells (computed once by the caller)."""
    if not timings:
        return None
    lines = []
    for t in timings:
        cut = None if t.ratio is None else stats.within_range(t.ratio, "ratio")
        ratio = "" if cut is None else (
            f"{cut.mean:.2f}×" + (f" [{cut.ci[0]:.2f}, {cut.ci[1]:.2f}]" if cut.ci else "")
            + (" ‡" if t.unlike else ""))
        lines.append([md(t.row), md(f"{t.task}/{t.arch}"),
                      f"{t.epoch_s.mean:.3f}" + (f" ± {t.epoch_s.std:.3f}"
                                                 if t.epoch_s.std is not None else ""),
                      t.epoch_s.n, ratio, f"{t.eval_s:.3f}",
                      "–" if t.memory_mb is None else f"{t.memory_mb:.0f}",
                      f"{t.train_hours:.2f}"])
    headers = ["algorithm", "task/arch", "train s/epoch (runs' medians)", "runs",
               f"÷ {md(layout.baseline or 'baseline')}'s [95% CI]", "eval s/epoch",
               "peak memory MB", "training hours"]
    if any(t.cpu_share is not None for t in timings):   # runs that noted it (harness.worker)
        headers.insert(4, "CPU share")
        for line, t in zip(lines, timings):
            line.insert(4, "–" if t.cpu_share is None else f"{t.cpu_share:.2f}")
    notes = ""
    for reason, text in tables.UNLIKE.items():
        cells = [f"{md(t.row)} on {md(t.task)}/{md(t.arch)}" for t in timings
                 if reason in t.unlike]
        if cells:
            notes += f"\n\n‡ {text}: {', '.join(cells)}."
    total = tables.compute_per_rule(timings)
    per_rule = _table([[md(r), f"{h:.2f}"] for r, h in sorted(
        total.items(), key=lambda kv: layout.row_order.index(kv[0])
        if kv[0] in layout.row_order else 99)], ["algorithm", "training hours, all cells"])
    return _table(lines, headers) + notes + "\n\nTotal compute per rule:\n\n" + per_rule


def settings_section(layout: Layout) -> str:
    s = layout.raw
    seeds = s.get("seeds") or []
    lines = [f"Epochs {s.get('epochs')} (overrides below), batch {s.get('batch_size')}, "
             f"seeds {', '.join(map(str, seeds))}, validation {s.get('validation')} of the "
             f"training data in use, protocol {s.get('protocol')}, patience "
             f"{s.get('patience') if s.get('patience') is not None else 'none'}; baseline "
             f"{md(s.get('baseline') or 'none')}.", ""]
    rows = []
    for row, common, differing in tables.row_parameters(layout):
        text = ", ".join(f"{k}={v}" for k, v in common.items())
        if differing:
            text += "; " + "; ".join(f"{cell}: " + ", ".join(f"{k}={v}" for k, v in p.items())
                                     for cell, p in differing.items())
        rows.append([md(row), md(text)])
    if rows:
        lines.append(_table(rows, ["algorithm", "every hyper-parameter of its runs"]))
    overrides = s.get("overrides") or []
    if overrides:
        def text(mapping: dict) -> str:
            return ", ".join(f"{k}={'|'.join(map(str, v)) if isinstance(v, list) else v}"
                             for k, v in mapping.items()) or "every run"
        lines += ["", "Where the settings come from: the suite's overrides, in order (a later "
                  "one wins where two set the same thing), each with the reason the suite "
                  "gives.", "",
                  _table([[md(text(o.get("match") or {})), md(text(o.get("sets") or {})),
                           md(o.get("why") or "–")] for o in overrides],
                         ["runs matched", "set to", "why"])]
    return "\n".join(lines)


def _summary(values, metric: str) -> str:
    return summary_text(stats.summarize([v for v in values if v == v]), metric)


def protocols_table(layout: Layout, runs) -> Optional[str]:
    """Both selections side by side, per row and column, with the selected epochs."""
    ok = runs[runs["status"] == "ok"]
    if ok.empty:
        return None
    lines = []
    for row in tables.rows(layout, ok):
        for task, arch in tables.columns(layout, ok):
            group = ok[(ok["label"] == row) & (ok["task_label"] == task) & (ok["arch"] == arch)]
            if group.empty:
                continue
            metric = layout.metrics[task][0]
            lines.append([md(row), md(f"{task}/{arch}"), md(metric),
                          _summary(group["clean_test"], metric),
                          f"{group['clean_epoch'].mean():.1f}",
                          _summary(group["paper_test"], metric),
                          f"{group['paper_epoch'].mean():.1f}",
                          int(group["epochs_run"].max())])
    return _table(lines, ["algorithm", "task/arch", "metric", "clean: test at best-val epoch",
                          "mean epoch", "paper: best test epoch", "mean epoch", "epochs run"])


def validation_table(layout: Layout, runs) -> Optional[str]:
    """How a sweep chooses: for every plugin run in two or more configurations on a task/arch,
    each configuration's best validation metric, its epoch and (for the record) the test
    metric there; in bold each plugin's best validation mean. None when nothing is swept."""
    ok = runs[(runs["status"] == "ok") & runs["clean_val"].notna()]
    if ok.empty:
        return None
    lines = []
    for task, arch in tables.columns(layout, ok):
        metric, direction = layout.metrics[task]
        here = ok[(ok["task_label"] == task) & (ok["arch"] == arch)]
        means = here.groupby("label")["clean_val"].mean()
        plugin_of = dict(zip(here["label"], here["algorithm"]))
        best: dict[str, str] = {}
        for row, mean in means.items():
            plugin = plugin_of[row]
            if plugin not in best or ((mean > means[best[plugin]]) if direction == "max"
                                      else (mean < means[best[plugin]])):
                best[plugin] = row
        configurations = here.groupby("algorithm")["label"].nunique()
        for row in tables.rows(layout, here):
            plugin = plugin_of[row]
            if configurations[plugin] < 2:
                continue
            group = here[here["label"] == row]
            chosen = best[plugin] == row
            value = _summary(group["clean_val"], metric)
            lines.append([md(plugin), md(f"{task}/{arch}"),
                          f"**{md(row)}**" if chosen else md(row),
                          f"**{value}**" if chosen else value,
                          f"{group['clean_epoch'].mean():.1f}",
                          _summary(group["clean_test"], metric)])
    if not lines:
        return None
    return _table(lines, ["plugin", "task/arch", "configuration", "best validation",
                          "at epoch", "test at that epoch"])


def metrics_table(layout: Layout, runs, epochs, protocol: str) -> Optional[str]:
    """Every test metric a task records (baselines such as persistence, bits per character,
    the loss) at the epoch the protocol selects; one table per task/arch."""
    ok = runs[runs["status"] == "ok"]
    chosen = ok[["key", f"{protocol}_epoch"]].dropna()
    if chosen.empty:
        return None
    picked = epochs.merge(chosen, left_on=["run_key", "epoch"],
                          right_on=["key", f"{protocol}_epoch"])
    parts = []
    for task, arch in tables.columns(layout, ok):
        here = picked[(picked["task_label"] == task) & (picked["arch"] == arch)]
        names = [c[len("test_"):] for c in sorted(here.columns)
                 if c.startswith("test_") and here[c].notna().any()]
        if len(names) <= 2:   # the primary metric and the loss: the results table says it all
            continue
        lines = [[md(row)] + [_summary(here[here["label"] == row][f"test_{m}"], m)
                              for m in names] for row in tables.rows(layout, here)]
        parts.append(f"**{md(task)}/{md(arch)}**\n\n" + _table(
            lines, ["algorithm"] + [md(n) for n in names]))
    return "\n\n".join(parts) or None


def fingerprint_table(runs) -> Optional[str]:
    """The source each run was made with: one row per (algorithm, task, digests)."""
    import json
    done = runs[runs["status"] != "skipped"]
    if done.empty:
        return None
    counts: dict[tuple, int] = {}
    for algorithm, task, text in zip(done["algorithm"], done["task"], done["fingerprint"]):
        parts = json.loads(text) if isinstance(text, str) and text else {}
        line = (algorithm, task, parts.get("algorithm", "?"), parts.get("task", "?"),
                parts.get("engine", "?"))
        counts[line] = counts.get(line, 0) + 1
    lines = [[md(a), md(t), f"`{alg}`", f"`{tsk}`", f"`{eng}`", n]
             for (a, t, alg, tsk, eng), n in sorted(counts.items())]
    return _table(lines, ["algorithm", "task", "algorithm source", "task source",
                          "engine source", "runs"])


def environment_table(sessions, runs) -> Optional[str]:
    used = sessions[sessions["id"].isin(runs["session_id"].dropna().astype(int))]
    if used.empty:
        return None
    columns = ["started_at", "python", "torch", "project_version", "git_commit", "cpu",
               "cores", "gpu", "jobs", "threads", "backend", "device"]
    lines = [[md(v) for v in row] for row in used[columns].values.tolist()]
    return _table(lines, columns)


def cells_text(cells: tuple[str, ...], limit: int = 6) -> str:
    shown = "; ".join(cells[:limit])
    return shown + (f"; … ({len(cells) - limit} more)" if len(cells) > limit else "")


def _trial_values(trials):
    """(row, task, arch) → [(trial index, objective, params)] in trial order: the objective is
    the mean over the trial's seeds of their best validation metric."""
    out: dict[tuple, list] = {}
    for (row, task, arch, trial), group in trials.groupby(["label", "task_label", "arch",
                                                           "trial"]):
        base = row_of(row)
        ok = group[group["status"] == "ok"]["clean_val"].dropna()
        params = group["params"].iloc[0]
        out.setdefault((base, task, arch), []).append(
            (int(trial), float(ok.mean()) if len(ok) else None, params))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in out.items()}


def best_so_far(values: list, direction: str) -> list[Optional[float]]:
    best, out = None, []
    for _, value, _ in values:
        if value is not None and (best is None or (value > best if direction == "max"
                                                   else value < best)):
            best = value
        out.append(best)
    return out


def tuning_caption(layout: Layout) -> str:
    tune = layout.raw.get("tune") or {}
    epochs = f"{tune['epochs']} epochs" if tune.get("epochs") else "the suite's epochs"
    return (f"Every rule got the same budget: {tune.get('trials')} trials ({tune.get('sampler')} "
            f"sampler, seeds {tune.get('seeds')}, {epochs} each), each selected on validation "
            "(its best validation metric); the best trial's settings then ran with the "
            "suite's seeds (the results above). *Still improving*: the best came in the last "
            "quarter of the trials — a larger budget might have found better."
            + (" Trial 0 of every rule was its own settings (the suite's values, else the "
               "plugin's defaults): *own settings* is its validation, so a search that did not "
               "beat a rule's defaults shows it." if tune.get("include_defaults") else ""))


def tuning_table(layout: Layout, trials) -> Optional[str]:
    import json

    from harness.tune import first_best
    values = _trial_values(trials)
    if not values:
        return None
    planned = (layout.raw.get("tune") or {}).get("trials")
    own = bool((layout.raw.get("tune") or {}).get("include_defaults"))
    lines = []
    for row in layout.row_order:
        for task, arch in layout.column_order:
            found = values.get((row, task, arch))
            if not found:
                continue
            metric, direction = layout.metrics[task]
            scored = [(v, i) for i, v, _ in found if v is not None]
            first = next((v for i, v, _ in found if i == 0), None)
            own_cell = [fmt(first, metric) if first is not None else "–"] if own else []
            if not scored:
                lines.append([md(row), md(f"{task}/{arch}"), f"{len(found)} of {planned}", "–",
                              *own_cell, "", "", ""])
                continue
            best_index = first_best([(i, v) for i, v, _ in found], direction)
            best_value = next(v for i, v, _ in found if i == best_index)
            all_params = [json.loads(p) if isinstance(p, str) else p for _, _, p in found]
            varied = sorted(k for k in all_params[0]
                            if len({json.dumps(p.get(k)) for p in all_params}) > 1)
            chosen = next(p for (i, _, _), p in zip(found, all_params) if i == best_index)
            improving = planned and best_index >= 0.75 * (planned - 1) and planned > 1
            lines.append([md(row), md(f"{task}/{arch}"), f"{len(found)} of {planned}",
                          fmt(best_value, metric), *own_cell, best_index,
                          md(", ".join(f"{k}={chosen[k]:.3g}" if isinstance(chosen[k], float)
                                       else f"{k}={chosen[k]}" for k in varied)),
                          "still improving" if improving else ""])
    return _table(lines, ["algorithm", "task/arch", "trials", "best validation",
                          *(["own settings"] if own else []), "at trial", "chosen settings", ""])


def time_to_target_table(layout: Layout, epochs) -> Optional[str]:
    found = tables.time_to_target(layout, epochs)
    if not found:
        return None
    lines = []
    for t in found:
        metric = layout.metrics[t.task][0]
        if not t.reached:
            lines.append([md(t.row), md(f"{t.task}/{t.arch}"), fmt(t.target, metric),
                          f"not reached (0 of {t.runs})", "–"])
            continue
        lines.append([md(t.row), md(f"{t.task}/{t.arch}"), fmt(t.target, metric),
                      f"{t.reached} of {t.runs}: " + summary_text(t.seconds, "s"),
                      summary_text(t.epochs, "epochs")])
    return _table(lines, ["algorithm", "task/arch", "validation target",
                          "training seconds to reach it [95% CI] (seeds)", "epochs"])
