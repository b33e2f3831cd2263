"""Markdown reports built from the result store alone: tables (computed in ``tables``,
formatted in ``render``) and plots (``plots``), in ``reports/<suite>/`` beside the run data
(``runs.jsonl``) they come from. Neither the suite's YAML nor the plugins nor torch is needed:
the store recorded the suite's structure when it ran.

``report.md`` leads with the answer — the results of the suite's protocol (mean, 95% interval
and seeds per cell, best only where distinguishable, the published value and the difference) —
then says which cells are still missing and the command that fills each, then the differences
to the baseline, the aggregate across tasks, the other protocol, sweeps, every metric, time and
memory, the figures, skipped/failed runs by reason, settings, the source of the runs and the
environment.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from harness import store as store_mod
from harness.fingerprint import is_current
from harness.report import coverage, render, tables
from harness.report.layout import Layout, md
from harness.tune import row_of

__all__ = ["Layout", "build", "md", "stale_cells", "headline"]


def _specs(runs):
    """Each run's stored spec (JSON), or None where the frame has none."""
    return runs["spec"] if "spec" in runs.columns else [None] * len(runs)


def _with_source(runs):
    """The runs that were made (not skipped) and recorded their source digest (a run the
    supervisor recorded — killed, timed out — has none: not "older code")."""
    return runs[(runs["status"] != "skipped") & runs["source"].notna()]


def _stale(runs, current) -> set[tuple]:
    """(key, row label, role, task, arch) of the runs (not skipped) whose stored source digest
    differs from what ``current(algorithm, task)`` says the code gives now (None: unknown, not
    counted) and is not verified equivalent to it (:func:`harness.fingerprint.is_current`)."""
    if current is None or runs.empty or "source" not in runs.columns:
        return set()
    done = _with_source(runs)
    role = done["role"] if "role" in done.columns else [""] * len(done)
    return {(key, row, kind, task, arch)
            for key, kind, row, algorithm, task_plugin, task, arch, source, spec in zip(
                done["key"], role, done["label"], done["algorithm"], done["task"],
                done["task_label"], done["arch"], done["source"], _specs(done))
            if not is_current(spec, source, current(algorithm, task_plugin))}


def equated(runs, current) -> int:
    """How many runs (not skipped) were made with a digest other than the current code's yet
    count as current through a verified equivalence (equivalences.yaml)."""
    if current is None or runs.empty or "source" not in runs.columns:
        return 0
    done = _with_source(runs)
    count = 0
    for algorithm, task, source, spec in zip(done["algorithm"], done["task"], done["source"],
                                             _specs(done)):
        now = current(algorithm, task)
        count += now is not None and source != now and is_current(spec, source, now)
    return count


def stale_cells(runs, current) -> tuple[int, list[str]]:
    """How many runs are stale (:func:`_stale`), and their cells. Tuning trials count too,
    their cells marked "(tuning)": a selection resting on trials of older code is as stale as
    a final run of it."""
    old = _stale(runs, current)
    return (len({key for key, *_ in old}),
            sorted({f"{row_of(r)}{' (tuning)' if kind == 'trial' else ''} on {t}/{a}"
                    for _, r, kind, t, a in old}))


def stale_groups(runs, current) -> set[tuple]:
    """(row, task, arch) of the results cells holding a stale run (tuning trials aside)."""
    return {(r, t, a) for _, r, kind, t, a in _stale(runs, current) if kind != "trial"}


def layout_of(store, layout: Optional[Layout] = None) -> Layout:
    from harness.api import UserError
    if layout is not None:
        return layout
    structure = store.structure()
    if structure is None:
        raise UserError(f"{store.path}: the store has no suite structure recorded (run the "
                        "suite, or report it with its YAML file)")
    return Layout.of(structure)


