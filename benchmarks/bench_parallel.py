"""Parallel throughput: the same four small runs with --jobs 1 and --jobs 2, through the real
dispatcher (loky workers, threads capped at cores // jobs), wall-clock including worker start.

Small runs (a 784-64-10 MLP at batch 16, ~8 s each) are where process parallelism pays: their
operations are too small for torch's intra-op threads to use two cores, so --jobs 1 leaves one
idle. For large matrix products two threads already share the work and --jobs buys less:
measured here 1.50 for a 784-128-10 MLP at batch 32 (two threads ran it 1.3x faster than one),
1.11 for 2-s runs (each worker pays torch's import once, about 3 s).

    python benchmarks/bench_parallel.py [--subset 20000] [--epochs 12]

Prints runs per minute for each and the ratio jobs2 / jobs1 (bar: ≥ 1.7 on 2 cores).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _timing  # noqa: F401  (puts the project on sys.path)
from harness import parallel
from harness.data import default_data_dir
from harness.registry import discover
from harness.suite import load

SUITE = """
name: parallel_bench
seeds: 4
epochs: {epochs}
batch_size: 16
tasks:
  mnist:
    archs: {{small: {{layers: [flatten, {{dense: 64}}, {{dense: {{units: 10, act: linear}}}}]}}}}
    params: {{train_subset: {subset}, test_subset: 1000}}
algorithms:
  bp: {{lr: 1.0e-3}}
"""


def wall(jobs: int, suite_path: Path, store: Path) -> float:
    suite = load(suite_path, device="cpu", store=str(store))
    start = time.perf_counter()
    summary = parallel.run(suite.specs, suite.store_path, jobs=jobs, data_dir=default_data_dir(),
                           progress=False, suite_name=suite.name, log=lambda m: None)
    elapsed = time.perf_counter() - start
    assert summary.counts["ok"] == 4, summary.counts
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    discover()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "parallel_bench.yaml"
        path.write_text(SUITE.format(subset=args.subset, epochs=args.epochs))
        one = wall(1, path, Path(tmp) / "one.sqlite")
        two = wall(2, path, Path(tmp) / "two.sqlite")
    print(f"four small BP runs (784-64-10 MLP, {args.subset} MNIST images, {args.epochs} "
          f"epochs, batch 16)")
    print(f"  --jobs 1: {one:.1f} s  ({4 / one * 60:.1f} runs/min)")
    print(f"  --jobs 2: {two:.1f} s  ({4 / two * 60:.1f} runs/min)")
    print(f"  throughput ratio jobs2/jobs1 = {one / two:.2f}  (bar: >= 1.7)")


if __name__ == "__main__":
    main()
