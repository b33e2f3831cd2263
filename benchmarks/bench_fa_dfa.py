"""FA and DFA against BP: training seconds per epoch of the MNIST MLP (784-1024-512-256-10,
batch 128, Adam), each timed by the harness's own clock, in the same process, interleaved.

    python benchmarks/bench_fa_dfa.py [--subset 20000] [--repeats 3] [--threads 2] [--arch mlp]

Prints the median seconds per epoch of each and the ratios FA/BP and DFA/BP (bar: ≤ 1.1).
Runs on real MNIST when prepared, else on random tensors of its shape (same time).
"""
from __future__ import annotations

import argparse

from _timing import interleaved_epoch_times, median

BAR = 1.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per repeat; the first is warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    names = ("bp", "fa", "dfa")
    times = interleaved_epoch_times(names, args.arch, repeats=args.repeats,
                                    train_subset=args.subset, epochs=args.epochs,
                                    threads=args.threads, device=args.device)
    bp = median(times["bp"])
    print(f"MNIST {args.arch.upper()} epoch of {args.subset} images, batch 128, Adam, "
          f"{args.threads} threads, {args.device}")
    for name in names:
        print(f"  {name:<4} {median(times[name]):.3f} s/epoch (median of {len(times[name])})")
    for name in names[1:]:
        ratio = median(times[name]) / bp
        verdict = "ok" if ratio <= BAR else "OVER"
        print(f"  ratio {name}/bp = {ratio:.3f}  (bar: <= {BAR}) {verdict}")


if __name__ == "__main__":
    main()