def frames_for(store, layout: Layout) -> store_mod.Frames:
    """The store's runs and epochs as the suite's plan names them: each planned run under its
    row label, task entry and role (a run planned twice — a tuning trial that is also a final
    run — appears under both); runs the plan does not name are left out."""
    import pandas as pd
    frames = store_mod.frames(store, keys=layout.keys())
    frames = _in_key_order(frames)
    plan = pd.DataFrame([{"key": p["key"], "label": p["label"], "task_label": p["task"],
                          "role": p.get("role") or "", "trial": p.get("trial")}
                         for p in layout.plan])
    if plan.empty or frames.runs.empty:
        runs = frames.runs.assign(role="", trial=None)
        return store_mod.Frames(runs, frames.epochs.assign(role=""), frames.sessions)
    plan = plan.drop_duplicates(["key", "label", "task_label", "role"])
    runs = frames.runs.drop(columns=["label", "task_label"]).merge(plan, on="key")
    epochs = frames.epochs.drop(columns=["label", "task_label"]).merge(
        plan[["key", "label", "task_label", "role"]], left_on="run_key", right_on="key"
    ).drop(columns=["key"])
    return _in_key_order(store_mod.Frames(runs, epochs, frames.sessions))


def _in_key_order(frames: store_mod.Frames) -> store_mod.Frames:
    """Rows in an order of their content alone (run key, label, epoch; session uuid), not of
    the order runs entered a store: a report built from a store and from its runs.jsonl is the
    same to the last digit (the bootstrap draws over rows in this order)."""
    def order(frame, columns):
        present = [c for c in columns if c in frame.columns]
        if frame.empty or not present:
            return frame
        return frame.sort_values(present, kind="mergesort").reset_index(drop=True)
    return store_mod.Frames(order(frames.runs, ["key", "label", "task_label", "role"]),
                            order(frames.epochs, ["run_key", "label", "task_label", "epoch"]),
                            order(frames.sessions, ["started_at", "uuid"]))


def headline(store, layout: Optional[Layout] = None, current=None,
             frames: Optional[store_mod.Frames] = None) -> str:
    """The results table of the suite's protocol, as the report opens with it (``current``:
    as for :func:`build`, to mark the cells holding stale runs; ``frames``: the store's, where
    the caller has read them already)."""
    layout = layout_of(store, layout)
    frames = frames if frames is not None else frames_for(store, layout)
    runs = frames.runs[frames.runs["role"] != "trial"]
    epochs = frames.epochs[frames.epochs["role"] != "trial"]
    return render.results_table(layout, runs, layout.protocol, stale_groups(runs, current),
                                tables.reference_predictors(layout, epochs)) \
        or "(no finished runs yet)"


def build(store, out_root: Path = Path("reports"), layout: Optional[Layout] = None,
          write_data: bool = True, current=None) -> Path:
    """Write ``<out_root>/<suite>/report.md``, its PNGs and ``runs.jsonl`` (the data behind
    it) from a store alone; returns the report's path. ``layout``: the suite's structure (by
    default the one the store recorded). The report is a function of the runs alone: built
    again from its ``runs.jsonl`` it is the same (timestamps aside). ``current(algorithm,
    task)``: the source digest the code has now, to say which runs are stale (None: not
    checked, as where the plugins are not at hand)."""
    from harness.api import UserError
    from harness.exchange import write_jsonl
    layout = layout_of(store, layout)
    frames = frames_for(store, layout)
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
    try:
        shown = str(out_dir.resolve().relative_to(Path.cwd().resolve()) / "runs.jsonl")
    except ValueError:
        shown = "<this folder>/runs.jsonl"           # never a machine path in a report
    return _write(layout, frames, out_dir, f"python bench.py report {shown}",
                  current)


def _section(lines: list[str], title: str, body: Optional[str], caption: str = "") -> None:
    if body:
        lines += [title, ""] + ([caption, ""] if caption else []) + [body, ""]


