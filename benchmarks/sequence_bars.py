"""The sequence suite's bars from its store: every metric of the test split at the epoch the
clean protocol selects (best validation primary metric), beside the baselines the tasks record
(most-frequent-character accuracy; persistence MSE), mean ± std over seeds.

    python benchmarks/sequence_bars.py reports/sequences/runs.jsonl > reports/sequences/bars.md

(a store works too: results/sequences.sqlite, the default).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.api import UserError  # noqa: E402
from harness.exchange import without_machine_paths  # noqa: E402
from harness.store import open_results  # noqa: E402

BARS = {  # task label -> (description, check(metrics) -> bool)
    "chars": ("accuracy > baseline_accuracy + 10 points and bpc < 3.0",
              lambda m: m["accuracy"] > m["baseline_accuracy"] + 10 and m["bpc"] < 3.0),
    "forecast": ("test mse < persistence_mse", lambda m: m["mse"] < m["persistence_mse"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default="results/sequences.sqlite",
                        help="the sequences suite's store or its runs.jsonl")
    path = parser.parse_args().results
    if not Path(path).exists():
        sys.exit(f"error: {path}: no such store or runs.jsonl")
    try:
        db = open_results(path)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    groups = defaultdict(list)
    skipped = []
    task_params = {}
    for key, label, task, task_label, arch, seed, protocol, status, reason, tparams in db.query(
            "select key, label, task, task_label, arch, seed, protocol, status, reason, "
            "task_params from runs"):
        if status != "ok":
            skipped.append((label, task_label, arch, seed, status,
                            without_machine_paths(reason)))
            continue
        epochs = [(e, json.loads(m)) for e, m in db.query(
            "select epoch, metrics from epochs where run_key=? order by epoch", (key,))]
        primary, sign = ("accuracy", 1) if task == "chars" else ("mse", -1)
        watch = "val" if protocol == "clean" and epochs[0][1].get("val") else "test"
        epoch, best = max(epochs, key=lambda em: (sign * em[1][watch][primary], -em[0]))
        groups[(label, task, task_label, arch, protocol)].append((seed, epoch, best["test"]))
        task_params[(label, task, task_label, arch, protocol)] = tparams
    print(f"# Sequence bars (from `{without_machine_paths(path)}`)\n")
    print("Test metrics at the epoch selected on validation (clean protocol; paper protocol: "
          "best test epoch), mean ± std over seeds.\n")
    for (label, task, task_label, arch, protocol), runs in sorted(groups.items()):
        names = sorted(runs[0][2])
        print(f"## {label} on {task_label}/{arch} ({protocol}; {len(runs)} seed(s), selected "
              f"epochs {[r[1] for r in runs]})\n")
        print(f"Task params: `{task_params[(label, task, task_label, arch, protocol)]}`\n")
        print("| metric | test |\n|---|---|")
        mean = {}
        for name in names:
            vals = [r[2][name] for r in runs]
            mean[name] = statistics.mean(vals)
            sd = f" ± {statistics.stdev(vals):.4g}" if len(vals) > 1 else ""
            print(f"| {name} | {mean[name]:.4g}{sd} |")
        desc, check = BARS[task]
        try:
            verdict = "met" if check(mean) else "NOT met"
        except KeyError:
            verdict = "cannot tell"
        role = " (ablation row: a comparison, not the bar's row)" if "_ablation" in task_label else ""
        print(f"\nBar ({desc}): **{verdict}**{role}\n")
    if skipped:
        print("## Not run\n\n| row | task | arch | seed | status | reason |\n|---|---|---|---|---|---|")
        for row in skipped:
            print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
