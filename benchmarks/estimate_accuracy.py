"""How far `--dry-run`'s estimate is from the time runs really took: for every cell of a suite
with finished runs in a store, the estimate the dry run gives where nothing of the cell is
stored yet (a few steps timed on this machine, or their cached figure) against the runs' real
time (every epoch's training and evaluation seconds, as the store recorded them), per run.

    python benchmarks/estimate_accuracy.py suites/paper_table.yaml \\
        --store results/paper_table.sqlite --only arch=mlp --threads 1

The ratio is estimate ÷ actual (above 1: the dry run said longer), over the epochs each run
had (an early-stopped run is compared on the epochs it ran). The calibrated column is what the
dry run says once other cells are stored: the timed figure × the factor of
harness.estimate.factor over the *other* cells' median recorded ÷ timed epoch (after the
first, at these --threads; a busy machine's figure by the other busy-timed cells only), so no
cell is calibrated by its own runs. With --only, only the
selected cells calibrate each other (a dry run uses the whole suite's). Its timings are cached
as a dry run's are, so a later dry run can calibrate by the cells timed here. The runs' time depends on
what else the machine ran beside them, the timed steps' on the load while they were timed: run
it on a quiet machine, at the `--threads` the runs had, and read the total, not single cells.
The store (or runs.jsonl) is only read.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.api import UserError, device_kind  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", help="the suite's YAML file")
    parser.add_argument("--store", help="its store or runs.jsonl (default: the suite's store)")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V[,V]",
                        help="as for bench.py run (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    parser.add_argument("--data-dir", default=None,
                        help="the data folder (default: $BENCH_DATA_DIR or data/)")
    parser.add_argument("--device", default="cpu",
                        help="the device the runs had, as in their keys (default cpu)")
    parser.add_argument("--plugins", action="append", default=[], metavar="DIR",
                        help="extra plugin folder, as for bench.py (repeatable)")
    parser.add_argument("--no-timing", action="store_true",
                        help="use cached step timings only; time nothing")
    args = parser.parse_args()
    try:
        return _report(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _report(args) -> int:
    from tabulate import tabulate

    from harness import estimate, registry
    from harness import suite as suite_mod
    from harness.cli import _only
    from harness.data import default_data_dir
    from harness.store import frames, open_results
    registry.discover(args.plugins)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    suite = suite_mod.load(args.suite, device=args.device, data_dir=data_dir)
    path = Path(args.store) if args.store else Path(suite.store_path)
    if not path.exists():
        raise UserError(f"{path}: no such store or runs.jsonl")
    specs = {s.key(): s for s in (_only(suite, args.only) if args.only else suite.specs)}
    with open_results(path) as store:
        found = frames(store, keys=list(specs))
    runs, epochs = found.runs[found.runs["status"] == "ok"], found.epochs
    seconds = (epochs["train_time_s"].fillna(0) + epochs["eval_time_s"].fillna(0)) \
        .groupby(epochs["run_key"]).sum() if len(epochs) else {}
    counted = epochs.groupby("run_key")["epoch"].count() if len(epochs) else {}
    runs = runs[[key in counted and seconds[key] > 0 for key in runs["key"]]]
    if runs.empty:
        raise UserError(f"{path}: no finished {args.device} run of the suite with its epochs"
                        f"{' matches --only' if args.only else ''} (runs made on another "
                        "device: give its --device)")
    cells: dict[tuple, list[str]] = {}
    for key, label, task, arch in zip(runs["key"], runs["label"], runs["task_label"],
                                      runs["arch"]):
        cells.setdefault((label, task, arch), []).append(key)
    # as a dry run with nothing of these cells stored: timed steps (or their cached figure)
    ahead = estimate.estimate([specs[k] for k in runs["key"]], Path("/nonexistent.sqlite"),
                              str(data_dir), args.threads, measure=not args.no_timing,
                              log=lambda m: print(m, file=sys.stderr))
    known: dict[tuple, tuple[float, float, bool]] = {}   # cell → (estimate, actual, busy)
    medians: dict[tuple, tuple[float, Optional[float]]] = {}
    for cell, keys in cells.items():
        # per epoch the run had (an early-stopped run had fewer than the spec's)
        pairs = [(ahead[k].epoch_s * int(counted[k]), float(seconds[k])) for k in keys
                 if ahead[k].epoch_s is not None and ahead[k].epoch_s > 0]
        medians[cell] = (statistics.median(float(seconds[k]) for k in keys) / 60,
                         statistics.median(g for g, _ in pairs) / 60 if pairs else None)
        if pairs:
            known[cell] = (sum(g for g, _ in pairs), sum(a for _, a in pairs),
                           any(ahead[k].busy for k in keys))
    # the calibration's ratios as the dry run takes them (harness.estimate.calibration_pairs):
    # each cell's median recorded epoch after the first, at these threads and device kind, of
    # its ok and diverged runs, ÷ its quiet timed epoch
    finished = found.runs[found.runs["status"].isin(["ok", "diverged"])
                          & (found.runs["threads"] == args.threads)
                          & (found.runs["device"].fillna("cpu").map(device_kind)
                             == device_kind(args.device))]
    after_first = epochs[~epochs["warmup"].astype(bool)] if len(epochs) else epochs
    per_run = {key: list(group) for key, group in
               (after_first["train_time_s"].fillna(0) + after_first["eval_time_s"].fillna(0))
               .groupby(after_first["run_key"])} if len(after_first) else {}
    recorded = estimate.cell_medians(
        ((label, task, arch), per_run.get(key, [])) for key, label, task, arch in zip(
            finished["key"], finished["label"], finished["task_label"], finished["arch"]))
    ratios: dict[bool, dict] = {False: {}, True: {}}     # by whether the timing was busy
    for cell, keys in cells.items():
        timed = next((ahead[k].epoch_s for k in keys if ahead[k].epoch_s), None)
        if cell in recorded and cell in known and timed:
            ratios[known[cell][2]][cell] = (cell[2], recorded[cell] / timed)
    counts = {"calibrated": 0, "busy": 0, "too few others": 0}
    rows, totals = [], [0.0, 0.0, 0.0]            # estimate, calibrated, actual
    for cell, keys in sorted(cells.items()):
        row = [cell[0], f"{cell[1]}/{cell[2]}", len(keys), *medians[cell]]
        if cell not in known:
            rows.append(row + [None, None])
            continue
        guess, actual, busy = known[cell]
        scale, others, _ = estimate.factor(ratios[busy], cell[2], cell)
        counts["calibrated" if others else "too few others"] += 1
        counts["busy"] += busy
        calibrated = guess * scale
        for i, value in enumerate((guess, calibrated, actual)):
            totals[i] += value
        rows.append(row + [guess / actual, calibrated / actual])
    print(tabulate(rows, ["row", "task/arch", "runs", "actual min/run", "estimate min/run",
                          "estimate ÷ actual", "calibrated ÷ actual"], floatfmt=".2f",
                   missingval="?"))
    guess, calibrated, actual = totals
    if actual:
        for name, value in (("timed steps alone", guess),
                            ("calibrated by the other cells", calibrated)):
            ratio = value / actual
            verdict = "within" if 1 / 1.5 <= ratio <= 1.5 else "outside"
            print(f"{name}: {estimate.human(value)} estimated, {estimate.human(actual)} "
                  f"taken: {ratio:.2f}x ({verdict} a factor of 1.5)")
        print(f"cells: {counts['calibrated']} calibrated by the others, "
              f"{counts['too few others']} with fewer than {estimate.MIN_CELLS} others to "
              f"calibrate them (not scaled); {counts['busy']} timed on a busy machine (those "
              "are calibrated by the other busy-timed cells only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