def _write(layout: Layout, frames, out_dir: Path, regenerate: str,
           current=None) -> Path:
    from harness.api import UserError
    from harness.report import plots
    all_runs, all_epochs, sessions = frames
    trials = all_runs[all_runs["role"] == "trial"]
    runs = all_runs[all_runs["role"] != "trial"]
    epochs = all_epochs[all_epochs["role"] != "trial"]
    stale, stale_here = stale_cells(all_runs, current), stale_groups(runs, current)
    protocol = layout.protocol
    other = "paper" if protocol == "clean" else "clean"
    counts = all_runs.drop_duplicates("key")["status"].value_counts().to_dict()
    lines = [f"# Report: {layout.name}", ""]
    if layout.description:
        lines += [layout.description.strip(), ""]
    stored = all_runs["key"].nunique() if len(all_runs) else 0
    lines += [f"{stored} of {len(set(layout.keys()))} planned runs stored (" + ", ".join(
        f"{k} {v}" for k, v in sorted(counts.items())) + "). Every number below comes from the "
              f"runs in `runs.jsonl` beside this file; regenerate with `{regenerate}`.", ""]
    if stale[0]:
        lines += [f"**{stale[0]} of these runs were made with older code (stale)**: "
                  f"{', '.join(md(c) for c in stale[1])}. The current code may give other "
                  f"numbers; `python bench.py run {layout.raw.get('path') or 'SUITE'} "
                  "--rerun-stale` runs them again.", ""]
    lines += [f"Protocol: **{protocol}** — " + (
        "the test metric at the epoch best on the validation split." if protocol == "clean"
        else "the best test metric over epochs (as the DLL paper reports)."),
              f"Cells: {render.CELLS}. " + render.MARKS]
    if layout.reference_source:
        lines += [f"Published values: {md(layout.reference_source)}; Δ = measured − published. "
                  "A published cell is its mean ± std over the paper's seeds, a measured one its "
                  "mean and 95% interval of the mean: compare them by their means, not their "
                  "spreads; and Δ also holds what differs between the paper's setup and this "
                  "suite's (budgets, optimiser, a baseline's variant: the settings section)."]
    lines.append("")
    predictors = tables.reference_predictors(layout, epochs)
    _section(lines, f"## Results ({protocol} protocol)",
             render.results_table(layout, runs, protocol, stale_here, predictors),
             "The tasks' own reference predictors, scored on the test split without "
             "learning (each defined by its task plugin; a rule that scores worse does worse "
             "than that fixed predictor): " + "; ".join(
                 f"{md(t)}/{md(a)} {md(m)} {render.fmt(v, m)}" for t, a, m, v in predictors)
             + "." if predictors else "")
    missing = coverage.missing_cells(layout, all_runs)
    if missing:
        grouped = coverage.grouped_missing(layout, missing, all_runs)
        rows = [[md(row), md(cell), count, f"`{command}`"]
                for row, cell, count, command in grouped]
        _section(lines, "## Cells still missing", render._table(
            rows, ["algorithm", "task/arch", "runs missing", "command"]),
            f"{sum(len(m.seeds) for m in missing)} planned run(s) are not in the data yet; each "
            "command runs the missing runs of its cell, or of its whole column where every rule "
            "misses some or has only skipped ones (stored runs are skipped; `--dry-run` first "
            "says how long they take; `--jobs 2` on two cores).")
    if layout.baseline:
        _section(lines, f"## Difference to {md(layout.baseline)}",
                 render.differences_table(layout, runs, protocol),
                 f"Each row minus {md(layout.baseline)} in the same cell, {protocol} protocol: "
                 "mean difference [95% interval, uncorrected], p-value Holm-corrected across the "
                 "table in one family with the comparisons behind the results table's marks (* "
                 "below 0.05), paired by seed where both ran the same seeds (same split and "
                 "data order).")
        _section(lines, "## Across tasks", render.aggregate_table(layout, runs, protocol),
                 f"Every run's score as a ratio to {md(layout.baseline)}'s mean in its cell "
                 "(inverted for metrics where lower is better: above 1 is better than the "
                 "baseline), their interquartile mean per rule with a 95% stratified bootstrap "
                 "interval (Agarwal et al. 2021). Rules are compared over the cells they all "
                 "have (first column); the IQM over all of a rule's cells is beside it, over a "
                 "set of cells of its own. The performance profile below shows the fraction of "
                 "the common cells where each rule is within a factor τ of the best.")
    if len(trials):
        _section(lines, "## Tuning", render.tuning_table(layout, trials),
                 render.tuning_caption(layout))
    _section(lines, "## Time to target", render.time_to_target_table(layout, epochs),
             "Training seconds (every epoch's, the first included) and epochs until the "
             "validation metric first reached the suite's target for the task; over the seeds "
             "that reached it (intervals cut at 0).")
    _section(lines, f"## Results ({other} protocol)",
             render.results_table(layout, runs, other, stale_here, predictors))
    _section(lines, "## Both protocols, per run group", render.protocols_table(layout, runs))
    _section(lines, "## Selection on validation", render.validation_table(layout, runs),
             "Bold: the best validation mean of each plugin on each task/arch; test shown for "
             "the record only.")
    _section(lines, f"## Every test metric at the {protocol} protocol's epoch",
             render.metrics_table(layout, runs, epochs, protocol))
    timings = tables.timing(layout, runs, epochs, sessions)
    noted = any(t.cpu_share is not None for t in timings)
    _section(lines, "## Time per epoch and memory", render.timing_table(layout, timings),
             "Timings are only as good as the machine was quiet; `benchmarks/` measures "
             "ratios in one process. A run's ratio divides it by the baseline's runs of the "
             "same cell made at the same torch threads on the same CPU model; ‡ marks a ratio "
             "that is not like for like, and the lines below the table say why (" + "; ".join(
                 tables.UNLIKE.values()) + ")." + (
                 " CPU share (where runs noted it): the run process's CPU seconds ÷ (wall "
                 "seconds × its threads) over the whole run, set-up and evaluation included, "
                 "median over the cell's CPU runs — near 1 where a one-thread run had its core, "
                 "well below where other work took the cores and slowed it." if noted else "")
             + " Peak memory: the largest over the cell's runs of a CPU run's peak resident set "
             "(getrusage: the whole worker process, Python, torch and the data included, not "
             "the rule's tensors alone) or a CUDA run's torch.cuda.max_memory_allocated.")
    for title, name in _figures(layout, runs, epochs, out_dir, trials, timings):
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    grouped = coverage.problems(layout, all_runs)
    if grouped:
        rows = [[p.status, p.count, md(p.reason), md(render.cells_text(p.cells))]
                for p in grouped]
        _section(lines, "## Skipped, failed and diverged runs, by reason",
                 render._table(rows, ["status", "runs", "reason", "cells"]))
    _section(lines, "## Settings", render.settings_section(layout))
    n_equated = equated(runs, current)
    _section(lines, "## Source of the runs", render.fingerprint_table(runs),
             "Digests of the code each run was made with (docstrings and comments aside): its "
             "algorithm plugin, its task plugin and the engine's numeric parts "
             "(harness/fingerprint.py). `python bench.py run SUITE --dry-run` says which stored "
             "runs the current code would make differently (stale); `--rerun-stale` runs "
             "them again." + (f" {n_equated} run(s) made with an older digest count as current: "
                              "`bench.py equate` re-ran one of each of their configurations "
                              "with the current code and its numbers agreed with the stored "
                              "ones, or with the old code re-run beside it (equivalences.yaml "
                              "lists each check, its tolerance and epochs)." if n_equated else ""))
    _section(lines, "## Environment", render.environment_table(sessions, runs))
    path = out_dir / "report.md"
    try:
        path.write_text("\n".join(lines))
    except OSError as exc:
        raise UserError(f"{path}: cannot write the report ({exc.strerror})") from None
    return path


def _figures(layout: Layout, runs, epochs, out_dir: Path, trials,
             timings: list) -> list[tuple[str, str]]:
    import seaborn as sns

    from harness import profiles
    from harness.report import plots
    sns.set_theme(style="whitegrid", context="notebook")
    colours = plots.palette(list(layout.row_order), layout.row_algorithms)
    made = plots.learning_curves(layout, epochs, out_dir, colours)
    made += plots.metric_vs_time(layout, epochs, out_dir, colours)
    made += plots.time_ratio(layout, timings, out_dir, colours, layout.baseline)
    made += plots.alignment(layout, epochs, out_dir, colours)
    made += plots.logged(layout, epochs, out_dir, colours)
    made += plots.tuning(layout, trials, out_dir, colours)
    across = tables.aggregate(layout, runs, layout.protocol)
    profile = across.profile if across is not None else None
    if profile is not None:
        figure = profiles.plot_profile(profile, colours, title="Performance profile "
                                       f"({layout.protocol} protocol)")
        figure.savefig(out_dir / "profile.png", dpi=plots.DPI, bbox_inches="tight")
        made.append(("Performance profile", "profile.png"))
    return made
