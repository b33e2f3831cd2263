"""DLL's time per epoch against BP in the harness, same model, same process, batch 128:
MNIST MLP (bar ≤ 1.35×; DLL's matrix work is about 4/3 of BP's at most) and MNIST CNN
(bar ≤ 1.6×). DLL-FA (Θ frozen) is shown too: the difference is the cost of learning Θ.

    python benchmarks/bench_dll.py [--subset 10000] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

from _timing import interleaved_epoch_times, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for arch, bar in (("mlp", 1.35), ("cnn", 1.6)):
        subset = args.subset if arch == "mlp" else args.subset // 4
        times = interleaved_epoch_times(("bp", "dll", "dll_fa"), arch, repeats=args.repeats,
                                        train_subset=subset, epochs=3, threads=args.threads)
        bp_fast, bp_mid = min(times["bp"]), median(times["bp"])
        print(f"MNIST {arch.upper()}, {subset} images, batch 128, {args.threads} threads")
        for name, values in times.items():
            print(f"  {name:<7} fastest {min(values):.3f} s/epoch ({min(values) / bp_fast:.2f}× BP), "
                  f"median {median(values):.3f} ({median(values) / bp_mid:.2f}× BP)")
        print(f"  bar: dll <= {bar}× BP")


if __name__ == "__main__":
    main()
