"""The commands that read results without running anything — ``show``, ``export`` and
``compare`` — and how a user names results: a suite file (its store), a ``.sqlite`` store, or
a committed ``runs.jsonl``. None of them needs the plugins or torch."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from harness.api import UserError

MARK_START = "<!-- headline:{name} -->"
MARK_END = "<!-- /headline:{name} -->"


def results_path(target: Path, store: Optional[str] = None) -> Path:
    """The store or data file ``target`` names. A suite file names its store — found from its
    ``name`` and ``store`` keys alone, without expanding it (no plugins needed)."""
    target = Path(target)
    if target.suffix in (".yaml", ".yml"):
        from harness.suite import read_yaml
        raw = read_yaml(target)
        name = raw.get("name", target.stem)
        return Path(store or raw.get("store") or Path("results") / f"{name}.sqlite")
    if store:
        raise UserError("--store is for a suite file; give the store itself instead")
    if target.is_dir():
        raise UserError(f"{target}: a folder; give a suite .yaml, a .sqlite store or a runs.jsonl")
    return target


def _open(target: Path, store: Optional[str] = None):
    from harness.store import open_results
    path = results_path(target, store)
    if not path.exists():
        raise UserError(f"{path}: no results there (run the suite first, or give a runs.jsonl)")
    return open_results(path)


def cmd_show(args) -> int:
    """The headline table in the terminal (GitHub markdown), or into a marked block of a file."""
    from harness.fingerprint import current_source
    from harness.report import frames_for, headline, layout_of, stale_cells
    from harness.report.render import CELLS, MARKS, fmt
    from harness.report.tables import columns, reference_predictors
    with _open(args.target, args.store) as store:
        layout = layout_of(store)
        current = current_source(args.plugins)
        frames = frames_for(store, layout)
        table = headline(store, layout, current, frames)
        stale, cells = stale_cells(frames.runs, current)
        predictors = reference_predictors(
            layout, frames.epochs[frames.epochs["role"] != "trial"])
        counted = frames.runs[(frames.runs["role"] != "trial")
                              & frames.runs["status"].isin(["ok", "diverged"])]
        shown = set(columns(layout, counted))          # the headline's columns
        absent = [f"{t}/{a}" for t, a in layout.column_order if (t, a) not in shown]
    meaning = ("the test metric at the best-validation epoch" if layout.protocol == "clean"
               else "the best test epoch, as the DLL paper reports")
    caption = (f"*{layout.name}, {layout.protocol} protocol ({meaning}). Cells: {CELLS}; – "
               "no result (not run yet, skipped or failed: the report "
               "says which); an empty published cell: no published value. "
               + MARKS.replace("**bold**", "bold").replace("*italic*", "italic")
               + (f" {stale} of the runs were made with older code (stale): "
                  f"{', '.join(cells)}." if stale else "")
               + (" The tasks' reference predictors on test: " + "; ".join(
                   f"{t}/{a} {m} {fmt(v, m)}" for t, a, m, v in predictors) + "."
                  if predictors else "")
               + (f" Not shown, no finished run yet (data not on the machines that ran it, or "
                  f"not run): {', '.join(absent)}; the report lists each missing cell with the "
                  "command that fills it." if absent else "") + "*")
    if args.into is None:
        print(caption + "\n")
        print(table)
        return 0
    path = Path(args.into)
    start, end = MARK_START.format(name=layout.name), MARK_END.format(name=layout.name)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise UserError(f"{path}: needs the lines {start} and {end} around the place for the "
                        "table")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    new = f"{before}{start}\n{caption}\n\n{table}\n{end}{after}"
    if new == text:
        print(f"{path}: headline table of {layout.name} already up to date")
        return 0
    try:
        path.write_text(new)
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror})") from None
    print(f"{path}: headline table of {layout.name} updated")
    return 0


FORMATS = ("csv", "parquet", "json")


def cmd_export(args) -> int:
    """runs and epochs (and sessions) as files a pandas or R user reads."""
    from harness.store import frames
    if args.format not in FORMATS:
        raise UserError(f"--format: {args.format!r} is not one of {', '.join(FORMATS)}")
    if args.format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("--format parquet needs pyarrow: pip install pyarrow") from None
    with _open(args.target, args.store) as store:
        data = frames(store)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, frame in zip(("runs", "epochs", "sessions"), data):
            target = out / f"{name}.{args.format}"
            if args.format == "csv":
                frame.to_csv(target, index=False)
            elif args.format == "parquet":
                frame.to_parquet(target, index=False)
            else:
                frame.to_json(target, orient="records", lines=True)
            print(f"{target}: {len(frame)} rows")
    except OSError as exc:
        raise UserError(f"{out}: cannot write ({exc.strerror})") from None
    return 0


def _per_run_time(store_frames):
    """runs with a ``train_s_per_epoch`` column: each run's median epoch (warm-up out)."""
    runs, epochs, _ = store_frames
    timed = epochs[~epochs["warmup"]] if len(epochs) and (~epochs["warmup"]).any() else epochs
    medians = timed.groupby("run_key")["train_time_s"].median() if len(timed) else {}
    runs = runs.copy()
    runs["train_s_per_epoch"] = [medians.get(k) if len(timed) else None for k in runs["key"]]
    return runs


