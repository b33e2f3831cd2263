"""Markdown reports built from the result store alone: tables (tabulate) and plots (seaborn).

``reports/<suite>/report.md`` holds, in order: the results table of the suite's protocol
(mean ± std over seeds, the number of seeds, the best per column in bold, the published
reference and the difference), both protocols side by side, what the validation split selects
in each algorithm's sweep, every test metric, time per epoch (warm-up excluded)
and peak memory, curves of the metric per epoch and per second of training, the runs that were
skipped or failed with their reasons, and the environment the runs ran in.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness import store as store_mod
from harness.report import coverage
from harness.report.layout import Layout, md


ARROW = {"max": "↑", "min": "↓"}


def _fmt(value: float, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if metric.endswith("accuracy"):
        return f"{value:.2f}"
    return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.2e}"


def _mean_std(values) -> tuple[float, float, int]:
    import numpy as np
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, int(arr.size)


def _cell(mean: float, std: float, n: int, metric: str, bold: bool = False) -> str:
    if n == 0:
        return "–"
    text = f"{_fmt(mean, metric)} ± {_fmt(std, metric)} ({n})" if n > 1 else f"{_fmt(mean, metric)} (1)"
    return f"**{text}**" if bold else text


def _reference(suite: Layout, label: str, algorithm: str, task: str, arch: str):
    entry = label.split(" (")[0]
    for key in ((label, task, arch), (entry, task, arch), (algorithm, task, arch)):
        if key in suite.references:
            return suite.references[key]
    return None


def _columns(suite: Layout, runs) -> list[tuple[str, str]]:
    present = set(zip(runs["task_label"], runs["arch"]))
    return [c for c in suite.column_order if c in present]


def _rows(suite: Layout, runs) -> list[str]:
    present = set(runs["label"])
    return [r for r in suite.row_order if r in present]


def results_table(suite: Layout, runs, protocol: str) -> Optional[str]:
    """Rows × task/arch columns of ``protocol``'s selected test metric, with references. A cell
    with a diverged run is marked † and is never the column's best."""
    from tabulate import tabulate
    ok = runs[runs["status"].isin(["ok", "diverged"])]
    if ok.empty:
        return None
    column_name = "clean_test" if protocol == "clean" else "paper_test"
    columns, rows = _columns(suite, ok), _rows(suite, ok)
    stats = {}
    for (label, task, arch), group in ok.groupby(["label", "task_label", "arch"]):
        stats[(label, task, arch)] = (_mean_std(group[column_name].tolist()),
                                      group["algorithm"].iloc[0],
                                      bool((group["status"] == "ok").all()))
    headers = ["algorithm"]
    for task, arch in columns:
        metric, direction = suite.metrics[task]
        headers.append(md(f"{task}/{arch} {metric} {ARROW[direction]}"))
        if any(_reference(suite, r, stats.get((r, task, arch), (None, r))[1], task, arch)
               for r in rows):
            headers += ["published", "Δ"]
    table = []
    for label in rows:
        line = [md(label)]
        for task, arch in columns:
            metric, direction = suite.metrics[task]
            means = [m for (m, _, n), _, all_ok in (stats[(r, task, arch)] for r in rows
                                                     if (r, task, arch) in stats)
                     if n and all_ok]
            best = (max if direction == "max" else min)(means) if means else None
            has_refs = any(_reference(suite, r, stats.get((r, task, arch), (None, r))[1], task, arch)
                           for r in rows)
            if (label, task, arch) in stats:
                (mean, std, n), algorithm, all_ok = stats[(label, task, arch)]
                cell = _cell(mean, std, n, metric, bold=n > 0 and all_ok and mean == best)
                line.append(cell if all_ok else cell + " †")
            else:
                mean, n, algorithm = math.nan, 0, label
                line.append("–")
            if has_refs:
                ref = _reference(suite, label, algorithm, task, arch)
                if ref is None:
                    line += ["", ""]
                else:
                    ref_mean, ref_std = ref
                    line.append(_fmt(ref_mean, metric) + (f" ± {_fmt(ref_std, metric)}" if ref_std is not None else ""))
                    line.append(f"{mean - ref_mean:+.2f}" if n else "–")
        table.append(line)
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def protocols_table(suite: Layout, runs) -> Optional[str]:
    """Both selections side by side, per row and column, with the selected epochs."""
    from tabulate import tabulate
    ok = runs[runs["status"].isin(["ok", "diverged"])]
    if ok.empty:
        return None
    table = []
    for label in _rows(suite, ok):
        for task, arch in _columns(suite, ok):
            group = ok[(ok["label"] == label) & (ok["task_label"] == task) & (ok["arch"] == arch)]
            if group.empty:
                continue
            metric = suite.metrics[task][0]
            clean = _mean_std(group["clean_test"].tolist())
            paper = _mean_std(group["paper_test"].tolist())
            ref = _reference(suite, label, group["algorithm"].iloc[0], task, arch)
            table.append([md(label), md(f"{task}/{arch}"), md(metric),
                          _cell(*clean, metric), f"{group['clean_epoch'].mean():.1f}",
                          _cell(*paper, metric), f"{group['paper_epoch'].mean():.1f}",
                          _fmt(ref[0], metric) if ref else "",
                          f"{paper[0] - ref[0]:+.2f}" if ref and paper[2] else "",
                          int(group["epochs_run"].max())])
    headers = ["algorithm", "task/arch", "metric", "clean: test at best-val epoch", "epoch",
               "paper: best test epoch", "epoch", "published", "Δ paper", "epochs run"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def validation_table(suite: Layout, runs) -> Optional[str]:
    """How a sweep chooses: for every algorithm plugin run in two or more configurations on a
    task/arch, each configuration's best validation metric and its epoch, the test metric at
    that epoch beside it (for the record), and in bold the best validation mean. None when the
    suite sweeps nothing."""
    from tabulate import tabulate
    ok = runs[runs["status"].isin(["ok", "diverged"]) & runs["clean_val"].notna()]
    if ok.empty:
        return None
    table = []
    for task, arch in _columns(suite, ok):
        metric, direction = suite.metrics[task]
        here = ok[(ok["task_label"] == task) & (ok["arch"] == arch)]
        stats = {label: (_mean_std(group["clean_val"].tolist()), group)
                 for label, group in here.groupby("label")}
        best = {}
        for label, ((mean, _, _), group) in stats.items():
            plugin = group["algorithm"].iloc[0]
            if plugin not in best or (mean > best[plugin][1] if direction == "max"
                                      else mean < best[plugin][1]):
                best[plugin] = (label, mean)
        configurations = here.groupby("algorithm")["label"].nunique()
        for label in _rows(suite, here):
            (mean, std, n), group = stats[label]
            plugin = group["algorithm"].iloc[0]
            if configurations[plugin] < 2:
                continue
            chosen = best[plugin][0] == label
            table.append([md(plugin), md(f"{task}/{arch}"), f"**{md(label)}**" if chosen else md(label),
                          _cell(mean, std, n, metric, bold=chosen),
                          f"{group['clean_epoch'].mean():.1f}",
                          _cell(*_mean_std(group["clean_test"].tolist()), metric)])
    if not table:
        return None
    headers = ["plugin", "task/arch", "configuration", "best validation", "at epoch",
               "test at that epoch"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def metrics_table(suite: Layout, runs, epochs, protocol: str) -> Optional[str]:
    """Every test metric the task records (not only the primary one: baselines such as the
    persistence forecast, bits per character, loss) at the epoch the protocol selects; one
    table per task/arch, since tasks record different metrics."""
    from tabulate import tabulate
    ok = runs[runs["status"].isin(["ok", "diverged"])]
    chosen = ok[["key", f"{protocol}_epoch"]].dropna()
    if chosen.empty:
        return None
    picked = epochs.merge(chosen, left_on=["run_key", "epoch"],
                          right_on=["key", f"{protocol}_epoch"])
    tables = []
    for task, arch in _columns(suite, ok):
        here = picked[(picked["task_label"] == task) & (picked["arch"] == arch)]
        names = [c[len("test_"):] for c in sorted(here.columns)
                 if c.startswith("test_") and here[c].notna().any()]
        if len(names) <= 2:   # the primary metric and the loss: the results table says it all
            continue
        rows = []
        for label in _rows(suite, here):
            group = here[here["label"] == label]
            rows.append([md(label)] + [_cell(*_mean_std(group[f"test_{m}"].tolist()), m) for m in names])
        tables.append(f"**{md(task)}/{md(arch)}**\n\n" + tabulate(
            rows, headers=["algorithm"] + [md(n) for n in names], tablefmt="github",
            disable_numparse=True))
    return "\n\n".join(tables) or None


def timing_table(suite: Layout, runs, epochs) -> Optional[str]:
    """Seconds per training epoch (warm-up excluded; mean ± std over seeds' epochs) and peak
    memory, with the ratio to BP where BP ran the same column."""
    from tabulate import tabulate
    timed = epochs[~epochs["warmup"] & epochs["status"].isin(["ok", "diverged"])]
    if timed.empty:
        timed = epochs[epochs["status"].isin(["ok", "diverged"])]
    if timed.empty:
        return None
    table = []
    bp_time = {}
    for (label, task, arch), group in timed.groupby(["label", "task_label", "arch"]):
        if group["algorithm"].iloc[0] == "bp":
            bp_time.setdefault((task, arch), group["train_time_s"].mean())
    for label in _rows(suite, timed):
        for task, arch in _columns(suite, timed):
            group = timed[(timed["label"] == label) & (timed["task_label"] == task)
                          & (timed["arch"] == arch)]
            if group.empty:
                continue
            mean, std, n = _mean_std(group["train_time_s"].tolist())
            eval_mean = group["eval_time_s"].mean()
            memory = runs[(runs["label"] == label) & (runs["task_label"] == task)
                          & (runs["arch"] == arch)]["peak_memory_mb"].max()
            ratio = bp_time.get((task, arch))
            table.append([md(label), md(f"{task}/{arch}"), f"{mean:.3f} ± {std:.3f}", n,
                          f"{mean / ratio:.2f}×" if ratio else "", f"{eval_mean:.3f}",
                          f"{memory:.0f}" if memory == memory else "–"])
    headers = ["algorithm", "task/arch", "train s/epoch", "epochs timed", "vs BP",
               "eval s/epoch", "peak memory MB"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def _plots(suite: Layout, epochs, out_dir: Path) -> list[tuple[str, str]]:
    from harness.report import plots
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="notebook")
    colours = plots.palette(list(suite.row_order))
    made = []
    for draw in (plots.learning_curves, plots.metric_vs_time):
        made += draw(suite, epochs, out_dir, colours)
    made += plots.time_ratio(suite, epochs, out_dir, colours, suite.baseline)
    return made


def environment_table(sessions, runs) -> Optional[str]:
    from tabulate import tabulate
    used = sessions[sessions["id"].isin(runs["session_id"].dropna().astype(int))]
    if used.empty:
        return None
    columns = ["id", "started_at", "python", "torch", "project_version", "git_commit", "cpu",
               "cores", "gpu", "jobs", "threads", "backend", "device"]
    return tabulate(used[columns].values.tolist(), headers=columns, tablefmt="github",
                    disable_numparse=True)


def fingerprint_table(runs) -> Optional[str]:
    """The source each run was made with: one row per (algorithm, task, digests)."""
    import json

    from tabulate import tabulate
    done = runs[runs["status"] != "skipped"]
    if done.empty:
        return None
    rows: dict[tuple, int] = {}
    for algorithm, task, text in zip(done["algorithm"], done["task"], done["fingerprint"]):
        parts = json.loads(text) if isinstance(text, str) and text else {}
        line = (algorithm, task, parts.get("algorithm", "?"), parts.get("task", "?"),
                parts.get("engine", "?"))
        rows[line] = rows.get(line, 0) + 1
    table = [[md(a), md(t), f"`{alg}`", f"`{tsk}`", f"`{eng}`", n]
             for (a, t, alg, tsk, eng), n in sorted(rows.items())]
    return tabulate(table, headers=["algorithm", "task", "algorithm source", "task source",
                                    "engine source", "runs"],
                    tablefmt="github", disable_numparse=True)


def stale_runs(store, layout: "Layout", current: dict) -> int:
    """How many of the layout's stored runs were made with source other than ``current``
    (key → the current source digest)."""
    wanted = set(layout.keys())
    return sum(1 for key, source, status in store.query("SELECT key, source, status FROM runs")
               if key in wanted and status != "skipped" and current.get(key) != source)


def build(store, out_root: Path = Path("reports"), layout: Optional[Layout] = None,
          regenerate: str = "", write_data: bool = True) -> Path:
    """Write ``<out_root>/<suite>/report.md``, its PNGs and ``runs.jsonl`` (the data behind
    it) from a store alone; returns the report's path. ``layout``: the suite's structure (by
    default the one the store recorded). The report is a function of the runs alone: built
    again from its ``runs.jsonl`` it is the same (timestamps aside)."""
    from harness.api import UserError
    from harness.exchange import write_jsonl
    if layout is None:
        structure = store.structure()
        if structure is None:
            raise UserError(f"{store.path}: the store has no suite structure recorded (run "
                            "the suite, or report it with its YAML file)")
        layout = Layout.of(structure)
    frames = store_mod.frames(store, keys=layout.keys())
    out_dir = Path(out_root) / layout.name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot write the report there ({exc.strerror}); give a "
                        "writable --out folder") from None
    if write_data:
        records = store.export_records(layout.keys())
        records["structure"], records["suite"] = layout.raw, layout.name
        write_jsonl(records, out_dir / "runs.jsonl")
    return _write(layout, frames, out_dir,
                  regenerate or f"python bench.py report {out_dir / 'runs.jsonl'}")


def _cells_text(cells: tuple[str, ...], limit: int = 6) -> str:
    shown = "; ".join(cells[:limit])
    return shown + (f"; … ({len(cells) - limit} more)" if len(cells) > limit else "")


def _write(suite: Layout, frames, out_dir: Path, regenerate: str) -> Path:
    from tabulate import tabulate
    runs, epochs, sessions = frames
    counts = runs["status"].value_counts().to_dict()
    total = len(suite.plan)
    protocol = suite.protocol
    other = "paper" if protocol == "clean" else "clean"
    lines = [f"# Report: {suite.name}", ""]
    if suite.description:
        lines += [suite.description.strip(), ""]
    lines += [f"Suite `{suite.name}`: {len(runs)} of {total} runs stored (" + ", ".join(
        f"{k} {v}" for k, v in sorted(counts.items())) + "). Every number below comes from "
              f"the runs in `runs.jsonl` beside this file; regenerate with `{regenerate}`.", ""]
    lines += [f"Protocol of this suite: **{protocol}** — "
              + ("test metric at the epoch best on the validation split."
                 if protocol == "clean" else "best test metric over epochs (as the DLL paper "
                 "reports)."),
              "Cells: mean ± std over seeds (number of seeds); best per column in bold; † a "
              "cell with a diverged run (never marked best)."]
    if suite.reference_source:
        lines += [f"Published values: {md(suite.reference_source)}; Δ = measured − published."]
    lines.append("")
    headline = results_table(suite, runs, protocol)
    if headline:
        lines += [f"## Results ({protocol} protocol)", "", headline, ""]
    missing = coverage.missing_cells(suite, runs)
    if missing:
        n_missing = sum(len(m.seeds) for m in missing)
        rows = [[md(m.row), md(f"{m.task}/{m.arch}"), f"{len(m.seeds)} of {m.planned}",
                 f"`{m.command}`"] for m in missing]
        lines += ["## Cells still missing", "",
                  f"{n_missing} planned run(s) are not in the data yet; each command runs the "
                  "missing seeds of its cell (add `--jobs 2` on two cores; `--dry-run` first "
                  "says how long it takes):", "",
                  tabulate(rows, headers=["algorithm", "task/arch", "seeds missing", "command"],
                           tablefmt="github", disable_numparse=True), ""]
    for title, table in ((f"## Results ({other} protocol)", results_table(suite, runs, other)),
                         ("## Both protocols, per run group", protocols_table(suite, runs)),
                         ("## Selection on validation (bold: the best validation mean of each "
                          "algorithm on each task/arch; test shown for the record only)",
                          validation_table(suite, runs)),
                         (f"## Every test metric at the {protocol} protocol's epoch",
                          metrics_table(suite, runs, epochs, protocol)),
                         ("## Time per epoch and memory", timing_table(suite, runs, epochs))):
        if table:
            lines += [title, "", table, ""]
    for title, name in _plots(suite, epochs, out_dir):
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    grouped = coverage.problems(suite, runs)
    if grouped:
        rows = [[p.status, p.count, md(p.reason), md(_cells_text(p.cells))] for p in grouped]
        lines += ["## Skipped, failed and diverged runs, by reason", "",
                  tabulate(rows, headers=["status", "runs", "reason", "cells"],
                           tablefmt="github", disable_numparse=True), ""]
    sources = fingerprint_table(runs)
    if sources:
        lines += ["## Source of the runs", "", "Digests of the code each run was made with "
                  "(docstrings and comments aside): its algorithm plugin, its task plugin and "
                  "the engine's numeric parts (harness/fingerprint.py). `python bench.py run "
                  "SUITE --dry-run` says which stored runs the current code would make "
                  "differently (stale); `--rerun-stale` runs them again.", "", sources, ""]
    env = environment_table(sessions, runs)
    if env:
        lines += ["## Environment", "", env, ""]
    path = out_dir / "report.md"
    try:
        path.write_text("\n".join(lines))
    except OSError as exc:
        from harness.api import UserError
        raise UserError(f"{path}: cannot write the report ({exc.strerror})") from None
    return path
