"""How far `--dry-run`'s estimate is from the time runs really took: for every cell of a suite
with finished runs in a store, the estimate the dry run gives where nothing of the cell is
stored yet (a few steps timed on this machine, or their cached figure) against the runs' real
time (every epoch's training and evaluation seconds, as the store recorded them), per run.

    python benchmarks/estimate_accuracy.py suites/paper_table.yaml \\
        --store results/paper_table.sqlite --only arch=mlp --threads 1

The ratio is estimate ÷ actual (above 1: the dry run said longer). The runs' time depends on
what else the machine ran beside them, the timed steps' on the load while they were timed: run
it on a quiet machine, at the `--threads` the runs had, and read the total, not single cells.
The store (or runs.jsonl) is only read.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.api import UserError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", help="the suite's YAML file")
    parser.add_argument("--store", help="its store or runs.jsonl (default: the suite's store)")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V[,V]",
                        help="as for bench.py run (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    parser.add_argument("--data-dir", default="data", help="the data folder (default data)")
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
    from harness.store import frames, open_results
    registry.discover()
    suite = suite_mod.load(args.suite)
    path = Path(args.store) if args.store else Path(suite.store_path)
    if not path.exists():
        raise UserError(f"{path}: no such store or runs.jsonl")
    specs = {s.key(): s for s in (_only(suite, args.only) if args.only else suite.specs)}
    with open_results(path) as store:
        found = frames(store, keys=list(specs))
    runs = found.runs[found.runs["status"] == "ok"]
    if runs.empty:
        raise UserError(f"{path}: no finished run of the suite{' matches --only' * bool(args.only)}")
    seconds = (found.epochs.assign(s=found.epochs["train_time_s"] + found.epochs["eval_time_s"])
               .groupby("run_key")["s"].sum())
    cells: dict[tuple, list[str]] = {}
    for key, label, task, arch in zip(runs["key"], runs["label"], runs["task_label"],
                                      runs["arch"]):
        cells.setdefault((label, task, arch), []).append(key)
    # as a dry run with nothing of these cells stored: timed steps (or their cached figure)
    ahead = estimate.estimate([specs[k] for k in runs["key"]], Path("/nonexistent.sqlite"),
                              args.data_dir, args.threads, measure=not args.no_timing,
                              log=lambda m: print(m, file=sys.stderr))
    rows, total_est, total_actual = [], 0.0, 0.0
    for (label, task, arch), keys in sorted(cells.items()):
        actual = [float(seconds.get(k, 0.0)) for k in keys]
        guessed = [ahead[k].seconds for k in keys]
        if any(g is None for g in guessed):
            rows.append([label, f"{task}/{arch}", len(keys), statistics.median(actual) / 60,
                         None, None])
            continue
        total_est, total_actual = total_est + sum(guessed), total_actual + sum(actual)
        rows.append([label, f"{task}/{arch}", len(keys), statistics.median(actual) / 60,
                     statistics.median(guessed) / 60, sum(guessed) / sum(actual)])
    print(tabulate(rows, ["row", "task/arch", "runs", "actual min/run", "estimate min/run",
                          "estimate ÷ actual"], floatfmt=".2f", missingval="?"))
    if total_actual:
        ratio = total_est / total_actual
        verdict = "within" if 1 / 1.5 <= ratio <= 1.5 else "outside"
        print(f"\nall cells with an estimate: {estimate.human(total_est)} estimated, "
              f"{estimate.human(total_actual)} taken: {ratio:.2f}x ({verdict} a factor of 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