def cmd_compare(args) -> int:
    """Per cell, B − A of the primary metric and of time per epoch, each with a test; exit 1
    when a change is significant and beyond --threshold in the metric's bad direction."""
    from tabulate import tabulate

    from harness import stats
    from harness.report import layout_of
    from harness.report.tables import PROTOCOL_COLUMN
    from harness.store import frames
    with _open(args.a) as a, _open(args.b) as b:
        layout = layout_of(a)
        other = layout_of(b) if b.structure() is not None else layout   # older data: trusted
        if layout.name != other.name and not args.force:
            raise UserError(f"{args.a} holds suite {layout.name!r} and {args.b} suite "
                            f"{other.name!r}: their budgets and splits may differ; --force "
                            "compares them anyway")
        protocol = args.protocol or layout.protocol
        if args.protocol is None and layout.protocol != other.protocol:
            raise UserError(f"{args.a} selects epochs by the {layout.protocol} protocol and "
                            f"{args.b} by the {other.protocol} protocol; choose one with "
                            "--protocol clean|paper")
        value = PROTOCOL_COLUMN[protocol]
        all_a, all_b = _per_run_time(frames(a)), _per_run_time(frames(b))
    runs_a = all_a[all_a["status"] == "ok"].dropna(subset=[value])
    runs_b = all_b[all_b["status"] == "ok"].dropna(subset=[value])
    directions = {t: d for t, (_, d) in layout.metrics.items()}
    changes = stats.compare(runs_a, runs_b, value, directions, time="train_s_per_epoch")
    if not changes:
        raise UserError(f"{args.a} and {args.b} share no (algorithm, task/arch) cell to compare")
    regressions = stats.regressions(changes, args.threshold, alpha=args.alpha,
                                    time_threshold=args.time_threshold)
    flagged = {c.key for c in regressions}

    def text(d) -> str:
        if d is None or d.estimate is None:
            return "–"
        part = f"{d.estimate:+.4g}"
        if d.ci is not None:
            part += f" [{d.ci[0]:+.4g}, {d.ci[1]:+.4g}]"
        if d.p_holm is not None:
            part += f" p={stats.format_p(d.p_holm, args.alpha)}"
        if min(d.n_a, d.n_b) < 2:
            return part + " (one seed: no test)"
        return part + f" ({'paired' if d.paired else 'unpaired'})"
    lines = [[c.key[0], f"{c.key[1]}/{c.key[2]}", layout.metrics.get(c.key[1], ("metric",))[0],
              text(c.metric), text(c.time), "REGRESSION" if c.key in flagged else ""]
             for c in changes]
    print(f"B − A, {protocol} protocol ({value}); time: train seconds per epoch; "
          f"Holm-corrected, alpha {args.alpha}, threshold {args.threshold}")
    print(tabulate(lines, headers=["algorithm", "task/arch", "metric", "Δ metric [95% CI]",
                                   "Δ s/epoch [95% CI]", ""], tablefmt="github",
                   disable_numparse=True))
    def cells(runs) -> set:
        runs = runs[runs["status"] != "skipped"]
        return set(zip(runs["label"], runs["task_label"], runs["arch"]))
    ok_a, ok_b = cells(runs_a), cells(runs_b)
    # a cell A has results for and B ran without one ok run (all diverged or failed): the
    # worst regression there is, though there is nothing to test
    lost = sorted((ok_a & cells(all_b)) - ok_b)
    for r, t, arch in lost:
        states = all_b[(all_b["label"] == r) & (all_b["task_label"] == t) & (all_b["arch"] == arch)]
        counts = states.drop_duplicates("key")["status"].value_counts().to_dict()
        print(f"REGRESSION: {r} on {t}/{arch} has no ok run in B ("
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")")
    for side, here, there in (("A", cells(all_a), cells(all_b)), ("B", cells(all_b), cells(all_a))):
        alone = sorted(here - there)
        if alone:
            print(f"only in {side} (not compared): " + ", ".join(
                f"{r} on {t}/{arch}" for r, t, arch in alone))
    if regressions or lost:
        print(f"{len(regressions) + len(lost)} cell(s) significantly worse beyond the "
              "threshold or without results in B", file=sys.stderr)
        return 1
    return 0
