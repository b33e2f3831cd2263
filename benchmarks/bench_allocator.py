"""The run processes' allocator setting (harness/allocator.py) against glibc as it comes.

The setting is process-wide and cannot be undone in a process, so the two sides cannot share
one: this script runs ``bench_roofline.py --json`` alternately with ``BENCH_MALLOC=default``
(glibc's own thresholds) and without it (freed memory kept), ``--rounds`` times each, and
prints for every (arch, rule) the fastest training epoch of each side, their ratio, and each
side's fraction of the matmul peak that its own process measured. Alternating rounds spreads
whatever else the machine does over both sides; run it on a quiet machine all the same.

    python benchmarks/bench_allocator.py --archs fmnist_cnn,mnist_mlp --algorithms bp,dll,pc
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

HERE = Path(__file__).resolve().parent


def one_round(default: bool, args) -> list[dict]:
    env = dict(os.environ)
    if default:
        env["BENCH_MALLOC"] = "default"
    else:
        env.pop("BENCH_MALLOC", None)
    command = [sys.executable, str(HERE / "bench_roofline.py"), "--json", "--threads",
               str(args.threads), "--archs", args.archs, "--algorithms", args.algorithms,
               "--repeats", str(args.repeats), "--scale", str(args.scale)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench_roofline.py failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="fmnist_cnn,mnist_cnn,mnist_mlp")
    parser.add_argument("--algorithms", default="bp,fa,dfa,dll,pc,dtp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    parser.add_argument("--repeats", type=int, default=2, help="bench_roofline's --repeats")
    parser.add_argument("--scale", type=float, default=1.0, help="bench_roofline's --scale")
    args = parser.parse_args()
    started = time.perf_counter()
    best: dict[tuple, dict] = {}
    for round_ in range(args.rounds):
        for default in (True, False):
            side = "glibc default" if default else "kept"
            print(f"round {round_ + 1}/{args.rounds}: {side}…", file=sys.stderr, flush=True)
            for row in one_round(default, args):
                key = (row["arch"], row["algorithm"], side)
                if key not in best or row["epoch_s"] < best[key]["epoch_s"]:
                    best[key] = row
    table = []
    for arch, rule in sorted({(a, r) for a, r, _ in best}):
        before, after = best.get((arch, rule, "glibc default")), best.get((arch, rule, "kept"))
        if not before or not after:
            continue
        table.append([arch, rule, f"{before['epoch_s']:.3f}", f"{after['epoch_s']:.3f}",
                      f"{after['epoch_s'] / before['epoch_s']:.2f}",
                      f"{before['peak_fraction']:.2f}", f"{after['peak_fraction']:.2f}",
                      "" if before["vs_bp"] is None else f"{before['vs_bp']:.2f}",
                      "" if after["vs_bp"] is None else f"{after['vs_bp']:.2f}"])
    print(f"Allocator: training epochs (fastest of {args.rounds} rounds × {args.repeats} "
          f"repeats per side, {args.threads} threads), glibc's default thresholds against "
          f"freed memory kept (harness/allocator.py); peak fractions against each process's "
          f"own matmul peak")
    print(tabulate(table, headers=["arch", "rule", "default_s", "kept_s", "kept/default",
                                   "peak_default", "peak_kept", "vs_bp_default", "vs_bp_kept"],
                   tablefmt="github"))
    print(f"wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
